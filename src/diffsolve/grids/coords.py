"""Normalised log-SNR coordinates u in [0, 1] (0 = t_max, 1 = t_min), in which grid searches move points."""
from __future__ import annotations

import torch

from ..processes import NoiseProcess

Tensor = torch.Tensor
DT = torch.float64


def to_unit(process: NoiseProcess, t: Tensor) -> Tensor:
    """u = (lambda(t) - lambda(t_max)) / (lambda(t_min) - lambda(t_max)), clamped to [0, 1]."""
    a, b = process.lam_range
    return ((process.lam(torch.as_tensor(t, dtype=DT)) - a) / (b - a)).clamp(0, 1)


def from_unit(process: NoiseProcess, u: Tensor, fix_last: bool) -> Tensor:
    """Times of the unit coordinates ``u``; the first point is t_max, and with ``fix_last`` a last u >= 1 is t_min."""
    a, b = process.lam_range
    u = torch.as_tensor(u, dtype=DT)
    t = process.t_of_lam(a + u * (b - a))
    t = t.clamp(process.t_min, process.t_max)
    t[0] = process.t_max
    if fix_last and float(u[-1]) >= 1.0:
        t[-1] = process.t_min
    return t
