"""Euler and Heun on the probability-flow ODE, and Euler-Maruyama on the reverse SDE.

The ODE is integrated in ``variable`` (default ``process.ode_variable``): 'sigma' means y = x/alpha against
s = sigma/alpha with dy/ds = eps (EDM / k-diffusion; Euler there equals DDIM), 't' means x against process
time with dx/dt = alpha' x0 + sigma' eps (flow matching's velocity).  Heun is EDM's second-order method
(Karras et al. 2022, Alg. 1).
Euler-Maruyama: dx = [f x + (g^2 + g~^2)/2 eps / sigma] dt + g~ dW over decreasing t (Song et al. 2021), with
g~ = g (the process's own reverse SDE) unless ``ds.sample(diffusion=...)`` chooses another diffusion g~(t)^2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_singlestep
from .expint import lincomb
from .state import Noise, Point

Tensor = torch.Tensor


class _View:
    """Coordinates (y, v) in which the ODE reads dy/dv = derivative(point)."""

    def __init__(self, process, variable: Optional[str]):
        self.p = process
        self.var = variable or process.ode_variable
        if self.var not in ("sigma", "t"):
            raise ValueError(f"variable must be 'sigma' or 't', got {self.var!r}")

    def v(self, t: float, alpha: float, sigma: float) -> float:
        return sigma / alpha if self.var == "sigma" else t

    def derivative(self, pt: Point) -> Tensor:
        if self.var == "sigma":
            return pt.eps
        t = torch.tensor(pt.t, dtype=torch.float64)
        return float(self.p.d_alpha(t)) * pt.x0 + float(self.p.d_sigma(t)) * pt.eps


def heun(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, second_order: bool = True,
         variable: Optional[str] = None):
    """EDM Heun (second_order=True) or Euler; the step to clean data is the denoiser jump."""
    view = _View(ev.process, variable)

    def step(x: Tensor, i: int, p0: Point, k: int):
        a_t, s_t, _ = grid_point(grid, i + 1)
        t_next = float(grid.t[i + 1])
        dv = view.v(t_next, a_t, s_t) - view.v(p0.t, p0.alpha, p0.sigma)
        d0 = view.derivative(p0)
        # x_next = to_x(to_y(x) + dv * d) = cx * x + cd * d, as one fused linear combination
        cx, cd = (a_t / p0.alpha, a_t * dv) if view.var == "sigma" else (1.0, dv)
        x_next = lincomb([(cx, x), (cd, d0)])
        if second_order:
            p1 = yield ev.request(x_next, t_next)
            x_next = lincomb([(cx, x), (0.5 * cd, d0), (0.5 * cd, view.derivative(p1))])
        return x_next

    return run_singlestep(ev, x, grid, step)


def euler(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, variable: Optional[str] = None):
    return heun(ev, x, grid, noise, second_order=False, variable=variable)


def euler_maruyama(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise):
    p = ev.process

    def step(x: Tensor, i: int, p0: Point, k: int) -> Tensor:
        t = torch.tensor(p0.t, dtype=torch.float64)
        dt = float(grid.t[i + 1]) - p0.t  # negative
        f, g2, gt2 = float(p.drift(t)), float(p.diffusion2(t)), float(ev.diffusion2(t))
        st = ev.state
        drift = f * x + 0.5 * (g2 + gt2) * p0.eps / p0.sigma
        return x + drift * dt + math.sqrt(max(gt2, 0.0) * -dt) * st.noise.like(x)

    return run_singlestep(ev, x, grid, step)
