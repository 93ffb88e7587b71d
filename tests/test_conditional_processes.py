"""Conditional affine processes x_t = a x0 + b y + c eps (IR-SDE mean reverting, RDDM, ResShift) against exact answers:
the MR Sampler written here from its paper's equations (arXiv:2502.07856), the DDPM <-> RDDM coefficient
conversion, output conversions, and convergence orders against the shifted mixture's exact ODE."""
import inspect
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.processes import RDDM, MeanReverting, ResShift, VPDiscrete
from diffsolve.solvers.state import Noise
from diffsolve.training import TrainConfig
from diffsolve.util import seeding

DT = torch.float64
REF = ds.GaussianMixture.random(dim=8, n_components=3, seed=1, delta=0.3)
MR = MeanReverting(T=100, max_sigma=0.5, eps=0.01)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


MU = 0.8 * randn(6, 8, seed=1)
Z = randn(6, 8, seed=2)


# ----------------------------------------------------------------------------------------
# the MR Sampler, from the paper's update equations (original frame, with the mu terms)
# ----------------------------------------------------------------------------------------
def mr_sampler(x, mu, grid, predict, order, param, sde=False, seeds=None):
    """MR Sampler on the grid's points 0..M (alpha_i = e^{-thetabar}, sigma_i, lambda_i = log(alpha/sigma)): a buffer
    of data (x0) or noise predictions, orders 1-3 (ODE) or 1-2 (SDE), the first steps at lower order."""
    a, s, lam = (grid.alpha.tolist(), grid.sigma.tolist(), grid.lam.tolist())
    rng = Noise(seeding.solver_generators(seeds)) if sde else None
    q = []  # newest first
    for i in range(1, len(a)):
        q.insert(0, predict(x, float(grid.t[i - 1]), param))
        k = min(order, i)
        h = lam[i] - lam[i - 1]
        d1 = d2 = None
        if k >= 2:
            r = (lam[i - 1] - lam[i - 2]) / h
            d1 = (q[0] - q[1]) / r
        if k == 3:
            r1 = (lam[i - 2] - lam[i - 3]) / h
            d10, d11 = (q[0] - q[1]) / r, (q[1] - q[2]) / r1
            d1 = d10 + (d10 - d11) * r / (r + r1)
            d2 = (d10 - d11) / (r + r1)
        if not sde and param == "data":
            p1 = math.expm1(-h)
            p2 = p1 / h + 1
            p3 = p2 / h - 0.5
            D = p1 * q[0] - (p2 * d1 if k >= 2 else 0) + (p3 * d2 if k == 3 else 0)
            x = s[i] / s[i - 1] * x - a[i] * D + mu * (1 - s[i] / s[i - 1] + s[i] / s[i - 1] * a[i - 1] - a[i])
        elif not sde:
            p1 = math.expm1(h)
            p2 = p1 / h - 1
            p3 = p2 / h - 0.5
            D = p1 * q[0] + (p2 * d1 if k >= 2 else 0) + (p3 * d2 if k == 3 else 0)
            x = a[i] / a[i - 1] * x - s[i] * D + mu * (1 - a[i] / a[i - 1])
        elif param == "data":
            p1 = -math.expm1(-2 * h)
            p2 = 1 - p1 / (2 * h)
            z = rng.like(x)
            x = (s[i] / s[i - 1] * math.exp(-h) * x + a[i] * p1 * q[0] + (a[i] * p2 * d1 if k >= 2 else 0)
                 + s[i] * math.sqrt(p1) * z + mu * (1 - a[i] / a[i - 1] * math.exp(-2 * h) - a[i] * p1))
        else:
            p1 = math.expm1(h)
            p2 = p1 / h - 1
            z = rng.like(x)
            x = (a[i] / a[i - 1] * x - 2 * s[i] * p1 * q[0] - (2 * s[i] * p2 * d1 if k >= 2 else 0)
                 + s[i] * math.sqrt(math.expm1(2 * h)) * z + mu * (1 - a[i] / a[i - 1]))
    return x


def predict(x, t, param):
    x0, eps = REF.posterior(x, MR, t, y=MU)
    return x0 if param == "data" else eps


# our solver (registry name, options) for each MR Sampler configuration
OURS = {("data", 1, False): ("dpm++2m", {"order": 1}),
        ("data", 2, False): ("dpm++2m", {"taylor2": True}),
        ("data", 3, False): ("dpm++3m", {"taylor2": True, "taylor3": False}),
        ("noise", 1, False): ("dpm-solver-2m", {"order": 1}),
        ("noise", 2, False): ("dpm-solver-2m", {"taylor2": True}),
        ("noise", 3, False): ("dpm-solver-3m", {"taylor2": True, "taylor3": False}),
        ("data", 1, True): ("dpm++2m-sde", {"order": 1}),
        ("data", 2, True): ("dpm++2m-sde", {"taylor2": True}),
        ("noise", 1, True): ("dpm++2m-sde", {"order": 1, "form": "noise"}),
        ("noise", 2, True): ("dpm++2m-sde", {"form": "noise", "taylor2": True})}


@pytest.mark.parametrize("param, order, sde", list(OURS))
def test_mr_sampler_is_dpm_solver_in_the_standard_frame(param, order, sde):
    """The MR Sampler's update (noise and data parameterisation, orders 1-3, ODE and SDE) equals our DPM-Solver(++)
    multistep run on the process minus b(t) mu, to <= 1e-6 (float64: ~1e-13)."""
    name, opts = OURS[(param, order, sde)]
    den = REF.denoiser(MR, "x0" if param == "data" else "epsilon")
    grid = ds.make_grid(MR, 12, "logsnr", final="t_min")
    seeds = list(range(10, 16))
    ours = ds.sample(den, Z, name, grid=grid, model_kwargs={"mu": MU}, lower_order_final=False,
                     seeds=seeds if sde else None, **opts)
    x_T = MU + MR.prior_scale * Z  # the IR-SDE prior N(mu, lambda^2)
    theirs = mr_sampler(x_T, MU, grid, predict, order, param, sde, seeds)
    err = float((ours - theirs).abs().max())
    assert err <= 1e-6, err
    # ... and the run is a real one: it moved far from the prior and depends on mu
    assert float((ours - x_T).abs().max()) > 0.3


def test_mr_default_second_order_differs_from_the_taylor_variant():
    """Our default 2M (midpoint weight of D1) is another second-order method: it differs from the MR Sampler's
    (exact phi_2 weight) by O(h^3) per step, visibly on a coarse grid."""
    den = REF.denoiser(MR, "x0")
    grid = ds.make_grid(MR, 8, "logsnr", final="t_min")
    a = ds.sample(den, Z, "dpm++2m", grid=grid, model_kwargs={"mu": MU}, lower_order_final=False)
    b = ds.sample(den, Z, "dpm++2m", grid=grid, model_kwargs={"mu": MU}, lower_order_final=False, taylor2=True)
    assert float((a - b).abs().max()) > 1e-5


# ----------------------------------------------------------------------------------------
# DDPM <-> RDDM
# ----------------------------------------------------------------------------------------
def test_ddpm_rddm_coefficient_conversion_is_exact():
    vp = VPDiscrete.linear(1000)
    r = RDDM.from_ddpm(vp)
    n = torch.arange(1000, dtype=DT)
    ac = vp.alphas_cumprod
    # alphabar_RDDM = 1 - sqrt(abar), betabar^2 = 1 - abar, and x_t = (1 - alphabar) x0 + alphabar y + betabar eps
    assert torch.equal(r.alphas_cumsum, 1 - ac.sqrt()) and torch.equal(r.betas2_cumsum, 1 - ac)
    for f in ("alpha", "sigma"):
        rel = ((getattr(r, f)(n) - getattr(vp, f)(n)) / getattr(vp, f)(n)).abs().max()
        assert float(rel) <= 1e-14, (f, float(rel))
    assert float((r.lam(n) - vp.lam(n)).abs().max()) <= 1e-13
    assert float((r.offset(n) - (1 - ac.sqrt())).abs().max()) <= 1e-15
    back = r.to_ddpm().alphas_cumprod  # exact up to the rounding of 1 - (1 - sqrt(abar)) (abar >= 4e-5)
    assert float(((back - ac) / ac).abs().max()) <= 1e-13
    # RDDM's own schedules are not variance preserving: no DDPM
    with pytest.raises(ValueError, match="not variance preserving"):
        RDDM.from_schedules(100).to_ddpm()


def test_a_ddpm_model_samples_identically_as_rddm():
    """With the conditioning y = 0 (RDDM's I_in = 0) the converted process runs the DDPM's steps exactly; with
    y != 0 the run in the standard frame is unchanged and only the frame moves."""
    vp = VPDiscrete.linear(1000)
    r = RDDM.from_ddpm(vp)
    t = torch.tensor([999.0, 700, 400, 200, 100, 50, 20, 0], dtype=DT)
    for name in ("ddim", "dpm++2m", "unipc-bh2", "heun"):
        a = ds.sample(REF.denoiser(vp, "epsilon"), Z, name, grid=t)
        b = ds.sample(REF.denoiser(r, "epsilon"), Z, name, grid=t, model_kwargs={"y": torch.zeros_like(Z)})
        c = ds.sample(REF.denoiser(r, "epsilon"), Z, name, grid=t, model_kwargs={"y": MU})
        assert float((a - b).abs().max()) <= 1e-12, name
        assert float((a - c).abs().max()) <= 1e-12, name  # x0 of the standard frame: y only shifts the frame


@pytest.mark.parametrize("proc", [RDDM.from_schedules(200, beta_sum=1.0), ResShift(T=15), MR],
                         ids=["rddm", "resshift", "ir-sde"])
def test_residual_noise_and_data_predictions_agree(proc):
    """The residual (y - x0), noise and data predictions of one exact model give one run."""
    kw = {proc.offset_key: MU}
    out = {p: ds.sample(REF.denoiser(proc, p), Z, "dpm++2m", nfe=12, model_kwargs=kw)
           for p in ("x0", "epsilon", "residual", "v")}
    for p, x in out.items():
        assert float((x - out["x0"]).abs().max()) <= 1e-9, p


# ----------------------------------------------------------------------------------------
# exact answers: the shifted mixture
# ----------------------------------------------------------------------------------------
def test_prior_is_centred_at_y_and_the_exact_ode_is_reached():
    for proc in (MR, ResShift(T=15), RDDM.from_schedules(200)):
        kw = {proc.offset_key: MU}
        x_T = MU + proc.prior_scale * Z
        exact = ds.exact_targets(REF, proc, x_T, y=MU)
        x = ds.sample(REF.denoiser(proc, "x0"), Z, "dpm++3m", nfe=60, model_kwargs=kw, final="t_min")
        assert float((x - exact.at_t_min).abs().max()) < 5e-3, proc
        x0 = ds.sample(REF.denoiser(proc, "x0"), Z, "dpm++3m", nfe=60, model_kwargs=kw)
        assert float((x0 - exact.denoised).abs().max()) < 5e-3, proc
        # the given x_T (scale_noise=False) is the same start
        same = ds.sample(REF.denoiser(proc, "x0"), x_T, "dpm++3m", nfe=60, model_kwargs=kw, scale_noise=False)
        assert float((same - x0).abs().max()) <= 1e-12


#: one solver of each family (the frame change is exact, so the rest follow: tests/test_seams.py shows a Shifted run
#: equals its base process's run to 1e-12)
FAMILIES = ["ddim", "heun", "pndm", "ipndm", "deis", "dpm-solver-3", "dpm++2s", "dpm++2m", "dpm++3m", "unipc-bh2"]


@pytest.fixture(scope="module")
def mr_case():
    x_T = MU[:4] + MR.prior_scale * Z[:4]
    return x_T, REF.ode_solution(MR, x_T, MR.t_max, MR.t_min, rtol=1e-12, y=MU[:4])


@pytest.mark.parametrize("name", FAMILIES)
def test_convergence_order_on_the_mean_reverting_process(name, mr_case):
    """Against the shifted mixture's exact ODE (DOP853, rtol 1e-12, from x_T = mu + lambda z to t_min)."""
    x_T, target = mr_case
    info = ds.get_solver(name)
    base = [64, 128, 256] if info.order >= 4 else [48, 96, 192]
    if info.singlestep_order:
        base = [info.singlestep_order * round(n / info.singlestep_order) for n in base]
    opts = {"lower_order_final": False} if "lower_order_final" in inspect.signature(info.fn).parameters else {}
    nfes, errs = [], []
    for n in base:
        x, run = ds.sample(REF.denoiser(MR, "x0"), Z[:4], name, nfe=n, final="t_min", return_info=True,
                           model_kwargs={"mu": MU[:4]}, **opts)
        nfes.append(run.nfe)
        errs.append(float((x - target).abs().max()))
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope - info.order) <= 0.35, f"{name}: slope {slope:.2f}, errors {errs}"


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
def test_missing_y_and_bad_arguments_are_clear_errors():
    den = REF.denoiser(MR, "x0")
    with pytest.raises(ValueError, match="offset"):
        ds.sample(den, Z, "dpm++2m", nfe=5)
    with pytest.raises(ValueError, match="offset"):
        ds.sample(den, Z, "dpm++2m", nfe=5, model_kwargs={"mu": MU[:2]})  # y of another batch
    with pytest.raises(ValueError, match="offset"):
        REF.posterior(Z, MR, 50.0)
    with pytest.raises(ValueError, match="needs a process with an offset"):
        ds.Denoiser(lambda x, t: x, ds.EDM(), "residual")
    with pytest.raises(ValueError, match="schedule"):
        MeanReverting(schedule="sigmoid")
    with pytest.raises(ValueError):
        ResShift(kappa=-1)
    with pytest.raises(ValueError, match="residual"):
        TrainConfig(objective="residual")
