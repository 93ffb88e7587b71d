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

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator
from .smc import spectral_basis

Tensor = torch.Tensor
DT = torch.float64


class DDRM:
    name = "ddrm"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, eta: float = 0.85, eta_b: float = 1.0):
        if not (0 <= eta <= 1 and 0 <= eta_b <= 1):
            raise ValueError("DDRM's eta and eta_b must lie in [0, 1]")
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y, batch=True)  # [1 or n, *out_shape]
        U, self.s, self.V = spectral_basis(op, "ddrm")  # V [d, r]: the observed directions; the rest is isotropic
        self.y_bar = (self.y.reshape(self.y.shape[0], -1).to(DT) @ U) / self.s  # [1 or n, r]
        self.eta, self.eta_b = float(eta), float(eta_b)
        self.nfe = self.vjps = 0

    def _x0(self, x: Tensor, t: float, a: float, s: float) -> Tensor:
        self.nfe += 1
        with torch.no_grad():
            return self.model.evaluate(x, t, {}, (a, s)).x0.to(DT)

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """Samples from standard normal ``noise`` on ``grid`` (final='t_min'; one evaluation per point, the last
        one's x0 prediction is the result); ``rng``: the per-sample streams of the steps' noise.  The unobserved
        rule is isotropic, so it runs in the data space and the observed coordinates x V are then replaced."""
        shape = noise.shape
        n = shape[0]
        V, s_, yb, sy, eta, eta_b = self.V, self.s, self.y_bar, self.sigma_y, self.eta, self.eta_b
        S0 = float(grid.sigma[0] / grid.alpha[0])
        z = rng.like(noise.to(DT)).reshape(n, -1)
        x = S0 * z  # the start in the VE view
        zb = z @ V
        rem = (S0**2 - sy**2 / s_**2).clamp_min(0.0).sqrt()
        xb = torch.where(S0 * s_ >= sy, yb + rem * zb, S0 * zb)
        x = x + (xb - x @ V) @ V.T
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("ddrm runs on a grid that ends at t_min (final='t_min')")
        for i in range(n_pts):
            a_t, sig_t = float(grid.alpha[i]), float(grid.sigma[i])
            St = sig_t / a_t
            x0 = self._x0((x * a_t).reshape(shape), float(grid.t[i]), a_t, sig_t).reshape(n, -1)
            if i == n_pts - 1:  # the final jump: the denoised state
                x = x0
                break
            Ss = float(grid.sigma[i + 1] / grid.alpha[i + 1])
            eps = (x - x0) / St
            z = rng.like(x.reshape(shape)).reshape(n, -1).to(DT)
            new = x0 + math.sqrt(1 - eta**2) * Ss * eps + eta * Ss * z  # unobserved
            x0b, zb = x0 @ V, z @ V
            weak = s_ * Ss < sy
            noisy = x0b + math.sqrt(1 - eta**2) * Ss * (yb - x0b) * s_ / max(sy, 1e-300) + eta * Ss * zb
            var = (Ss**2 - eta_b**2 * sy**2 / s_**2).clamp_min(0.0)
            strong = (1 - eta_b) * x0b + eta_b * yb + var.sqrt() * zb
            x = new + (torch.where(weak, noisy, strong) - new @ V) @ V.T
        return x.reshape(shape)
