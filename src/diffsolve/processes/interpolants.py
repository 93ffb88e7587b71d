"""Interpolants: rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022) and general affine
paths (Albergo et al. 2023)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import DT, NoiseProcess, Tensor
from .base import as_t as _as_t


class RectifiedFlow(NoiseProcess):
    """Rectified flow / flow matching with the linear path: alpha = 1 - t, sigma = t.

    The log-SNR is infinite at both ends, so sampling runs on [t_min, t_max] inside (0, 1);
    the final jump to clean data (the default last step) covers [0, t_min].
    """

    ode_variable = "t"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1 - 1e-3):
        if not 0 < t_min < t_max < 1:
            raise ValueError("need 0 < t_min < t_max < 1")
        self.t_min, self.t_max = t_min, t_max
        self.prior_scale = 1.0

    def alpha(self, t):
        return 1 - _as_t(t)

    def sigma(self, t):
        return _as_t(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(_as_t(t))

    def d_sigma(self, t):
        return torch.ones_like(_as_t(t))

    def t_of_lam(self, lam):
        return torch.sigmoid(-_as_t(lam))

    def config(self):
        return {"type": "RectifiedFlow", "t_min": self.t_min, "t_max": self.t_max}


class AffineInterpolant(NoiseProcess):
    """Any path x_t = alpha(t) x0 + sigma(t) eps given by user callables (float64 tensors in/out).

    Derivatives default to central finite differences; pass ``d_alpha``/``d_sigma`` for exact ones.
    ``alpha/sigma`` must be strictly decreasing on [t_min, t_max].
    """

    ode_variable = "t"

    def __init__(self, alpha: Callable[[Tensor], Tensor], sigma: Callable[[Tensor], Tensor],
                 t_min: float, t_max: float, d_alpha: Optional[Callable] = None,
                 d_sigma: Optional[Callable] = None, prior_scale: Optional[float] = None,
                 name: str = "affine"):
        self._alpha, self._sigma = alpha, sigma
        self._d_alpha, self._d_sigma = d_alpha, d_sigma
        self.t_min, self.t_max, self.name = float(t_min), float(t_max), name
        ts = torch.linspace(t_min, t_max, 257, dtype=DT)
        lam = self.lam(ts)
        if not torch.all(torch.isfinite(lam)) or torch.any(lam[1:] >= lam[:-1]):
            raise ValueError("alpha/sigma must be finite, positive and strictly decreasing on [t_min, t_max]")
        self.prior_scale = float(prior_scale if prior_scale is not None else self.sigma(_as_t(t_max)))

    def alpha(self, t):
        return self._alpha(_as_t(t))

    def sigma(self, t):
        return self._sigma(_as_t(t))

    @staticmethod
    def _fd(fn, t, h=1e-6):
        return (fn(t + h) - fn(t - h)) / (2 * h)

    def d_alpha(self, t):
        t = _as_t(t)
        return self._d_alpha(t) if self._d_alpha else self._fd(self._alpha, t)

    def d_sigma(self, t):
        t = _as_t(t)
        return self._d_sigma(t) if self._d_sigma else self._fd(self._sigma, t)

    def config(self):
        return {"type": "AffineInterpolant", "name": self.name, "t_min": self.t_min, "t_max": self.t_max}

