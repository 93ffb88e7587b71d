"""The exact posterior of a Gaussian-mixture prior under a linear-Gaussian measurement y = A x0 + sigma_y n.

With x0 ~ sum_k pi_k N(mu_k, C_k), each component's posterior is Gaussian (S_k = A C_k A^T + sigma_y^2 I,
G_k = C_k A^T S_k^{-1}):

    mu_k' = mu_k + G_k (y - A mu_k),   C_k' = C_k - G_k A C_k,   pi_k' ∝ pi_k N(y; A mu_k, S_k),

so the posterior is again a mixture (``DenseGaussianMixture``).  Its exact denoiser E[x0 | x_t, y] is the
*oracle* guided model -- any solver run on it samples the posterior with solver error only -- and the difference of
its score and the prior's is the exact noisy-time guidance term grad log p_t(y | x_t).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..adapters.denoiser import Denoiser
from ..processes import NoiseProcess
from ..reference import DenseGaussianMixture, GaussianMixture
from .operators import Operator

Tensor = torch.Tensor
DT = torch.float64
Prior = Union[GaussianMixture, DenseGaussianMixture]


def check_measurement(op: Operator, y: Tensor, sigma_y: float, batch: bool = False) -> Tensor:
    """y as [1, *op.out_shape] float64, with clear errors for a wrong shape, NaN or a negative sigma_y.
    ``batch``: also accept one measurement per sample, [B, *op.out_shape] (kept as it is)."""
    if not isinstance(op, Operator):
        raise TypeError(f"operator must be a diffsolve.inverse Operator, got {type(op).__name__}")
    y = torch.as_tensor(y, dtype=DT)
    if tuple(y.shape) == op.out_shape:
        y = y[None]
    if tuple(y.shape[1:]) != op.out_shape or (y.shape[0] != 1 and not batch) or y.shape[0] < 1:
        raise ValueError(f"y must have the operator's measurement shape {list(op.out_shape)}"
                         f"{' (or one per sample)' if batch else ''}, got {list(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("y has NaN or infinite entries")
    if not (isinstance(sigma_y, (int, float)) and math.isfinite(sigma_y)) or sigma_y < 0:
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    return y


def _check_problem(op: Operator, y: Tensor, sigma_y: float, shape: Sequence[int]) -> Tensor:
    """y checked as ``check_measurement`` does, for an exact posterior: sigma_y > 0, a linear operator on data of
    the prior's ``shape``."""
    y = check_measurement(op, y, sigma_y)
    if sigma_y <= 0:
        raise ValueError("the exact posterior needs sigma_y > 0")
    if not op.linear:
        raise TypeError("the exact posterior needs a linear operator")
    if op.in_shape != tuple(shape):
        raise ValueError(f"the operator acts on {list(op.in_shape)}, the prior's data are {list(shape)}")
    return y


class ExactPosterior:
    """p(x0 | y) for a mixture prior and a linear operator with Gaussian noise ``sigma_y`` (> 0)."""

    def __init__(self, prior: Prior, op: Operator, y: Tensor, sigma_y: float):
        y = _check_problem(op, y, sigma_y, prior.shape)
        dense = prior if isinstance(prior, DenseGaussianMixture) else DenseGaussianMixture.from_mixture(prior)
        self.prior, self.op, self.y, self.sigma_y = prior, op, y, float(sigma_y)
        A = op.matrix().to(DT)
        yf = y.reshape(-1)
        C, mu = dense.covs, dense.means
        AC = torch.einsum("md,kde->kme", A, C)  # [K, m, d]
        S = torch.einsum("kme,ne->kmn", AC, A) + sigma_y**2 * torch.eye(A.shape[0], dtype=DT)
        L = torch.linalg.cholesky(S)
        r = yf[None] - mu @ A.T  # [K, m]
        sol = torch.cholesky_solve(r[..., None], L)[..., 0]  # S^{-1} r
        means = mu + torch.einsum("kme,km->ke", AC, sol)
        covs = C - torch.einsum("kmd,kme->kde", AC, torch.cholesky_solve(AC, L))
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)
        loglik = -0.5 * ((r * sol).sum(-1) + logdet + A.shape[0] * math.log(2 * math.pi))
        self.log_evidence = torch.logsumexp(dense.log_weights + loglik, 0)
        self.mixture = DenseGaussianMixture(means, covs, shape=dense.shape, log_weights=dense.log_weights + loglik)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        return self.mixture.sample(n, generator)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.mixture.log_prob(x)

    def mean(self) -> Tensor:
        return self.mixture.mean()

    def covariance(self) -> Tensor:
        return self.mixture.covariance()

    def denoiser(self, process: NoiseProcess, prediction: str = "x0") -> Denoiser:
        """The oracle guided model: the exact E[x0 | x_t, y] as a model every solver can run."""
        return self.mixture.denoiser(process, prediction)

    def guidance(self, x: Tensor, process: NoiseProcess, t: Union[float, Tensor]) -> Tensor:
        """The exact grad_{x_t} log p_t(y | x_t) = posterior score - prior score at x_t."""
        return self.mixture.score(x, process, t) - self.prior.score(x, process, t)


class LowRankPosterior:
    """p(x0 | y) for a low-rank mixture prior (``GaussianMixture``: C_k = B_k diag(lambda_k^2) B_k^T + delta^2 I)
    without d x d matrices, for large d: the posterior weights pi_k' ∝ pi_k N(y; A mu_k, S_k) and means
    mu_k + G_k (y - A mu_k) as in ``ExactPosterior``, with G_k = C_k A^T S_k^{-1} built from A B_k; samples by
    Matheron's rule, x' = x + G_k (y - A x - sigma_y n) for x a draw of component k (k drawn by pi'), which has the
    component's posterior law exactly.  O(K d (r + m)) per sample."""

    def __init__(self, prior: GaussianMixture, op: Operator, y: Tensor, sigma_y: float):
        y = _check_problem(op, y, sigma_y, prior.shape)
        self.prior, self.op, self.y, self.sigma_y = prior, op, y, float(sigma_y)
        A = op.matrix().to(DT)  # [m, d]
        m = A.shape[0]
        lam2, dl2 = prior.scales**2, prior.delta**2
        AB = torch.einsum("md,kdr->kmr", A, prior.bases)
        S = dl2 * (A @ A.T) + torch.einsum("kmr,kr,knr->kmn", AB, lam2, AB) + sigma_y**2 * torch.eye(m, dtype=DT)
        CAt = dl2 * A.T[None] + torch.einsum("kdr,kr,kmr->kdm", prior.bases, lam2, AB)  # C_k A^T [K, d, m]
        L = torch.linalg.cholesky(S)
        r = y.reshape(1, -1) - prior.means @ A.T  # [K, m]
        sol = torch.cholesky_solve(r[..., None], L)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2)).sum(-1)
        loglik = -0.5 * ((r * sol).sum(-1) + logdet + m * math.log(2 * math.pi))
        self.log_evidence = torch.logsumexp(prior.log_weights + loglik, 0)
        self.log_weights = prior.log_weights + loglik - self.log_evidence
        self.gain = torch.cholesky_solve(CAt.transpose(1, 2), L).transpose(1, 2)  # G_k [K, d, m]
        self.means = prior.means + torch.einsum("kdm,km->kd", self.gain, r)
        self.A = A

    def mean(self) -> Tensor:
        return (self.log_weights.exp() @ self.means).reshape(self.prior.shape)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        pr = self.prior
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, pr.rank, generator=generator, dtype=DT)
        iso = torch.randn(n, pr.dim, generator=generator, dtype=DT)
        noise = torch.randn(n, self.A.shape[0], generator=generator, dtype=DT)
        out = torch.empty(n, pr.dim, dtype=DT)
        yf = self.y.reshape(1, -1)
        for j in torch.unique(k).tolist():  # per component: no [n, d, r] gather
            rows = k == j
            x = pr.means[j] + (z[rows] * pr.scales[j]) @ pr.bases[j].T + pr.delta * iso[rows]
            out[rows] = x + (yf - x @ self.A.T - self.sigma_y * noise[rows]) @ self.gain[j].T
        return out.reshape((n,) + tuple(pr.shape))
