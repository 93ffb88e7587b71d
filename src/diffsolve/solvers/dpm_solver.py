"""DPM-Solver family: exponential integrators in the half log-SNR lambda.

* DPM-Solver-1/2/3 singlestep, noise prediction (Lu et al. 2022, arXiv:2206.00927, Alg. 1-2).
* DPM-Solver multistep 2/3, noise prediction, and DPM-Solver++ 2S/2M/3M, data prediction
  (Lu et al. 2022b, arXiv:2211.01095).
* SDE-DPM-Solver++(2M) (ibid., sec. 5 / App. B), the stochastic data-prediction solver.

Multistep differences use r_k = h_prev_k / h.  ``taylor3=True`` (default) weights the second
difference of the 3M methods with its Taylor coefficient, which makes them third order; with
``taylor3=False`` the coefficient is half of it, as in the reference implementations (whose
3M is then second order on any grid, see docs/conventions.md).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_multistep, run_singlestep
from .expint import Form, as_form, exp_coefficients, exp_frame, exp_step, lincomb, model_output
from .state import Noise, Point

Tensor = torch.Tensor


def multistep_update(form: Union[str, Form], taylor3: bool = True, taylor2: bool = False):
    """Update rule of DPM-Solver(-++) multistep of order k <= 3 on the history (newest last).

    The differences D1, D2 of the papers are linear in the stored outputs, so the step is written as
    one linear combination x_t = c_x x + sum_j w_j m_j (one fused pass per term).
    """

    form = as_form(form)

    def update(x: Tensor, i: int, hist: List[Point], k: int, grid: TimeGrid) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        h = lam_t - p0.lam
        cx, scale = exp_frame(p0, a_t, s_t, form)
        pts = hist[-k:][::-1]  # newest first: m0, m1, m2
        w = exp_coefficients(h, 3 if k == 3 else 1, form)
        if k == 1:
            coef = np.array([w[0]])
        elif k == 2 and taylor2:  # Taylor variant (diffusers 'heun'): derivative weighted by h^2 phi_2
            r0 = (p0.lam - pts[1].lam) / h
            w2 = exp_coefficients(h, 2, form)[1]
            coef = np.array([w[0] + w2 / (r0 * h), -w2 / (r0 * h)])
        elif k == 2:  # 'midpoint' variant: D1 weighted by h phi_1 / 2
            r0 = (p0.lam - pts[1].lam) / h
            coef = np.array([w[0] * (1 + 0.5 / r0), -w[0] * 0.5 / r0])
        else:
            r0, r1 = (p0.lam - pts[1].lam) / h, (pts[1].lam - pts[2].lam) / h
            d1_0 = np.array([1 / r0, -1 / r0, 0.0])
            d1_1 = np.array([0.0, 1 / r1, -1 / r1])
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            coef = w[0] * np.array([1.0, 0, 0]) + w[1] * d1 / h + w[2] * (2.0 if taylor3 else 1.0) * d2 / h**2
        return lincomb([(cx, x)] + [(scale * float(c), model_output(p, form)) for c, p in zip(coef, pts)])

    return update


def exp_weight(h: float, k: int, form: Form) -> float:
    """h^k phi_k(+-h): the k-th exponential-integrator weight (see ``expint.exp_coefficients``)."""
    return exp_coefficients(h, k, form)[k - 1]


def dpm_multistep(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 2, form: str = "data",
                  lower_order_final: Optional[bool] = None, taylor3: bool = True, taylor2: bool = False):
    """DPM-Solver multistep (form='noise') or DPM-Solver++ multistep (form='data'), order 1-3.

    ``taylor2=True`` weights the first difference of order-2 steps with its Taylor coefficient h^2 phi_2
    (diffusers' ``solver_type='heun'``) instead of the midpoint h phi_1 / 2; DPM-Solver-v3 with
    (l, s, b) = (1, 0, 0) is this variant.
    """
    upd = multistep_update(form, taylor3, taylor2)
    return run_multistep(ev, x, grid, lambda x, i, hist, k: upd(x, i, hist, k, grid), order,
                         lower_order_final, history=3)


def dpm_sde_multistep(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 2,
                      lower_order_final: Optional[bool] = None, form: str = "data", taylor2: bool = False):
    """SDE-DPM-Solver++(2M) (form='data') and SDE-DPM-Solver-2M (form='noise'), h = lambda_t - lambda_s:

      data:  x_t = (s_t/s_s) e^{-h} x + a_t (1 - e^{-2h}) x0 + a_t c D1 + s_t sqrt(1 - e^{-2h}) z
      noise: x_t = (a_t/a_s) x - 2 s_t (e^h - 1) eps - 2 s_t c D1 + s_t sqrt(e^{2h} - 1) z

    with D1 = (m_s - m_prev) / r the first difference of the model output; c is the midpoint weight (half the
    first-order weight) or, with ``taylor2``, the exact integral of the linear term (1 - (1 - e^{-2h})/(2h) for
    data, (e^h - 1 - h)/h for noise), which the MR Sampler uses (arXiv:2502.07856).
    """
    fm = as_form(form)

    def update(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        h = lam_t - p0.lam
        if fm == Form.DATA:
            one_m = float(-np.expm1(-2.0 * h))
            cx, c0, cz = (s_t / p0.sigma) * float(np.exp(-h)), a_t * one_m, s_t * one_m**0.5
            c1 = a_t * ((1 - one_m / (2 * h)) if taylor2 else 0.5 * one_m)
        else:
            em = float(np.expm1(h))
            cx, c0, cz = a_t / p0.alpha, -2 * s_t * em, s_t * float(np.expm1(2 * h)) ** 0.5
            c1 = -2 * s_t * ((em - h) / h if taylor2 else 0.5 * em)
        m0 = model_output(p0, fm)
        pairs = [(cx, x), (c0, m0)]
        if k >= 2:
            p1 = hist[-2]
            r0 = (p0.lam - p1.lam) / h
            pairs += [(c1 / r0, m0), (-c1 / r0, model_output(p1, fm))]
        return lincomb(pairs + [(cz, ev.state.noise.like(x))])

    return run_multistep(ev, x, grid, update, order, lower_order_final, history=2)


# ----------------------------------------------------------------------------------------
# singlestep
# ----------------------------------------------------------------------------------------
def singlestep_orders(nfe: int, order: int, clean_end: bool) -> List[int]:
    """Orders of the steps of a singlestep solver spending at most ``nfe`` evaluations.

    As many order-``order`` steps as fit, then one lower-order step for the remainder; a final
    jump to clean data costs one evaluation and is order 1 (DPM-Solver's 'fast' recipe, sec. 3.4).
    """
    budget = nfe - 1 if clean_end else nfe
    orders = [order] * (budget // order)
    if budget % order:
        orders.append(budget % order)
    if clean_end:
        orders.append(1)
    return orders


def _intermediate(ev: Evaluator, lam: float) -> tuple:
    p = ev.process
    t = p.t_of_lam(torch.tensor(lam, dtype=torch.float64))
    return float(t), float(p.alpha(t)), float(p.sigma(t))


def dpm_singlestep(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 2, form: str = "noise",
                   orders: Optional[Sequence[int]] = None):
    """DPM-Solver-k (form='noise') or DPM-Solver++(2S) (form='data', k <= 2) singlestep.

    Step s -> t of order 2 evaluates once more at lambda_s + h/2; order 3 at lambda_s + h/3 and
    lambda_s + 2h/3.  Intermediate times come from the process's exact lambda inverse.
    """
    fm = as_form(form)
    sign = 1.0 if fm == Form.NOISE else -1.0
    scale = (lambda a, s: s) if fm == Form.NOISE else (lambda a, s: a)
    if orders is None:
        orders = [order] * grid.steps
    if len(orders) != grid.steps:
        raise ValueError(f"{len(orders)} step orders for a grid of {grid.steps} steps")
    if any(k not in (1, 2, 3) for k in orders):
        raise ValueError(f"singlestep order must be 1, 2 or 3, got {sorted(set(orders))}")

    def step(x: Tensor, i: int, p0: Point, k: int):
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        h = lam_t - p0.lam
        m0 = model_output(p0, fm)
        first = exp_step(x, p0, a_t, s_t, lam_t, [m0], fm)
        if k == 1:
            return first
        if k == 2:
            r1 = 0.5
            t1, a1, s1 = _intermediate(ev, p0.lam + r1 * h)
            u1 = exp_step(x, p0, a1, s1, p0.lam + r1 * h, [m0], fm)
            m1 = model_output((yield ev.request(u1, t1)), fm)
            w = scale(a_t, s_t) * exp_weight(h, 1, fm) / (2 * r1)
            return first - sign * w * (m1 - m0)
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        t1, a1, s1 = _intermediate(ev, p0.lam + r1 * h)
        u1 = exp_step(x, p0, a1, s1, p0.lam + r1 * h, [m0], fm)
        d1 = model_output((yield ev.request(u1, t1)), fm) - m0
        t2, a2, s2 = _intermediate(ev, p0.lam + r2 * h)
        u2 = exp_step(x, p0, a2, s2, p0.lam + r2 * h, [m0], fm)
        u2 = u2 - sign * scale(a2, s2) * (r2 / r1) * exp_weight(r2 * h, 2, fm) / (r2 * h) * d1
        d2 = model_output((yield ev.request(u2, t2)), fm) - m0
        return first - sign * scale(a_t, s_t) * exp_weight(h, 2, fm) / h / r2 * d2

    return run_singlestep(ev, x, grid, step, list(orders))
