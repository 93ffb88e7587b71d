"""DAPS: decoupled annealing posterior sampling (Zhang et al. 2024, arXiv:2407.01521).

Anneal down a grid of noise levels t_0 > t_1 > ... > t_K, each step decoupled from the last:

1. x0_hat = an estimate of x0 from x_{t_i}: the model's x0 prediction (``ode_steps = 1``) or the probability-flow ODE
   solved to t_min in ``ode_steps`` DDIM steps (the paper's choice);
2. x0 ~ p(x0 | x_{t_i}, y) under the Gaussian approximation p(x0 | x_t) = N(x0_hat, r_t^2 I),
   r_t^2 = S_t^2 / (1 + S_t^2 / data_var) (S_t = sigma_t / alpha_t; the exact posterior variance of a N(mu, data_var I)
   prior).  With a linear-Gaussian measurement y = A x0 + sigma_y n this conditional is Gaussian and is sampled
   exactly in the operator's SVD (where the paper runs Langevin steps towards it):
   mean = argmin ||y - A x||^2 / sigma_y^2 + ||x - x0_hat||^2 / r^2 (``Operator.prox``), variance per singular
   direction 1 / (1 / r^2 + s_i^2 / sigma_y^2), r^2 in the unobserved directions;
3. x_{t_{i+1}} = alpha_{i+1} x0 + sigma_{i+1} z with fresh noise z.

If x_{t_i} ~ p(x_{t_i} | y) and step 2 is exact, x0 ~ p(x0 | y) and x_{t_{i+1}} ~ p(x_{t_{i+1}} | y): for a Gaussian
prior with isotropic covariance (and ``data_var`` its variance) DAPS samples the posterior exactly up to the start.
No VJP; ``ode_steps`` network evaluations per annealing step.
"""
from __future__ import annotations

import math

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid, explicit
from ...sampling import sample
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator
from .smc import spectral_basis

Tensor = torch.Tensor
DT = torch.float64


class DAPS:
    name = "daps"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, ode_steps: int = 1,
                 data_var: float = 1.0):
        if int(ode_steps) < 1:
            raise ValueError(f"DAPS's ode_steps must be >= 1, got {ode_steps}")
        if not data_var > 0:
            raise ValueError(f"DAPS's data_var must be > 0, got {data_var}")
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y, batch=True)
        _, self.s, self.V = spectral_basis(op, "daps")  # V [d, r]: the observed directions
        self.ode_steps, self.data_var = int(ode_steps), float(data_var)
        self.nfe = self.vjps = 0

    def _x0_hat(self, x: Tensor, grid: TimeGrid, i: int) -> Tensor:
        t, a, s = float(grid.t[i]), float(grid.alpha[i]), float(grid.sigma[i])
        with torch.no_grad():
            p = self.model.process
            if self.ode_steps == 1 or t <= p.t_min:  # at t_min the ODE has no length left: the x0 prediction
                self.nfe += 1
                return self.model.evaluate(x, t, {}, (a, s)).x0.to(DT)
            lo, hi = p.lam(torch.tensor(t, dtype=DT)), p.lam(torch.tensor(p.t_min, dtype=DT))
            ts = p.t_of_lam(torch.linspace(float(lo), float(hi), self.ode_steps, dtype=DT))
            ts[0], ts[-1] = t, p.t_min
            g = explicit(p, t=ts, final="denoise")
            self.nfe += self.ode_steps
            return sample(self.model, x, "ddim", grid=g, scale_noise=False).to(DT)

    def _posterior_sample(self, x0_hat: Tensor, S: float, z: Tensor) -> Tensor:
        """x0 ~ N(x0_hat, r^2 I) restricted by y = A x0 + sigma_y n, exactly (SVD)."""
        n = x0_hat.shape[0]
        r2 = S**2 / (1.0 + S**2 / self.data_var)
        sy2 = max(self.sigma_y, 1e-12) ** 2
        mean = self.op.prox(x0_hat, self.y.expand((n,) + self.op.out_shape).to(DT), sy2 / max(r2, 1e-300))
        sd = (1.0 / (1.0 / max(r2, 1e-300) + self.s**2 / sy2)).sqrt()  # along V; r elsewhere
        z = z.reshape(n, -1)
        return mean.reshape(n, -1) + math.sqrt(r2) * z + ((sd - math.sqrt(r2)) * (z @ self.V)) @ self.V.T

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """Samples from standard normal ``noise`` on the annealing ``grid`` (ending at t_min); ``rng``: the per-sample
        streams of the fresh noise."""
        shape = noise.shape
        p = self.model.process
        x = p.prior_from_noise(noise.to(DT))
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("daps runs on a grid that ends at t_min (final='t_min')")
        x0 = x
        for i in range(n_pts):
            S = float(grid.sigma[i] / grid.alpha[i])
            x0 = self._posterior_sample(self._x0_hat(x, grid, i).reshape(shape), S, rng.like(x))
            x0 = x0.reshape(shape)
            if i + 1 < n_pts:
                x = float(grid.alpha[i + 1]) * x0 + float(grid.sigma[i + 1]) * rng.like(x)
        return x0
