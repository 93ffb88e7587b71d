"""Parity with diffusers' schedulers on an exact model (see docs/conventions.md).

diffusers is driven exactly as its pipelines drive it (set_timesteps; scale_model_input; net; step) and
diffsolve runs the same solver on the same process times with the same last step and the same order rule.
Both see the same exact epsilon-network of a Gaussian mixture (float64), and the process is built from the
scheduler's own float32 ``alphas_cumprod``.  diffusers keeps its schedule in float32 (and DPMSolverMultistep
casts the state to float32 inside ``step``), so agreement is limited to float32 rounding: ~1e-7 measured,
asserted at 1e-5.
"""
import numpy as np
import pytest
import torch

import diffsolve as ds

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

DT = torch.float64
REF = ds.GaussianMixture.random(dim=16, seed=0)
TOL = 1e-5

pytestmark = [pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]
STEPS = [5, 10, 20]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up costs more than it saves (and keeps the file fast on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def noise(batch=4, seed=0):
    return torch.randn(batch, REF.dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


def rel(ours, theirs):
    return float((ours - theirs).norm() / theirs.norm())


def process_of(sched):
    return ds.VPDiscrete(sched.alphas_cumprod.to(DT))


def run_pipeline(sched, net, x_T, n, trace=None):
    """The loop of every diffusers pipeline; returns the sample and the number of network calls."""
    sched.set_timesteps(n)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        if trace is not None:
            trace.append(x)
        out = net(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    return x, len(sched.timesteps)


def network(proc):
    net = REF.network(proc, "epsilon")
    return lambda x, t: net(x.to(DT), t)  # exact float64 model, whatever dtype the scheduler hands over


def grid_of(proc, sched, final):
    """Our grid for a DPMSolverMultistep / UniPC schedule: its timesteps, then t = 0 or the jump to clean."""
    t = sched.timesteps.to(DT)
    sig = sched.sigmas.to(DT)
    assert rel(sig[:-1], proc.sigma_ve(t)) < 1e-6  # sigmas are sigma/alpha at the timesteps (float32)
    if final == "zero":
        assert float(sig[-1]) == 0.0
        return ds.explicit(proc, t=t, final="denoise")
    # 'sigma_min' is exactly the noise level of timestep 0 (up to float32 rounding)
    assert abs(float(sig[-1]) / float(proc.sigma_ve(torch.tensor(0.0, dtype=DT))) - 1) < 1e-6
    return ds.explicit(proc, t=torch.cat([t, torch.zeros(1, dtype=DT)]), final="t_min")


def compare(sched, solver, final, n, seed=0, **options):
    proc = process_of(sched)
    x_T = noise(seed=seed)
    theirs, calls = run_pipeline(sched, network(proc), x_T, n)
    grid = grid_of(proc, sched, final)
    ours, info = ds.sample(REF.denoiser(proc, "epsilon"), x_T, solver, grid=grid, nfe=None, return_info=True,
                           **options)
    assert info.nfe == calls == n
    return rel(ours, theirs)


# ----------------------------------------------------------------------------------------
# the schedule itself
# ----------------------------------------------------------------------------------------
def test_linear_schedule_matches_diffusers():
    """Our float64 cumprod of the float32 betas vs diffusers' float32 cumprod (4e-7 relative measured)."""
    ours = ds.VPDiscrete.linear(1000).alphas_cumprod
    theirs = DPMSolverMultistepScheduler().alphas_cumprod.to(DT)
    assert float(((ours - theirs) / theirs).abs().max()) < 1e-6


# ----------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", STEPS)
def test_ddim(n):
    """Deterministic DDIM, 'leading' timesteps, set_alpha_to_one=True: the step from t = 0 is the jump to x0."""
    sched = DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    proc = process_of(sched)
    x_T = noise()
    theirs, calls = run_pipeline(sched, network(proc), x_T, n)
    t = sched.timesteps.to(DT)
    # DDIM steps from t to t - N // n: on 'leading' timesteps that is exactly the next timestep
    assert torch.all(t[:-1] - t[1:] == 1000 // n) and t[-1] == 0
    ours, info = ds.sample(REF.denoiser(proc, "epsilon"), x_T, "ddim", grid=ds.explicit(proc, t=t, final="denoise"),
                           nfe=None, return_info=True)
    assert info.nfe == calls
    assert rel(ours, theirs) <= TOL


def test_ddim_default_clips_x0():
    """diffusers' DDIM default clip_sample=True clips the x0 prediction to [-1, 1]: not the DDIM ODE step."""
    assert DDIMScheduler().config.clip_sample
    sched = DDIMScheduler(set_alpha_to_one=True)
    proc = process_of(sched)
    x_T = noise()
    theirs, _ = run_pipeline(sched, network(proc), x_T, 10)
    ours = ds.sample(REF.denoiser(proc, "epsilon"), x_T, "ddim",
                     grid=ds.explicit(proc, t=sched.timesteps.to(DT), final="denoise"), nfe=None)
    assert rel(ours, theirs) > 1e-3


# ----------------------------------------------------------------------------------------
# DPM-Solver multistep (DPMSolverMultistepScheduler lowers the order at the end only below 15 steps)
# ----------------------------------------------------------------------------------------
DPM_CASES = {
    "dpm++2m-zero": (dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"), "dpm++2m", {}),
    "dpm++2m-sigma_min": (dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min"),
                          "dpm++2m", {}),
    "dpm2m-noise-sigma_min": (dict(algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"),
                              "dpm-solver-2m", {}),
    "dpm++3m-zero": (dict(algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="zero"), "dpm++3m",
                     {"taylor3": False}),
    "dpm++3m-sigma_min": (dict(algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="sigma_min"),
                          "dpm++3m", {"taylor3": False}),
    "dpm3m-noise-sigma_min": (dict(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"),
                              "dpm-solver-3m", {"taylor3": False}),
}


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", list(DPM_CASES))
def test_dpm_solver_multistep(case, n):
    cfg, solver, opts = DPM_CASES[case]
    sched = DPMSolverMultistepScheduler(**cfg)
    final = cfg["final_sigmas_type"]
    assert compare(sched, solver, final, n, lower_order_final=n < 15, **opts) <= TOL


def test_dpm_solver_multistep_keeps_full_order_from_15_steps():
    """From 15 steps diffusers does not lower the order on the last steps even when asked to."""
    cfg = dict(algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="sigma_min", lower_order_final=True)
    assert compare(DPMSolverMultistepScheduler(**cfg), "dpm++3m", "sigma_min", 15,
                   lower_order_final=False, taylor3=False) <= TOL
    assert compare(DPMSolverMultistepScheduler(**cfg), "dpm++3m", "sigma_min", 15,
                   lower_order_final=True, taylor3=False) > 1e-3


def test_noise_prediction_refuses_zero_final_sigma():
    with pytest.raises(ValueError):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="zero")


# ----------------------------------------------------------------------------------------
# UniPC (lower_order_final=True lowers on every run: order <= steps left)
# ----------------------------------------------------------------------------------------
UNIPC_CASES = [("bh2", 2, "zero"), ("bh2", 2, "sigma_min"), ("bh2", 3, "zero"), ("bh2", 3, "sigma_min"),
               ("bh1", 2, "sigma_min"), ("bh1", 3, "sigma_min")]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("variant,order,final", UNIPC_CASES)
def test_unipc(variant, order, final, n):
    sched = UniPCMultistepScheduler(solver_type=variant, solver_order=order, final_sigmas_type=final)
    assert compare(sched, f"unipc-{variant}", final, n, order=order, lower_order_final=True) <= TOL


@pytest.mark.parametrize("n", STEPS)
def test_unipc_bh1_zero_final_is_nan_in_diffusers(n):
    """diffusers' bh1 with final_sigmas_type='zero' multiplies B(h) = h = -inf by a zero correction on the last
    step (NaN).  Up to that step the two agree; our last step is the denoiser jump x <- x0(x, t_last)."""
    sched = UniPCMultistepScheduler(solver_type="bh1", solver_order=2, final_sigmas_type="zero")
    proc = process_of(sched)
    x_T = noise()
    trace = []
    theirs, _ = run_pipeline(sched, network(proc), x_T, n, trace)
    assert torch.isnan(theirs).all()
    assert torch.isfinite(trace[-1]).all()

    states = []
    ours = ds.sample(REF.denoiser(proc, "epsilon"), x_T, "unipc-bh1", grid=grid_of(proc, sched, "zero"), nfe=None,
                     order=2, lower_order_final=True, callback=lambda d: states.append(d["x"]))
    assert torch.isfinite(ours).all()
    assert rel(states[-2], trace[-1]) <= TOL  # the state the last model call sees
    t_last = float(sched.timesteps[-1])
    jump = REF.posterior(states[-2], proc, t_last)[0]
    assert torch.allclose(ours, jump, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# the reference 3M coefficient is second order (measured values in docs/conventions.md)
# ----------------------------------------------------------------------------------------
def test_reference_3m_is_second_order_on_vp_discrete():
    proc = ds.VPDiscrete.linear(1000)
    ref = ds.GaussianMixture.random(dim=8, n_components=3, seed=1, delta=0.3)
    den = ref.denoiser(proc, "epsilon")
    x_T = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    exact = ref.ode_solution(proc, x_T, proc.t_max, proc.t_min, rtol=1e-12)
    nfes = [64, 128, 256, 512]
    for taylor3, order in ((True, 3), (False, 2)):
        errs = []
        for n in nfes:
            grid = ds.explicit(proc, t=ds.timesteps.logsnr(proc, n + 1), final="t_min")
            x, info = ds.sample(den, x_T, "dpm++3m", grid=grid, nfe=None, return_info=True, lower_order_final=False,
                                taylor3=taylor3)
            assert info.nfe == n
            errs.append(float((x - exact).norm() / exact.norm()))
        slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.35, (taylor3, slope, errs)
