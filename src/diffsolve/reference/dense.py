"""Exact reference with full covariances: x0 ~ sum_k pi_k N(mu_k, C_k).

Each C_k is kept as its eigendecomposition Q_k diag(e_k) Q_k^T, so that at VE noise level s the component
posterior is diagonal in that basis: E[x0 | x~, k] = mu_k + Q_k diag(e_k / (e_k + s^2)) Q_k^T (x~ - mu_k) and
log N(x~; mu_k, C_k + s^2 I) is a sum over eigen-directions.  When all components share one covariance (the
posterior of a mixture of equal-covariance Gaussians under a linear-Gaussian measurement) one basis serves all
of them and an evaluation costs O(B d^2 + B K d) instead of O(B K d^2).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .gmm import DT, ClosedFormPrior, GaussianMixture

Tensor = torch.Tensor


class DenseGaussianMixture(ClosedFormPrior):
    """A Gaussian mixture with full covariances ``covs`` [K, d, d] (symmetric PSD), ``means`` [K, d] and
    ``weights`` [K] (or ``log_weights``), samples shaped ``shape``."""

    def __init__(self, means: Tensor, covs: Tensor, weights: Optional[Tensor] = None,
                 shape: Optional[Sequence[int]] = None, log_weights: Optional[Tensor] = None):
        self.means = torch.as_tensor(means, dtype=DT)
        covs = torch.as_tensor(covs, dtype=DT)
        K, d = self.means.shape
        if covs.shape != (K, d, d):
            raise ValueError(f"covs must be [K, d, d] = [{K}, {d}, {d}], got {list(covs.shape)}")
        if not (torch.isfinite(self.means).all() and torch.isfinite(covs).all()):
            raise ValueError("means and covariances must be finite")
        covs = 0.5 * (covs + covs.transpose(1, 2))
        self.shared = bool(torch.allclose(covs, covs[:1].expand_as(covs), rtol=0, atol=1e-14 * float(covs.abs().max())))
        e, Q = torch.linalg.eigh(covs[:1] if self.shared else covs)
        if float(e.min()) < -1e-9 * float(e.abs().max().clamp_min(1e-300)):
            raise ValueError("a covariance is not positive semi-definite")
        self.eig = e.clamp_min(0.0).expand(K, d) if self.shared else e.clamp_min(0.0)
        self.Q = Q  # [1 or K, d, d]
        self.covs = covs
        if log_weights is not None:
            lw = torch.as_tensor(log_weights, dtype=DT)
        else:
            w = torch.ones(K, dtype=DT) if weights is None else torch.as_tensor(weights, dtype=DT)
            if (w < 0).any() or float(w.sum()) <= 0:
                raise ValueError("mixture weights must be non-negative with a positive sum")
            lw = torch.log(w)
        self.log_weights = lw - torch.logsumexp(lw, 0)
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not have {d} elements")
        self.dim, self.n_components = d, K

    @classmethod
    def from_mixture(cls, ref: GaussianMixture) -> "DenseGaussianMixture":
        """The same distribution as a low-rank ``GaussianMixture``, with its covariances made dense."""
        U, s = ref.bases, ref.scales
        covs = torch.einsum("kdr,kr,ker->kde", U, s**2, U) + ref.delta**2 * torch.eye(ref.dim, dtype=DT)
        return cls(ref.means, covs, shape=ref.shape, log_weights=ref.log_weights)

    def _project(self, xf: Tensor) -> Tensor:
        """Q_k^T (x~ - mu_k): [B, K, d]."""
        if self.shared:
            Q = self.Q[0]
            return (xf @ Q)[:, None, :] - (self.means @ Q)[None]
        return torch.einsum("bkd,kde->bke", xf[:, None, :] - self.means[None], self.Q)

    def _terms(self, xf: Tensor, sigma_ve: Union[float, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        s2 = torch.as_tensor(sigma_ve, dtype=DT) ** 2
        s2 = s2.reshape(-1, 1, 1) if s2.dim() else s2
        v = self.eig[None] + s2  # [1 or B, K, d]
        if float(v.min()) <= 0:
            raise ValueError("a component is degenerate at this noise level (zero variance)")
        p = self._project(xf)
        logp = -0.5 * ((p * p / v).sum(-1) + torch.log(v).sum(-1) + self.dim * math.log(2 * math.pi))
        return logp, p, v

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        logp, _, _ = self._terms(self._flat(x), sigma_ve)
        return torch.logsumexp(logp + self.log_weights, -1)

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        xf = self._flat(x)
        logp, p, v = self._terms(xf, sigma_ve)
        w = torch.softmax(logp + self.log_weights, -1)  # [B, K]
        g = self.eig[None] / v * p  # [B, K, d]: diag(e / (e + s^2)) Q^T (x~ - mu)
        if self.shared:
            out = w @ self.means + (w[:, :, None] * g).sum(1) @ self.Q[0].T
        else:
            out = w @ self.means + torch.einsum("bk,kde,bke->bd", w, self.Q, g)
        return out.reshape(x.shape)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DT) * self.eig[k].sqrt()
        Q = self.Q[0].expand(n, -1, -1) if self.shared else self.Q[k]
        return (self.means[k] + torch.einsum("nde,ne->nd", Q, z)).reshape(n, *self.shape)

    def mean(self) -> Tensor:
        """E[x0] [*shape]."""
        return (self.log_weights.exp() @ self.means).reshape(self.shape)

    def covariance(self) -> Tensor:
        """Cov[x0] [d, d] (within-component plus between-component parts)."""
        w = self.log_weights.exp()
        mu = w @ self.means
        dm = self.means - mu
        return torch.einsum("k,kde->de", w, self.covs) + torch.einsum("k,kd,ke->de", w, dm, dm)
