"""TMPD: tweedie moment-projected diffusion (Boys et al. 2023, arXiv:2310.06721).

MMPS with A Cov[x0 | x_t] A^T replaced by its row sums, diag(A gamma_t J_t A^T 1), so that the solve is an
elementwise division (two VJPs per evaluation):

    E[x0 | x_t, y] ~ x0_hat + gamma_t J_t^T A^T [(y - A x0_hat) / (sigma_y^2 + A gamma_t J_t A^T 1)].
"""
from __future__ import annotations

import torch

from ..guided import Guided, Tape, gamma


class TMPD(Guided):
    name = "tmpd"

    def correction(self, tape: Tape, alpha, sigma):
        g = gamma(alpha, sigma)
        op = self.op
        v = op.forward(g * tape.vjp(tape.y_hat, tape.xg, torch.ones_like(tape.y_hat)))
        r = self._residual(tape.y_hat).detach()
        self.count(2)
        # the row-sum estimate may be negative for a general A: kept signed (the published rule; it diverges on
        # some dense operators with mixed-sign rows, docs/inverse.md), only an exact zero is guarded
        var = self.sigma_y**2 + v
        var = torch.where(var.abs() < 1e-12, torch.full_like(var, 1e-12), var)
        return g * tape.vjp(tape.y_hat, tape.xg, r / var)
