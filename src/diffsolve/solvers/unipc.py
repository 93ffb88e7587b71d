"""UniPC (Zhao et al. 2023, arXiv:2302.04867): unified predictor UniP-p and corrector UniC.

With h = lambda_t - lambda_s, hh = -h (data prediction) or h (noise prediction), previous
outputs at r_k = (lambda_k - lambda_s)/h and D_k = (m_k - m_s)/r_k, the predictor is
  x_t = x_t^(1) - scale_t B(hh) sum_k rho_k D_k,   x_t^(1) the first-order exponential step,
where rho solves R rho = b with R_ik = r_k^(i-1), b_i = i! phi_{i+1}(hh) hh^i ... / B(hh);
B(hh) = hh (bh1) or e^hh - 1 (bh2).  UniC re-applies the same formula including the fresh model
output at t (which the next step reuses), raising the order by one at no extra evaluation.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from .core import Evaluator, Noise, Point, grid_point, run_multistep

Tensor = torch.Tensor


def _coefficients(h: float, rks: List[float], order: int, form: str, variant: str):
    """hphi_1, B(h) and the UniPC linear system (R, b) of size ``order``."""
    hh = -h if form == "data" else h
    hphi_1 = math.expm1(hh)
    hphi_k = hphi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R, b, fact = [], [], 1
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rks])
        b.append(hphi_k * fact / b_h)
        fact *= i + 1
        hphi_k = hphi_k / hh - 1 / fact
    return hphi_1, b_h, torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def _out(p: Point, form: str) -> Tensor:
    return p.x0 if form == "data" else p.eps


def _first_order(x: Tensor, p0: Point, a_t: float, s_t: float, hphi_1: float, form: str) -> Tensor:
    if form == "data":
        return (s_t / p0.sigma) * x - a_t * hphi_1 * p0.x0
    return (a_t / p0.alpha) * x - s_t * hphi_1 * p0.eps


def _differences(ref: Point, others: List[Point], h: float, form: str):
    rks = [(p.lam - ref.lam) / h for p in others]
    return rks, [(_out(p, form) - _out(ref, form)) / r for p, r in zip(others, rks)]


def unipc(ev: Evaluator, x: Tensor, grid, noise: Noise, order: int = 2, variant: str = "bh2",
          form: str = "data", corrector: bool = True, lower_order_final: Optional[bool] = None) -> Tensor:
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1..3, got {order}")
    if lower_order_final is None:
        lower_order_final = True  # as the reference implementation: the last steps drop order

    def predict(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, s_t, lam_t = grid_point(grid, i + 1)
        p0 = hist[-1]
        h = lam_t - p0.lam
        rks, d1s = _differences(p0, hist[-k:-1][::-1], h, form)
        hphi_1, b_h, R, b = _coefficients(h, rks + [1.0], k, form, variant)
        x_t = _first_order(x, p0, a_t, s_t, hphi_1, form)
        if k == 1:
            return x_t
        rho = [0.5] if k == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        scale = a_t if form == "data" else s_t
        return x_t - scale * b_h * sum(r * d for r, d in zip(rho, d1s))

    def correct(x: Tensor, hist: List[Point], k: int) -> Tensor:
        new, p0 = hist[-1], hist[-2]
        h = new.lam - p0.lam
        rks, d1s = _differences(p0, hist[-k - 1:-2][::-1], h, form)
        hphi_1, b_h, R, b = _coefficients(h, rks + [1.0], k, form, variant)
        rho = [0.5] if k == 1 else torch.linalg.solve(R, b).tolist()
        x_t = _first_order(p0.x, p0, new.alpha, new.sigma, hphi_1, form)
        scale = new.alpha if form == "data" else new.sigma
        res = sum(r * d for r, d in zip(rho[:-1], d1s)) + rho[-1] * (_out(new, form) - _out(p0, form))
        return x_t - scale * b_h * res

    return run_multistep(ev, x, grid, predict, order, lower_order_final, history=order + 1,
                         correct=correct if corrector else None)
