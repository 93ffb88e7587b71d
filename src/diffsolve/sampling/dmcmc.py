"""Denoising MCMC (Kim & Ye 2022, arXiv:2209.14593): Denoising Langevin Gibbs in the product space (x, sigma), then any
solver from the chain's sigma to clean data.

The chain targets p(x~, sigma) = p(sigma) p_sigma(x~) in the VE view (x~ = x / alpha, sigma = sigma / alpha):

* x-step, Langevin at the current level: x~ <- x~ + (eta / 2) grad log p_sigma(x~) + sqrt(eta) z, with the model's
  score grad log p_sigma = -eps / sigma and eta = ``step_size`` * sigma^2;
* sigma-step: sigma ~ p(sigma | x~) over the discrete ``NoiseLevels`` (a trained noise-level classifier, or the
  closed form log p_sigma(x~) + log p(sigma) of an exact reference); ``sigma_step='argmax'`` takes the most likely
  level, as the paper's code does.

Each round runs ``chain_steps`` Langevin-Gibbs steps per chain, keeps the state of lowest sigma the chain visited, and
integrates it to clean data with ``solver`` in ``nfe`` evaluations (the paper's "n_skip" and "n_den").  The chains are
started once (a cheap sample from noise, re-noised at ``init_sigma``, then ``burn_in`` steps) and carry on across
rounds, so that cost is shared by all the samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..adapters.denoiser import Model
from ..solvers import get_solver
from ..solvers.state import Noise
from ..util import seeding
from .sample import plan_run, sample

Tensor = torch.Tensor
DT = torch.float64


@dataclass
class NoiseLevels:
    """Discrete noise levels ``sigmas`` [K] (VE view, increasing) and ``logits(x~) -> [B, K]``, log p(sigma_k | x~) up
    to a per-row constant (a classifier's logits, or an exact reference's log-densities plus the log prior)."""

    sigmas: Tensor
    logits: Callable[[Tensor], Tensor]

    def __post_init__(self):
        self.sigmas = torch.as_tensor(self.sigmas, dtype=DT).flatten()
        if self.sigmas.numel() < 2 or not (self.sigmas > 0).all() or not (self.sigmas[1:] > self.sigmas[:-1]).all():
            raise ValueError("noise levels must be >= 2 positive, increasing values")

    @classmethod
    def exact(cls, reference: Any, sigmas: Tensor, log_prior: Optional[Tensor] = None) -> "NoiseLevels":
        """The closed-form p(sigma | x~) of an exact reference (``ClosedFormPrior.noise_level_logits``)."""
        s = torch.as_tensor(sigmas, dtype=DT).flatten()
        return cls(s, lambda x: reference.noise_level_logits(x, s, log_prior))


@dataclass
class DMCMCInfo:
    """What a Denoising-MCMC run cost: per sample ``chain_steps`` Langevin evaluations plus the integrator's ``nfe``
    (``nfe_per_sample``); once per chain ``start_nfe`` (the initial sample) and ``burn_in``.  ``sigmas``: the level
    each sample was integrated from."""

    nfe_per_sample: int
    chain_steps: int
    integrator_nfe: int
    start_nfe: int
    burn_in: int
    rounds: int
    chains: int
    sigmas: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def amortised_nfe(self) -> float:
        """NFE per sample with the chains' start shared by all samples."""
        return self.nfe_per_sample + (self.start_nfe + self.burn_in) / self.rounds


def dmcmc(model: Model, levels: NoiseLevels, seeds: Sequence[int], shape: Optional[Sequence[int]] = None, *,
          rounds: int = 1, chain_steps: int = 4, nfe: int = 6, solver: str = "dpm++2m", spacing: str = "logsnr",
          step_size: float = 0.5, sigma_step: str = "argmax", init_sigma: Optional[float] = None,
          start_nfe: int = 10, burn_in: int = 20, keep: str = "lowest",
          solver_options: Optional[Dict[str, Any]] = None) -> tuple[Tensor, DMCMCInfo]:
    """Denoising Langevin Gibbs with ``len(seeds)`` chains for ``rounds`` rounds: returns ``rounds * len(seeds)``
    samples (round-major) and a ``DMCMCInfo``.

    ``seeds`` name the chains (their starting noise and Langevin noise, batch-size independent); ``shape``: one
    sample's (default ``model.sample_shape``); ``step_size``: eta / sigma^2; ``init_sigma``: where the chains start
    (default: the middle level); ``start_nfe``: the default solver's budget for the chains' first sample; ``keep``:
    integrate the round's state of lowest sigma (the paper's choice: the cheapest to finish, a biased pick) or its
    last state (an exact Gibbs sample of the joint when the steps are exact)."""
    if sigma_step not in ("argmax", "sample"):
        raise ValueError(f"sigma_step must be 'argmax' or 'sample', got {sigma_step!r}")
    if keep not in ("lowest", "last"):
        raise ValueError(f"keep must be 'lowest' or 'last', got {keep!r}")
    if rounds < 1 or chain_steps < 1 or nfe < 1 or burn_in < 0 or not step_size > 0:
        raise ValueError("need rounds >= 1, chain_steps >= 1, nfe >= 1, burn_in >= 0 and step_size > 0")
    proc = model.process
    if not getattr(proc, "gaussian", True) or proc.offset_key is not None:
        raise ValueError(f"Denoising MCMC needs a process with Gaussian marginals and no offset, not {proc!r}")
    shape = tuple(shape if shape is not None else getattr(model, "sample_shape", None) or ())
    if not shape:
        raise ValueError("pass shape= (the model does not record its sample_shape)")
    sig = levels.sigmas
    lo, hi = (float(proc.sigma_ve(torch.tensor(t, dtype=DT))) for t in (proc.t_min, proc.t_max))
    if float(sig[0]) < lo * (1 - 1e-6) or float(sig[-1]) > hi * (1 + 1e-6):  # levels stored in float32
        raise ValueError(f"noise levels [{float(sig[0]):.4g}, {float(sig[-1]):.4g}] leave the process's range "
                         f"[{lo:.4g}, {hi:.4g}]")
    seeds = [int(s) for s in seeds]
    rng = Noise(seeding.solver_generators(seeds))
    gen = torch.Generator().manual_seed(seeds[0] * 7919 + 1)  # for sigma_step='sample'

    def score_step(x: Tensor, s: Tensor) -> Tensor:
        t = proc.t_of_sigma_ve(s)
        a = proc.alpha(t).reshape((-1,) + (1,) * len(shape))
        eps = model.evaluate((a * x).to(DT), t, {}).eps
        eta = (step_size * s**2).reshape(a.shape)
        return x - 0.5 * eta * eps / s.reshape(a.shape) + eta.sqrt() * rng.like(x)

    def level(x: Tensor) -> Tensor:
        lg = levels.logits(x)
        if lg.shape != (x.shape[0], sig.numel()):
            raise ValueError(f"noise-level logits must be [B, K] = [{x.shape[0]}, {sig.numel()}], got {tuple(lg.shape)}")
        if sigma_step == "argmax":
            return lg.argmax(1)
        return torch.multinomial(torch.softmax(lg.to(DT), 1), 1, generator=gen).flatten()

    # start: a cheap sample from the chains' noise, re-noised at init_sigma, then burn-in
    x0 = sample(model, seeding.noise(seeds, shape), nfe=start_nfe)
    k = torch.full((len(seeds),), int(torch.searchsorted(sig, torch.tensor(init_sigma if init_sigma is not None
                                                                           else float(sig[sig.numel() // 2])))))
    k = k.clamp(0, sig.numel() - 1)
    x = x0.to(DT) + sig[k].reshape((-1,) + (1,) * len(shape)) * rng.like(x0.to(DT))
    for _ in range(burn_in):
        x = score_step(x, sig[k])
        k = level(x)
    outs: List[Tensor] = []
    used: List[Tensor] = []
    info = get_solver(solver)
    for _ in range(rounds):
        best_x, best_k = x, k
        for _ in range(chain_steps):
            x = score_step(x, sig[k])
            k = level(x)
            lower = (k < best_k) if keep == "lowest" else torch.ones_like(k, dtype=torch.bool)
            best_x = torch.where(lower.reshape((-1,) + (1,) * len(shape)), x, best_x)
            best_k = torch.where(lower, k, best_k)
        out = torch.empty_like(best_x)
        for kk in best_k.unique().tolist():  # one integrator run per level
            rows = (best_k == kk).nonzero().flatten()
            t0 = float(proc.t_of_sigma_ve(sig[kk]))
            grid, plan = plan_run(info, model, nfe, spacing, None, "denoise", t0)
            x_t = float(proc.alpha(torch.tensor(t0, dtype=DT))) * best_x[rows]
            out[rows] = sample(model, x_t, solver, grid=grid, nfe=nfe, scale_noise=False,
                               **(solver_options or {})).to(DT)
        outs.append(out)
        used.append(sig[best_k])
    spent = info.plan_budget(nfe, True).cost
    return torch.cat(outs), DMCMCInfo(chain_steps + spent, chain_steps, spent, start_nfe, burn_in, rounds, len(seeds),
                                      torch.cat(used))
