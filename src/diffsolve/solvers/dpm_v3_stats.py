"""DPM-Solver-v3's empirical model statistics l, s, b: the object, its quadrature and its file format.

See ``solvers.dpm_v3`` for the method; estimation (``compute_statistics``) lives in ``tuning.statistics`` and
the closed form for a Gaussian in ``reference.statistics``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters.denoiser import Model
from ..adapters.identity import IdentityCheck, ModelMismatch
from ..util.files import save_safetensors

Tensor = torch.Tensor
DT = torch.float64
FORMAT = "diffsolve.dpm_v3.statistics/1"
_GAUSS = 6  # Gauss-Legendre nodes per quadrature segment
_SEG = 0.25  # longest quadrature segment in lambda


class StatisticsMismatch(ModelMismatch):
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
        self._identity: Optional[IdentityCheck] = None

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

    # -- tensors -----------------------------------------------------------------------
    def to_tensors(self, prefix: str = "") -> Tuple[Dict[str, Tensor], str]:
        """(tensors, JSON metadata) of these statistics, for embedding in another safetensors file."""
        t = {prefix + "lam": self.lam, prefix + "l": self.l, prefix + "s": self.s, prefix + "b": self.b}
        if self.probe is not None:
            t[prefix + "probe"] = self.probe
        return t, json.dumps(dict(self.meta, extrapolate=self.extrapolate), sort_keys=True, default=float)

    @classmethod
    def from_tensors(cls, t: Dict[str, Tensor], meta_json: str, prefix: str = "") -> "Statistics":
        meta = json.loads(meta_json or "{}")
        extrapolate = bool(meta.pop("extrapolate", False))
        return cls(t[prefix + "lam"], t[prefix + "l"], t[prefix + "s"], t[prefix + "b"], meta,
                   t.get(prefix + "probe"), extrapolate)

    # -- validity --------------------------------------------------------------------
    def check(self, model: Model, shape: Optional[Sequence[int]] = None,
              lam_span: Optional[Tuple[float, float]] = None, fingerprint: bool = True,
              device: Optional[Union[str, torch.device]] = None) -> int:
        """Raise ``StatisticsMismatch`` unless these statistics fit ``model`` (process, guidance scale, model
        fingerprint), data ``shape`` and the log-SNR span ``lam_span`` a grid needs.  Returns the network calls
        the fingerprint check made (0 once a model object is verified)."""
        problems = []
        if shape is not None and self.shape and tuple(shape) != self.shape:
            problems.append(f"data shape {tuple(shape)} != statistics' {self.shape}")
        if lam_span is not None and not self.extrapolate:
            lo, hi = self.lam_range
            tol = 1e-7 * max(1.0, abs(lo), abs(hi))
            if lam_span[0] < lo - tol or lam_span[1] > hi + tol:
                problems.append(f"the time grid spans lambda [{lam_span[0]:.6g}, {lam_span[1]:.6g}], outside the "
                                f"statistics' range [{lo:.6g}, {hi:.6g}] (recompute them with a wider lam_range)")
        calls = 0
        model_rec = self.meta.get("model")
        if model_rec is not None:
            if self._identity is None:
                self._identity = IdentityCheck(model_rec, self.probe, self.shape, "the statistics")
            found, calls = self._identity.problems(model, fingerprint and not problems, device)
            problems += [p + (": these statistics were computed for another model" if "fingerprint" in p else "")
                         for p in found]
        if problems:
            raise StatisticsMismatch("DPM-Solver-v3 statistics do not match: " + "; ".join(problems))
        return calls

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
        Mw = np.zeros((n + 1, n + 1))  # Mw[k, j]: weight of g_j in the k-th Taylor coefficient (k = 0: g_0)
        Mw[0, 0] = 1.0
        Mw[1:] = coef
        Wg = torch.from_numpy(Mw.T.copy()) @ Phi  # [n+1 (j), D]: sum_k M[k, j] Phi_k
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
