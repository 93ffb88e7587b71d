"""DDRM: denoising diffusion restoration models (Kawar et al. 2022, arXiv:2201.11793).

A DDIM-type sampler run in the operator's spectral basis.  With A = U diag(s) V^T (completed to an orthonormal
basis of the data space), the VE view x~ = x / alpha at noise level S_t, x_bar = V^T x~ and y_bar = diag(1/s) U^T y,
one step from S_t to S_s (< S_t) with the model's x0_bar = V^T x0_hat(x_t) and eps_bar = (x_bar - x0_bar) / S_t is,
per coordinate i:

* unobserved (s_i = 0):          x0_bar + sqrt(1 - eta^2) S_s eps_bar + eta S_s z;
* observed, s_i S_s < sigma_y:   x0_bar + sqrt(1 - eta^2) S_s (y_bar - x0_bar) s_i / sigma_y + eta S_s z;
* observed, s_i S_s >= sigma_y:  (1 - eta_b) x0_bar + eta_b y_bar + sqrt(S_s^2 - eta_b^2 sigma_y^2 / s_i^2) z.

The start draws the observed coordinates around y_bar with the remaining variance.  No VJP: one network
evaluation per step (the defaults eta = 0.85, eta_b = 1 are the paper's).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator

Tensor = torch.Tensor
DT = torch.float64


def complete_basis(V: Tensor) -> Tensor:
    """[d, d] orthonormal basis whose first columns are V's (V: [d, r] orthonormal)."""
    d, r = V.shape
    if r == d:
        return V
    Q, _ = torch.linalg.qr(torch.cat([V, torch.eye(d, dtype=V.dtype)], 1))
    Q = Q[:, :d]
    Q[:, :r] = V  # QR may flip signs of V's columns: keep V itself
    return Q


def spectrum(op: Operator) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(U [m, r], S [r], V [d, d], s [d]) of a linear operator: its SVD with V completed to an orthonormal basis of
    the data space and s its singular values padded with zeros for the unobserved directions."""
    U, S, V = op.svd()
    s = torch.cat([S.to(DT), torch.zeros(op.in_dim - S.numel(), dtype=DT)])
    return U, S, complete_basis(V.to(DT)), s


class DDRM:
    name = "ddrm"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, eta: float = 0.85, eta_b: float = 1.0):
        if not op.linear:
            raise TypeError("DDRM needs a linear operator (its SVD)")
        if not (0 <= eta <= 1 and 0 <= eta_b <= 1):
            raise ValueError("DDRM's eta and eta_b must lie in [0, 1]")
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y, batch=True)
        U, S, self.V, self.s = spectrum(op)
        self.r = S.numel()
        yf = self.y.reshape(self.y.shape[0], -1).to(DT)  # [1 or B, m]
        self.y_bar = torch.cat([(yf @ U) / S, torch.zeros(yf.shape[0], op.in_dim - self.r, dtype=DT)], 1)
        self.eta, self.eta_b = float(eta), float(eta_b)
        self.nfe = self.vjps = 0

    def _x0(self, x: Tensor, t: float, a: float, s: float) -> Tensor:
        self.nfe += 1
        with torch.no_grad():
            return self.model.evaluate(x, t, {}, (a, s)).x0.to(DT)

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """Samples from standard normal ``noise`` on ``grid`` (final='t_min'; one evaluation per point, the last
        one's x0 prediction is the result); ``rng``: the per-sample streams of the steps' noise."""
        shape = noise.shape
        n = shape[0]
        obs = self.s > 0
        s_, yb, sy, eta, eta_b = self.s, self.y_bar, self.sigma_y, self.eta, self.eta_b
        S0 = float(grid.sigma[0] / grid.alpha[0])
        # the start, in the spectral basis of the VE view
        z = rng.like(noise.to(DT)).reshape(n, -1)
        xb = S0 * z
        rem = (S0**2 - sy**2 / s_[obs].clamp_min(1e-300) ** 2).clamp_min(0.0).sqrt()
        xb[:, obs] = torch.where(S0 * s_[obs] >= sy, yb[:, obs] + rem * z[:, obs], xb[:, obs])
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("ddrm runs on a grid that ends at t_min (final='t_min')")
        for i in range(n_pts):
            a_t, sig_t = float(grid.alpha[i]), float(grid.sigma[i])
            St = sig_t / a_t
            x = (xb @ self.V.T).reshape(shape) * a_t
            x0b = self._x0(x, float(grid.t[i]), a_t, sig_t).reshape(n, -1) @ self.V
            if i == n_pts - 1:  # the final jump: the denoised state
                xb = x0b
                break
            Ss = float(grid.sigma[i + 1] / grid.alpha[i + 1])
            eps = (xb - x0b) / St
            z = rng.like(x).reshape(n, -1).to(DT)
            new = x0b + math.sqrt(1 - eta**2) * Ss * eps + eta * Ss * z  # unobserved
            so, ybo, x0o = s_[obs], yb[:, obs], x0b[:, obs]
            weak = so * Ss < sy
            noisy = x0o + math.sqrt(1 - eta**2) * Ss * (ybo - x0o) * so / max(sy, 1e-300) + eta * Ss * z[:, obs]
            var = (Ss**2 - eta_b**2 * sy**2 / so**2).clamp_min(0.0)
            strong = (1 - eta_b) * x0o + eta_b * ybo + var.sqrt() * z[:, obs]
            new[:, obs] = torch.where(weak, noisy, strong)
            xb = new
        return (xb @ self.V.T).reshape(shape)
