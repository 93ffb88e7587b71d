"""Distances between sample sets."""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, directions: int = 100, generator: Optional[torch.Generator] = None,
                       p: int = 2) -> float:
    """Sliced p-Wasserstein distance between equal-size sample sets a, b [n, ...] over ``directions`` random unit
    directions: (mean over directions of W_p^p of the 1-D projections)^(1/p), the 1-D W_p by sorted samples."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced Wasserstein needs sample sets of one shape, got {list(a.shape)} and {list(b.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    u = torch.randn(a.shape[1], directions, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    pa, pb = (a @ u).sort(0)[0], (b @ u).sort(0)[0]
    return float(((pa - pb).abs() ** p).mean() ** (1.0 / p))
