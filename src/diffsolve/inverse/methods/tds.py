"""TDS: twisted diffusion sampler, a sequential Monte Carlo posterior sampler (Wu et al. 2023, arXiv:2306.17775).

N particles follow a guided DDPM proposal and carry importance weights, so that the weighted ensemble targets
p(x0 | y) exactly as N grows, whatever the twist's error.  With the twist
p~_t(y | x_t) = N(y; A x0_hat(x_t), (sigma_y^2 + tau_t^2) I), tau_t^2 = kappa v s_t^2 / (v + s_t^2) (s_t the VE
noise level; with kappa = 1, the posterior variance of x0 for isotropic data of variance v):

(``full=True``, linear operators: covariance sigma_y^2 I + tau_t^2 A A^T instead of the isotropic one);

* proposal: the DDPM step from x_t with x0_hat replaced by x0_hat + gamma_t grad log p~_t(y | x_t);
* weight:   w *= p(x_s | x_t) p~_s(y | x_s) / (q(x_s | x_t, y) p~_t(y | x_t)), and at the end the twist is
  replaced by the exact likelihood N(y; A x0, sigma_y^2 I) of the clean particles;
* resampling (systematic) whenever the effective sample size falls below ``ess`` x N, through
  ``SolverState.reindex`` (every per-particle quantity moves together).

One network evaluation and one VJP per particle and step (3 NFE-equivalents).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise, SolverState
from ..operators import Operator
from .smc import ess, systematic_resample  # noqa: F401  (re-exported: the resampling lives in smc)

Tensor = torch.Tensor
DT = torch.float64


class TDS:
    name = "tds"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, kappa: float = 1.0,
                 data_var: float = 1.0, ess: float = 0.5, full: bool = True):
        from ..exact import check_measurement

        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y)
        if not 0 < ess <= 1:
            raise ValueError(f"ess threshold must be in (0, 1], got {ess}")
        if kappa < 0 or data_var <= 0:
            raise ValueError("kappa must be >= 0 and data_var > 0")
        self.kappa, self.data_var, self.ess = float(kappa), float(data_var), float(ess)
        # full: the twist's covariance sigma_y^2 I + tau_t^2 A A^T (in A's SVD; linear operators), else isotropic
        self.svd = op.svd() if (full and op.linear) else None
        self.nfe = self.vjps = self.resamplings = 0

    def _twist(self, x: Tensor, t: float, a: float, s: float) -> Tuple[Tensor, Tensor, Tensor]:
        """(x0_hat, grad_x log p~_t(y | x), log p~_t(y | x)) per particle."""
        sv2 = (s / a) ** 2
        var = self.sigma_y**2 + self.kappa * sv2 / (1 + sv2 / self.data_var)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = self.model.evaluate(xg, t, {}, (a, s)).x0
            if not x0.requires_grad:
                raise TypeError("tds needs gradients through the model, but its x0 prediction has no graph")
            r = (self.y.to(x0.dtype) - self.op.forward(x0)).flatten(1)
            if self.svd is None:
                logp = -0.5 * (r * r).sum(1) / var - 0.5 * r.shape[1] * math.log(2 * math.pi * var)
            else:  # eigenvalues sigma_y^2 + tau^2 s_i^2 along U's columns, sigma_y^2 on their complement
                U, S, _ = self.svd
                tau2 = var - self.sigma_y**2
                ev = self.sigma_y**2 + tau2 * S**2
                ru = r @ U
                rest = (r * r).sum(1) - (ru * ru).sum(1)
                m, k = r.shape[1], S.numel()
                sy2 = max(self.sigma_y**2, 1e-300)
                logp = -0.5 * ((ru * ru / ev).sum(1) + (rest / sy2 if m > k else 0.0) + torch.log(ev).sum()
                               + (m - k) * math.log(sy2) + m * math.log(2 * math.pi))
            (g,) = torch.autograd.grad(logp.sum(), xg)
        self.nfe += 1
        self.vjps += 1
        return x0.detach(), g, logp.detach()

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """Particles [N, ...] from standard normal ``noise`` on ``grid`` (final='t_min': the clean end is the x0
        prediction at t_min); returns the equally weighted particles after the final resampling.  The particles share
        ``generator`` (they interact); ``rng`` is unused."""
        proc = self.model.process
        st = SolverState(x=proc.prior_from_noise(noise.to(DT)), noise=Noise())
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("tds runs on a grid that ends at t_min (final='t_min')")
        a, s = float(grid.alpha[0]), float(grid.sigma[0])
        x0, g, lp = self._twist(st.x, float(grid.t[0]), a, s)
        # the start's weight is the twist itself: the product of the step weights then telescopes to
        # p~_0(y | x_0) times the proposal corrections, the target's importance weight
        st.extras = {"x0": x0, "grad": g, "logp": lp, "logw": lp.clone()}
        for i in range(n_pts - 1):
            e = st.extras
            a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
            a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
            tau = 1 - (a_t * s_s / (a_s * s_t)) ** 2
            sd = s_s * math.sqrt(max(tau, 0.0))
            x0g = e["x0"] + (s_t**2 / a_t) * e["grad"]

            def mean(x0_: Tensor) -> Tensor:
                return a_s * x0_ + s_s * math.sqrt(max(1 - tau, 0.0)) * (st.x - a_t * x0_) / s_t

            mq, mp = mean(x0g), mean(e["x0"])
            z = torch.randn(st.x.shape, generator=generator, dtype=DT)
            xs = mq + sd * z
            log_ratio = ((xs - mq) ** 2 - (xs - mp) ** 2).flatten(1).sum(1) / (2 * sd * sd) if sd > 0 else 0.0
            x0n, gn, lpn = self._twist(xs, float(grid.t[i + 1]), a_s, s_s)
            logw = e["logw"] + log_ratio + lpn - e["logp"]
            st.x, st.extras = xs, {"x0": x0n, "grad": gn, "logp": lpn, "logw": logw}
            self._maybe_resample(st, generator)
        # the clean end: the twist becomes the exact likelihood of the clean particles
        e = st.extras
        r = (self.y - self.op.forward(e["x0"])).flatten(1)
        lik = -0.5 * (r * r).sum(1) / self.sigma_y**2
        st.extras["logw"] = e["logw"] + lik - e["logp"] if self.sigma_y > 0 else e["logw"]
        self._maybe_resample(st, generator, force=True)
        return st.extras["x0"]

    def _maybe_resample(self, st: SolverState, generator: torch.Generator, force: bool = False) -> None:
        logw = st.extras["logw"]
        if not torch.isfinite(logw).any():
            raise ValueError("tds: every particle has zero weight (the measurement is far from the prior)")
        logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
        if force or ess(logw) < self.ess * st.batch:
            u = float(torch.rand((), generator=generator, dtype=DT))
            st.reindex(systematic_resample(logw, u))
            st.extras["logw"] = torch.zeros(st.batch, dtype=DT)
            self.resamplings += 1
