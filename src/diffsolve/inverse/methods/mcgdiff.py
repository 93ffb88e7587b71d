"""MCGdiff: Monte Carlo guided diffusion (Cardoso, Janati, Le Corff, Moulines 2023, arXiv:2308.07983).

Sequential Monte Carlo in the spectral basis of A (the engine and its notation: ``smc.SpectralSMC``).  The noisy
measurement of observed coordinate i, y_bar_i = x_bar0_i + rho_i n (rho_i = sigma_y / s_i), has the law of the
diffused state at the VE noise level rho_i.  So the coordinate is *pinned* at the time tau_i with
S_{tau_i} ~ rho_i: above it the particles follow the forward bridge towards the pseudo-observation,

    g_t,i(x_bar_i) = N(x_bar_i; y_bar_i, S_t^2 - S_tau^2 + c_i),   c_i = rho_i^2 - S_tau^2 (the final potential's),

and below it the coordinate is free.  The grid's nearest interior points are moved onto S = sqrt(1 - kappa) rho_i
(the paper's singular-value-adapted time steps), so c_i = kappa rho_i^2; coordinates with rho_i above the start
level are conditioned exactly at the start, those below the last level pinned at the last point.  The paper's
defaults: DDIM eta (0.85 at 100 steps), resampling at every step.  Ours: systematic resampling when the effective
sample size falls below ``ess`` N, the start drawn from the bridge exactly, and the potential at the pin kept as the
measurement's likelihood rather than divided out.  One network evaluation per particle and step, no VJP.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ..operators import Operator
from .smc import SpectralSMC, final_variance, pin_points, snap_grid

Tensor = torch.Tensor


class MCGDiff(SpectralSMC):
    name = "mcgdiff"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, kappa: float = 1e-4,
                 snap: bool = True, **smc):
        super().__init__(model, op, y, sigma_y, **smc)
        if not 0 < kappa < 1:
            raise ValueError(f"mcgdiff: kappa must lie in (0, 1), got {kappa}")
        self.kappa, self.snap = float(kappa), bool(snap)

    def adapt_grid(self, grid: TimeGrid, n: int) -> TimeGrid:
        if not self.snap:
            return grid
        return snap_grid(grid, self.model.process, (math.sqrt(1 - self.kappa) * self.rho2.sqrt()).tolist())

    def schedule(self, S: Tensor) -> Tuple[Tensor, Tensor]:
        pins = pin_points(S, self.rho2)
        c = final_variance(S, self.rho2, pins, self.kappa)
        k = torch.arange(S.numel())[:, None]
        bridge = S[:, None] ** 2 - S[pins][None, :] ** 2 + c[None, :]
        w = torch.where(k < pins[None, :], bridge, torch.full_like(bridge, math.inf))
        w = torch.where(k == pins[None, :], c[None, :].expand_as(w), w)
        return w, k == pins[None, :]
