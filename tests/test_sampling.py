import math

import pytest
import torch
from conftest import randn

import diffsolve as ds

DT = torch.float64
REF = ds.GaussianMixture.random(dim=4, n_components=3, seed=2, delta=0.2)
VP = ds.VPDiscrete.linear(1000)


def mixture_moments(ref):
    w = ref.log_weights.exp()
    mean = (w[:, None] * ref.means).sum(0)
    cov = torch.zeros(ref.dim, ref.dim, dtype=DT)
    for k in range(ref.n_components):
        ck = ref.bases[k] @ torch.diag(ref.scales[k] ** 2) @ ref.bases[k].T + ref.delta**2 * torch.eye(ref.dim, dtype=DT)
        dm = ref.means[k] - mean
        cov += w[k] * (ck + torch.outer(dm, dm))
    return mean, cov


@pytest.mark.parametrize("name,opts,proc", [
    ("ddpm", {}, VP), ("dpm++2m-sde", {}, VP), ("ddim", {"eta": 0.5}, VP),
    ("euler-maruyama", {}, ds.VPContinuous.linear()), ("euler-maruyama", {}, ds.EDM()),
])
def test_stochastic_solvers_match_moments(name, opts, proc):
    n = 6000
    den = REF.denoiser(proc, "epsilon")
    x = ds.sample(den, randn(n, 4, seed=11), name, nfe=250, seeds=range(n), **opts)
    mean, cov = mixture_moments(REF)
    sd = torch.sqrt(torch.diag(cov))
    assert torch.all((x.mean(0) - mean).abs() < 4.5 * sd / math.sqrt(n)), (x.mean(0), mean)
    # variance: se of a sample variance ~ var * sqrt(2/n) for near-Gaussian marginals; allow for kurtosis
    assert torch.all((x.var(0) - torch.diag(cov)).abs() < 6 * torch.diag(cov) * math.sqrt(2 / n) + 1e-3)


@pytest.mark.parametrize("name", ["ddpm", "dpm++2m-sde", "euler-maruyama"])
def test_seeds_make_samples_batch_size_independent(name):
    den = REF.denoiser(VP, "epsilon")
    noise = randn(6, 4, seed=3)
    full = ds.sample(den, noise, name, nfe=8, seeds=[10, 11, 12, 13, 14, 15])
    part = ds.sample(den, noise[2:4], name, nfe=8, seeds=[12, 13])
    assert torch.equal(full[2:4], part)
    other = ds.sample(den, noise[2:4], name, nfe=8, seeds=[99, 13])
    assert not torch.equal(other[0], part[0]) and torch.equal(other[1], part[1])


def test_deterministic_samples_are_batch_independent():
    den = REF.denoiser(VP, "epsilon")
    noise = randn(5, 4)
    full = ds.sample(den, noise, "unipc-bh2", nfe=7)
    assert torch.allclose(full[1:3], ds.sample(den, noise[1:3], "unipc-bh2", nfe=7), atol=1e-12)


@pytest.mark.parametrize("info", [s for s in ds.solvers() if not s.requires], ids=lambda s: s.name)
@pytest.mark.parametrize("final", ["denoise", "t_min"])
def test_nfe_budget_is_respected_and_reported(info, final):
    for nfe in (5, 6, 8, 10):
        den = REF.denoiser(VP, "epsilon")
        _, run = ds.sample(den, randn(2, 4), info.name, nfe=nfe, final=final, seeds=[0, 1], return_info=True)
        assert run.nfe == den.nfe <= nfe
        assert run.nfe >= nfe - 2  # the budget is used (up to a Heun/PNDM remainder)
        assert run.ends_clean == (final == "denoise")


def test_singlestep_budget_split():
    from diffsolve.solvers.dpm_solver import singlestep_orders
    assert singlestep_orders(10, 3, clean_end=True) == [3, 3, 3, 1]
    assert singlestep_orders(8, 3, clean_end=True) == [3, 3, 1, 1]
    assert singlestep_orders(7, 2, clean_end=False) == [2, 2, 2, 1]


def test_explicit_grids_and_callback():
    den = REF.denoiser(VP, "epsilon")
    seen = []
    grid = ds.explicit(VP, t=[999, 700, 400, 100, 0], final="t_min")
    x, run = ds.sample(den, randn(2, 4), "dpm++2m", grid=grid, nfe=None, return_info=True, callback=seen.append)
    assert run.nfe == 4 and len(seen) == 4 and seen[-1]["t"] == 0.0
    g2 = ds.explicit(VP, sigmas=[float(VP.sigma_ve(torch.tensor(999.0))), 1.0, 0.1, 0])
    assert g2.clean_end and g2.steps == 3
    with pytest.raises(ValueError, match="more than nfe"):
        ds.sample(den, randn(2, 4), "heun", grid=grid, nfe=4)


def test_cfg_through_sample():
    den = ds.ClassifierFreeGuidance(ds.Denoiser(lambda x, t, y=None: 0.1 * x + y[:, None].to(x.dtype), VP, "epsilon"),
                                    2.0, {"y": torch.zeros(1)})
    x = ds.sample(den, randn(3, 4), "ddim", nfe=5, model_kwargs={"y": torch.ones(3)})
    assert torch.isfinite(x).all() and den.nfe == 5


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def test_unknown_solver_lists_valid_names():
    den = REF.denoiser(VP)
    with pytest.raises(ValueError) as e:
        ds.sample(den, randn(2, 4), "dpm++9m", nfe=10)
    for name in ("ddim", "dpm++2m", "unipc-bh2", "euler-maruyama"):
        assert name in str(e.value)


@pytest.mark.parametrize("nfe", [0, -3])
def test_nfe_below_minimum(nfe):
    with pytest.raises(ValueError, match="nfe"):
        ds.sample(REF.denoiser(VP), randn(2, 4), "dpm++2m", nfe=nfe)


def test_heun_needs_two_nfe_without_jump():
    with pytest.raises(ValueError, match="needs nfe >= 2"):
        ds.sample(REF.denoiser(VP), randn(2, 4), "heun", nfe=1, final="t_min")


@pytest.mark.parametrize("nfe", [2.5, "10", True])
def test_nfe_must_be_int(nfe):
    with pytest.raises(ValueError):
        ds.sample(REF.denoiser(VP), randn(2, 4), "ddim", nfe=nfe)


@pytest.mark.parametrize("t,msg", [([999, 500, 600, 0], "decreasing"), ([1200, 500, 0], "range"),
                                   ([999, -5], "range"), ([999, float("nan"), 0], "NaN")])
def test_bad_grids(t, msg):
    with pytest.raises(ValueError, match=msg):
        ds.sample(REF.denoiser(VP), randn(2, 4), "ddim", grid=t, nfe=None)


def test_bad_noise_and_options():
    den = REF.denoiser(VP)
    with pytest.raises(ValueError, match="noise"):
        ds.sample(den, torch.tensor(1.0), "ddim", nfe=5)
    with pytest.raises(ValueError, match="NaN"):
        ds.sample(den, torch.full((2, 4), float("nan")), "ddim", nfe=5)
    with pytest.raises(ValueError, match="no option"):
        ds.sample(den, randn(2, 4), "ddim", nfe=5, order=3)
    with pytest.raises(ValueError, match="spacing"):
        ds.sample(den, randn(2, 4), "ddim", nfe=5, spacing="fibonacci")
    with pytest.raises(ValueError, match="final"):
        ds.sample(den, randn(2, 4), "ddim", nfe=5, final="zero")
    with pytest.raises(ValueError, match="seeds"):
        ds.sample(den, randn(2, 4), "ddpm", nfe=5, seeds=[1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        ds.sample(ds.Denoiser(lambda x, t: x[:, :3], VP), randn(2, 4), "ddim", nfe=5)


def test_non_finite_network_output_names_step_and_time():
    calls = {"n": 0}

    def net(x, t):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 3 else 0.1 * x

    with pytest.raises(ds.SamplingError, match=r"step 2: .*t=") as e:
        ds.sample(ds.Denoiser(net, VP), randn(2, 4), "dpm++2m", nfe=5)
    assert "not finite" in str(e.value)


def test_diverging_state_is_reported():
    net = lambda x, t: x * 1e200  # finite outputs, exploding state
    with pytest.raises(ds.SamplingError, match="non-finite"):
        ds.sample(ds.Denoiser(net, VP, dtype=DT, check_finite=False), randn(2, 4), "dpm++3m", nfe=6)
