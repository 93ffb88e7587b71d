"""DPS: diffusion posterior sampling (Chung et al. 2022, arXiv:2209.14687).

The likelihood is taken at the point estimate, p(y | x_t) ~ N(y; A x0_hat(x_t), .), with DPS's step-size rule
zeta_t = zeta / ||y - A x0_hat|| on the gradient of ||y - A x0_hat||^2.  Here as an x0 correction:

    E[x0 | x_t, y] ~ x0_hat - gamma_t zeta grad_{x_t} ||y - A x0_hat||,

with the norm taken per sample (the reference code normalises by the whole batch's residual, so its step depends
on the batch size).  One VJP per evaluation; works with non-linear operators.
"""
from __future__ import annotations

import torch

from ..guided import Guided, Tape, gamma, step_guided_loop


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
        self.y = check_measurement(op, y, sigma_y, batch=True)
        self.nfe = self.vjps = 0

    def run(self, noise, grid, rng, generator):
        def gradient(xg, x0):
            norm = (self.y.to(x0.dtype) - self.op.forward(x0)).flatten(1).norm(dim=1)
            return torch.autograd.grad(norm.sum(), xg)[0]

        x, n = step_guided_loop(self.model, noise, grid, rng, 1.0, self.name, gradient,
                                lambda x, g, a_s, a_t: x - self.zeta * g)
        self.nfe += n
        self.vjps += n
        return x
