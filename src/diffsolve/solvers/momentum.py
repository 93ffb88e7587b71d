"""Momentum variants of the multistep solvers (Wizadwongsa et al. 2023, "Diffusion Sampling with Momentum for
Mitigating Divergence Artifacts", arXiv:2307.11118).

Every one-evaluation-per-step solver here moves the state as x_t = c_x x_s + c * d, where d is the solver's
direction (DPM-Solver++: the effective data prediction D0 + D1/2 with c = alpha_t (1 - e^{-h}); Adams / PLMS:
the effective eps with c = alpha_t (sigma~_t - sigma~_s)).

* **HB** (Polyak's heavy ball): d is replaced by the velocity v_n = (1 - beta) v_{n-1} + beta d_n (v_0 = d_0).
  The base update is used unchanged (``heavy_ball`` wraps any update rule of ``run_multistep``), its direction
  recovered as d = (x_base - c_x x_s) / c.  beta = 1 is the base solver; for beta < 1 the velocity lags the
  direction by (1 - beta)/beta steps, an O(h) error per step: HB methods are first order (the paper's result).
* **GHVB** (generalised heavy ball): the velocity averages the raw model output, v_n = (1 - beta) v_{n-1} +
  beta eps_n, and the Adams step of order k reads
      e = AB_{k-1}(eps) + [AB_k - AB_{k-1}](v),
  i.e. the highest Newton term (the (k-1)-th difference) is taken from the velocities.  On uniform steps this is
  exactly the paper's GHVB coefficients, e.g. k = 2: ((2 + beta) v_n - (2 - beta) v_{n-1}) / (2 beta); here the
  Adams weights are the variable-step ones of ``ipndm`` (``lagrange_weights``), so beta = 1 is ``ipndm``
  (``variable='lambda'``: ``deis``) on any grid.  With the velocity's constant lag, the (k-1)-th difference of v
  estimates that of eps to O(h), so GHVB-k is of order k.  The start v_0 = eps_0 (no history yet) adds a
  transient decaying like (1 - beta)^n whose size is proportional to d eps / d sigma~ at t_max, which is ~0 for
  diffusion ODEs (straight trajectories at high noise); measured slopes are k (tests/test_momentum.py).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
import torch

from ..grids import TimeGrid
from . import adams, dpm_solver
from .drivers import Evaluator, grid_point, run_multistep
from .expint import exp_coefficients, exp_frame, lagrange_weights
from .state import Noise, Point

Tensor = torch.Tensor


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"momentum beta must lie in (0, 1], got {beta}")
    return beta


def heavy_ball(ev: Evaluator, update: Callable, frame: Callable[[int, List[Point]], tuple], beta: float) -> Callable:
    """Wrap a ``run_multistep`` update rule with Polyak heavy-ball momentum on its direction.

    ``frame(i, hist) -> (c_x, c)`` gives the step's frame: x_base = c_x x + c d.  The velocity lives in the
    solver state (``extras['velocity']``).
    """

    def upd(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        x_base = update(x, i, hist, k)
        if beta == 1.0:
            return x_base
        cx, c = frame(i, hist)
        d = (x_base - cx * x) / c
        extras = ev.state.extras
        v_prev = extras.get("velocity")
        v = d if v_prev is None else torch.add(d, v_prev - d, alpha=1.0 - beta)
        extras["velocity"] = v
        return cx * x + c * v

    return upd


def exp_data_frame(grid: TimeGrid) -> Callable[[int, List[Point]], tuple]:
    """Frame of a data-prediction exponential step: c_x = sigma_t/sigma_s, c = alpha_t (1 - e^{-h})."""

    def frame(i: int, hist: List[Point]) -> tuple:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        cx, scale = exp_frame(p0, a_t, s_t, "data")
        return cx, scale * exp_coefficients(lam_t - p0.lam, 1, "data")[0]

    return frame


def ve_frame(grid: TimeGrid) -> Callable[[int, List[Point]], tuple]:
    """Frame of a VE-view transfer x~_t = x~_s + (sigma~_t - sigma~_s) e: c_x = alpha_t/alpha_s, c = alpha_t dsigma~."""

    def frame(i: int, hist: List[Point]) -> tuple:
        a_t, s_t, _ = grid_point(grid, i + 1)
        p0 = hist[-1]
        return a_t / p0.alpha, a_t * (s_t / a_t - p0.sigma_ve)

    return frame


def dpmpp_2m_hb(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, beta: float = 0.8, order: int = 2,
                lower_order_final: Optional[bool] = None, taylor2: bool = False):
    """DPM-Solver++(2M) with heavy-ball momentum on D0 + D1/2 (the paper's 'DPM-Solver++ with HB')."""
    beta = _check_beta(beta)
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1..3, got {order}")
    base = dpm_solver.multistep_update("data", True, taylor2)
    upd = heavy_ball(ev, lambda x, i, hist, k: base(x, i, hist, k, grid), exp_data_frame(grid), beta)
    return run_multistep(ev, x, grid, upd, order, lower_order_final, history=3)


def ipndm_hb(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 4, beta: float = 0.8,
             variable: str = "sigma", lower_order_final: Optional[bool] = None):
    """iPNDM (PLMS with lower-order warm-up; variable-step Adams weights) with heavy-ball momentum."""
    beta = _check_beta(beta)
    base = adams.adams_update(ev, grid, variable)
    if not 1 <= order <= 4:
        raise ValueError(f"order must be 1..4, got {order}")
    upd = heavy_ball(ev, base, ve_frame(grid), beta)
    return run_multistep(ev, x, grid, upd, order, lower_order_final, history=order)


def ghvb(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 4, beta: float = 0.8, variable: str = "sigma",
         lower_order_final: Optional[bool] = None):
    """Generalised heavy ball of order ``order`` (1-4) on the Adams family (see the module doc)."""
    beta = _check_beta(beta)
    node, dsig = adams._variable(ev, variable)
    if not 1 <= order <= 4:
        raise ValueError(f"order must be 1..4, got {order}")
    def update(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        vel: List[Tensor] = ev.state.extras.setdefault("velocities", [])
        vel.append(p0.eps if not vel else torch.add(p0.eps, vel[-1] - p0.eps, alpha=1.0 - beta))
        del vel[:-order]
        pts, vs = hist[-k:], vel[-k:]
        u = [node(p.t, p.lam, p.sigma_ve) for p in pts]
        a, b = u[-1], node(float(grid.t[i + 1]), lam_t, s_t / a_t)
        wk = lagrange_weights(u, a, b, dsig)
        wk1 = lagrange_weights(u[1:], a, b, dsig) if k > 1 else np.zeros(0)
        e = float(wk[0]) * vs[0]
        for j in range(1, k):
            e = e + float(wk1[j - 1]) * pts[j].eps + float(wk[j] - wk1[j - 1]) * vs[j]
        return (a_t / p0.alpha) * x + a_t * e

    return run_multistep(ev, x, grid, update, order, lower_order_final, history=order)
