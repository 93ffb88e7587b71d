"""A batched Dormand-Prince 5(4) integrator (Dormand & Prince 1980; 'dopri5' / scipy's RK45) with a step size
per sample, so a sample's steps and evaluations do not depend on the batch it is integrated in.

``integrate(f, u0, u1, y0, ...)`` solves dy/du = f(u, y, idx) from u0 to u1 (per-sample [B] or scalars) for
y [B, n]; ``f`` sees only the rows ``idx`` that are still integrating, with their own u.  Adaptive mode (the
default) controls the local error per sample (``rtol``, ``atol``; the first ``split`` entries of y and the rest are
normed separately and the larger counts); ``steps=N`` takes N equal steps of the same 5th-order formula instead,
so every sample costs exactly 6 N + 1 evaluations (a fixed budget: distributed runs stay in lockstep).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple, Union

import torch

Tensor = torch.Tensor
DT = torch.float64
Rhs = Callable[[Tensor, Tensor, Tensor], Tensor]

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))


class IntegrationError(RuntimeError):
    """The adaptive integrator did not reach the end within its step budget."""


def _stages(f: Rhs, u: Tensor, h: Tensor, y: Tensor, k1: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """One Dormand-Prince step from (u, y) with first stage k1: (5th-order y_new, error estimate, k7 = f(y_new))."""
    ks = [k1]
    hc = h[:, None]
    for i in range(1, 7):
        yi = y + hc * sum(a * kj for a, kj in zip(_A[i], ks) if a != 0.0)
        ks.append(f(u + _C[i] * h, yi, idx))
    y_new = y + hc * sum(b * kj for b, kj in zip(_B5, ks) if b != 0.0)  # equals the 7th stage's input
    err = hc * sum(e * kj for e, kj in zip(_E, ks) if e != 0.0)
    return y_new, err, ks[6]


def _norm(err: Tensor, y0: Tensor, y1: Tensor, rtol: float, atol: float, split: int) -> Tensor:
    scale = atol + rtol * torch.maximum(y0.abs(), y1.abs())
    r = (err / scale) ** 2
    a = r[:, :split].mean(1).sqrt()
    if split < r.shape[1]:
        a = torch.maximum(a, r[:, split:].mean(1).sqrt())
    return a


def integrate(f: Rhs, u0: Union[float, Tensor], u1: Union[float, Tensor], y0: Tensor, rtol: float = 1e-5,
              atol: float = 1e-5, steps: Optional[int] = None, split: Optional[int] = None, max_steps: int = 10_000,
              progress: Optional[Any] = None) -> Tuple[Tensor, Tensor]:
    """Solve dy/du = f(u, y, idx) from ``u0`` to ``u1``; returns (y at u1 [B, n], evaluations per sample [B]).

    ``progress``: a tqdm-like bar advanced by the fraction of the u-range covered (in percent of the batch).
    """
    b = y0.shape[0]
    u0 = torch.as_tensor(u0, dtype=DT).expand(b).clone()
    u1 = torch.as_tensor(u1, dtype=DT).expand(b).clone()
    span = u1 - u0
    split = y0.shape[1] if split is None else split
    y = y0.to(DT).clone()
    nfe = torch.zeros(b, dtype=torch.long)
    all_idx = torch.arange(b)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        h = span / steps
        k = f(u0, y, all_idx)
        nfe += 1
        u = u0.clone()
        for i in range(steps):
            y, _, k = _stages(f, u, h, y, k, all_idx)
            u = u0 + (i + 1) * h
            nfe += 6
            if progress is not None:
                progress.update(100.0 / steps)
        return y, nfe

    u = u0.clone()
    k = f(u0, y, all_idx)
    nfe += 1
    h = span / 20
    active = span.abs() > 0
    done_frac = torch.zeros(b, dtype=DT)
    n_steps = 0
    while bool(active.any()):
        n_steps += 1
        if n_steps > max_steps:
            raise IntegrationError(f"the adaptive ODE solve did not finish within {max_steps} steps (rtol={rtol}, "
                                   f"atol={atol}); loosen the tolerances or use a fixed number of steps")
        idx = all_idx[active]
        ua, ha, ya, ka = u[idx], h[idx], y[idx], k[idx]
        rest = u1[idx] - ua
        ha = torch.where(ha.abs() > rest.abs(), rest, ha)  # do not step past the end
        y_new, err, k_new = _stages(f, ua, ha, ya, ka, idx)
        nfe[idx] += 6
        en = _norm(err.detach(), ya.detach(), y_new.detach(), rtol, atol, split)  # step control: no gradients
        ok = en <= 1.0
        fac = torch.where(en > 0, 0.9 * en.clamp_min(1e-10) ** -0.2, torch.full_like(en, 10.0)).clamp(0.2, 10.0)
        acc = idx[ok]
        u[acc] = ua[ok] + ha[ok]
        y[acc] = y_new[ok]
        k[acc] = k_new[ok]
        h[idx] = ha * torch.where(ok, fac, fac.clamp(max=1.0))
        reached = acc[(u1[acc] - u[acc]).abs() <= 1e-12 * (1 + u1[acc].abs())]
        active[reached] = False
        if progress is not None:
            frac = ((u - u0) / torch.where(span == 0, torch.ones_like(span), span)).clamp(0, 1)
            progress.update(float((frac - done_frac).sum()) * 100.0 / b)
            done_frac = frac
    return y, nfe
