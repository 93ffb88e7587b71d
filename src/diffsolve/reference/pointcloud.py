"""Exact reference for a finite data set: x0 ~ sum_i pi_i delta(y_i), under the Gaussian kernel or PFGM++'s.

At VE noise level s (x~ = x0 + s * perturbation) the posterior over the points is a softmax, so the ideal denoiser
E[x0 | x~] = sum_i w_i y_i and the noisy log-density are closed form:

* Gaussian kernel (every Gaussian process): log w_i = log pi_i - ||x~ - y_i||^2 / (2 s^2);
* PFGM++ with D augmented dimensions (Xu et al. 2023, arXiv:2302.04265), r = s sqrt(D):
  log w_i = log pi_i - (N + D)/2 log(1 + ||x~ - y_i||^2 / r^2)  (the kernel (||x - y||^2 + r^2)^(-(N+D)/2)).

Its probability-flow ODE dx~/ds = (x~ - E[x0 | x~]) / s is solved as the mixture's is (DOP853 to rtol 1e-10).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..processes import NoiseProcess
from .gmm import DT, ClosedFormPrior

Tensor = torch.Tensor


class PointCloud(ClosedFormPrior):
    """The empirical distribution of ``points`` [n, *shape] (optional ``weights`` [n]) under the kernel of
    augmentation dimension ``D`` (None: the Gaussian kernel of every Gaussian process; a number: PFGM++)."""

    def __init__(self, points: Tensor, weights: Optional[Tensor] = None, D: Optional[float] = None,
                 shape: Optional[Sequence[int]] = None):
        pts = torch.as_tensor(points, dtype=DT)
        if pts.dim() < 2 or pts.shape[0] < 1:
            raise ValueError(f"points must be [n, *shape] with n >= 1, got {tuple(pts.shape)}")
        if not torch.isfinite(pts).all():
            raise ValueError("points contain NaN or inf")
        if D is not None and (not math.isfinite(D) or D <= 0):
            raise ValueError(f"the PFGM++ kernel needs D > 0, got {D!r}")
        self.shape = tuple(shape) if shape is not None else tuple(pts.shape[1:])
        self.points = pts.reshape(pts.shape[0], -1)
        self.dim = self.points.shape[1]
        if math.prod(self.shape) != self.dim:
            raise ValueError(f"shape {self.shape} does not have {self.dim} elements")
        w = torch.ones(pts.shape[0], dtype=DT) if weights is None else torch.as_tensor(weights, dtype=DT)
        if w.shape != (pts.shape[0],) or (w < 0).any() or float(w.sum()) <= 0:
            raise ValueError("weights must be [n], non-negative, with a positive sum")
        self.log_weights = torch.log(w / w.sum())
        self.D = None if D is None else float(D)

    @classmethod
    def for_process(cls, points: Tensor, process: NoiseProcess, **kw) -> "PointCloud":
        """The point cloud under ``process``'s kernel (PFGM++'s D, else Gaussian)."""
        return cls(points, D=getattr(process, "D", None), **kw)

    def check_process(self, process: NoiseProcess) -> None:
        d = getattr(process, "D", None)
        if (d is None) != (self.D is None) or (d is not None and float(d) != self.D):
            raise ValueError(f"this point cloud has the {'Gaussian' if self.D is None else f'D={self.D:g}'} kernel, "
                             f"the process {process!r} another; build it with PointCloud.for_process")

    def _log_kernel(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        """log k_s(x~ - y_i) + log pi_i [B, n] (the kernel's normaliser included)."""
        xf = self._flat(x)
        s = torch.as_tensor(sigma_ve, dtype=DT)
        s = s.reshape(-1, 1) if s.dim() else s
        d2 = (xf * xf).sum(1, keepdim=True) - 2 * xf @ self.points.T + (self.points * self.points).sum(1)[None]
        d2 = d2.clamp_min(0.0)
        n = self.dim
        if self.D is None:
            logk = -0.5 * d2 / s**2 - n * torch.log(s) - 0.5 * n * math.log(2 * math.pi)
        else:
            D = self.D
            r2 = s**2 * D
            logk = (math.lgamma(0.5 * (n + D)) - math.lgamma(0.5 * D) - 0.5 * n * math.log(math.pi)
                    - 0.5 * n * torch.log(r2) - 0.5 * (n + D) * torch.log1p(d2 / r2))
        return logk + self.log_weights[None]

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        w = torch.softmax(self._log_kernel(x, sigma_ve), -1)
        return (w @ self.points).reshape(x.shape)

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        s = torch.as_tensor(sigma_ve, dtype=DT)
        if not s.dim() and float(s) == 0.0:
            raise ValueError("a point cloud has no density at noise level 0")
        return torch.logsumexp(self._log_kernel(x, s), -1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        return self.points[k].reshape(n, *self.shape)

    def mean(self) -> Tensor:
        return (self.log_weights.exp() @ self.points).reshape(self.shape)

    def covariance(self) -> Tensor:
        w = self.log_weights.exp()
        c = self.points - w @ self.points
        return (c * w[:, None]).T @ c
