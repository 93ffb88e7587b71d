"""DDIM (Song et al. 2021, arXiv:2010.02502) and DDPM ancestral sampling (Ho et al. 2020).

x_t = alpha_t x0 + sqrt(sigma_t^2 - s^2) eps + s z,   s = eta sigma_t sqrt(1 - e^{-2h}),
h = lambda_t - lambda_s.  eta = 0 is the deterministic DDIM (= DPM-Solver-1 = Euler in the VE
view); eta = 1 is DDPM's ancestral step with the posterior variance (written for any process).
"""
from __future__ import annotations

import math
from typing import List

import torch

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_multistep
from .expint import exp_step
from .state import Noise, Point

Tensor = torch.Tensor


def ddim(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, eta: float = 0.0):
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def update(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p = hist[-1]
        if eta == 0:  # first-order exponential step in whichever form the model gave
            return exp_step(x, p, a_t, s_t, lam_t, [p.pred.x0 if p.pred.native == "x0" else p.eps],
                            "data" if p.pred.native == "x0" else "noise")
        s_eta = eta * s_t * math.sqrt(-math.expm1(-2.0 * (lam_t - p.lam)))
        s_eta = min(s_eta, s_t)
        return a_t * p.x0 + math.sqrt(s_t**2 - s_eta**2) * p.eps + s_eta * ev.state.noise.like(x)

    return run_multistep(ev, x, grid, update, order=1, history=1)


def ddpm(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise):
    """Ancestral sampling: DDIM with eta = 1."""
    return ddim(ev, x, grid, noise, eta=1.0)
