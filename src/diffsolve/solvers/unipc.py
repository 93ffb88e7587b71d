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

from ..grids import TimeGrid
from .drivers import Evaluator, grid_point, run_multistep
from .expint import exp_coefficients, exp_frame, lincomb, model_output
from .state import Noise, Point

Tensor = torch.Tensor


def _system(h: float, rks: List[float], order: int, form: str, variant: str):
    """The UniPC linear system (R, b) of size ``order`` for the points r_k (last one 1)."""
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
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def _step(x: Tensor, p0: Point, others: List[Point], rhos: List[float], a_t: float, s_t: float, h: float,
          form: str, variant: str, new: Optional[Point] = None, rho_new: float = 0.0) -> Tensor:
    """x_t = x_t^(1) + c B(h) [sum_k rho_k (m_k - m0)/r_k + rho_new (m_new - m0)] as one linear combination."""
    cx, scale = exp_frame(p0, a_t, s_t, form)
    w0 = exp_coefficients(h, 1, form)[0]
    hh = -h if form == "data" else h
    res = -abs(scale) * (hh if variant == "bh1" else math.expm1(hh))
    pairs = [(cx, x)]
    c0 = scale * w0
    for p, rho in zip(others, rhos):
        r = (p.lam - p0.lam) / h
        pairs.append((res * rho / r, model_output(p, form)))
        c0 -= res * rho / r
    if new is not None:
        pairs.append((res * rho_new, model_output(new, form)))
        c0 -= res * rho_new
    pairs.insert(1, (c0, model_output(p0, form)))
    return lincomb(pairs)


def unipc(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, order: int = 2, variant: str = "bh2",
          form: str = "data", corrector: bool = True, lower_order_final: Optional[bool] = None):
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
        others = hist[-k:-1][::-1]
        rhos: List[float] = []
        if k == 2:
            rhos = [0.5]
        elif k == 3:
            R, b = _system(h, [(p.lam - p0.lam) / h for p in others] + [1.0], k, form, variant)
            rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return _step(x, p0, others, rhos, a_t, s_t, h, form, variant)

    def correct(x: Tensor, hist: List[Point], k: int) -> Tensor:
        new, p0 = hist[-1], hist[-2]
        h = new.lam - p0.lam
        others = hist[-k - 1:-2][::-1]
        if k == 1:
            rhos = [0.5]
        else:
            R, b = _system(h, [(p.lam - p0.lam) / h for p in others] + [1.0], k, form, variant)
            rhos = torch.linalg.solve(R, b).tolist()
        return _step(p0.x, p0, others, rhos[:-1], new.alpha, new.sigma, h, form, variant, new, rhos[-1])

    return run_multistep(ev, x, grid, predict, order, lower_order_final, history=order + 1,
                         correct=correct if corrector else None)
