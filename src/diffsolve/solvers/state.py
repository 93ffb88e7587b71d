"""Solver state: the evaluation points, per-sample random streams and the explicit ``SolverState`` that drivers
own and step hooks may change (replace x, reindex the batch, reset the history)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..adapters.denoiser import Prediction

Tensor = torch.Tensor


class SamplingError(ValueError):
    """Raised when sampling cannot proceed (bad input or a non-finite state)."""


class Point:
    """One model evaluation: where (t, lambda, alpha, sigma) and what the model said.

    ``x_eval`` (= ``pred.x``) is the state the model saw; ``x`` starts equal to it and is replaced when a
    corrector moves the state after the evaluation.  ``cache`` holds solver-derived tensors of this point
    (e.g. DPM-Solver-v3's f), reindexed with the batch.
    """

    __slots__ = ("t", "lam", "alpha", "sigma", "x", "pred", "cache")

    def __init__(self, t: float, lam: float, alpha: float, sigma: float, x: Tensor, pred: Prediction):
        self.t, self.lam, self.alpha, self.sigma, self.x, self.pred = t, lam, alpha, sigma, x, pred
        self.cache: Dict[str, Any] = {}

    @property
    def x_eval(self) -> Tensor:
        return self.pred.x

    @property
    def x0(self) -> Tensor:
        return self.pred.x0

    @property
    def eps(self) -> Tensor:
        return self.pred.eps

    @property
    def sigma_ve(self) -> float:
        return self.sigma / self.alpha

    def reindex(self, idx: Tensor) -> "Point":
        pr = self.pred
        x0 = pr._x0[idx] if pr._x0 is not None else None
        eps = pr._eps[idx] if pr._eps is not None else None
        a, s = (v[idx] if isinstance(v, Tensor) and v.dim() else v for v in (pr.alpha, pr.sigma))
        new = Point(self.t, self.lam, self.alpha, self.sigma, self.x[idx], Prediction(pr.x[idx], a, s, x0, eps))
        new.cache = {k: _reindex(v, idx, self.x.shape[0]) for k, v in self.cache.items()}
        return new


class Noise:
    """Draws N(0, I) noise shaped like the state, one torch.Generator per sample (batch-size independent)."""

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

    def reindex(self, idx: Tensor) -> "Noise":
        """The streams of the rows ``idx``; a row drawn twice gets a copy of its stream's state (the two
        continue identically unless the caller reseeds one)."""
        if self.generators is None:
            return Noise(None)
        out, seen = [], set()
        for j in idx.tolist():
            g = self.generators[j]
            if j in seen:
                h = torch.Generator(device=g.device)
                h.set_state(g.get_state())
                g = h
            seen.add(j)
            out.append(g)
        return Noise(out)


def _reindex(v: Any, idx: Tensor, batch: int) -> Any:
    """Rows ``idx`` of every per-sample tensor in ``v`` (tensors whose first dimension is the batch)."""
    if isinstance(v, Tensor):
        return v[idx] if v.dim() and v.shape[0] == batch else v
    if isinstance(v, Point):
        return v.reindex(idx)
    if isinstance(v, list):
        return [_reindex(u, idx, batch) for u in v]
    if isinstance(v, tuple):
        return tuple(_reindex(u, idx, batch) for u in v)
    if isinstance(v, dict):
        return {k: _reindex(u, idx, batch) for k, u in v.items()}
    return v


@dataclass
class SolverState:
    """Everything a solver carries between steps.

    ``x``: the state at grid point ``i`` (after step i-1; before the evaluation at t_i);
    ``history``: the latest evaluations (``Point``), newest last (multistep methods extrapolate from them);
    ``noise``: the per-sample random streams; ``kwargs``: the model's keyword arguments (per-sample tensors
    move with their rows); ``extras``: solver-specific state (momentum velocity, PNDM's eps list, ...);
    ``order``: the order of the step just taken (a UniC-type corrector uses it).
    """

    x: Tensor
    i: int = 0
    history: List[Point] = field(default_factory=list)
    noise: Noise = field(default_factory=Noise)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    extras: Dict[str, Any] = field(default_factory=dict)
    order: int = 0

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def reindex(self, idx: Any) -> "SolverState":
        """Keep (and repeat) the rows ``idx`` of every part of the state, e.g. after particle resampling."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.x.device).flatten()
        if idx.numel() < 1 or int(idx.min()) < 0 or int(idx.max()) >= self.batch:
            raise SamplingError(f"reindex: indices must lie in [0, {self.batch}), got {idx.tolist()[:8]}")
        b = self.batch
        self.x = self.x[idx]
        self.history = [p.reindex(idx) for p in self.history]
        self.noise = self.noise.reindex(idx)
        self.kwargs = {k: _reindex(v, idx, b) for k, v in self.kwargs.items()}
        self.extras = {k: _reindex(v, idx, b) for k, v in self.extras.items()}
        return self

    def reset_history(self) -> "SolverState":
        """Forget past evaluations (after the state was moved, they describe other states): the next steps
        warm up again from order 1, and history-dependent extras are dropped."""
        self.history = []
        self.extras = {}
        self.order = 0
        return self

