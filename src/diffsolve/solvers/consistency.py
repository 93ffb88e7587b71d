"""Consistency multistep sampling (Song et al. 2023, Consistency Models, arXiv:2303.01469, Alg. 1; LCM,
arXiv:2310.04378): at each grid point the model's clean estimate x0(x_i, t_i) is taken as the sample, then
re-noised to the next grid point with fresh noise, x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z, z ~ N(0, I).

The sampler of few-step students (consistency-distilled, reflow and MMD students alike); on a teacher it is
DDPM's ancestral step with all of the noise refreshed.  The last step is the denoiser jump to clean data.
"""
from __future__ import annotations

from typing import List

import torch

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_multistep
from .state import Noise, Point

Tensor = torch.Tensor


def consistency(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise):
    def update(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, _ = grid_point(grid, i + 1)
        return a_t * hist[-1].x0 + s_t * ev.state.noise.like(x)

    return run_multistep(ev, x, grid, update, order=1, history=1)
