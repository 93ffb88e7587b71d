"""PiGDM: pseudo-inverse guided diffusion (Song et al. 2023, ICLR, OpenReview 9_gsMA8MRKQ).

The posterior covariance of x0 is taken isotropic, r_t^2 I with r_t^2 = s^2 / (1 + s^2) (s = sigma_t / alpha_t;
exact for unit-variance data), so that

    E[x0 | x_t, y] ~ x0_hat + gamma_t J_t^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x0_hat),

the m x m system solved exactly in the operator's SVD (one VJP per evaluation).  With a standard normal prior and
its exact denoiser this is the exact posterior mean.
"""
from __future__ import annotations

import torch

from ..guided import Guided, Tape, gamma, step_guided_loop


class PiGDM(Guided):
    name = "pigdm"

    def __init__(self, model, op, y, sigma_y, data_var: float = 1.0):
        super().__init__(model, op, y, sigma_y)
        if not op.linear:
            raise TypeError("PiGDM needs a linear operator (its SVD)")
        self.data_var = float(data_var)
        self.U, self.S, _ = op._svd_for("PiGDM")

    def correction(self, tape: Tape, alpha, sigma):
        a = torch.as_tensor(alpha, dtype=torch.float64)
        s = torch.as_tensor(sigma, dtype=torch.float64)
        sv2 = (s / a) ** 2
        r2 = (self.data_var * sv2 / (self.data_var + sv2)).reshape(-1, 1)
        res = self._residual(tape.y_hat).detach()
        rf = res.reshape(res.shape[0], -1).to(torch.float64)
        # (r^2 U S^2 U^T + sigma_y^2 I)^{-1} r in the SVD (U has orthonormal columns; its complement sees sigma_y^2)
        U, S = self.U, self.S
        ru = rf @ U
        sol = (ru / (r2 * S**2 + self.sigma_y**2)) @ U.T
        if self.sigma_y > 0:  # the part of r outside A's range (zero up to rounding when sigma_y = 0)
            sol = sol + (rf - ru @ U.T) / self.sigma_y**2
        sol = sol.reshape(res.shape).to(res.dtype)
        self.count()
        return gamma(alpha, sigma) * tape.vjp(tape.y_hat, tape.xg, sol)


class PiGDMStep:
    """PiGDM as a sampler step (the form of the paper's Algorithm 1 in the noiseless limit): a DDIM(eta) step from
    (x_t, x0_hat), then

        x_s <- x_s + alpha_s alpha_t J_t^T (A^+ y - A^+ A x0_hat)

    (one evaluation and one VJP per step; the clean end is the x0 prediction at t_min)."""

    name = "pigdm-step"

    def __init__(self, model, op, y, sigma_y, eta: float = 0.0):
        from ..exact import check_measurement

        if not op.linear:
            raise TypeError("PiGDM needs a linear operator (its pseudo-inverse)")
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        self.model, self.op, self.eta = model, op, float(eta)
        self.y = check_measurement(op, y, sigma_y, batch=True)
        self.pinv_y = op.pinv(self.y)
        self.nfe = self.vjps = 0

    def run(self, noise, grid, rng, generator):
        def gradient(xg, x0):
            v = (self.pinv_y.to(x0.dtype) - self.op.pinv(self.op.forward(x0.detach()))).expand_as(x0)
            return torch.autograd.grad(x0, xg, v)[0]

        x, n = step_guided_loop(self.model, noise, grid, rng, self.eta, self.name, gradient,
                                lambda x, g, a_s, a_t: x + a_s * a_t * g)
        self.nfe += n
        self.vjps += n
        return x
