"""A Gaussian mixture whose components share one covariance C = I - V diag(c) V^T (V orthonormal [d, r]): the
25-component grid prior of the MCGdiff protocol (Cardoso et al. 2023, arXiv:2308.07983; r = 0) and its posterior
under a linear-Gaussian measurement (V the operator's right singular vectors), in closed form at O(B K d)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .gmm import ClosedFormPrior

Tensor = torch.Tensor
DT = torch.float64


class SharedCovarianceMixture(ClosedFormPrior):
    """x0 ~ sum_k pi_k N(mu_k, C) with one covariance C = I - V diag(c) V^T (V [d, r] orthonormal, 0 <= c < 1).

    At VE noise level s, with P = (C + s^2 I)^{-1} = (I - V V^T) / (1 + s^2) + V diag(1 / (1 - c + s^2)) V^T:
    E[x0 | x~] = x~ - s^2 P (x~ - sum_k w_k mu_k), w = softmax_k(log pi_k + x~^T P mu_k - mu_k^T P mu_k / 2),
    all by [B, d] x [d, K] products.  r = 0 is the unit-covariance grid prior, r = d_y its posterior."""

    def __init__(self, means: Tensor, log_weights: Tensor, V: Optional[Tensor] = None, c: Optional[Tensor] = None):
        self.means = torch.as_tensor(means, dtype=DT)
        K, d = self.means.shape
        self.V = torch.zeros(d, 0, dtype=DT) if V is None else torch.as_tensor(V, dtype=DT)
        self.c = torch.zeros(0, dtype=DT) if c is None else torch.as_tensor(c, dtype=DT)
        if self.V.shape != (d, self.c.numel()) or (self.c.numel() and not (0 <= float(self.c.min()) and
                                                                            float(self.c.max()) < 1)):
            raise ValueError("V must be [d, r] and 0 <= c < 1 (r entries)")
        lw = torch.as_tensor(log_weights, dtype=DT)
        self.log_weights = lw - torch.logsumexp(lw, 0)
        self.shape, self.dim, self.n_components = (d,), d, K
        self.lam = 1.0 - self.c  # eigenvalues of C along V (1 elsewhere)
        self.mV = self.means @ self.V  # [K, r]
        self.msq = (self.means**2).sum(1)  # [K]

    def covariance_matrix(self) -> Tensor:
        return torch.eye(self.dim, dtype=DT) - (self.V * self.c) @ self.V.T

    def _precision(self, sigma_ve: Union[float, Tensor], batch: int) -> Tuple[Tensor, Tensor, Tensor]:
        s2 = torch.as_tensor(sigma_ve, dtype=DT) ** 2
        s2 = (s2.reshape(-1, 1) if s2.dim() else s2.reshape(1, 1)).expand(batch, 1)
        iso = 1.0 / (1.0 + s2)  # [B, 1]
        delta = 1.0 / (self.lam[None] + s2) - iso  # [B, r]: extra precision along V
        return s2, iso, delta

    def _logits(self, xf: Tensor, iso: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
        xV = xf @ self.V
        xPm = iso * (xf @ self.means.T) + (xV * delta) @ self.mV.T  # [B, K]
        mPm = iso * self.msq[None] + delta @ (self.mV**2).T
        return self.log_weights[None] + xPm - 0.5 * mPm, xV

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        xf = self._flat(x)
        s2, iso, delta = self._precision(sigma_ve, xf.shape[0])
        logits, _ = self._logits(xf, iso, delta)
        r = xf - torch.softmax(logits, -1) @ self.means
        Pr = iso * r + ((r @ self.V) * delta) @ self.V.T
        return (xf - s2 * Pr).reshape(x.shape)

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        xf = self._flat(x)
        s2, iso, delta = self._precision(sigma_ve, xf.shape[0])
        logits, xV = self._logits(xf, iso, delta)
        xPx = iso[:, 0] * (xf**2).sum(1) + (delta * xV**2).sum(1)
        logdet = (self.dim - self.c.numel()) * torch.log(1.0 + s2[:, 0]) + torch.log(self.lam[None] + s2).sum(1)
        return torch.logsumexp(logits, -1) - 0.5 * (xPx + logdet + self.dim * math.log(2 * math.pi))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DT)
        return self.means[k] + z - ((z @ self.V) * (1.0 - self.lam.sqrt())) @ self.V.T
