"""TSMC: twisted sequential Monte Carlo in the operator's spectral basis, with the model's own covariance in the twist
(ours; builds on TDS, Wu et al. 2023, arXiv:2306.17775, and MCGdiff, Cardoso et al. 2023, arXiv:2308.07983).

The engine and its notation are ``smc.SpectralSMC`` (observed coordinates x_bar = V^T x~, y_bar = diag(1/s) U^T y,
rho_i = sigma_y / s_i).  Two Gaussians per grid point k:

* the *twist* (what the weights target), the moment-matched prediction of the measurement from the denoiser,

      G_k(x~) = N(y_bar; x_bar0_hat(x~), diag(rho^2) + R_k),   R_k = S_k^2 C (C + S_k^2 I)^{-1},

  with C = V^T Cov[x0] V the prior's covariance on the observed directions, read off the model itself: Tweedie,
  Cov[x0 | x~_T] = S_T^2 d x0_hat / d x~ at the start, where it is the prior's, by finite differences along V at
  ``probes`` particles (r + 1 evaluations each; a handful of particles, counted in the budget).  For a Gaussian
  prior G_k is p(y | x_t) exactly; for a mixture it is its moment match, right at both ends of the path.  At the
  last point G is the measurement's likelihood N(y_bar; x_bar0_hat, rho^2) of the returned samples;
* the *proposal's surrogate* h_k(x_bar) = N(x_bar; y_bar, rho^2 + gamma^2 S_k^2) (the flat-prior prediction for
  gamma = 1; wider for gamma > 1), linear in the state, so each move is the exact Gaussian product of the prior's
  reverse kernel with it.

Weights G_{k+1}(x') Z_h(x) / (h_{k+1}(x') G_k(x)) (Z_h the surrogate's predictive), resampled on G (systematic, when
the effective sample size falls below ``ess`` N).  The reverse kernel's variance includes the x0 uncertainty
(``analytic``: + (1 - c)^2 S_t^2 (1 - E||eps_hat||^2 / d), the ensemble's average, as Analytic-DPM, Bao et al.
2022, arXiv:2201.06503), which DDPM's kernel leaves out (it under-disperses at coarse steps).  One network evaluation
per particle and step, no VJP.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ..operators import Operator
from .smc import SpectralSMC, _log_normal

Tensor = torch.Tensor
DT = torch.float64
FULL_RANK = 16  # the twist's covariance C in full up to this many observed directions, else one scalar


class TSMC(SpectralSMC):
    name = "tsmc"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, gamma: float = 2.0, probes: int = 8,
                 cov: str = "prior", **smc):
        super().__init__(model, op, y, sigma_y, **smc)
        if cov not in ("prior", "ensemble"):
            raise ValueError(f"tsmc: cov must be 'prior' or 'ensemble', got {cov!r}")
        self.cov = cov
        if not gamma > 0:
            raise ValueError(f"tsmc: gamma must be > 0, got {gamma}")
        if int(probes) < 1:
            raise ValueError(f"tsmc: probes must be >= 1, got {probes}")
        self.gamma, self.probes = float(gamma), int(probes)
        self.C_eig: Optional[Tuple[Tensor, Tensor]] = None

    def schedule(self, S: Tensor) -> Tuple[Tensor, Tensor]:
        w = self.rho2[None, :] + self.gamma**2 * S[:, None] ** 2
        return w, torch.zeros_like(w, dtype=torch.bool)

    def _probe_cost(self, n: int) -> int:
        """Network evaluations per output sample of the probes (``prepare``)."""
        calls = 1 + (self.V.shape[1] if self.V.shape[1] <= FULL_RANK else 1)
        return math.ceil(calls * min(self.probes, n * self.oversample) / n)

    def overhead(self, n: int) -> int:
        return super().overhead(n) + (self._probe_cost(n) if self.cov == "prior" else 0)

    def prepare(self, x: Tensor, grid: TimeGrid) -> None:
        """C = S_T^2 sym(V^T J V) at ``probes`` start particles (J = d x0_hat / d x~ by forward differences)."""
        if self.cov != "prior":
            return
        V, r = self.V, self.V.shape[1]
        xs = x[: self.probes]
        S0 = float(grid.sigma[0] / grid.alpha[0])
        h = 1e-3 * S0
        before = self.nfe
        base = self._x0(xs, grid, 0) @ V
        if r <= FULL_RANK:
            J = torch.stack([((self._x0(xs + h * V[:, i], grid, 0) @ V) - base) / h for i in range(r)], 1).mean(0)
            C = S0**2 * 0.5 * (J + J.T)
        else:  # one random direction in span(V): a scalar variance on the observed directions
            u = torch.randn(r, generator=torch.Generator().manual_seed(0), dtype=DT)
            u = u / u.norm()
            c = S0**2 * float(((((self._x0(xs + h * (V @ u), grid, 0) @ V) - base) / h) @ u).mean())
            C = torch.diag(torch.full((r,), c, dtype=DT))
        ev, U = torch.linalg.eigh(C)
        self.C_eig = (ev.clamp_min(1e-12), U)
        self.nfe = before + self._probe_cost(x.shape[0] // self.oversample)

    def denoised_twist(self, xb: Tensor, x0b: Tensor, logw: Tensor, k: int, S: Tensor) -> Optional[Tensor]:
        if k == S.numel() - 1:  # the likelihood of the returned samples
            return _log_normal(x0b, self.y_bar, self.rho2)
        S2 = float(S[k]) ** 2
        if self.cov == "ensemble":  # E Cov[x_bar0 | x_t] = S^2 (I - E eps_bar eps_bar^T), over the weighted particles
            e = (xb - x0b) / math.sqrt(S2)
            w = torch.softmax(logw, 0)
            R = S2 * (torch.eye(e.shape[1], dtype=DT) - (e * w[:, None]).T @ e)
            ev, U = torch.linalg.eigh(0.5 * (R + R.T))
            R = (U * ev.clamp_min(0.0)) @ U.T
        else:
            assert self.C_eig is not None
            ev, U = self.C_eig
            R = (U * (ev * S2 / (ev + S2))) @ U.T
        L = torch.linalg.cholesky(R + torch.diag(self.rho2))
        z = torch.linalg.solve_triangular(L, (x0b - self.y_bar).T, upper=False).T
        return -0.5 * (z * z).sum(1) - torch.log(torch.diagonal(L)).sum() - 0.5 * z.shape[1] * math.log(2 * math.pi)
