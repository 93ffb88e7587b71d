"""Fit a solver's coefficients to one model: the non-stationary solver that ``solvers.fitted`` runs.

On a fixed grid every deterministic one-evaluation-per-step solver is a lower-triangular coefficient matrix C
(``solvers.fitted``): x_{i+1} = C[i, 0] x_T + sum_{j <= i} C[i, j+1] D_j.  ``linear_coefficients`` reads C off a
named solver by running it on a *symbolic* model whose j-th x0 prediction is the unit vector e_{j+1} (the state
then holds its own coefficients).  ``fit_coefficients`` refits C on calibration noise, step by step: with the
states x_i of the fitted solver itself, the row of step i solves the regularised least-squares problem

    min_c  sum_n || B_n c - x*_n(t_{i+1}) ||^2  +  mu sum_j G_jj (c_j - c0_j)^2,     B_n = [x_T, D_0, ..., D_i]

(x*: the teacher's trajectory from the same noise; c0: the starting solver's row; G = sum_n B_n^T B_n, so mu is
scale-free).  mu -> inf keeps the starting solver; mu = 0 is the unregularised fit.  ``fit_solver`` picks mu by
K-fold cross-validation on the calibration noise and reports out-of-fold errors, so a fitted solver is compared
with the others on samples it was not fitted to.  This is the least-squares, no-backpropagation variant of
Shaul et al. 2024 (Bespoke Non-Stationary Solvers, arXiv:2403.01329), which fit the same family end to end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..adapters.denoiser import Model, Prediction
from ..grids import TimeGrid
from ..sampling import sample
from ..solvers import get_solver
from ..solvers.fitted import coefficient_matrix

Tensor = torch.Tensor
DT = torch.float64
#: regularisation strengths ``fit_solver`` cross-validates (inf: the starting solver)
MUS = (1e-4, 1e-3, 1e-2, 1e-1)


class _Symbolic:
    """A model whose j-th evaluation predicts x0 = e_{j+1} in a state of coefficients [x_T, D_0, D_1, ...]."""

    def __init__(self, process, n: int):
        self.process, self.n, self.calls = process, n, 0

    def identity(self) -> Dict[str, Any]:
        return {"symbolic": True}

    def evaluate(self, x: Tensor, t: Any, kwargs: Mapping[str, Any], coeffs: Optional[Tuple[float, float]] = None
                 ) -> Prediction:
        if coeffs is None:
            tt = torch.tensor(float(t), dtype=DT)
            coeffs = (float(self.process.alpha(tt)), float(self.process.sigma(tt)))
        self.calls += 1
        if self.calls >= self.n:
            raise ValueError("the solver evaluates more than once per step: it has no coefficient matrix")
        e = torch.zeros_like(x)
        e[..., self.calls] = 1.0
        return Prediction(x, coeffs[0], coeffs[1], x0=e)


def linear_solver(solver: str) -> bool:
    """Whether ``solver`` is a deterministic one-evaluation-per-step method without model-specific inputs, i.e.
    a coefficient matrix on every grid (DPM-Solver-v3's statistics act per dimension: not a matrix)."""
    info = get_solver(solver)
    return (not info.stochastic and not info.requires and not info.singlestep_order
            and all(info.cost(k, c) == k for k in (1, 2, 5) for c in (False, True)))


def linear_coefficients(process, solver: str, grid: TimeGrid, **options: Any) -> Tensor:
    """The coefficient matrix [steps, steps + 1] of ``solver`` with ``options`` on ``grid`` (module docstring)."""
    if not linear_solver(solver):
        raise ValueError(f"solver {solver!r} is not a linear one-evaluation-per-step method; use one of "
                         f"{', '.join(s.name for s in _linear_infos())}")
    n = grid.steps + 1
    model = _Symbolic(process, n)
    e0 = torch.zeros(1, n, dtype=DT)
    e0[0, 0] = 1.0
    rows: List[Tensor] = []
    sample(model, e0, solver, grid=grid, nfe=None, scale_noise=False,
           after_step=lambda state, step: rows.append(state.x[0].clone()), **options)
    return coefficient_matrix(torch.stack(rows), grid.steps)


def _linear_infos():
    from ..solvers import solvers

    return [s for s in solvers() if linear_solver(s.name)]


def fit_coefficients(model: Model, grid: TimeGrid, start: Tensor, noise: Tensor, targets: Sequence[Tensor],
                     mu: float, kwargs: Optional[Dict[str, Any]] = None, batch: Optional[int] = None
                     ) -> Tuple[Tensor, Tensor]:
    """(C, x_end): the coefficient matrix refitted row by row from ``start`` (module docstring) on ``noise``
    against ``targets`` (the teacher's states at grid.t[1:], the last one the run's end target), and the fitted
    solver's end states on ``noise``.  ``mu = inf`` returns ``start`` unchanged (and its end states).  On a grid
    that ends at clean data the last row stays the denoiser jump."""
    steps = grid.steps
    C = coefficient_matrix(start, steps).clone()
    if len(targets) != steps:
        raise ValueError(f"{len(targets)} targets for a grid of {steps} steps")
    kw = dict(kwargs or {})
    proc = model.process
    x = proc.prior_from_noise(noise.to(DT))
    basis = [x]
    step = batch or x.shape[0]
    for i in range(steps):
        a, s = float(grid.alpha[i]), float(grid.sigma[i])
        with torch.no_grad():
            d = torch.cat([model.evaluate(x[k:k + step], float(grid.t[i]), kw, (a, s)).x0.to(DT)
                           for k in range(0, x.shape[0], step)])
        basis.append(d)
        m = i + 2
        if grid.is_clean(i + 1):
            C[i] = 0.0
            C[i, i + 1] = 1.0
        elif math.isfinite(mu):
            B = torch.stack([b.flatten(1) for b in basis], -1)  # [N, dim, m]
            G = torch.einsum("ndj,ndk->jk", B, B)
            r = torch.einsum("ndj,nd->j", B, targets[i].to(DT).flatten(1))
            W = mu * torch.diag(torch.diag(G))
            c = torch.linalg.solve(G + W + 1e-12 * torch.trace(G) * torch.eye(m, dtype=DT), r + W @ C[i, :m])
            C[i, :m] = c
        x = sum(float(C[i, j]) * basis[j] for j in range(m))
    return C, x


@dataclass
class Fit:
    """A fitted solver: ``coefficients`` (fitted on all the noise with the chosen ``mu``), the out-of-fold squared
    errors per sample (``d2``: each sample scored by a fit that did not see it) and the cross-validated RMSE of
    every mu tried (``cv``; inf: the starting solver)."""

    coefficients: Tensor
    mu: float
    d2: Tensor
    cv: Dict[float, float] = field(default_factory=dict)

    @property
    def rmse(self) -> float:
        return float(self.d2.mean().sqrt())


def fit_solver(model: Model, grid: TimeGrid, start: Tensor, noise: Tensor, targets: Sequence[Tensor],
               mus: Sequence[float] = MUS, folds: int = 2, kwargs: Optional[Dict[str, Any]] = None,
               batch: Optional[int] = None) -> Fit:
    """Cross-validate mu in ``mus`` (and inf, the starting solver) with ``folds`` folds of ``noise``, then refit on
    all of it with the best; ``Fit.d2`` holds the chosen mu's out-of-fold errors (inf: the start's own)."""
    n = noise.shape[0]
    if n < 2 * folds:
        raise ValueError(f"fitting needs at least {2 * folds} samples for {folds}-fold cross-validation, got {n}")
    idx = torch.arange(n)
    parts = [idx[k::folds] for k in range(folds)]
    end = targets[-1].to(DT)
    oof: Dict[float, Tensor] = {}
    for mu in list(mus) + [math.inf]:
        d2 = torch.empty(n, dtype=DT)
        for held in parts:
            C = start
            if math.isfinite(mu):
                train = idx[~torch.isin(idx, held)]
                C, _ = fit_coefficients(model, grid, start, noise[train], [t[train] for t in targets], mu, kwargs,
                                        batch)
            x = _run(model, grid, C, noise[held], kwargs, batch)
            d2[held] = ((x - end[held]) ** 2).flatten(1).mean(1)
        oof[mu] = d2 if torch.isfinite(d2).all() else torch.full((n,), math.inf, dtype=DT)
    cv = {mu: float(d2.mean().sqrt()) for mu, d2 in oof.items()}
    best = min(cv, key=lambda m: (cv[m], -m))
    C, _ = fit_coefficients(model, grid, start, noise, targets, best, kwargs, batch)
    return Fit(C, best, oof[best], cv)


def _run(model: Model, grid: TimeGrid, C: Tensor, noise: Tensor, kwargs: Optional[Dict[str, Any]],
         batch: Optional[int]) -> Tensor:
    step = batch or noise.shape[0]
    return torch.cat([sample(model, noise[k:k + step], "fitted", grid=grid, nfe=None, coefficients=C,
                             model_kwargs=kwargs).to(DT) for k in range(0, noise.shape[0], step)])
