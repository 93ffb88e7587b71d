"""The machinery every solver shares.

All solvers integrate the probability-flow ODE (or the reverse SDE) of x_t = alpha x0 + sigma eps
on a ``TimeGrid``.  In the half log-SNR lambda = log(alpha/sigma) the exact solution is
(Lu et al. 2022, DPM-Solver; 2022b, DPM-Solver++)

  noise form:  x_t = (alpha_t/alpha_s) x_s - sigma_t * int_{lam_s}^{lam_t} e^{lam_t - lam} eps(lam) dlam
  data form:   x_t = (sigma_t/sigma_s) x_s + alpha_t * int_{lam_s}^{lam_t} e^{lam - lam_t} x0(lam) dlam

Expanding eps or x0 in powers of (lam - lam_s) gives the phi-function coefficients
h^{k+1} phi_{k+1}(+-h) below.  Equivalently, in the 'VE view' x~ = x/alpha, s = sigma/alpha
the ODE is dx~/ds = eps, which is where Euler, Heun and the Adams-type (PNDM) methods live.

A step whose target is clean data (the grid's ``clean_end``) is always the denoiser jump
x <- x0(x_s, s): the one last-step rule shared by every solver.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..denoiser import Denoiser, NonFiniteError, Prediction
from ..timesteps import TimeGrid

Tensor = torch.Tensor


class SamplingError(ValueError):
    """Raised when sampling cannot proceed (bad input or a non-finite state)."""


# ----------------------------------------------------------------------------------------
# phi functions: phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du,  phi_0(z) = e^z
# ----------------------------------------------------------------------------------------
def phi_float(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du (phi_0 = e^z) in float64: the series
    sum_j z^j/(j+k)! for small |z|, the recurrence phi_{k+1} = (phi_k - 1/k!)/z otherwise."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 0.2:
        series, term = 0.0, 1.0 / math.factorial(k)
        for j in range(25):
            series += term
            term = term * z / (j + k + 1)
        return series
    rec = math.expm1(z) / z
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / z
    return rec


# ----------------------------------------------------------------------------------------
# evaluation points and the model call
# ----------------------------------------------------------------------------------------
class Point:
    """One model evaluation: where (t, lambda, alpha, sigma, state x) and what the model said.

    ``x0`` and ``eps`` come from the lazy ``Prediction`` (float64). ``x`` may be replaced by a
    corrector after the evaluation; the prediction keeps the state it was made at.
    """

    __slots__ = ("t", "lam", "alpha", "sigma", "x", "pred")

    def __init__(self, t: float, lam: float, alpha: float, sigma: float, x: Tensor, pred: Prediction):
        self.t, self.lam, self.alpha, self.sigma, self.x, self.pred = t, lam, alpha, sigma, x, pred

    @property
    def x0(self) -> Tensor:
        return self.pred.x0

    @property
    def eps(self) -> Tensor:
        return self.pred.eps

    @property
    def sigma_ve(self) -> float:
        return self.sigma / self.alpha


class Evaluator:
    """Calls the denoiser at process times, checking results and counting NFE."""

    def __init__(self, den: Denoiser, model_kwargs: Optional[Dict[str, Any]] = None,
                 callback: Optional[Callable[[Dict[str, Any]], None]] = None,
                 progress: Optional[Any] = None):
        self.den, self.kwargs = den, dict(model_kwargs or {})
        self.callback, self.progress = callback, progress
        self.nfe = 0
        self.step = 0

    def __call__(self, x: Tensor, t: float, coeffs: Optional[tuple] = None) -> Point:
        """Evaluate at process time t; ``coeffs`` = (alpha, sigma, lambda) if already known."""
        if coeffs is None:
            p = self.den.process
            tt = torch.tensor(float(t), dtype=torch.float64)
            coeffs = (float(p.alpha(tt)), float(p.sigma(tt)), float(p.lam(tt)))
        a, s, lam = coeffs
        try:
            pred = self.den.predict_lazy(x, float(t), self.kwargs, (a, s))
        except NonFiniteError as e:
            raise SamplingError(f"step {self.step}: {e}") from None
        self.nfe += 1
        if self.progress is not None:
            self.progress.update(1)
        return Point(float(t), lam, a, s, x, pred)

    def at(self, x: Tensor, grid: TimeGrid, i: int) -> Point:
        return self(x, float(grid.t[i]), grid_point(grid, i))

    def finish_step(self, i: int, x: Tensor, grid: TimeGrid, point: Optional[Point] = None) -> Tensor:
        """Common bookkeeping after step i -> i+1: finiteness check (one reduction) and user callback."""
        if not torch.isfinite(x.sum()):
            t_next = "clean" if grid.is_clean(i + 1) else f"t={float(grid.t[i + 1]):.6g}"
            raise SamplingError(f"state became non-finite at step {i} ({float(grid.t[i]):.6g} -> {t_next}); "
                                "try more NFE, another grid, or a lower-order solver")
        self.step = i + 1
        if self.callback is not None:
            denoised = point.x0 if point is not None else None
            self.callback({"i": i, "x": x, "t": float(grid.t[i + 1]), "denoised": denoised})
        return x


# ----------------------------------------------------------------------------------------
# exponential-integrator building blocks
# ----------------------------------------------------------------------------------------
def exp_step(x: Tensor, s: Point, alpha_t: float, sigma_t: float, lam_t: float,
             terms: Sequence[Tensor], form: str) -> Tensor:
    """One exponential-integrator step from point s to time t.

    ``terms[k]`` is the k-th derivative-like term c_k such that the model output is modelled as
    sum_k c_k (lam - lam_s)^k / k!  (c_0 = model output at s).  ``form`` is 'data' (x0) or
    'noise' (eps).  Returns x_t exactly for that polynomial model.
    """
    cx, scale = exp_frame(s, alpha_t, sigma_t, form)
    w = exp_coefficients(lam_t - s.lam, len(terms), form)
    return lincomb([(cx, x)] + [(scale * wk, c) for wk, c in zip(w, terms)])


def lincomb(pairs: Sequence[tuple]) -> Tensor:
    """sum_j c_j * T_j with one fused pass per term (c_j floats, T_j same-shape tensors)."""
    (c0, t0), *rest = pairs
    out = torch.mul(t0, c0)
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def exp_coefficients(h: float, order: int, form: str) -> List[float]:
    """[h^1 phi_1, ..., h^order phi_order] at -h (data form) or +h (noise form), as floats."""
    h = float(h)
    sign = -1.0 if form == "data" else 1.0
    return [h**k * phi_float(k, sign * h) for k in range(1, order + 1)]


def exp_frame(s: "Point", alpha_t: float, sigma_t: float, form: str) -> tuple[float, float]:
    """(coefficient of x_s, signed scale of the model terms) of an exponential step s -> t:
    data form x_t = (sigma_t/sigma_s) x_s + alpha_t * (...), noise form x_t = (alpha_t/alpha_s) x_s - sigma_t * (...)."""
    if form == "data":
        return sigma_t / s.sigma, alpha_t
    return alpha_t / s.alpha, -sigma_t


def lagrange_weights(nodes: Sequence[float], a: float, b: float,
                     dsigma: Callable[[np.ndarray], np.ndarray], n_quad: int = 16) -> np.ndarray:
    """w_j = int_a^b L_j(u) dsigma(u)/du du for the Lagrange basis L_j through ``nodes``.

    Used by Adams-type multistep methods in the VE view (x~_t = x~_s + sum_j w_j eps_j);
    the interpolation variable u is lambda (DEIS 'logrho'), sigma/alpha (iPNDM) or t (tAB).
    Gauss-Legendre quadrature in u (exact for polynomials, ~machine precision for exp).
    """
    xs, ws = np.polynomial.legendre.leggauss(n_quad)
    u = 0.5 * (b - a) * xs + 0.5 * (b + a)
    jac = dsigma(u) * ws * 0.5 * (b - a)
    nodes = np.asarray(nodes, dtype=np.float64)
    out = np.empty(len(nodes))
    for j, uj in enumerate(nodes):
        L = np.ones_like(u)
        for m, um in enumerate(nodes):
            if m != j:
                L *= (u - um) / (uj - um)
        out[j] = np.sum(L * jac)
    return out


# ----------------------------------------------------------------------------------------
# randomness: one generator per sample, so a sample does not depend on the batch size
# ----------------------------------------------------------------------------------------
class Noise:
    """Draws N(0, I) noise shaped like the state, one torch.Generator per sample."""

    def __init__(self, generators: Optional[Sequence[torch.Generator]] = None):
        self.generators = list(generators) if generators is not None else None

    def like(self, x: Tensor) -> Tensor:
        if self.generators is None:
            return torch.randn_like(x)
        if len(self.generators) != x.shape[0]:
            raise SamplingError(f"{len(self.generators)} generators for a batch of {x.shape[0]}")
        out = torch.empty_like(x)
        for row, g in zip(out, self.generators):  # fill in place: no per-sample temporaries
            row.normal_(generator=g)
        return out


def generators_from_seeds(seeds: Sequence[int], device: Union[str, torch.device] = "cpu") -> List[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


# ----------------------------------------------------------------------------------------
# multistep driver
# ----------------------------------------------------------------------------------------
def step_order(i: int, steps: int, order: int, lower_order_final: bool) -> int:
    """Order of step i (0-based) of a multistep method: warm up from 1, optionally lower at the end."""
    k = min(order, i + 1)
    if lower_order_final:
        k = min(k, steps - i)
    return max(k, 1)


def resolve_lower_order_final(flag: Optional[bool], grid: TimeGrid) -> bool:
    """``None`` (auto): lower the order on the last steps when there are fewer than 15 steps, or when the
    last finite log-SNR interval is over 3x the one before (large final steps blow up high orders)."""
    if flag is not None:
        return bool(flag)
    if grid.steps < 15:
        return True
    lam = grid.lam[torch.isfinite(grid.lam)]
    if lam.numel() >= 3:
        d = lam[1:] - lam[:-1]
        return bool(d[-1] > 3 * d[-2])
    return False


UpdateFn = Callable[[Tensor, int, List[Point], int], Tensor]


def run_multistep(ev: Evaluator, x: Tensor, grid: TimeGrid, update: UpdateFn, order: int,
                  lower_order_final: Optional[bool] = None, history: int = 4,
                  correct: Optional[Callable[[Tensor, List[Point], int], Tensor]] = None) -> Tensor:
    """Shared loop of all one-evaluation-per-step methods.

    For each step i: evaluate the model at (x, t_i), optionally ``correct`` x with that evaluation
    (UniC), then ``update(x, i, hist, k)`` gives x_{i+1} with order k.  A step to clean data is the
    denoiser jump.  ``hist`` holds the latest ``history`` points, newest last.
    """
    lof = resolve_lower_order_final(lower_order_final, grid)
    hist: List[Point] = []
    prev_order = 0
    for i in range(grid.steps):
        pt = ev.at(x, grid, i)
        hist = (hist + [pt])[-history:]
        if correct is not None and len(hist) > 1:
            x = correct(x, hist, prev_order)
            hist[-1].x = x
        if grid.is_clean(i + 1):
            x = pt.x0
            prev_order = 1
        else:
            k = step_order(i, grid.steps, order, lof)
            x = update(x, i, hist, k)
            prev_order = k
        x = ev.finish_step(i, x, grid, pt)
    return x


def grid_point(grid: TimeGrid, i: int) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of grid point i as floats."""
    return float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])
