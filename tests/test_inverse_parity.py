"""Parity of the guidance methods with the peer library azula (github.com/probabilists/azula), run through its
own code on the same exact Gaussian-mixture model, operator, times, states and noise (float64).

* MMPS and TMPD are denoiser wrappers in both libraries: one guided x0 evaluation is compared directly.
* DPS as an x0 correction (``DPS``, method 'dps-x0'): azula's is a DDPM step plus -zeta grad_{x_t} ||y - A x0_hat||
  on x_s (norm over the whole batch); ours is the x0 correction -gamma_t zeta grad ||r|| (per sample), which a DDPM
  step t -> s scales by alpha_s tau (tau = 1 - (alpha_t sigma_s / (alpha_s sigma_t))^2).  The two steps agree for
  one sample when our strength is zeta / (alpha_s tau gamma_t): a per-step value, so whole trajectories are not at
  parity with a constant zeta.
* DPS as a sampler step (``DPSStep``, method 'dps') and PiGDM as a sampler step (``PiGDMStep``, 'pigdm-step') are
  azula's DPSSampler and PGDMSampler: whole trajectories are compared on the same times.  azula's sampler ends at
  the state x_{t_0} of its last time (it returns x, no final denoising); ours evaluates the model once more there
  and returns its (unguided) x0 prediction, so our output is compared with azula's denoiser applied to azula's
  last state at t_0.  azula's DPS norm is taken over the whole batch and ours per sample, so DPS is compared for
  one sample (a batch of ours against azula run on each of its samples alone); PiGDM has no norm and is compared
  for batches of 1 and 4.
"""
import pytest
import torch

import diffsolve as ds
from diffsolve.grids import explicit, make_grid
from diffsolve.inverse import DPS, METHODS, MMPS, TMPD, Dense, DPSStep, PiGDMStep
from diffsolve.reference import GaussianMixture
from diffsolve.solvers.state import Noise
from diffsolve.util import seeding

azula = pytest.importorskip("azula", reason="the peer library azula is not installed (pip install --no-deps azula)")

from azula.denoise import Denoiser as AzulaDenoiser  # noqa: E402
from azula.denoise import DiracPosterior  # noqa: E402
from azula.guidance import DPSSampler, MMPSDenoiser, PGDMSampler, TMPDenoiser  # noqa: E402
from azula.linalg.covariance import IsotropicCovariance  # noqa: E402
from azula.noise import Schedule  # noqa: E402
from azula.sample import DDIMSampler, DDPMSampler  # noqa: E402

DT = torch.float64
TOL = 1e-5
D, M, SIGMA_Y = 8, 3, 0.2
FRACTIONS = (0.05, 0.2, 0.5, 0.8, 0.95)  # of the process's time range
TRAJECTORY = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2, 0.12, 0.06, 0.02, 0.0)  # non-uniform, t_max down to t_min
PROCESSES = {"vp": lambda: ds.VPDiscrete.linear(1000), "ve": lambda: ds.VE()}


class ProcessSchedule(Schedule):
    """azula's schedule view of one of our processes: t (our process time) -> (alpha_t, sigma_t)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, t):
        t = torch.as_tensor(t, dtype=DT)
        return self.process.alpha(t), self.process.sigma(t)


class GaussianDenoiser(AzulaDenoiser):
    """An azula denoiser around one of our models: the posterior mean is the model's x0 prediction."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.schedule = ProcessSchedule(model.process)

    def forward(self, x_t, t, **kwargs):
        return DiracPosterior(mean=self.model.evaluate(x_t, torch.as_tensor(t, dtype=DT), kwargs).x0)


def _problem(process, positive=False, seed=0):
    """The exact mixture model, a Dense operator (non-negative entries when ``positive``), y, and the times."""
    prior = GaussianMixture.random(D, n_components=3, rank=2, seed=seed)
    if positive:
        A = torch.randn(M, D, generator=torch.Generator().manual_seed(seed + 1), dtype=DT).abs() / M**0.5
        op = Dense(A)
    else:
        op = Dense.gaussian(M, (D,), seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    y = op(prior.sample(1, g)) + SIGMA_Y * torch.randn(1, M, generator=g, dtype=DT)
    times = [process.t_min + f * (process.t_max - process.t_min) for f in FRACTIONS]
    return prior, op, y, times


def _states(prior, process, t, n=6, seed=5):
    """n draws of x_t ~ p_t (per-time seed)."""
    t = torch.as_tensor(t, dtype=DT)
    g = torch.Generator().manual_seed(seed + int(1000 * float(t)))
    return process.alpha(t) * prior.sample(n, g) + process.sigma(t) * torch.randn(n, D, generator=g, dtype=DT)


def _rel(ours, theirs, base):
    """Relative difference of the two corrections (x0 minus the unguided x0_hat)."""
    return float((ours - theirs).norm() / (theirs - base).norm())


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_mmps_matches_azula(kind, iterations):
    process = PROCESSES[kind]()
    prior, op, y, times = _problem(process)
    model = prior.denoiser(process)
    ours = MMPS(model, op, y, SIGMA_Y, iterations=iterations)
    theirs = MMPSDenoiser(GaussianDenoiser(model), y, op.forward, IsotropicCovariance(SIGMA_Y**2), solver="cg",
                          iterations=iterations)
    for t in times:
        x = _states(prior, process, t)
        tt = torch.tensor(t, dtype=DT)
        base = model.evaluate(x, tt, {}).x0
        a = ours.evaluate(x, tt).x0
        b = theirs(x, tt).mean
        assert _rel(a, b, base) <= TOL, f"MMPS({iterations}) at t={t:g}: {_rel(a, b, base):.3g}"


@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_tmpd_matches_azula(kind):
    """TMPD's row-sum variance sigma_y^2 + A gamma J A^T 1 can be negative; azula divides by it as it is and we
    clamp it, so parity is checked where it is positive (a non-negative operator here, asserted below)."""
    process = PROCESSES[kind]()
    prior, op, y, times = _problem(process, positive=True)
    model = prior.denoiser(process)
    ours = TMPD(model, op, y, SIGMA_Y)
    theirs = TMPDenoiser(GaussianDenoiser(model), y, op.forward, SIGMA_Y**2)
    for t in times:
        x = _states(prior, process, t)
        tt = torch.tensor(t, dtype=DT)
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            pred = model.evaluate(xg, tt, {})
            y_hat = op.forward(pred.x0)
            (v,) = torch.autograd.grad(y_hat, xg, torch.ones_like(y_hat))
        var = SIGMA_Y**2 + op.forward(pred.sigma**2 / pred.alpha * v)
        assert float(var.min()) > 1e-3, "the test problem must keep TMPD's variance positive"
        base = pred.x0.detach()
        a = ours.evaluate(x, tt).x0
        b = theirs(x, tt).mean
        assert _rel(a, b, base) <= TOL, f"TMPD at t={t:g}: {_rel(a, b, base):.3g}"


@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_ddpm_step_matches_azula(kind):
    """Our 'ddpm' solver's step t -> s is azula's DDPMSampler step (same noise draw)."""
    process = PROCESSES[kind]()
    prior, _, _, times = _problem(process)
    model = prior.denoiser(process)
    for t, s in zip(times[1:], times[:-1]):
        x = _states(prior, process, t, n=1)
        torch.manual_seed(7)
        b = DDPMSampler(GaussianDenoiser(model)).step(x, torch.tensor(t, dtype=DT), torch.tensor(s, dtype=DT))
        a = ds.sample(model, x, "ddpm", grid=[t, s], final="t_min", scale_noise=False,
                      generators=[torch.Generator().manual_seed(7)])
        assert float((a - b).norm() / b.norm()) <= 1e-12


@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_dps_step_matches_azula_with_per_step_strength(kind):
    """One DDPM step of our DPS at strength zeta / (alpha_s tau gamma_t) is azula's DPS step at zeta (one sample,
    where our per-sample residual norm is azula's batch norm)."""
    process = PROCESSES[kind]()
    prior, op, y, times = _problem(process)
    model = prior.denoiser(process)
    zeta = 0.3
    for t, s in zip(times[1:], times[:-1]):
        x = _states(prior, process, t, n=1)
        tt, ss = torch.tensor(t, dtype=DT), torch.tensor(s, dtype=DT)
        a_t, s_t, a_s, s_s = process.alpha(tt), process.sigma(tt), process.alpha(ss), process.sigma(ss)
        tau = 1 - (a_t / a_s * s_s / s_t) ** 2
        ours = DPS(model, op, y, SIGMA_Y, zeta=float(zeta / (a_s * tau * s_t**2 / a_t)))
        torch.manual_seed(7)
        base = DDPMSampler(GaussianDenoiser(model)).step(x, tt, ss)
        torch.manual_seed(7)
        b = DPSSampler(GaussianDenoiser(model), y, op.forward, zeta=zeta).step(x, tt, ss)
        a = ds.sample(ours, x, "ddpm", grid=[t, s], final="t_min", scale_noise=False,
                      generators=[torch.Generator().manual_seed(7)])
        assert _rel(a, b, base) <= TOL, f"DPS step {t:g} -> {s:g}: {_rel(a, b, base):.3g}"


# ---------------------------------------------------------------------------------------------------------------
# whole trajectories of the step-level methods


def _on_times(cls, times):
    """``cls`` (an azula sampler) run on the given times instead of its linspace(start, stop, steps + 1)."""
    times = torch.as_tensor(times, dtype=DT)

    class OnTimes(cls):
        @property
        def timesteps(self):
            return times

    OnTimes.__name__ = f"{cls.__name__}OnTimes"
    return OnTimes


def _azula_end(sampler, den, x_T, t_end):
    """azula's x0 prediction at the last state of its trajectory (the point our step methods return)."""
    return den(sampler(x_T), torch.as_tensor(t_end, dtype=DT)).mean


def _trajectory(kind):
    process = PROCESSES[kind]()
    prior, op, y, _ = _problem(process)
    model = prior.denoiser(process)
    times = [process.t_min + f * (process.t_max - process.t_min) for f in TRAJECTORY]
    return process, model, op, y, times


def _azula_pair(method, den, op, y, times, **options):
    """azula's guided sampler for ``method`` and its unguided counterpart (for the scale of the guidance)."""
    if method == "dps":
        return (_on_times(DPSSampler, times)(den, y, op.forward, zeta=options["zeta"], silent=True),
                _on_times(DDPMSampler, times)(den, silent=True))
    return (_on_times(PGDMSampler, times)(den, y, op.forward, op.pinv, eta=options["eta"], silent=True),
            _on_times(DDIMSampler, times)(den, eta=options["eta"], silent=True))


def _ours(method, model, op, y, **options):
    return (DPSStep if method == "dps" else PiGDMStep)(model, op, y, SIGMA_Y, **options)


def _check_trajectory(method, kind, n, options, seed=3):
    """Ours (global-seed draws) against azula on the same explicit times, start and noise; the relative
    differences of the outputs and of the guidance effects (guided minus unguided end)."""
    process, model, op, y, times = _trajectory(kind)
    den = GaussianDenoiser(model)
    noise = torch.randn(n, D, generator=torch.Generator().manual_seed(11), dtype=DT)
    x_T = process.prior_from_noise(noise)
    guided, plain = _azula_pair(method, den, op, y, times, **options)
    torch.manual_seed(seed)
    theirs = _azula_end(guided, den, x_T, times[-1])
    torch.manual_seed(seed)
    base = _azula_end(plain, den, x_T, times[-1])
    ours_m = _ours(method, model, op, y, **options)
    torch.manual_seed(seed)
    ours = ours_m.run(noise, explicit(process, t=times, final="t_min"), Noise(None), None)
    assert ours_m.nfe == ours_m.vjps == len(times)
    assert float((theirs - base).norm() / theirs.norm()) > 0.1, "the guidance must change the result"
    return float((ours - theirs).norm() / theirs.norm()), _rel(ours, theirs, base)


@pytest.mark.parametrize("zeta", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_dps_trajectory_matches_azula(kind, zeta):
    """Method 'dps' (DPSStep) over a whole non-uniform trajectory t_max -> t_min is azula's DPSSampler, for one
    sample (azula's residual norm is the whole batch's and ours is per sample: they agree only for a batch of 1,
    so a batch of 4 in one azula call is not compared; see the per-sample test below)."""
    rel, rel_guidance = _check_trajectory("dps", kind, 1, {"zeta": zeta})
    assert rel <= TOL and rel_guidance <= TOL, f"DPS trajectory: {rel:.3g} (of the guidance {rel_guidance:.3g})"


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_pigdm_step_trajectory_matches_azula(kind, eta, n):
    """Method 'pigdm-step' (PiGDMStep) over a whole trajectory is azula's PGDMSampler at the same eta, for one
    sample and for a batch of 4 (no batch-wide quantity in either: the batch is compared in one call)."""
    rel, rel_guidance = _check_trajectory("pigdm-step", kind, n, {"eta": eta})
    assert rel <= TOL and rel_guidance <= TOL, f"PiGDM trajectory: {rel:.3g} (of the guidance {rel_guidance:.3g})"


@pytest.mark.parametrize("method, options", [("dps", {"zeta": 0.3}), ("pigdm-step", {"eta": 1.0})])
@pytest.mark.parametrize("kind", sorted(PROCESSES))
def test_inverse_sample_matches_azula_per_sample(kind, method, options):
    """``ds.inverse.sample`` end to end (its own grid, seeded starts and per-sample solver streams) for 4 samples:
    each sample is azula's sampler run on that sample alone, on the library's time grid, with the global torch
    generator in the state of the sample's solver stream (so azula's randn_like draws are that stream's).  For DPS
    this is the parity that holds for a batch: azula run on the 4 samples in one call normalises by the batch's
    residual norm and differs."""
    process, model, op, y, _ = _trajectory(kind)
    den = GaussianDenoiser(model)
    seeds = [3, 14, 15, 92]
    x, info = ds.inverse.sample(model, op, y, SIGMA_Y, method=method, nfe=30, seeds=seeds, **options)
    assert info.evaluations == info.vjps == 10
    grid = make_grid(process, info.evaluations, METHODS[method].spacing, "t_min")
    times = grid.t.tolist()
    noise = seeding.noise(seeds, op.in_shape)
    guided, plain = _azula_pair(method, den, op, y, times, **options)
    for j, seed in enumerate(seeds):
        x_T = process.prior_from_noise(noise[j:j + 1])
        torch.default_generator.set_state(seeding.stream(seed, seeding.SOLVER).get_state())
        theirs = _azula_end(guided, den, x_T, times[-1])
        torch.default_generator.set_state(seeding.stream(seed, seeding.SOLVER).get_state())
        base = _azula_end(plain, den, x_T, times[-1])
        ours = x[j:j + 1]
        rel = float((ours - theirs).norm() / theirs.norm())
        assert rel <= TOL and _rel(ours, theirs, base) <= TOL, f"{method} sample {j}: {rel:.3g}"
