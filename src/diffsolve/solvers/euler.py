"""Euler and Heun on the probability-flow ODE, and Euler-Maruyama on the reverse SDE.

The ODE is integrated in ``process.ode_variable``: 'sigma' means y = x/alpha against
s = sigma/alpha with dy/ds = eps (EDM / k-diffusion; Euler there equals DDIM), 't' means x
against process time with dx/dt = alpha' x0 + sigma' eps (flow matching's velocity).
Heun is EDM's second-order method (Karras et al. 2022, Alg. 1).
Euler-Maruyama: dx = [f x + g^2 eps / sigma] dt + g dW over decreasing t (Song et al. 2021).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .core import Evaluator, Noise, Point, grid_point, lincomb

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

    def to_y(self, x: Tensor, alpha: float) -> Tensor:
        return x / alpha if self.var == "sigma" else x

    def to_x(self, y: Tensor, alpha: float) -> Tensor:
        return y * alpha if self.var == "sigma" else y

    def derivative(self, pt: Point) -> Tensor:
        if self.var == "sigma":
            return pt.eps
        t = torch.tensor(pt.t, dtype=torch.float64)
        return float(self.p.d_alpha(t)) * pt.x0 + float(self.p.d_sigma(t)) * pt.eps


def heun(ev: Evaluator, x: Tensor, grid, noise: Noise, second_order: bool = True,
         variable: Optional[str] = None) -> Tensor:
    """EDM Heun (second_order=True) or Euler; the step to clean data is the denoiser jump."""
    view = _View(ev.den.process, variable)
    for i in range(grid.steps):
        p0 = ev.at(x, grid, i)
        if grid.is_clean(i + 1):
            x = ev.finish_step(i, p0.x0, grid, p0)
            continue
        a_t, s_t, _ = grid_point(grid, i + 1)
        t_next = float(grid.t[i + 1])
        dv = view.v(t_next, a_t, s_t) - view.v(p0.t, p0.alpha, p0.sigma)
        d0 = view.derivative(p0)
        # x_next = to_x(to_y(x) + dv * d) = cx * x + cd * d, as one fused linear combination
        cx, cd = (a_t / p0.alpha, a_t * dv) if view.var == "sigma" else (1.0, dv)
        x_next = lincomb([(cx, x), (cd, d0)])
        if second_order:
            p1 = ev(x_next, t_next)
            x_next = lincomb([(cx, x), (0.5 * cd, d0), (0.5 * cd, view.derivative(p1))])
        x = ev.finish_step(i, x_next, grid, p0)
    return x


def euler(ev: Evaluator, x: Tensor, grid, noise: Noise, variable: Optional[str] = None) -> Tensor:
    return heun(ev, x, grid, noise, second_order=False, variable=variable)


def euler_maruyama(ev: Evaluator, x: Tensor, grid, noise: Noise) -> Tensor:
    p = ev.den.process
    for i in range(grid.steps):
        p0 = ev.at(x, grid, i)
        if grid.is_clean(i + 1):
            x = ev.finish_step(i, p0.x0, grid, p0)
            continue
        t = torch.tensor(p0.t, dtype=torch.float64)
        dt = float(grid.t[i + 1]) - p0.t  # negative
        f, g2 = float(p.drift(t)), float(p.diffusion2(t))
        x_new = x + (f * x + g2 * p0.eps / p0.sigma) * dt + math.sqrt(max(g2, 0.0) * -dt) * noise.like(x)
        x = ev.finish_step(i, x_new, grid, p0)
    return x
