"""Closed-form DPM-Solver-v3 statistics of a single Gaussian (tests, and a check of the estimator)."""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor
DT = torch.float64

# ----------------------------------------------------------------------------------------
def gaussian_statistics(mean: Tensor, cov: Tensor, lam: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Exact (l, s, b) for data N(mean, cov) and the ideal denoiser, on the lambda grid ``lam`` ([n, d] each).

    With P = (e^{2 lam} cov + I)^{-1}, y = x~ - mean ~ N(0, Q), Q = cov + e^{-2 lam} I:  E = P y, l = diag P,
    dy/dlam = -P y, P' = 2 P^2 - 2 P, so f = (P - diag P) y - l mean and
    f' = (P' - diag P' - (P - diag P) P) y - diag(P') mean:  s = diag(M' Q M^T) / diag(M Q M^T), b = E f' - s E f.
    Where Var f = 0 (diagonal P) s is 0 (the ridge limit).
    """
    mean, cov, lam = (torch.as_tensor(v, dtype=DT) for v in (mean, cov, lam))
    d = mean.numel()
    I = torch.eye(d, dtype=DT)
    ls, ss, bs = [], [], []
    for lm in lam:
        P = torch.linalg.inv(torch.exp(2 * lm) * cov + I)
        Q = cov + torch.exp(-2 * lm) * I
        Pp = 2 * P @ P - 2 * P
        l, lp = torch.diagonal(P), torch.diagonal(Pp)
        M = P - torch.diag(l)
        Mp = Pp - torch.diag(lp) - M @ P
        var = torch.diagonal(M @ Q @ M.T)
        cv = torch.diagonal(Mp @ Q @ M.T)
        s = torch.where(var > 1e-300, cv / var.clamp_min(1e-300), torch.zeros_like(var))
        b = -lp * mean + s * l * mean
        ls.append(l)
        ss.append(s)
        bs.append(b)
    return torch.stack(ls), torch.stack(ss), torch.stack(bs)
