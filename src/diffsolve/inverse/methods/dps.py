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
