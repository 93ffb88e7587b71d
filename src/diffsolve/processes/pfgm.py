"""PFGM++ (Xu et al. 2023, arXiv:2302.04265): Poisson flow generative models with D augmented dimensions.

The N-dimensional data are perturbed by the kernel p_r(x | y) ∝ (||x - y||^2 + r^2)^(-(N + D)/2): a multivariate
Student t with D degrees of freedom and scale sigma = r / sqrt(D) (the paper's alignment r = sigma sqrt(D), which
carries EDM's sigma grid and hyper-parameters over).  Its perturbation is sigma * R u with u a uniform direction and
R^2 = D s / (1 - s), s ~ Beta(N/2, D/2).  D -> inf is EDM (Gaussian kernel), D = 1 is PFGM.

The sampling ODE is EDM's, dx/dsigma = (x - D(x, sigma)) / sigma with D(x, sigma) = E[y | x] under that kernel, so
every ODE solver of the 'VE view' (alpha = 1, sigma = t) runs on it unchanged.  The marginals are not Gaussian
(``gaussian = False``): reverse-SDE solvers refuse it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .base import Tensor
from .ve import EDM


class PFGMpp(EDM):
    """PFGM++ with augmentation dimension ``D`` (> 0) on EDM's sigma range: alpha = 1, sigma(t) = t (r = t sqrt(D)).

    ``perturbation(z)`` maps standard normal noise to the kernel's standardised perturbation by a radial quantile
    transport (the direction z/|z| is kept, the radius mapped from the chi^2_N quantile of |z|^2 to the quantile of
    sqrt(D s/(1 - s)), s ~ Beta(N/2, D/2)), so one seed means one start on every D and D -> inf gives EDM's
    sigma_max * z exactly.  The prior is sigma_max times it: radius r_max sqrt(s/(1 - s)), r_max = sigma_max sqrt(D).
    """

    gaussian = False

    def __init__(self, D: float = 128.0, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if isinstance(D, bool) or not isinstance(D, (int, float)) or not math.isfinite(D) or D <= 0:
            raise ValueError(f"PFGM++ needs an augmentation dimension D > 0 (finite), got {D!r}")
        super().__init__(sigma_min, sigma_max, sigma_data)
        self.D = float(D)

    def perturbation(self, noise: Tensor) -> Tensor:
        """z [B, ...] standard normal -> the kernel's perturbation at unit scale (|out|^2 = D s/(1 - s)), per row."""
        from scipy.special import betaincinv, gammainc, gammaincc

        b = noise.shape[0]
        flat = noise.reshape(b, -1)
        n = flat.shape[1]
        r2 = (flat.to(torch.float64) ** 2).sum(1).cpu().numpy()
        if np.any(r2 <= 0):
            raise ValueError("PFGM++ perturbation: a noise row is zero (no direction)")
        a, d = 0.5 * n, 0.5 * self.D
        u, uc = gammainc(a, 0.5 * r2), gammaincc(a, 0.5 * r2)  # the chi^2_N quantile and its complement
        # s ~ Beta(N/2, D/2) at quantile u and 1 - s ~ Beta(D/2, N/2) at 1 - u: each accurate where it is small
        s, c = betaincinv(a, d, u), betaincinv(d, a, uc)
        radius2 = self.D * s / c
        if not np.all(np.isfinite(radius2)) or np.any(radius2 <= 0):
            raise ValueError("PFGM++ perturbation: the radius quantile is not finite (noise too extreme)")
        scale = torch.from_numpy(np.sqrt(radius2 / r2)).to(device=noise.device, dtype=noise.dtype)
        return noise * scale.reshape((-1,) + (1,) * (noise.dim() - 1))

    def prior_from_noise(self, noise: Tensor) -> Tensor:
        return self.perturbation(noise) * self.prior_scale

    def config(self):
        return {"type": "PFGMpp", "D": self.D, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}
