"""RePaint: inpainting by replacement with resampling (Lugmayr et al. 2022, arXiv:2201.09865).

Each step t -> s of a DDIM(eta) sampler (eta = 1: DDPM's ancestral step) is followed by a *replacement*: the part of
x_s that the measurement sees is overwritten by a draw of the noised measurement.  Then, ``resample`` times, the
state is sent back up by the forward process and the step is redone, so that the model can harmonise the
generated part with the replaced one.  With ``jump`` = j > 1 the resampling goes back j steps at once
(the paper's jumps; a block of j steps is run ``resample`` + 1 times).

Replacement, generalised from masks to any linear operator A = U diag(s) V^T (VE view x~ = x / alpha at noise
level S = sigma / alpha; x_bar = V^T x~, y_bar = diag(1/s) U^T y with noise sigma_y / s_i per coordinate):

* coordinates with S_s s_i >= sigma_y:  x_bar_i = y_bar_i + sqrt(S_s^2 - sigma_y^2 / s_i^2) z_i
  (the marginal q(x_s | y) of that coordinate; for a mask and sigma_y = 0 it is alpha_s y + sigma_s z, the paper's);
* the others (unobserved, or the measurement noisier than the state) keep the model's value.

Going back up from s to t (t > s): x_t = (alpha_t / alpha_s) x_s + alpha_t sqrt(S_t^2 - S_s^2) z, i.e. q(x_t | x_s).
No VJP: one network evaluation per step and pass; the clean end is the x0 prediction at the last grid point.
With ``jump = 1`` and sigma_y = 0 on a mask this is azula's ``RePaintSampler`` with ``iterations = resample + 1``.
"""
from __future__ import annotations

import math
from typing import List

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator
from .smc import spectral_basis

Tensor = torch.Tensor
DT = torch.float64


def repaint_schedule(steps: int, jump: int, resample: int) -> List[int]:
    """The grid indices RePaint visits, from 0 (t_max) down to ``steps``: blocks of ``jump`` steps, each block run
    ``resample`` + 1 times (going back up to the block's start between runs)."""
    if steps < 1 or jump < 1 or resample < 0:
        raise ValueError("RePaint needs steps >= 1, jump >= 1 and resample >= 0")
    path = [0]
    start = 0
    while start < steps:
        end = min(start + jump, steps)
        for r in range(resample + 1):
            path += list(range(start + 1, end + 1))
            if r < resample:
                path.append(start)  # one jump back up to the block's start
        start = end
    return path


class RePaint:
    name = "repaint"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, resample: int = 3, jump: int = 1,
                 eta: float = 1.0):
        if not op.linear:
            raise TypeError("RePaint needs a linear operator (the part of x the measurement sees)")
        if int(resample) != resample or resample < 0:
            raise ValueError(f"RePaint's resample must be an integer >= 0, got {resample}")
        if int(jump) != jump or jump < 1:
            raise ValueError(f"RePaint's jump must be an integer >= 1, got {jump}")
        if not 0 <= eta <= 1:
            raise ValueError(f"RePaint's eta must lie in [0, 1], got {eta}")
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y, batch=True)
        U, self.s, self.V = spectral_basis(op, "repaint")  # V [d, r]: the observed directions
        self.y_bar = (self.y.reshape(self.y.shape[0], -1).to(DT) @ U) / self.s  # [1 or B, r]
        self.resample, self.jump, self.eta = int(resample), int(jump), float(eta)
        self.nfe = self.vjps = 0

    def _replace(self, x: Tensor, S: float, a: float, rng: Noise) -> Tensor:
        """Overwrite the measured coordinates of x (at VE level S, scale a) by a draw of q(x_s | y)."""
        n = x.shape[0]
        obs = self.s * S >= self.sigma_y
        if not bool(obs.any()):
            return x
        V, so = self.V[:, obs], self.s[obs]
        xv = x.reshape(n, -1).to(DT) / a
        z = rng.like(x).reshape(n, -1).to(DT) @ V  # drawn in data space (a mask's noise is per pixel)
        sd = (S**2 - self.sigma_y**2 / so**2).clamp_min(0.0).sqrt()
        xv = xv + (self.y_bar[:, obs] + sd * z - xv @ V) @ V.T
        return (a * xv).reshape(x.shape).to(x.dtype)

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """Samples from standard normal ``noise`` on ``grid`` (final='t_min'); ``rng``: the per-sample streams."""
        n_pts = grid.t.numel()
        if grid.is_clean(n_pts - 1):
            raise ValueError("repaint runs on a grid that ends at t_min (final='t_min')")
        al, sg = grid.alpha.tolist(), grid.sigma.tolist()
        x = self.model.process.prior_from_noise(noise.to(DT))
        path = repaint_schedule(n_pts - 1, self.jump, self.resample)
        for i, j in zip(path[:-1], path[1:]):
            if j < i:  # back up by the forward process: q(x_t | x_s)
                St, Ss = sg[j] / al[j], sg[i] / al[i]
                x = (al[j] / al[i]) * x + al[j] * math.sqrt(max(St**2 - Ss**2, 0.0)) * rng.like(x)
                continue
            a_t, s_t, a_s, s_s = al[i], sg[i], al[j], sg[j]
            with torch.no_grad():
                x0 = self.model.evaluate(x, float(grid.t[i]), {}, (a_t, s_t)).x0.to(DT)
            self.nfe += 1
            tau = min(max(self.eta * (1 - (a_t * s_s / (a_s * s_t)) ** 2), 0.0), 1.0)
            x = a_s * x0 + s_s * math.sqrt(1 - tau) * (x - a_t * x0) / s_t + s_s * math.sqrt(tau) * rng.like(x)
            x = self._replace(x, s_s / a_s, a_s, rng)
        with torch.no_grad():
            x0 = self.model.evaluate(x, float(grid.t[-1]), {}, (al[-1], sg[-1])).x0.to(DT)
        self.nfe += 1
        return x0
