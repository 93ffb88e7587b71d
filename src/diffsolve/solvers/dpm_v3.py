"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu 2023, arXiv:2310.13268): multistep solver with empirical model statistics.

Formulation (any affine process; everything is a function of the half log-SNR lambda).  With
N = sigma * eps(x, lambda) and per-dimension statistics l, s, b (vectors of the data's shape, functions of
lambda), the paper rewrites the probability-flow ODE dx/dlam = (alpha'/alpha) x - N as

    f = (N - l x) / alpha                                   (the model output the solver interpolates)
    x_t = (alpha_t/alpha_s) e^{-(L_t - L_s)} x_s - alpha_t e^{-L_t} int_{lam_s}^{lam_t} e^{L} f dlam,
    g(lam) = e^{-(S(lam) - S_s)} f(lam) - int_{lam_s}^{lam} e^{-(S(r) - S_s)} b(r) dr,

with L = int l, S = int s.  If f' = s f + b held exactly, g would be constant; the solver expands g in a
Taylor polynomial around lam_s whose derivatives come from previous evaluations (multistep predictor) or
from the fresh evaluation at t (UniC-style corrector), and integrates everything else exactly.  Written out,
one step is one elementwise linear combination

    x_t = (alpha_t/alpha_s) A * x_s - alpha_t (sum_j W_j * f_j + C),

with A, W_j, C tensors of the data's shape computed once per (lam_s, lam_t, nodes) by Gauss-Legendre
quadrature of the interpolated statistics (C^1 cubic in lambda, exact integrals of l and s; nothing is snapped to the
statistics' grid).  With (l, s, b) = (1, 0, 0), f = -x0 and the step is DPM-Solver++ multistep with Taylor
coefficients h^{k+1} phi_{k+1}(-h) (``dpm++2m``/``dpm++3m`` with ``taylor2=True``).

Empirical model statistics (``tuning.statistics.compute_statistics``), the paper's estimators on K noised data points per lambda,
in the 'VE view' x~ = x/alpha where they do not depend on the process (E = e^{-lam} eps, f = E - l x~,
dx~/dlam = -E):

    l      = E[diag(sigma * d eps/dx)]            (Hutchinson: v * JVP(v), v Rademacher)
    f'     = E' + l E - l' x~,  E' = dE/dlam along the ODE   (one JVP in (x, t) per point)
    s, b   = least squares of f' on f per dimension: s = Cov(f', f) / (Var f + ridge), b = E f' - s E f

The ridge (``s_ridge`` times the mean variance at that lambda) keeps s finite where Var f vanishes (e.g. at
high noise, or along directions where the model is exactly linear), shrinking it to s = 0, b = E f'.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..grids import TimeGrid
from .dpm_v3_stats import FORMAT, Statistics, StatisticsMismatch
from .drivers import Evaluator, grid_point, run_multistep
from .state import Noise, Point

Tensor = torch.Tensor
__all__ = ["dpm_v3", "derivative_weights", "Statistics", "StatisticsMismatch", "FORMAT"]


# ----------------------------------------------------------------------------------------
# Taylor-derivative estimates of g from the nodes
# ----------------------------------------------------------------------------------------
def derivative_weights(nodes: Sequence[float], pseudo: bool) -> np.ndarray:
    """[n, n+1] matrix c with g^(k)(nodes[0]) ~ sum_j c[k-1, j] g(nodes[j]), k = 1..n.

    ``pseudo=False``: derivatives of the degree-n polynomial through all nodes (order n+1).
    ``pseudo=True``: k! times the k-th Newton divided difference on nodes[0..k] (the paper's pseudo-order
    estimate: each derivative from the k+1 newest nodes only; more stable, lower order).
    """
    x = np.asarray(nodes, dtype=np.float64)
    n = x.size - 1
    if n == 0:
        return np.zeros((0, 1))
    if pseudo:
        D = [np.eye(n + 1)[j] for j in range(n + 1)]
        out = []
        for i in range(1, n + 1):
            D = [(D[j] - D[j + 1]) / (x[j] - x[j + i]) for j in range(n + 1 - i)]
            out.append(D[0] * math.factorial(i))
        return np.stack(out)
    u = x[1:] - x[0]
    R = np.stack([u**k / math.factorial(k) for k in range(1, n + 1)], 1)  # [n nodes, n orders]
    Rinv = np.linalg.inv(R)  # [order, node]
    c = np.zeros((n, n + 1))
    c[:, 1:] = Rinv
    c[:, 0] = -Rinv.sum(1)
    return c


# ----------------------------------------------------------------------------------------
# the solver
# ----------------------------------------------------------------------------------------
def dpm_v3(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, stats: Optional[Statistics] = None, order: int = 3,
           predictor_pseudo: Optional[bool] = None, corrector: Optional[bool] = None, corrector_pseudo: bool = False,
           lower_order_final: Optional[bool] = None, check_stats: bool = True):
    """DPM-Solver-v3 multistep predictor (order 1-3) with the optional corrector.

    Args:
        stats: ``Statistics`` of this model (``compute_statistics`` / ``Statistics.load``), or
            ``Statistics.degenerate()`` for the model-independent (1, 0, 0).
        predictor_pseudo / corrector: pseudo-order predictor and the corrector; ``None`` = the paper's rule
            (pseudo predictor for <= 5 steps, corrector for <= 6 steps).
        corrector_pseudo: corrector one order higher with pseudo-order derivatives.
        check_stats: verify the statistics against the model (fingerprint once per model object), the data
            shape and the grid's lambda span.
    """
    if stats is None:
        raise ValueError("solver 'dpm-v3' needs stats=: empirical model statistics of this model, e.g. "
                         "ds.compute_statistics(den, data, path='stats.safetensors') or "
                         "ds.dpm_v3.Statistics.load(path); Statistics.degenerate() gives DPM-Solver++")
    if not isinstance(stats, Statistics):
        raise TypeError(f"stats must be a dpm_v3.Statistics, got {type(stats).__name__}")
    if not 1 <= order <= 3:
        raise ValueError(f"DPM-Solver-v3 order must be 1..3, got {order}")
    lam_fin = grid.lam[torch.isfinite(grid.lam)]
    if check_stats:
        stats.check(ev.model, tuple(x.shape[1:]), (float(lam_fin.min()), float(lam_fin.max())), device=x.device)
    steps = grid.steps
    p_pseudo = steps <= 5 if predictor_pseudo is None else bool(predictor_pseudo)
    use_corr = steps <= 6 if corrector is None else bool(corrector)
    c_pseudo = bool(corrector_pseudo)
    shape = (1,) + (stats.shape if stats.shape else (1,) * (x.dim() - 1))
    dev, dt = x.device, x.dtype

    def f_of(p: Point) -> Tensor:
        f = p.cache.get("dpm_v3_f")
        if f is None:
            l = stats.values("l", [p.lam]).reshape(shape).to(device=dev, dtype=dt)
            f = (p.sigma * p.eps - l * p.x_eval) / p.alpha  # from the state the network saw (a corrector keeps f)
            p.cache["dpm_v3_f"] = f
        return f

    def combine(x_s: Tensor, p_s: Point, pts: List[Point], a_t: float, lam_t: float, pseudo: bool) -> Tensor:
        nodes = [p.lam for p in pts]
        A, W, C = stats.step(p_s.lam, lam_t, nodes, derivative_weights(nodes, pseudo))
        cast = lambda v: v.reshape(shape).to(device=dev, dtype=dt)
        out = (a_t / p_s.alpha) * cast(A) * x_s
        acc = cast(C).expand_as(x_s).clone() if C.abs().max() > 0 else torch.zeros_like(x_s)
        for j, p in enumerate(pts):
            acc = acc + cast(W[j]) * f_of(p)
        return out - a_t * acc

    def predict(x: Tensor, i: int, hist: List[Point], k: int) -> Tensor:
        a_t, _, lam_t = grid_point(grid, i + 1)
        pts = hist[-k:][::-1]  # newest (the expansion point) first
        return combine(x, hist[-1], pts, a_t, lam_t, p_pseudo)

    def correct(x: Tensor, hist: List[Point], k: int) -> Tensor:
        kc = k + (1 if c_pseudo else 0)
        if kc < 2 or len(hist) < kc:
            return x
        new, p_s = hist[-1], hist[-2]
        pts = [p_s, new] + hist[-kc - 1:-2][::-1]
        return combine(p_s.x, p_s, pts, new.alpha, new.lam, c_pseudo)

    return run_multistep(ev, x, grid, predict, order, lower_order_final, history=order + 2,
                         correct=correct if use_corr else None)
