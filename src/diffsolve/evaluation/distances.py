"""Distances between sample sets: sliced Wasserstein and MMD."""
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


def kernel_matrix(z: Tensor, bandwidths: Optional[Tensor] = None) -> Tensor:
    """Sum of Gaussian kernels exp(-|x - y|^2 / (2 h^2)) between all rows of z [N, ...]; default bandwidths: the
    median pairwise distance times (1/2, 1, 2)."""
    z = z.reshape(z.shape[0], -1).double()
    d2 = torch.cdist(z, z).pow(2)
    if bandwidths is None:
        med = d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), 1)].median().sqrt()
        bandwidths = med * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    hs = torch.as_tensor(bandwidths, dtype=torch.float64).reshape(-1, 1, 1)
    return torch.exp(-d2 / (2 * hs * hs)).sum(0)


def mmd2_from_kernel(k: Tensor, first: Tensor) -> float:
    """Unbiased MMD^2 of the split of a pooled kernel matrix k [N, N] into rows ``first`` (bool [N]) and the rest."""
    a, b = first, ~first
    n, m = int(a.sum()), int(b.sum())
    kaa, kbb, kab = k[a][:, a], k[b][:, b], k[a][:, b]
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * kab.mean())


def mmd2(a: Tensor, b: Tensor, bandwidths: Optional[Tensor] = None) -> float:
    """Unbiased squared maximum mean discrepancy (Gretton et al. 2012) between sample sets a [n, ...] and b [m, ...]
    with ``kernel_matrix``'s kernels.  Can be slightly negative when the sets come from one distribution."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"MMD needs two sets of >= 2 samples of one dimension, got {list(a.shape)} and {list(b.shape)}")
    first = torch.zeros(a.shape[0] + b.shape[0], dtype=torch.bool)
    first[: a.shape[0]] = True
    return mmd2_from_kernel(kernel_matrix(torch.cat([a, b]), bandwidths), first)
