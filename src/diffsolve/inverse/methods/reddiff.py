"""RED-diff: a variational (point-mass) posterior with a diffusion regulariser (Mardani et al. 2023,
arXiv:2305.04391; a seed paper).

mu (one per sample, started at A^+ y) minimises, by Adam over a descending time grid,

    L(mu) = mean (y - A mu)^2 / 2 + lam_t mean(sg[eps_hat(x_t) - eps] * mu),   x_t = alpha_t mu + sigma_t eps,

eps ~ N(0, I) fresh at every step, lam_t = lam sigma_t / alpha_t (the paper's 'linear' weighting); the second term is
the score-distillation gradient of the prior, with no VJP through the network.  One evaluation per step.  It
returns the optimised mu: a point estimate, not posterior samples (no spread).
"""
from __future__ import annotations

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator

Tensor = torch.Tensor
DT = torch.float64


class REDDiff:
    name = "reddiff"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, lam: float = 0.25, lr: float = 0.1,
                 betas: tuple = (0.9, 0.99)):
        if lam < 0 or lr <= 0:
            raise ValueError("RED-diff needs lam >= 0 and lr > 0")
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y, batch=True)
        self.lam, self.lr, self.betas = float(lam), float(lr), tuple(betas)
        self.nfe = self.vjps = 0

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        n = noise.shape[0]
        y = self.y.expand((n,) + self.op.out_shape)
        start = self.op.pinv(y) if self.op.linear else torch.zeros_like(noise, dtype=DT)
        mu = start.to(DT).clone().requires_grad_(True)
        opt = torch.optim.Adam([mu], lr=self.lr, betas=self.betas)
        for i in range(grid.t.numel()):
            if grid.is_clean(i):
                break
            a, s = float(grid.alpha[i]), float(grid.sigma[i])
            eps = rng.like(noise.to(DT))
            with torch.no_grad():
                eps_hat = self.model.evaluate(a * mu.detach() + s * eps, float(grid.t[i]), {}, (a, s)).eps.to(DT)
            self.nfe += 1
            opt.zero_grad()
            data = 0.5 * ((y - self.op.forward(mu)) ** 2).flatten(1).mean(1).sum()
            reg = (self.lam * s / a) * ((eps_hat - eps) * mu).flatten(1).mean(1).sum()
            (data + reg).backward()
            opt.step()
        return mu.detach()
