"""A linear multistep method with per-step coefficients fitted to one model (a non-stationary solver).

Every deterministic one-evaluation-per-step solver in this library -- DDIM, DPM-Solver(++) multistep, UniPC with
its corrector, DEIS, iPNDM, the momentum methods -- only ever forms linear combinations of the starting state x_T
and the model's x0 predictions D_j = D(x_j, t_j) (eps = (x - alpha x0)/sigma is one too).  On a fixed grid each
such solver is therefore a lower-triangular matrix C of coefficients:

    x_{i+1} = C[i, 0] x_T + sum_{j <= i} C[i, j + 1] D_j,        i = 0 .. steps - 1,

and ``fitted`` runs any such C (without one, DDIM's: x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (alpha_{i+1} -
alpha_i sigma_{i+1}/sigma_i) D_i, the first-order exponential step).  ``tuning.fitted`` reads C off a named solver (a symbolic run) and refits it on
calibration noise against the teacher's trajectory -- the non-stationary solvers of Shaul et al. 2024 ("Bespoke
Non-Stationary Solvers", arXiv:2403.01329), fitted here by regularised least squares, step by step, instead of by
back-propagation through the network.  One evaluation per step; the last row gives the state at t_min.  A grid
that ends at clean data ends, as with every solver here, with the denoiser jump x <- D_last (its last row is e_last).
"""
from __future__ import annotations

from typing import Any, List, Sequence, Union

import torch

from ..grids import TimeGrid
from .drivers import Evaluator, Program
from .expint import lincomb
from .state import Noise

Tensor = torch.Tensor


def coefficient_matrix(coefficients: Union[Tensor, Sequence[Sequence[float]]], steps: int) -> Tensor:
    """``coefficients`` as a float64 [steps, steps + 1] lower-triangular matrix, or a clear error."""
    try:
        C = torch.as_tensor(coefficients, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError("coefficients must be a [steps, steps + 1] matrix of numbers") from None
    if C.dim() != 2 or tuple(C.shape) != (steps, steps + 1):
        raise ValueError(f"coefficients of shape {tuple(C.shape)} do not fit a grid of {steps} steps "
                         f"(expected [{steps}, {steps + 1}]: row i = x_(i+1) in the basis [x_T, D_0, ..., D_i])")
    if not torch.isfinite(C).all():
        raise ValueError("coefficients contain NaN or inf")
    if torch.triu(C, diagonal=2).abs().max() > 0:
        raise ValueError("coefficients must be lower-triangular: row i may use x_T and D_0 .. D_i only")
    return C


def ddim_matrix(grid: TimeGrid) -> Tensor:
    """DDIM's coefficient matrix on ``grid`` (the starting point of a fit, and ``fitted`` without coefficients)."""
    n = grid.steps
    C = torch.zeros(n, n + 1, dtype=torch.float64)
    v = torch.zeros(n + 1, dtype=torch.float64)
    v[0] = 1.0
    for i in range(n):
        a = float(grid.sigma[i + 1] / grid.sigma[i])
        v = a * v
        v[i + 1] += float(grid.alpha[i + 1]) - a * float(grid.alpha[i])
        C[i] = v
    return C


def fitted(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, coefficients: Any = None) -> Program:
    """Run the coefficient matrix ``coefficients`` ([steps, steps + 1], see the module docstring) on ``grid``
    (``None``: DDIM's)."""
    C = ddim_matrix(grid) if coefficients is None else coefficient_matrix(coefficients, grid.steps)
    rows: List[List[float]] = C.tolist()
    st = ev.begin(x, None)
    st.extras["basis"] = [x]  # x_T, then the x0 prediction of every step (moves with the batch on reindex)
    for i in range(grid.steps):
        pt = yield ev.at(ev.state.x, grid, i)
        st = ev.state
        st.history = [pt]
        basis = st.extras["basis"] = st.extras["basis"] + [pt.x0]
        if grid.is_clean(i + 1):  # the one last-step rule: the jump to clean data
            x_next = pt.x0
        else:
            x_next = lincomb([(c, b) for c, b in zip(rows[i][: i + 2], basis)])
        ev.finish_step(i, x_next, grid, pt)
    return ev.state.x
