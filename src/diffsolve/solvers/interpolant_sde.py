"""Stochastic-interpolant SDEs (Albergo, Boffi & Vanden-Eijnden 2023, arXiv:2303.08797).

For an affine path x_t = alpha(t) x0 + sigma(t) z with a Gaussian base, every member of the family

    dX = [v(X, t) - eps(t) s(X, t)] dt + sqrt(2 eps(t)) dW,   t decreasing from t_max to t_min,

(the paper's dX = [b + eps s] dt + sqrt(2 eps) dW in its forward time) has the path's marginals, for any eps(t) >= 0;
eps = 0 is the probability-flow ODE, eps = g^2/2 the reverse diffusion SDE.  The velocity v = alpha' x0 + sigma' e and
the score s = -e / sigma both follow from one prediction (x0, e) in closed form -- for a velocity model, the
parameterisation table's 'velocity' conversion -- so any model of a Gaussian process runs them.

* ``interpolant_sde(second_order=False)``: Euler-Maruyama, X' = X + f dt + sqrt(2 eps(t)) dW, f = v - eps s;
* ``second_order=True``: stochastic Heun for additive noise: a predictor X~ = X + f(X, t) dt + g_t dW, then
  X' = X + (f(X, t) + f(X~, t')) dt / 2 + (g_t + g_t') dW / 2 with the same dW, g = sqrt(2 eps) (2 evaluations a step).

With eps = 0 they are Euler and Heun in t.  The noise comes from the per-sample streams of the solver state, so a
sample does not depend on its batch.
"""
from __future__ import annotations

import math
from typing import Callable, List, Union

import torch

from ..grids import TimeGrid
from .drivers import Evaluator, run_singlestep
from .expint import lincomb
from .state import Noise, Point

Tensor = torch.Tensor
Epsilon = Union[None, float, Callable[[float], float]]


def epsilon_values(process, grid: TimeGrid, epsilon: Epsilon) -> List[float]:
    """eps(t_i) at the grid's (non-clean) times: ``None`` is the reverse SDE's g(t)^2 / 2, a number a constant, a
    callable eps(t) of process time.  A negative or non-finite value is a clear error."""
    out = []
    for i in range(grid.t.numel() - (1 if grid.clean_end else 0)):
        t = float(grid.t[i])
        if epsilon is None:
            e = 0.5 * float(process.diffusion2(torch.tensor(t, dtype=torch.float64)))
        elif callable(epsilon):
            e = float(epsilon(t))
        else:
            e = float(epsilon)
        if not math.isfinite(e) or e < 0:
            raise ValueError(f"epsilon(t) must be finite and >= 0 (the SDE's diffusion is sqrt(2 epsilon)); got {e!r} "
                             f"at t={t:.6g}")
        out.append(max(e, 0.0))
    return out


def interpolant_sde(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, epsilon: Epsilon = None,
                    second_order: bool = False):
    """The interpolant SDE with diffusion coefficient ``epsilon`` (see the module doc), Euler-Maruyama or stochastic
    Heun (``second_order``); the step to clean data is the denoiser jump."""
    p = ev.process
    eps = epsilon_values(p, grid, epsilon)

    def drift(pt: Point, e: float) -> Tensor:
        t = torch.tensor(pt.t, dtype=torch.float64)
        return lincomb([(float(p.d_alpha(t)), pt.x0), (float(p.d_sigma(t)) + e / pt.sigma, pt.eps)])

    def step(x: Tensor, i: int, p0: Point, k: int):
        t_next = float(grid.t[i + 1])
        dt = t_next - p0.t  # negative
        dw = ev.state.noise.like(x).mul_(math.sqrt(-dt))
        g0, g1 = math.sqrt(2 * eps[i]), math.sqrt(2 * eps[i + 1])
        f0 = drift(p0, eps[i])
        pred = lincomb([(1.0, x), (dt, f0), (g0, dw)])
        if not second_order:
            return pred
        p1 = yield ev.request(pred, t_next)
        return lincomb([(1.0, x), (0.5 * dt, f0), (0.5 * dt, drift(p1, eps[i + 1])), (0.5 * (g0 + g1), dw)])

    return run_singlestep(ev, x, grid, step)


def interpolant_sde_heun(ev: Evaluator, x: Tensor, grid: TimeGrid, noise: Noise, epsilon: Epsilon = None):
    return interpolant_sde(ev, x, grid, noise, epsilon=epsilon, second_order=True)

