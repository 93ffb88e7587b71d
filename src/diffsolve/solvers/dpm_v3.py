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

Empirical model statistics (``compute_statistics``), the paper's estimators on K noised data points per lambda,
in the 'VE view' x~ = x/alpha where they do not depend on the process (E = e^{-lam} eps, f = E - l x~,
dx~/dlam = -E):

    l      = E[diag(sigma * d eps/dx)]            (Hutchinson: v * JVP(v), v Rademacher)
    f'     = E' + l E - l' x~,  E' = dE/dlam along the ODE   (one JVP in (x, t) per point)
    s, b   = least squares of f' on f per dimension: s = Cov(f', f) / (Var f + ridge), b = E f' - s E f

The ridge (``s_ridge`` times the mean variance at that lambda) keeps s finite where Var f vanishes (e.g. at
high noise, or along directions where the model is exactly linear), shrinking it to s = 0, b = E f'.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..denoiser import Denoiser
from .core import Evaluator, Noise, Point, grid_point, run_multistep

Tensor = torch.Tensor
DT = torch.float64
FORMAT = "diffsolve.dpm_v3.statistics/1"
_GAUSS = 6  # Gauss-Legendre nodes per quadrature segment
_SEG = 0.25  # longest quadrature segment in lambda


class StatisticsMismatch(ValueError):
    """DPM-Solver-v3 statistics do not belong to the model (or grid, or data shape) they are used with."""


# ----------------------------------------------------------------------------------------
# the statistics object
# ----------------------------------------------------------------------------------------
class Statistics:
    """Empirical model statistics l, s, b of one model on an increasing log-SNR grid ``lam``.

    ``l``, ``s``, ``b`` have shape [n, *shape] (float64); between grid points they are interpolated by C^1
    cubic Hermite polynomials in lambda (integrated exactly).  ``meta`` records what they were computed for (model fingerprint, process, guidance scale,
    data shape, K, lambda range) and ``check`` refuses a model they do not belong to.  Statistics with
    ``meta['model'] is None`` (``Statistics.degenerate``) are model-independent.
    """

    def __init__(self, lam: Tensor, l: Tensor, s: Tensor, b: Tensor, meta: Optional[Dict[str, Any]] = None,
                 probe: Optional[Tensor] = None, extrapolate: bool = False):
        lam = torch.as_tensor(lam, dtype=DT).flatten().cpu()
        if lam.numel() < 2 or not torch.all(lam[1:] > lam[:-1]) or not torch.all(torch.isfinite(lam)):
            raise ValueError("statistics need at least 2 finite, strictly increasing lambda values")
        vals = [torch.as_tensor(v, dtype=DT).cpu() for v in (l, s, b)]
        shape = tuple(vals[0].shape[1:])
        for name, v in zip("lsb", vals):
            if v.shape[0] != lam.numel() or tuple(v.shape[1:]) != shape:
                raise ValueError(f"statistic {name} has shape {tuple(v.shape)}, expected [{lam.numel()}, *{shape}]")
            if not torch.all(torch.isfinite(v)):
                raise ValueError(f"statistic {name} contains NaN or inf")
        self.lam = lam
        self.l, self.s, self.b = vals
        self.shape = shape
        self.meta = dict(meta or {})
        self.meta.setdefault("shape", list(shape))
        self.probe = None if probe is None else torch.as_tensor(probe, dtype=DT).cpu()
        self.extrapolate = extrapolate
        D = int(np.prod(shape)) if shape else 1
        self._pl = {k: _Hermite(lam, v.reshape(lam.numel(), D)) for k, v in zip("lsb", vals)}
        self._b_zero = bool(torch.all(self.b == 0))
        self._cache: Dict[tuple, tuple] = {}
        self._verified = weakref.WeakKeyDictionary()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def degenerate(cls, lam_min: float = -20.0, lam_max: float = 20.0, shape: Sequence[int] = ()) -> "Statistics":
        """(l, s, b) = (1, 0, 0): model-independent; DPM-Solver-v3 then is DPM-Solver++ (Taylor variant).

        Constant statistics extrapolate exactly, so any grid may be used with them.
        """
        lam = torch.tensor([float(lam_min), float(lam_max)], dtype=DT)
        one = torch.ones((2,) + tuple(shape), dtype=DT)
        meta = {"model": None, "kind": "degenerate", "lam_range": [float(lam_min), float(lam_max)]}
        return cls(lam, one, torch.zeros_like(one), torch.zeros_like(one), meta, extrapolate=True)

    @property
    def lam_range(self) -> Tuple[float, float]:
        return float(self.lam[0]), float(self.lam[-1])

    def __repr__(self) -> str:
        m = self.meta
        fp = (m.get("model") or {}).get("fingerprint", "none") if isinstance(m.get("model"), dict) else "none"
        return (f"Statistics(n={self.lam.numel()}, lam=[{self.lam_range[0]:.3f}, {self.lam_range[1]:.3f}], "
                f"shape={self.shape}, K={m.get('K')}, model={fp})")

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write a .safetensors file: tensors lam, l, s, b (and the fingerprint probe), JSON metadata."""
        from ..checkpoint import save_safetensors

        path = os.fspath(path)
        tensors = {"lam": self.lam, "l": self.l, "s": self.s, "b": self.b}
        if self.probe is not None:
            tensors["probe"] = self.probe
        meta = dict(self.meta, format=FORMAT, extrapolate=self.extrapolate)
        save_safetensors(tensors, path, {"diffsolve": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Statistics":
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            header = f.metadata() or {}
            if "diffsolve" not in header:
                raise ValueError(f"{os.fspath(path)} is not a diffsolve DPM-Solver-v3 statistics file")
            meta = json.loads(header["diffsolve"])
            t = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)}: unknown statistics format {meta.get('format')!r} (expected {FORMAT})")
        extrapolate = bool(meta.pop("extrapolate", False))
        meta.pop("format", None)
        return cls(t["lam"], t["l"], t["s"], t["b"], meta, t.get("probe"), extrapolate)

    # -- validity --------------------------------------------------------------------
    def check(self, den: Denoiser, shape: Optional[Sequence[int]] = None,
              lam_span: Optional[Tuple[float, float]] = None, fingerprint: bool = True,
              device: Optional[Union[str, torch.device]] = None) -> None:
        """Raise ``StatisticsMismatch`` unless these statistics fit ``den`` (process, guidance scale, model
        fingerprint), data ``shape`` and the log-SNR span ``lam_span`` a grid needs."""
        problems = []
        if shape is not None and self.shape and tuple(shape) != self.shape:
            problems.append(f"data shape {tuple(shape)} != statistics' {self.shape}")
        if lam_span is not None and not self.extrapolate:
            lo, hi = self.lam_range
            tol = 1e-7 * max(1.0, abs(lo), abs(hi))
            if lam_span[0] < lo - tol or lam_span[1] > hi + tol:
                problems.append(f"the time grid spans lambda [{lam_span[0]:.6g}, {lam_span[1]:.6g}], outside the "
                                f"statistics' range [{lo:.6g}, {hi:.6g}] (recompute them with a wider lam_range)")
        model = self.meta.get("model")
        if model is not None:
            cfg = _jsonable(den.process.config())
            if model.get("process") != cfg:
                problems.append(f"process {cfg} != statistics' {model.get('process')}")
            if abs(float(model.get("guidance_scale", 1.0)) - den.guidance_scale) > 1e-12:
                problems.append(f"guidance scale {den.guidance_scale} != statistics' {model.get('guidance_scale')}")
            if model.get("prediction") not in (None, den.prediction):
                problems.append(f"prediction {den.prediction!r} != statistics' {model.get('prediction')!r}")
            if fingerprint and not problems and self.probe is not None and den not in self._verified:
                why = fingerprint_mismatch(den, self.shape, model, self.probe, device)
                if why:
                    problems.append(why + ": these statistics were computed for another model")
                else:
                    self._verified[den] = True
        if problems:
            raise StatisticsMismatch("DPM-Solver-v3 statistics do not match: " + "; ".join(problems))

    # -- values ----------------------------------------------------------------------
    def values(self, name: str, lam: Union[float, Sequence[float], Tensor]) -> Tensor:
        """Interpolated statistic ``name`` ('l', 's' or 'b') at ``lam`` -> [len(lam), *shape]."""
        q = torch.as_tensor(lam, dtype=DT).flatten()
        return self._pl[name].value(q).reshape((q.numel(),) + (self.shape or (1,)))

    # -- step coefficients -----------------------------------------------------------
    def step(self, lam_s: float, lam_t: float, nodes: Sequence[float], coef: np.ndarray) -> tuple:
        """Elementwise coefficients (A, W [n+1, D], C) of one step lam_s -> lam_t with the Taylor model of g whose
        derivatives are ``coef @ g_nodes`` (``coef`` [n, n+1]; ``nodes[0] == lam_s``).  Cached."""
        key = (lam_s, lam_t, tuple(nodes), coef.tobytes())
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self._step(lam_s, lam_t, list(nodes), coef)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = out
        return out

    def _segments(self, a: float, c: float) -> Tuple[np.ndarray, np.ndarray]:
        """Quadrature segments [lo_m, hi_m] covering [a, c] (a <= c), split at the statistics' grid points."""
        g = self.lam.numpy()
        inner = g[(g > a) & (g < c)]
        pts = np.concatenate([[a], inner, [c]])
        out = [pts[0]]
        for lo, hi in zip(pts[:-1], pts[1:]):
            k = max(1, int(math.ceil((hi - lo) / _SEG)))
            out.extend(lo + (hi - lo) * np.arange(1, k + 1) / k)
        e = np.asarray(out)
        e[-1] = c
        return e[:-1], e[1:]

    def _int_expS_b(self, a: float, c: float, S_ref: Tensor) -> Tensor:
        """int_a^c e^{-(S(r) - S_ref)} b(r) dr (signed) -> [D]."""
        if self._b_zero or a == c:
            return torch.zeros(self._pl["b"].v.shape[1], dtype=DT)
        sign = 1.0
        if c < a:
            a, c, sign = c, a, -1.0
        lo, hi = self._segments(a, c)
        q, w = _gauss(lo, hi)
        S, b = self._pl["s"].integral(q), self._pl["b"].value(q)
        return sign * (w[:, None] * torch.exp(-(S - S_ref)) * b).sum(0)

    def _step(self, lam_s: float, lam_t: float, nodes: List[float], coef: np.ndarray) -> tuple:
        if lam_t < lam_s:
            raise ValueError("DPM-Solver-v3 steps must increase lambda")
        pl, ps, pb = self._pl["l"], self._pl["s"], self._pl["b"]
        n = coef.shape[0]
        one = torch.tensor([lam_s, lam_t], dtype=DT)
        L_st, S_st = pl.integral(one), ps.integral(one)
        A = torch.exp(-(L_st[1] - L_st[0]))
        D = pl.v.shape[1]
        lo, hi = self._segments(lam_s, lam_t)
        M, P = lo.size, _GAUSS
        xs, ws = _GL
        # Phi_k = int_s^t e^{L - L_t + S - S_s} (lam - lam_s)^k / k!  and
        # Psi = int_s^t e^{L - L_t + S - S_s} Btilde(lam),  Btilde(lam) = int_{lam_s}^{lam} e^{-(S - S_s)} b,
        # accumulated over chunks of segments (bounded [segments, P, P, D] temporaries)
        Phi = torch.zeros((n + 1, D), dtype=DT)
        Psi = torch.zeros(D, dtype=DT)
        carry = torch.zeros(D, dtype=DT)  # Btilde at the chunk's first segment start
        cs = max(1, 4_000_000 // (P * P * D))
        for m0 in range(0, M, cs):
            m1 = min(M, m0 + cs)
            q, w = _gauss(lo[m0:m1], hi[m0:m1])
            Sq = ps.integral(q) - S_st[0]
            E = torch.exp(pl.integral(q) - L_st[1] + Sq) * w[:, None]  # [m*P, D]
            u = (q - lam_s)[:, None]
            term = torch.ones_like(u)
            Phi[0] += E.sum(0)
            for k in range(1, n + 1):
                term = term * u / k
                Phi[k] += (E * term).sum(0)
            if self._b_zero:
                continue
            m = m1 - m0
            seg = (w[:, None] * torch.exp(-Sq) * pb.value(q)).reshape(m, P, D).sum(1)
            start = carry + torch.cumsum(seg, 0) - seg  # Btilde at each segment's start
            lo_t = torch.from_numpy(lo[m0:m1])
            half = (q.reshape(m, P) - lo_t[:, None]) / 2  # inner Gauss on [segment start, node]
            r = (lo_t[:, None, None] + half[..., None] * (xs + 1)).reshape(-1)
            wr = (half[..., None] * ws).reshape(-1)
            inner = (wr[:, None] * torch.exp(-(ps.integral(r) - S_st[0])) * pb.value(r)).reshape(m, P, P, D).sum(2)
            Psi += (E.reshape(m, P, D) * (start[:, None] + inner)).sum((0, 1))
            carry = carry + seg.sum(0)
        # node quantities: e^{-(S_j - S_s)} and Btilde_j
        nd = torch.tensor(nodes, dtype=DT)
        eS = torch.exp(-(ps.integral(nd) - S_st[0]))  # [n+1, D]
        Bt = torch.stack([torch.zeros(D, dtype=DT)] + [self._int_expS_b(lam_s, float(v), S_st[0]) for v in nodes[1:]])
        M = np.zeros((n + 1, n + 1))  # M[k, j]: weight of g_j in the k-th Taylor coefficient (k = 0: g_0)
        M[0, 0] = 1.0
        M[1:] = coef
        Wg = torch.from_numpy(M.T.copy()) @ Phi  # [n+1 (j), D]: sum_k M[k, j] Phi_k
        W = Wg * eS
        C = Psi - (Wg * Bt).sum(0)
        return A, W, C


_GL = tuple(torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(_GAUSS))


def _gauss(lo: np.ndarray, hi: np.ndarray) -> Tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on each segment [lo_m, hi_m], flattened segment-major."""
    xs, ws = _GL
    lo_t, half = torch.from_numpy(lo)[:, None], torch.from_numpy(hi - lo)[:, None] / 2
    return (lo_t + half * (xs + 1)).reshape(-1), (half * ws).reshape(-1)


class _Hermite:
    """C^1 piecewise-cubic Hermite interpolant of values v [n, D] at increasing knots, slopes by second-order
    finite differences; ``integral`` is its exact antiderivative from knots[0].  (C^1 statistics keep the
    solver's g twice continuously differentiable, which a 3rd-order step needs.)"""

    def __init__(self, knots: Tensor, v: Tensor):
        self.k, self.v = knots, v
        self.d = (knots[1:] - knots[:-1])[:, None]
        if knots.numel() >= 3:
            self.m = torch.gradient(v, spacing=(knots,), dim=0, edge_order=2)[0]
        else:
            self.m = ((v[1:] - v[:-1]) / self.d).expand(2, -1).clone()
        y0, y1, m0, m1 = v[:-1], v[1:], self.m[:-1], self.m[1:]
        seg = self.d * ((y0 + y1) / 2 + self.d * (m0 - m1) / 12)
        self.cum = torch.cat([torch.zeros_like(v[:1]), torch.cumsum(seg, 0)])

    def _idx(self, q: Tensor):
        i = (torch.searchsorted(self.k, q, right=True) - 1).clamp(0, self.k.numel() - 2)
        d = self.d[i]
        return i, d, (q[:, None] - self.k[i][:, None]) / d

    def value(self, q: Tensor) -> Tensor:
        i, d, x = self._idx(q)
        x2, x3 = x * x, x * x * x
        return ((2 * x3 - 3 * x2 + 1) * self.v[i] + (x3 - 2 * x2 + x) * d * self.m[i]
                + (-2 * x3 + 3 * x2) * self.v[i + 1] + (x3 - x2) * d * self.m[i + 1])

    def integral(self, q: Tensor) -> Tensor:
        i, d, x = self._idx(q)
        x2, x3, x4 = x * x, x * x * x, x * x * x * x
        part = ((x4 / 2 - x3 + x) * self.v[i] + (x4 / 4 - 2 * x3 / 3 + x2 / 2) * d * self.m[i]
                + (-x4 / 2 + x3) * self.v[i + 1] + (x4 / 4 - x3 / 3) * d * self.m[i + 1])
        return self.cum[i] + d * part


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=float))


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
def dpm_v3(ev: Evaluator, x: Tensor, grid, noise: Noise, stats: Optional[Statistics] = None, order: int = 3,
           predictor_pseudo: Optional[bool] = None, corrector: Optional[bool] = None, corrector_pseudo: bool = False,
           lower_order_final: Optional[bool] = None, check_stats: bool = True) -> Tensor:
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
                         "ds.dpm_v3.compute_statistics(den, data, path='stats.safetensors') or "
                         "ds.dpm_v3.Statistics.load(path); Statistics.degenerate() gives DPM-Solver++")
    if not isinstance(stats, Statistics):
        raise TypeError(f"stats must be a dpm_v3.Statistics, got {type(stats).__name__}")
    if not 1 <= order <= 3:
        raise ValueError(f"DPM-Solver-v3 order must be 1..3, got {order}")
    lam_fin = grid.lam[torch.isfinite(grid.lam)]
    if check_stats:
        stats.check(ev.den, tuple(x.shape[1:]), (float(lam_fin.min()), float(lam_fin.max())), device=x.device)
    steps = grid.steps
    p_pseudo = steps <= 5 if predictor_pseudo is None else bool(predictor_pseudo)
    use_corr = steps <= 6 if corrector is None else bool(corrector)
    c_pseudo = bool(corrector_pseudo)
    shape = (1,) + (stats.shape if stats.shape else (1,) * (x.dim() - 1))
    dev, dt = x.device, x.dtype
    fs: Dict[int, Tuple[Point, Tensor]] = {}

    def f_of(p: Point) -> Tensor:
        hit = fs.get(id(p))
        if hit is not None and hit[0] is p:
            return hit[1]
        l = stats.values("l", [p.lam]).reshape(shape).to(device=dev, dtype=dt)
        pr = p.pred
        f = (p.sigma * pr.eps - l * pr.x) / p.alpha  # from the state the network saw (a corrector keeps f)
        fs[id(p)] = (p, f)
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
        live = {id(p) for p in hist}
        for key in [key for key in fs if key not in live]:
            del fs[key]
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


# ----------------------------------------------------------------------------------------
# model fingerprint
# ----------------------------------------------------------------------------------------
def model_fingerprint(den: Denoiser, shape: Sequence[int], lambdas: Sequence[float], seed: int = 0,
                      kwargs: Optional[Dict[str, Any]] = None,
                      device: Optional[Union[str, torch.device]] = None) -> Tuple[Tensor, str]:
    """(eps outputs [len(lambdas), *shape], short hash) of the network on fixed seeded probe inputs.

    Probes run the unconditional branch (``den.uncond_kwargs``) so conditioning inputs are not needed; the
    guidance scale is recorded separately.  ``den.nfe`` is left unchanged.
    """
    g = torch.Generator().manual_seed(int(seed) + 20231020)
    proc = den.process
    kw = dict(kwargs if kwargs is not None else den.uncond_kwargs)
    outs = []
    nfe = den.nfe
    try:
        with torch.no_grad():
            for lam in lambdas:
                t = proc.t_of_lam(torch.tensor(float(lam), dtype=DT))
                z = torch.randn((1,) + tuple(shape), generator=g, dtype=DT)
                a, s = float(proc.alpha(t)), float(proc.sigma(t))
                xin = a * 0.5 * torch.tanh(torch.randn((1,) + tuple(shape), generator=g, dtype=DT)) + s * z
                if device is not None:
                    xin = xin.to(device)
                outs.append(den.predict_lazy(xin, float(t), kw).eps.to(DT).cpu())
    finally:
        den.nfe = nfe
    out = torch.cat(outs)
    h = hashlib.sha256(out.to(torch.float32).numpy().round(3).tobytes()).hexdigest()[:16]
    return out, h


def fingerprint_mismatch(den: Denoiser, shape: Sequence[int], model: Dict[str, Any], probe: Tensor,
                         device: Optional[Union[str, torch.device]] = None) -> Optional[str]:
    """None when ``den`` gives the recorded ``probe`` outputs on the probe inputs that ``model`` (a recorded
    fingerprint: probe_lambdas, probe_seed, probe_rtol, fingerprint) describes; otherwise what differs."""
    out, fp = model_fingerprint(den, shape, model["probe_lambdas"], model.get("probe_seed", 0), device=device)
    ref = probe.to(out)
    rel = float((out - ref).abs().max() / (ref.abs().max() + 1e-12))
    if rel <= model.get("probe_rtol", 1e-3):
        return None
    return (f"model fingerprint {fp} != the recorded {model.get('fingerprint')} (outputs on the probe inputs "
            f"differ by {rel:.2e} relative)")


# ----------------------------------------------------------------------------------------
# computing the statistics
# ----------------------------------------------------------------------------------------
_MOMENTS = ("E", "X", "Ep", "EE", "XX", "EX", "EpE", "EpX", "ld")


def compute_statistics(den: Denoiser, data: Optional[Union[Tensor, Callable[[int, torch.Generator], Tensor]]] = None,
                       *, K: int = 1024, n_lambda: int = 121, lam_range: Optional[Tuple[float, float]] = None,
                       shape: Optional[Sequence[int]] = None, batch_size: int = 256, seed: int = 0,
                       path: Optional[Union[str, os.PathLike]] = None, resume: bool = True, chunk: int = 8,
                       progress: bool = True, model_kwargs: Optional[Dict[str, Any]] = None,
                       s_ridge: float = 1e-4, data_solver: str = "dpm++3m", data_nfe: int = 50,
                       device: Optional[Union[str, torch.device]] = None,
                       on_chunk: Optional[Callable[[int, int], None]] = None) -> Statistics:
    """Empirical model statistics of ``den`` from K noised data points per lambda (forward-mode JVPs).

    Args:
        data: clean samples [N >= K, *shape], a callable ``(n, generator) -> samples``, or ``None`` to draw
            them from the model itself (``data_solver`` at ``data_nfe``; needs ``shape``).
        K: data points per lambda.
        n_lambda: points of the (uniform) log-SNR grid over ``lam_range`` (default: the process's whole range
            [lambda(t_max), lambda(t_min)]).
        batch_size: rows per network call (each row costs two JVPs).
        path: where the statistics are saved (.safetensors).  Partial results go to ``path + '.partial/'``, one
            file per chunk of ``chunk`` lambdas, so a killed run resumes where it stopped (``resume=True``);
            the partial directory is removed when the run completes.
        model_kwargs: per-sample conditioning tensors [N, ...] (sliced with the data), or fixed values.
        s_ridge: ridge of the s fit relative to the mean Var f at that lambda.
        on_chunk: called as ``on_chunk(done, total)`` after each chunk is saved (progress hooks, tests).
    """
    proc = den.process
    if lam_range is None:
        lam_range = (float(proc.lam(torch.tensor(proc.t_max, dtype=DT))), float(proc.lam(torch.tensor(proc.t_min, dtype=DT))))
    lo, hi = float(lam_range[0]), float(lam_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"lam_range must be finite and increasing, got {lam_range}")
    if n_lambda < 3:
        raise ValueError("n_lambda must be >= 3")
    lam = torch.linspace(lo, hi, n_lambda, dtype=DT)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = _get_data(den, data, K, shape, gen, data_solver, data_nfe, model_kwargs, device)
    K = x0.shape[0]
    shape = tuple(x0.shape[1:])
    dev = x0.device
    mk_all = dict(model_kwargs or {})
    probe_l = [float(np.clip(0.0, lo, hi)), lo + 0.8 * (hi - lo)]
    probe, fp = model_fingerprint(den, shape, probe_l, seed, device=dev)
    model_meta = {"fingerprint": fp, "process": _jsonable(proc.config()), "guidance_scale": den.guidance_scale,
                  "prediction": den.prediction, "probe_lambdas": probe_l, "probe_seed": int(seed), "probe_rtol": 1e-3}
    config = {"K": K, "lam_range": [lo, hi], "n_lambda": n_lambda, "seed": int(seed), "shape": list(shape),
              "model": model_meta, "data_hash": hashlib.sha256(x0.to(torch.float32).cpu().numpy().tobytes()).hexdigest()[:16]}
    part_dir = None if path is None else os.fspath(path) + ".partial"
    if part_dir is not None:
        os.makedirs(part_dir, exist_ok=True)
    chunks = [list(range(i, min(i + chunk, n_lambda))) for i in range(0, n_lambda, chunk)]
    moments: Dict[str, Tensor] = {k: torch.zeros((n_lambda,) + shape, dtype=DT) for k in _MOMENTS}
    todo = []
    for ci, idx in enumerate(chunks):
        got = _load_chunk(part_dir, ci, config) if (part_dir and resume) else None
        if got is None:
            todo.append(ci)
        else:
            for k in _MOMENTS:
                moments[k][idx] = got[k]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(chunks[ci]) for ci in todo) * K, desc="dpm-v3 statistics", unit="pt",
                   leave=False)
    t0 = time.time()
    try:
        with warnings.catch_warnings():  # torch's first forward-AD use warns about its own jit.script
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            for ci in todo:
                idx = chunks[ci]
                res = _chunk_moments(den, x0, lam[idx], idx, seed, batch_size, mk_all, bar)
                for k in _MOMENTS:
                    moments[k][idx] = res[k]
                if part_dir is not None:
                    _save_chunk(part_dir, ci, config, res)
                if on_chunk is not None:
                    on_chunk(ci + 1, len(chunks))
    finally:
        if bar is not None:
            bar.close()
    l, s, b = finalize(lam, moments, K, s_ridge)
    meta = {"kind": "empirical", "K": K, "lam_range": [lo, hi], "n_lambda": n_lambda, "seed": int(seed),
            "shape": list(shape), "model": model_meta, "data_hash": config["data_hash"], "s_ridge": s_ridge,
            "seconds": round(time.time() - t0, 3), "estimator": "hutchinson-jvp"}
    st = Statistics(lam, l, s, b, meta, probe)
    if path is not None:
        st.save(path)
        if part_dir is not None:
            for ci in range(len(chunks)):
                f = os.path.join(part_dir, f"chunk_{ci:05d}.safetensors")
                if os.path.exists(f):
                    os.remove(f)
            try:
                os.rmdir(part_dir)
            except OSError:
                pass
    return st


def finalize(lam: Tensor, m: Dict[str, Tensor], K: int, s_ridge: float = 1e-4) -> Tuple[Tensor, Tensor, Tensor]:
    """(l, s, b) from the accumulated per-lambda sums (see the module doc for the formulas)."""
    mean = {k: m[k] / K for k in ("E", "X", "Ep", "ld")}
    cov = lambda ab, a, b: m[ab] / K - mean[a] * mean[b]
    vE, vX, cEX = cov("EE", "E", "E"), cov("XX", "X", "X"), cov("EX", "E", "X")
    cEpE, cEpX = cov("EpE", "Ep", "E"), cov("EpX", "Ep", "X")
    l = mean["ld"]
    dl = _derivative(l, lam)
    var_f = (vE - 2 * l * cEX + l * l * vX).clamp_min(0)
    cov_ff = cEpE - l * cEpX + l * vE - l * l * cEX - dl * cEX + l * dl * vX
    red = tuple(range(1, var_f.dim()))
    scale = var_f.mean(dim=red, keepdim=True) if red else var_f
    mean_f = mean["E"] - l * mean["X"]
    sq = (mean_f * mean_f).mean(dim=red, keepdim=True) if red else mean_f * mean_f
    ridge = s_ridge * scale + 1e-10 * (scale + sq) + 1e-300  # + a floor: Var f at rounding level counts as 0
    s = cov_ff / (var_f + ridge)
    mean_fp = mean["Ep"] + l * mean["E"] - dl * mean["X"]
    b = mean_fp - s * mean_f
    return l, s, b


def _derivative(y: Tensor, x: Tensor) -> Tensor:
    """dy/dx along dim 0: 4th-order finite differences on a uniform grid (2nd order otherwise / n < 5)."""
    n = x.numel()
    dx = x[1:] - x[:-1]
    if n < 5 or float((dx.max() - dx.min()).abs()) > 1e-9 * float(dx.abs().max()):
        return torch.gradient(y, spacing=(x,), dim=0, edge_order=2)[0]
    h = float(dx.mean())
    d = torch.empty_like(y)
    d[2:-2] = (y[:-4] - 8 * y[1:-3] + 8 * y[3:-1] - y[4:]) / (12 * h)
    d[0] = (-25 * y[0] + 48 * y[1] - 36 * y[2] + 16 * y[3] - 3 * y[4]) / (12 * h)
    d[1] = (-3 * y[0] - 10 * y[1] + 18 * y[2] - 6 * y[3] + y[4]) / (12 * h)
    d[-1] = (25 * y[-1] - 48 * y[-2] + 36 * y[-3] - 16 * y[-4] + 3 * y[-5]) / (12 * h)
    d[-2] = (3 * y[-1] + 10 * y[-2] - 18 * y[-3] + 6 * y[-4] - y[-5]) / (12 * h)
    return d


def _get_data(den, data, K, shape, gen, data_solver, data_nfe, model_kwargs, device) -> Tensor:
    if data is None:
        if shape is None:
            raise ValueError("compute_statistics without data needs shape= (samples are drawn from the model)")
        from ..sampling import sample
        z = torch.randn((K,) + tuple(shape), generator=gen, dtype=DT)
        if device is not None:
            z = z.to(device)
        return sample(den, z, data_solver, nfe=data_nfe, model_kwargs=model_kwargs).detach()
    if callable(data) and not isinstance(data, Tensor):
        x = data(K, gen)
    else:
        x = torch.as_tensor(data)
        if x.shape[0] < K:
            raise ValueError(f"compute_statistics needs K={K} data points, got {x.shape[0]} (pass K={x.shape[0]})")
        x = x[:K]
    x = x.to(DT)
    if device is not None:
        x = x.to(device)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"data shape {tuple(x.shape[1:])} != shape {tuple(shape)}")
    return x


def _rows_kwargs(mk: Dict[str, Any], rows: Tensor, K: int) -> Dict[str, Any]:
    out = {}
    for k, v in mk.items():
        out[k] = v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == K else v
    return out


def _chunk_moments(den: Denoiser, x0: Tensor, lams: Tensor, idx: List[int], seed: int, batch_size: int,
                   mk: Dict[str, Any], bar) -> Dict[str, Tensor]:
    """Sums over the K data points of the moments at each lambda of the chunk."""
    proc = den.process
    K, shape = x0.shape[0], tuple(x0.shape[1:])
    dev = x0.device
    out = {k: torch.zeros((len(idx),) + shape, dtype=DT) for k in _MOMENTS}
    # rows = (lambda j, data point k).  Common random numbers: the same noise and probe vector for a data point at
    # every lambda, so the estimates are smooth in lambda (l' by finite differences stays accurate) and any
    # chunk can be recomputed alone (resume).
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919)
    eps_all = torch.randn((K,) + shape, generator=g, dtype=DT).to(dev)
    v_all = (torch.randint(0, 2, (K,) + shape, generator=g).to(DT) * 2 - 1).to(dev)
    t = proc.t_of_lam(lams)
    a, s = proc.alpha(t), proc.sigma(t)
    dlam_dt = proc.d_alpha(t) / a - proc.d_sigma(t) / s
    dt_dlam = 1.0 / dlam_dt
    dloga_dlam = (proc.d_alpha(t) / a) * dt_dlam
    n_rows = len(idx) * K
    fn = lambda xx, tt, kw: den.predict_lazy(xx, tt, kw).eps
    bshape = lambda v: v.reshape((-1,) + (1,) * len(shape))
    for start in range(0, n_rows, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_rows))
        jj, kk = rows // K, rows % K
        a_r, s_r, lam_r = bshape(a[jj]).to(dev), bshape(s[jj]).to(dev), bshape(lams[jj]).to(dev)
        x = a_r * x0[kk] + s_r * eps_all[kk]
        tt = t[jj].to(dev)
        kw = _rows_kwargs(mk, kk.to(dev) if dev.type != "cpu" else kk, K)
        v = v_all[kk]
        f1 = lambda xx, t_: fn(xx, t_, kw)
        eps, jv = torch.func.jvp(f1, (x, tt), (v, torch.zeros_like(tt)))
        eps, jv = eps.to(DT), jv.to(DT)
        dx = bshape(dloga_dlam[jj]).to(dev) * x - s_r * eps
        _, deps = torch.func.jvp(f1, (x, tt), (dx.to(x.dtype), dt_dlam[jj].to(dev)))
        deps = deps.to(DT)
        emil = torch.exp(-lam_r)
        E = emil * eps
        X = x / a_r
        Ep = -E + emil * deps
        vals = {"E": E, "X": X, "Ep": Ep, "EE": E * E, "XX": X * X, "EX": E * X, "EpE": Ep * E, "EpX": Ep * X,
                "ld": v * s_r * jv}
        for key, val in vals.items():  # jj: the lambda's position in this chunk
            out[key].index_add_(0, jj, val.cpu())
        if bar is not None:
            bar.update(len(rows))
    return out


def _chunk_file(part_dir: str, ci: int) -> str:
    return os.path.join(part_dir, f"chunk_{ci:05d}.safetensors")


def _save_chunk(part_dir: str, ci: int, config: dict, res: Dict[str, Tensor]) -> None:
    from ..checkpoint import save_safetensors

    save_safetensors(res, _chunk_file(part_dir, ci), {"config": json.dumps(config, sort_keys=True)})


def _load_chunk(part_dir: str, ci: int, config: dict) -> Optional[Dict[str, Tensor]]:
    from safetensors import safe_open

    f = _chunk_file(part_dir, ci)
    if not os.path.exists(f):
        return None
    try:
        with safe_open(f, framework="pt") as h:
            if json.loads((h.metadata() or {}).get("config", "null")) != json.loads(json.dumps(config, sort_keys=True)):
                return None
            return {k: h.get_tensor(k) for k in h.keys()}
    except Exception:  # a truncated file from a kill mid-write: recompute that chunk
        return None


# ----------------------------------------------------------------------------------------
# closed-form statistics of a single Gaussian (tests, and a check of the estimator)
# ----------------------------------------------------------------------------------------
def gaussian_statistics(mean: Tensor, cov: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (l, s, b) for data N(mean, cov) and the ideal denoiser, on the lambda grid ``lam`` ([n, d] each).

    With P = (e^{2 lam} cov + I)^{-1}, y = x~ - mean ~ N(0, Q), Q = cov + e^{-2 lam} I:  E = P y, l = diag P,
    dy/dlam = -P y, P' = 2 P^2 - 2 P, so f = (P - diag P) y - l mean and
    f' = (P' - diag P' - (P - diag P) P) y - diag(P') mean:  s = diag(M' Q M^T) / diag(M Q M^T), b = E f' - s E f.
    Where Var f = 0 (diagonal P) s is 0 (the ridge limit).
    """
    mean, cov, lam = (torch.as_tensor(v, dtype=DT) for v in (mean, cov, lam))
    d = mean.numel()
    I = torch.eye(d, dtype=DT)
    ls, ss, bs = [], [], []
    for lm in lam:
        P = torch.linalg.inv(torch.exp(2 * lm) * cov + I)
        Q = cov + torch.exp(-2 * lm) * I
        Pp = 2 * P @ P - 2 * P
        l, lp = torch.diagonal(P), torch.diagonal(Pp)
        M = P - torch.diag(l)
        Mp = Pp - torch.diag(lp) - M @ P
        var = torch.diagonal(M @ Q @ M.T)
        cv = torch.diagonal(Mp @ Q @ M.T)
        s = torch.where(var > 1e-300, cv / var.clamp_min(1e-300), torch.zeros_like(var))
        b = -lp * mean + s * l * mean
        ls.append(l), ss.append(s), bs.append(b)
    return torch.stack(ls), torch.stack(ss), torch.stack(bs)
