"""Adams-type multistep methods on the VE-view ODE dx~/ds = eps (x~ = x/alpha, s = sigma/alpha).

* PNDM / PLMS (Liu et al. 2022, arXiv:2202.09778): DDIM's transfer x~_t = x~_s + (s_t - s_s) e
  with e a fixed-coefficient Adams-Bashforth combination of past eps (orders 1..4, a Heun-like
  first step costing two evaluations), as diffusers' PNDM with ``skip_prk_steps``.
* iPNDM (Zhang & Chen 2023, DEIS paper; Zhou et al. 2024): Adams-Bashforth up to order 4 with
  lower-order warm-up.  Coefficients are computed for the actual (non-uniform) steps, so the
  order holds on any grid (diff-sampler's 'iPNDM-v'); on uniform grids it is iPNDM exactly.
* DEIS tAB-k (Zhang & Chen 2023, arXiv:2204.13902): eps extrapolated by a Lagrange polynomial in
  a chosen variable and integrated exactly against ds.  ``variable='lambda'`` (default; the
  'logrho' variant, smooth on every process), ``'t'`` (the paper's tAB), or ``'sigma'``.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_multistep, run_singlestep
from .expint import lagrange_weights, lincomb
from .state import Noise, Point

Tensor = torch.Tensor

# fixed Adams-Bashforth coefficients, newest first
AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ve_transfer(x: Tensor, p: Point, a_t: float, s_t: float, e: Tensor) -> Tensor:
    """x~_t = x~_s + (s_t - s_s) e in x coordinates (DDIM's transfer with direction e)."""
    return (a_t / p.alpha) * x + a_t * (s_t / a_t - p.sigma_ve) * e


def pndm(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise):
    """PLMS: fixed Adams-Bashforth weights on the eps of the latest (up to 4) grid evaluations."""

    def step(x: Tensor, i: int, p0: Point, k: int):
        a_t, s_t, _ = grid_point(grid, i + 1)
        eps_hist = [p.eps for p in ev.state.history]
        if i == 0:
            trial = ve_transfer(x, p0, a_t, s_t, p0.eps)
            p1 = yield ev.request(trial, float(grid.t[i + 1]))
            terms = [(0.5, p0.eps), (0.5, p1.eps)]
        else:
            terms = list(zip(AB[len(eps_hist)], reversed(eps_hist)))
        # ve_transfer with e = sum_j c_j eps_j, as one fused linear combination
        ce = a_t * (s_t / a_t - p0.sigma_ve)
        return lincomb([(a_t / p0.alpha, x)] + [(ce * c, eps) for c, eps in terms])

    return run_singlestep(ev, x, grid, step, history=4)


def _variable(ev: Evaluator, variable: str):
    """(u(t, lambda, sigma_ve), d sigma_ve / du as a numpy function) for the interpolation variable u."""
    proc = ev.process
    if variable == "lambda":
        return (lambda t, lam, sv: lam), (lambda u: -np.exp(-u))
    if variable == "sigma":
        return (lambda t, lam, sv: sv), (lambda u: np.ones_like(u))
    if variable == "t":
        def dsig(u):
            t = torch.from_numpy(np.asarray(u, dtype=np.float64))
            a, s = proc.alpha(t), proc.sigma(t)
            return ((proc.d_sigma(t) * a - s * proc.d_alpha(t)) / a**2).numpy()
        return (lambda t, lam, sv: t), dsig
    raise ValueError(f"variable must be 'lambda', 't' or 'sigma', got {variable!r}")


def adams_update(ev: Evaluator, grid: TimeGrid, variable: str = "lambda"):
    """Update rule of the variable-step Adams-Bashforth method on x~ (order k from the newest k points)."""
    node, dsig = _variable(ev, variable)

    def update(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        pts = hist[-k:]
        u = lambda p: node(p.t, p.lam, p.sigma_ve)
        w = lagrange_weights([u(p) for p in pts], u(p0), node(float(grid.t[i + 1]), lam_t, s_t / a_t), dsig)
        e = sum(float(wj) * p.eps for wj, p in zip(w, pts))
        return (a_t / p0.alpha) * x + a_t * e

    return update


def adams(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 3, variable: str = "lambda",
          lower_order_final: Optional[bool] = None):
    """Variable-step Adams-Bashforth on x~ with eps interpolated in ``variable`` (DEIS / iPNDM)."""
    update = adams_update(ev, grid, variable)
    if not 1 <= order <= 4:
        raise ValueError(f"order must be 1..4, got {order}")
    return run_multistep(ev, x, grid, update, order, lower_order_final, history=order)


def ipndm(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 4,
          lower_order_final: Optional[bool] = None) -> Tensor:
    return adams(ev, x, grid, noise, order=order, variable="sigma", lower_order_final=lower_order_final)


def deis(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 3, variable: str = "lambda",
         lower_order_final: Optional[bool] = None) -> Tensor:
    return adams(ev, x, grid, noise, order=order, variable=variable, lower_order_final=lower_order_final)
