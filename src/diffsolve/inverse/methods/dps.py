"""DPS: diffusion posterior sampling (Chung et al. 2022, arXiv:2209.14687).

The likelihood is taken at the point estimate, p(y | x_t) ~ N(y; A x0_hat(x_t), .), with DPS's step-size rule
zeta_t = zeta / ||y - A x0_hat|| on the gradient of ||y - A x0_hat||^2.  Here as an x0 correction:

    E[x0 | x_t, y] ~ x0_hat - gamma_t zeta grad_{x_t} ||y - A x0_hat||,

with the norm taken per sample (the reference code normalises by the whole batch's residual, so its step depends
on the batch size).  One VJP per evaluation; works with non-linear operators.
"""
from __future__ import annotations

import torch

from ..guided import Guided, Tape, gamma


class DPS(Guided):
    name = "dps"

    def __init__(self, model, op, y, sigma_y, zeta: float = 1.0):
        super().__init__(model, op, y, sigma_y)
        if not zeta > 0:
            raise ValueError(f"DPS needs a step size zeta > 0, got {zeta}")
        self.zeta = float(zeta)

    def correction(self, tape: Tape, alpha, sigma):
        r = self._residual(tape.y_hat)
        norm = r.flatten(1).norm(dim=1).clamp_min(1e-12)
        (g,) = torch.autograd.grad(norm.sum(), tape.xg, retain_graph=True)
        self.count()
        return -gamma(alpha, sigma) * self.zeta * g


class DPSStep:
    """DPS as published (Algorithm 1 of Chung et al.): a DDPM ancestral step from (x_t, x0_hat), then

        x_s <- x_s - zeta grad_{x_t} ||y - A x0_hat(x_t)||

    with the norm per sample (``DPS`` above is the same likelihood approximation as an x0 correction for any
    solver).  One evaluation and one VJP per step; the clean end is the x0 prediction at t_min."""

    name = "dps"

    def __init__(self, model, op, y, sigma_y, zeta: float = 0.3):
        from ..exact import check_measurement

        if not zeta > 0:
            raise ValueError(f"DPS needs a step size zeta > 0, got {zeta}")
        self.model, self.op, self.zeta = model, op, float(zeta)
        self.y = check_measurement(op, y, sigma_y)
        self.nfe = self.vjps = 0

    def run(self, noise, grid, rng, generator):
        import math

        x = self.model.process.prior_from_noise(noise.to(torch.float64))
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("dps runs on a grid that ends at t_min (final='t_min')")
        for i in range(n_pts):
            a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                x0 = self.model.evaluate(xg, float(grid.t[i]), {}, (a_t, s_t)).x0
                if not x0.requires_grad:
                    raise TypeError("dps needs gradients through the model, but its x0 prediction has no graph")
                norm = (self.y.to(x0.dtype) - self.op.forward(x0)).flatten(1).norm(dim=1)
                (g,) = torch.autograd.grad(norm.sum(), xg)
            self.nfe += 1
            self.vjps += 1
            x0 = x0.detach()
            if i == n_pts - 1:
                return x0
            a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
            tau = min(max(1 - (a_t * s_s / (a_s * s_t)) ** 2, 0.0), 1.0)
            x = a_s * x0 + s_s * math.sqrt(1 - tau) * (x - a_t * x0) / s_t + s_s * math.sqrt(tau) * rng.like(x)
            x = x - self.zeta * g
        return x
