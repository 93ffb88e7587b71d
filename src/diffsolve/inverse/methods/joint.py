"""Joint posterior of two frozen priors: source separation y = w1 x1 + w2 x2 + sigma_y n (Stevens et al. 2023,
"Removing structured noise with diffusion models", arXiv:2302.05290; "Dehazing ultrasound using diffusion models",
arXiv:2307.11204).

The two sources are independent a priori, p(x1, x2) = p1(x1) p2(x2), so the stacked state z = [x1; x2] (stacked
along the first axis of a sample) diffuses with the *product* model, whose denoiser is the pair of the two
models' denoisers, E[z0 | z_t] = [D1(x1_t); D2(x2_t)].  The measurement is linear in z, y = M z + sigma_y n with
M = [w1 I, w2 I] (``Mix``; M M^T = (w1^2 + w2^2) I, so its SVD is closed form).  Any method of the library then
samples p(x1, x2 | y): ``inner`` names it.  The default, 'repaint' with no resampling, is the papers' projection
rule: after each step the sum component of the state is replaced by a draw of the noised measurement, which for
w1 = w2 is their x <- x - lambda (x + h - y_t), h <- h - kappa (x + h - y_t) with lambda = kappa = 1/2; their
DPS and PiGDM variants are ``inner='dps'`` / ``'pigdm'``.

The two models may have different processes: the second is evaluated at the time of the same log-SNR, on its
state rescaled by alpha_2 / alpha_1 (the VE view x / alpha is shared).  One product evaluation is two network
evaluations, so a budget of ``nfe`` NFE-equivalents per pair gives the inner method nfe / 2.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ...adapters.denoiser import Model, Prediction
from ...reference import DenseGaussianMixture, GaussianMixture
from ..operators import Operator

Tensor = torch.Tensor
DT = torch.float64


def stacked_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape of a stacked pair [x1; x2] of samples ``shape`` (stacked along the first axis)."""
    return (2 * int(shape[0]),) + tuple(int(s) for s in shape[1:])


def split(z: Tensor) -> Tuple[Tensor, Tensor]:
    """(x1, x2) of stacked pairs z [B, 2 s0, ...]."""
    h = z.shape[1] // 2
    return z[:, :h], z[:, h:]


class Mix(Operator):
    """y = w1 x1 + w2 x2 for stacked pairs z = [x1; x2] of samples ``shape``."""

    def __init__(self, shape: Sequence[int], weights: Tuple[float, float] = (1.0, 1.0)):
        w1, w2 = (float(w) for w in weights)
        if not (math.isfinite(w1) and math.isfinite(w2)) or w1 == w2 == 0:
            raise ValueError(f"mixing weights must be finite and not both zero, got {weights}")
        self.w = (w1, w2)
        self.norm = math.hypot(w1, w2)
        super().__init__(stacked_shape(shape), tuple(shape))

    def forward(self, z):
        x1, x2 = split(z)
        return self.w[0] * x1 + self.w[1] * x2

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return torch.cat([self.w[0] * y, self.w[1] * y], 1)

    def pinv(self, y):  # M M^T = |w|^2 I
        return self.adjoint(y) / self.norm**2

    def prox(self, z0, y, rho):
        """(M^T M + rho)^{-1} (M^T y + rho z0): M^T M = P |w|^2 with P the projector on the row space."""
        r = torch.as_tensor(rho, dtype=z0.dtype)
        r = r.reshape((-1,) + (1,) * (z0.dim() - 1)) if r.dim() else r
        b = self.adjoint(y) + r * z0
        pb = self.adjoint(self.forward(b)) / self.norm**2
        return (b - pb) / r + pb / (self.norm**2 + r)

    def svd(self):
        m = self.out_dim
        eye = torch.eye(m, dtype=DT)
        V = torch.cat([self.w[0] * eye, self.w[1] * eye], 0) / self.norm
        return eye, torch.full((m,), self.norm, dtype=DT), V


class Product:
    """The product prior p1(x1) p2(x2) as one model of stacked pairs z = [x1; x2] (the process is the first
    model's; the second is evaluated at the same log-SNR).  ``nfe`` counts product evaluations."""

    def __init__(self, first: Model, second: Optional[Model] = None):
        self.first, self.second = first, second if second is not None else first
        shape = getattr(first, "sample_shape", None)
        shape2 = getattr(self.second, "sample_shape", None)
        if shape and shape2 and tuple(shape) != tuple(shape2):
            raise ValueError(f"the two priors sample different shapes: {list(shape)} and {list(shape2)}")
        self.sample_shape = stacked_shape(shape) if shape else None
        self.same_process = self.first.process.config() == self.second.process.config()
        self.process = self.first.process

    def identity(self) -> Dict[str, Any]:
        return {**self.first.identity(), "joint": self.second.identity()}

    def _second(self, x2: Tensor, t: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        if self.same_process:
            return self.second.evaluate(x2, t, kwargs).x0
        p1, p2 = self.first.process, self.second.process
        t2 = p2.t_of_lam(p1.lam(t))
        scale = (p2.alpha(t2) / p1.alpha(t)).to(x2.dtype)
        scale = scale.reshape((-1,) + (1,) * (x2.dim() - 1)) if scale.dim() else scale
        return self.second.evaluate(x2 * scale, t2, kwargs).x0

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        kwargs = kwargs if kwargs is not None else {}
        tt = torch.as_tensor(t, dtype=DT)
        x1, x2 = split(x)
        p1 = self.first.evaluate(x1, tt, kwargs, coeffs)
        x0 = torch.cat([p1.x0, self._second(x2, tt, kwargs).to(p1.x0.dtype)], 1)
        return Prediction(x, p1.alpha, p1.sigma, x0=x0)


def product_mixture(first: Union[GaussianMixture, DenseGaussianMixture],
                    second: Optional[Union[GaussianMixture, DenseGaussianMixture]] = None) -> DenseGaussianMixture:
    """The product p1(x1) p2(x2) of two Gaussian mixtures (K1 K2 components, block-diagonal covariances) over
    stacked pairs: the exact prior of a separation problem (``ExactPosterior(product_mixture(p1, p2), Mix(...))``)."""
    a = first if isinstance(first, DenseGaussianMixture) else DenseGaussianMixture.from_mixture(first)
    b = a if second is None else (second if isinstance(second, DenseGaussianMixture)
                                  else DenseGaussianMixture.from_mixture(second))
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"the two priors have different shapes {list(a.shape)} and {list(b.shape)}")
    K1, K2, d = a.n_components, b.n_components, a.dim
    # stacked along the first axis of a sample, a pair flattens to [x1 flat, x2 flat]
    means = torch.cat([a.means[:, None].expand(K1, K2, d), b.means[None].expand(K1, K2, d)], -1)
    covs = torch.zeros(K1, K2, 2 * d, 2 * d, dtype=DT)
    covs[:, :, :d, :d] = a.covs[:, None]
    covs[:, :, d:, d:] = b.covs[None]
    lw = (a.log_weights[:, None] + b.log_weights[None]).reshape(-1)
    return DenseGaussianMixture(means.reshape(K1 * K2, 2 * d), covs.reshape(K1 * K2, 2 * d, 2 * d), shape=stacked_shape(a.shape),
                                log_weights=lw)
