"""MMPS: moment-matching posterior sampling (Rozet et al. 2024, arXiv:2405.13712).

The likelihood p(y | x_t) is taken Gaussian with the full Tweedie covariance Cov[x0 | x_t] = gamma_t J_t:

    E[x0 | x_t, y] ~ x0_hat + gamma_t J_t^T A^T (sigma_y^2 I + A gamma_t J_t A^T)^{-1} (y - A x0_hat),

the linear system solved by ``iterations`` conjugate-gradient steps (one VJP each; with m iterations and an
exact denoiser of a Gaussian prior the correction is the exact posterior mean).
"""
from __future__ import annotations

from ..guided import Guided, Tape, conjugate_gradient, gamma


class MMPS(Guided):
    name = "mmps"

    def __init__(self, model, op, y, sigma_y, iterations: int = 3):
        super().__init__(model, op, y, sigma_y)
        if iterations < 1:
            raise ValueError(f"MMPS needs at least one solver iteration, got {iterations}")
        self.iterations = int(iterations)

    def correction(self, tape: Tape, alpha, sigma):
        g = gamma(alpha, sigma)
        op = self.op

        def cov_y(v):  # (sigma_y^2 + A gamma J A^T) v; J^T A^T v by one VJP through A(x0_hat(x_t))
            return self.sigma_y**2 * v + op.forward(g * tape.vjp(tape.y_hat, tape.xg, v))

        r = self._residual(tape.y_hat).detach()
        u = conjugate_gradient(cov_y, r, self.iterations, self.count)
        self.count()
        return g * tape.vjp(tape.y_hat, tape.xg, u)
