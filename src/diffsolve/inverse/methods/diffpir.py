"""DiffPIR: plug-and-play image restoration with a diffusion prior (Zhu et al. 2023, arXiv:2305.08995).

Half-quadratic splitting at every evaluation: the model's x0 prediction is replaced by the data-consistent

    x0_y = argmin_x ||y - A x||^2 + rho_t ||x - x0_hat||^2,   rho_t = lam sigma_y^2 / s_t^2   (s_t = sigma_t / alpha_t),

the operator's closed-form prox (``Operator.prox``); the solver then re-noises from x0_y (with ``solver='ddim'``
and ``eta`` the paper's zeta).  No VJP.  ``sigma_y = 0`` uses ``sigma_floor`` in rho_t.
"""
from __future__ import annotations

import torch

from ..guided import Guided, Tape


class DiffPIR(Guided):
    name = "diffpir"
    needs_gradients = False

    def __init__(self, model, op, y, sigma_y, lam: float = 1.0, sigma_floor: float = 1e-3):
        super().__init__(model, op, y, sigma_y)
        if not op.linear:
            raise TypeError("DiffPIR needs a linear operator (its prox)")
        if lam <= 0:
            raise ValueError(f"DiffPIR's lam must be > 0, got {lam}")
        self.lam, self.floor = float(lam), float(sigma_floor)

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        from ...adapters.denoiser import Prediction

        pred = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        a = torch.as_tensor(pred.alpha, dtype=torch.float64)
        s = torch.as_tensor(pred.sigma, dtype=torch.float64)
        sy = max(self.sigma_y, self.floor)
        rho = (self.lam * sy**2 / (s / a) ** 2).flatten()
        x0 = self.op.prox(pred.x0.detach(), self.y.expand((x.shape[0],) + self.op.out_shape).to(x.dtype),
                          rho if rho.numel() > 1 else float(rho))
        return Prediction(x, pred.alpha, pred.sigma, x0=x0)

    def correction(self, tape: Tape, alpha, sigma):  # not used: evaluate is overridden (no graph needed)
        raise NotImplementedError
