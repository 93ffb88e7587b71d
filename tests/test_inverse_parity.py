"""Parity of the guidance methods with the peer library azula (github.com/probabilists/azula), run through its
own code on the same exact Gaussian-mixture model, operator, times, states and noise (float64).

* MMPS and TMPD are denoiser wrappers in both libraries: one guided x0 evaluation is compared directly.
* DPS: azula's is a DDPM step plus -zeta grad_{x_t} ||y - A x0_hat|| on x_s (norm over the whole batch); ours is
  the x0 correction -gamma_t zeta grad ||r|| (per sample), which a DDPM step t -> s scales by alpha_s tau
  (tau = 1 - (alpha_t sigma_s / (alpha_s sigma_t))^2).  The two steps agree for one sample when our strength is
  zeta / (alpha_s tau gamma_t): a per-step value, so whole trajectories are not at parity with a constant zeta.
* PiGDM (azula's PGDMSampler: a DDIM step plus alpha_s alpha_t J^T (A^+ y - A^+ A x0_hat), noiseless) has no
  mapping onto our x0 correction and is not compared here.
"""
import pytest
import torch

import diffsolve as ds
from diffsolve.inverse import DPS, MMPS, TMPD, Dense
from diffsolve.reference import GaussianMixture

azula = pytest.importorskip("azula", reason="the peer library azula is not installed (pip install --no-deps azula)")

from azula.denoise import Denoiser as AzulaDenoiser  # noqa: E402
from azula.denoise import DiracPosterior  # noqa: E402
from azula.guidance import DPSSampler, MMPSDenoiser, TMPDenoiser  # noqa: E402
from azula.linalg.covariance import IsotropicCovariance  # noqa: E402
from azula.noise import Schedule  # noqa: E402
from azula.sample import DDPMSampler  # noqa: E402

DT = torch.float64
TOL = 1e-5
D, M, SIGMA_Y = 8, 3, 0.2
FRACTIONS = (0.05, 0.2, 0.5, 0.8, 0.95)  # of the process's time range
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
