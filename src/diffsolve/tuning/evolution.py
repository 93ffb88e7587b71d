"""The one evolutionary search over time grids (AutoDiffusion's time-step search, Li et al. 2023), shared by
``grid_search.evolve`` and the tuner's polish.

An individual is the vector of a grid's *free* points in normalised log-SNR u in (0, 1] (u = 0 is t_max, always
the first point; a grid that ends at t_min also keeps u = 1 fixed).  A generation keeps the ``elite`` best and
fills the population with children of tournament-selected parents: uniform crossover with probability
``crossover``, then a Gaussian move of 1-2 points by ``mutation`` times the local gap, then a repair (sorted,
at least ``gap`` apart).  Elitism makes the best fitness non-increasing, so the result is never worse than the
best start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from ..grids import from_unit, to_unit
from ..processes import NoiseProcess

Tensor = torch.Tensor
GAP = 1e-3


def free_points(process: NoiseProcess, t: Tensor, clean_end: bool) -> np.ndarray:
    """The free unit coordinates of grid ``t`` (all but t_max; and but t_min when the grid ends there)."""
    u = to_unit(process, t).numpy()
    return u[1:] if clean_end else u[1:-1]


def grid_times(process: NoiseProcess, free: np.ndarray, clean_end: bool) -> Tensor:
    """Inverse of ``free_points``: the grid's times (t_max first; t_min last unless the grid ends clean)."""
    parts = [np.zeros(1), np.asarray(free, dtype=float)] + ([] if clean_end else [np.ones(1)])
    u = np.concatenate(parts)
    return from_unit(process, torch.from_numpy(u), fix_last=True)


def repair(free: np.ndarray, clean_end: bool, gap: float = GAP) -> Optional[np.ndarray]:
    """Sorted, inside (0, 1] (below 1 - gap when t_min is fixed), consecutive points >= gap apart; None if the
    points do not fit."""
    hi = 1.0 if clean_end else 1.0 - gap
    f = np.sort(np.clip(free, gap, hi))
    for i in range(1, f.size):
        f[i] = max(f[i], f[i - 1] + gap)
    if f.size and f[-1] > hi + 1e-12:
        return None
    return f


def mutate(free: np.ndarray, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Move 1-2 free positions by N(0, scale * local gap)."""
    f = free.copy()
    if f.size == 0:
        return f
    ext = np.concatenate([[0.0], f, [1.0]])
    k = 1 if f.size == 1 or rng.random() < 0.6 else 2
    for i in rng.choice(f.size, size=k, replace=False):
        local = 0.5 * (ext[i + 2] - ext[i])
        f[i] = f[i] + rng.normal(0.0, scale) * local
    return f


def tournament(ranked: List[np.ndarray], rng: np.random.Generator, k: int = 3) -> np.ndarray:
    """The best of k random members of a population sorted best first."""
    idx = rng.integers(0, len(ranked), size=min(k, len(ranked)))
    return ranked[int(idx.min())]


@dataclass
class Evolution:
    """The search's outcome: the best free points and fitness, the best fitness per generation (``history[0]``:
    the starting population's) and the number of fitness calls."""

    best: np.ndarray
    value: float
    history: List[float] = field(default_factory=list)
    evaluations: int = 0


def evolve_points(fitness: Callable[[np.ndarray], float], starts: Sequence[np.ndarray], clean_end: bool,
                  rng: np.random.Generator, *, population: int = 16, elite: int = 2, mutation: float = 0.25,
                  crossover: float = 0.5, patience: int = 5, generations: Optional[int] = None,
                  stop: Callable[[], bool] = lambda: False, fill: bool = True, anneal: bool = False,
                  scores: Optional[Sequence[float]] = None,
                  on_generation: Optional[Callable[[float], None]] = None) -> Evolution:
    """(elite + offspring) evolution of free grid points under ``fitness`` (lower is better).

    ``starts``: the first population (``scores``: their fitness when already known); ``fill`` tops it up to
    ``population`` with mutants of the first start.  The search ends after ``generations`` (None: no limit), when
    ``stop()`` is true, or when ``patience`` generations bring no relative improvement of 1e-6 -- or, with
    ``anneal``, each such stall halves the mutation scale instead, and the search ends once it is at its floor
    (0.05) and more than 4 * patience generations have run.
    """
    calls = 0

    def fit(p: np.ndarray) -> float:
        nonlocal calls
        calls += 1
        v = fitness(p)
        return v if math.isfinite(v) else math.inf

    pop = [np.asarray(p, dtype=float) for p in starts]
    if not pop:
        raise ValueError("evolution needs at least one starting grid")
    vals = list(scores) if scores is not None else [fit(p) for p in pop]
    if fill and pop[0].size:
        tries = 0
        while len(pop) < population and tries < 50 * population:
            tries += 1
            child = repair(mutate(pop[0], rng, mutation), clean_end)
            if child is not None:
                pop.append(child)
                vals.append(fit(child))
    order = sorted(range(len(pop)), key=lambda i: vals[i])
    scored = [(vals[i], pop[i]) for i in order]
    history = [scored[0][0]]
    if pop[0].size == 0:
        return Evolution(scored[0][1], scored[0][0], history, calls)
    best, stale, gen = scored[0][0], 0, 0
    while (generations is None or gen < generations) and not stop():
        ranked = [p for _, p in scored]
        nxt = scored[:elite]
        while len(nxt) < population and not stop():
            pa = tournament(ranked, rng)
            child = pa.copy()
            if len(ranked) > 1 and rng.random() < crossover:
                pb = tournament(ranked, rng)
                child = np.where(rng.random(child.size) < 0.5, pa, pb)
            child = repair(mutate(child, rng, mutation), clean_end)
            if child is not None:
                nxt.append((fit(child), child))
        scored = sorted(nxt, key=lambda z: z[0])
        gen += 1
        history.append(scored[0][0])
        if on_generation is not None:
            on_generation(scored[0][0])
        if scored[0][0] < best * (1 - 1e-6):
            best, stale = scored[0][0], 0
            continue
        stale += 1
        if stale < patience:
            continue
        if not anneal:
            break
        mutation, stale = max(0.05, mutation / 2), 0
        if mutation <= 0.05 + 1e-12 and gen > 4 * patience:
            break
    return Evolution(scored[0][1], scored[0][0], history, calls)
