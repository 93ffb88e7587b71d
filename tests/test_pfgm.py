"""PFGM++ (arXiv:2302.04265) against exact answers: the prior's radius law (KS test against the Beta construction),
D -> inf is EDM (trajectories to 1e-5 at D = 1e8), the point-cloud reference's exact ODE (every deterministic solver
keeps its order at D = 128 and 2048), the training kernel, and clear errors."""
import inspect

import numpy as np
import pytest
import torch
from scipy import stats

import diffsolve as ds
from diffsolve.processes import PFGMpp
from diffsolve.reference import PointCloud
from diffsolve.training import TrainConfig, training_pair

DT = torch.float64
N = 8
POINTS = 0.7 * torch.randn(24, N, generator=torch.Generator().manual_seed(3), dtype=DT)
DETERMINISTIC = [s.name for s in ds.solvers() if not s.stochastic and not s.requires]
STOCHASTIC = [s.name for s in ds.solvers() if s.stochastic]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ----------------------------------------------------------------------------------------
# the prior and the kernel
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [1.0, 128.0, 2048.0])
@pytest.mark.parametrize("dim", [8, 64])
def test_prior_radius_passes_a_ks_test_against_the_beta_construction(D, dim):
    """R = r_max sqrt(s/(1-s)), s ~ Beta(N/2, D/2): the prior's radii against that law's CDF, and against radii drawn
    by the construction itself (two-sample); directions are the noise's (uniform)."""
    proc = PFGMpp(D)
    z = randn(3000, dim, seed=int(D) + dim)
    x = proc.prior_from_noise(z)
    r = x.norm(dim=1).numpy()
    r_max = proc.sigma_max * np.sqrt(D)
    cdf = lambda rho: stats.beta.cdf(rho**2 / (rho**2 + r_max**2), dim / 2, D / 2)
    assert stats.kstest(r, cdf).pvalue > 0.01
    s = np.random.default_rng(0).beta(dim / 2, D / 2, size=3000)
    assert stats.ks_2samp(r, r_max * np.sqrt(s / (1 - s))).pvalue > 0.01
    assert torch.allclose(x / x.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True), atol=1e-12)
    # per-sample: a row's start does not depend on the batch it is drawn in
    assert torch.equal(proc.prior_from_noise(z[5:6]), x[5:6])


def test_large_D_is_edm_and_the_training_kernel_is_the_prior_kernel():
    z = randn(64, N, seed=1)
    edm = ds.EDM()
    assert float(((PFGMpp(1e8).prior_from_noise(z) - edm.prior_from_noise(z)) / 80).abs().max()) < 1e-6
    proc = PFGMpp(128)
    x0, t = randn(64, N, seed=2), torch.full((64,), 3.0, dtype=DT)
    # x_t = x0 + sigma * perturbation(z), in the process's marginal and in training's regression pair
    assert torch.allclose(proc.marginal(x0, z, t), x0 + 3.0 * proc.perturbation(z), atol=1e-12)
    cfg = TrainConfig(process="PFGMpp", process_kwargs={"D": 128}, objective="edm")
    xin, _, target, _ = training_pair(cfg, proc, "log_sigma", x0.float(), z.float(), t)
    c_in = 1 / (9.0 + 0.25) ** 0.5
    assert torch.allclose((xin.double() / c_in - x0) / 3.0, proc.perturbation(z), atol=1e-4)
    # heavy tails: E|perturbation|^2 / N = D / (D - 2), above the Gaussian 1
    big = PFGMpp(8.0).perturbation(randn(20000, N, seed=4))
    assert abs(float(big.pow(2).mean()) - 8 / 6) < 0.05


# ----------------------------------------------------------------------------------------
# the point-cloud reference
# ----------------------------------------------------------------------------------------
def test_point_cloud_posterior_is_the_kernel_weighted_mean():
    """E[y | x] by direct quadrature of the kernel over the points, for the Gaussian and the PFGM++ kernel."""
    x = randn(5, N, seed=5)
    for D in (None, 3.0, 128.0):
        ref = PointCloud(POINTS, D=D)
        s = 0.8
        d2 = ((x[:, None, :] - POINTS[None]) ** 2).sum(-1)
        k = torch.exp(-d2 / (2 * s**2)) if D is None else (d2 + s**2 * D) ** (-(N + D) / 2)
        w = k / k.sum(1, keepdim=True)
        assert torch.allclose(ref.denoise_ve(x, s), w @ POINTS, atol=1e-12)
    # the PFGM++ kernel is a density: its log-normaliser integrates to one (1-D check by quadrature)
    one = PointCloud(torch.zeros(1, 1, dtype=DT), D=5.0)
    u = torch.linspace(-400, 400, 400001, dtype=DT)[:, None]
    assert abs(float(one.log_prob_ve(u, 1.3).exp().sum() * (u[1, 0] - u[0, 0])) - 1) < 1e-4


def _trajectory(den, z, name, nfe):
    states = []
    out = ds.sample(den, z, name, nfe=nfe, final="t_min", callback=lambda d: states.append(d["x"].clone()))
    return out, states


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_D_1e8_trajectories_equal_edm(name):
    z = randn(6, N, seed=6)
    proc = PFGMpp(1e8)
    a, sa = _trajectory(PointCloud.for_process(POINTS, proc).denoiser(proc, "x0"), z, name, 12)
    b, sb = _trajectory(PointCloud(POINTS).denoiser(ds.EDM(), "x0"), z, name, 12)
    assert len(sa) == len(sb) > 3
    for u, v in zip(sa, sb):
        assert float((u - v).norm() / v.norm()) <= 1e-5


def test_D_1e8_exact_ode_equals_edm():
    z = randn(4, N, seed=7)
    proc = PFGMpp(1e8)
    a = PointCloud.for_process(POINTS, proc).ode_solution(proc, proc.prior_from_noise(z), 80.0, 0.002)
    b = PointCloud(POINTS).ode_solution(ds.EDM(), ds.EDM().prior_from_noise(z), 80.0, 0.002)
    assert float((a - b).norm() / b.norm()) <= 1e-5


SMOOTH = dict(sigma_min=0.05)  # the point masses make the ODE stiff as sigma -> 0: stop where it is smooth


@pytest.fixture(scope="module", params=[128.0, 2048.0], ids=["D128", "D2048"])
def pfgm_case(request):
    proc = PFGMpp(request.param, **SMOOTH)
    ref = PointCloud.for_process(POINTS, proc)
    z = randn(4, N, seed=8)
    target = ref.ode_solution(proc, proc.prior_from_noise(z), proc.t_max, proc.t_min, rtol=1e-12)
    return proc, ref, z, target


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_solver_keeps_its_order(name, pfgm_case):
    proc, ref, z, target = pfgm_case
    info = ds.get_solver(name)
    base = [64, 128, 256] if info.order >= 4 else [96, 192, 384]
    if info.singlestep_order:
        base = [info.singlestep_order * round(n / info.singlestep_order) for n in base]
    opts = {"lower_order_final": False} if "lower_order_final" in inspect.signature(info.fn).parameters else {}
    den = ref.denoiser(proc, "x0")
    nfes, errs = [], []
    for n in base:
        x, run = ds.sample(den, z, name, nfe=n, final="t_min", return_info=True, **opts)
        nfes.append(run.nfe)
        errs.append(float((x - target).abs().max()))
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope - info.order) <= 0.35, f"{name} at D={proc.D:g}: slope {slope:.2f}, errors {errs}"


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [0, -3, float("inf"), float("nan"), "128"])
def test_bad_D_is_a_clear_error(D):
    with pytest.raises(ValueError, match="D > 0"):
        PFGMpp(D)


def test_training_refuses_bad_D(capsys, tmp_path):
    from diffsolve.training.train import main

    assert main(["--process", "PFGMpp", "--process-kwargs", '{"D": 0}', "--out", str(tmp_path)]) == 2
    assert "D > 0" in capsys.readouterr().err


def test_sde_solvers_and_gaussian_references_refuse_pfgm():
    proc = PFGMpp(128)
    den = PointCloud.for_process(POINTS, proc).denoiser(proc, "x0")
    for name in STOCHASTIC:
        with pytest.raises(ValueError, match="gaussian"):
            ds.sample(den, randn(2, N), name, nfe=6, seeds=[0, 1])
    with pytest.raises(ValueError, match="Gaussian kernels only"):
        ds.GaussianMixture.random(dim=N).posterior(randn(2, N), proc, 1.0)
    with pytest.raises(ValueError, match="kernel"):
        PointCloud(POINTS).posterior(randn(2, N), proc, 1.0)
    with pytest.raises(ValueError, match="D=128"):
        PointCloud(POINTS, D=128.0).posterior(randn(2, N), ds.EDM(), 1.0)


# ----------------------------------------------------------------------------------------
# the shipped PFGM++ digits model
# ----------------------------------------------------------------------------------------
def test_shipped_pfgm_model_samples_with_every_ve_solver():
    """ds.load('digits-pfgmpp') is PFGM++ with D = 128; every deterministic solver samples it at 20 NFE within RMSE 0.1
    of its converged reference (dpm++3m, 100 NFE, Karras) from the same heavy-tailed start, and the SDE solvers refuse it."""
    den = ds.load("digits-pfgmpp")
    assert isinstance(den.process, PFGMpp) and den.process.D == 128 and den.sample_shape == (1, 8, 8)
    z = randn(8, 1, 8, 8, seed=9)
    ref = ds.sample(den, z, "dpm++3m", nfe=100, spacing="karras")
    assert float(ref.abs().max()) < 3  # digits in [-1, 1], not the prior's heavy tails
    for name in DETERMINISTIC:
        x = ds.sample(den, z, name, nfe=20)
        assert float((x - ref).pow(2).mean().sqrt()) < 0.1, name
    for name in STOCHASTIC:
        with pytest.raises(ValueError, match="gaussian"):
            ds.sample(den, z, name, nfe=6, seeds=list(range(8)))
