"""Processes with alpha = 1: variance exploding (Song et al. 2021) and EDM (Karras et al. 2022)."""
from __future__ import annotations

import math

import torch

from .base import NoiseProcess
from .base import as_t as _as_t


class _AlphaOne(NoiseProcess):
    def alpha(self, t):
        return torch.ones_like(_as_t(t))

    def d_alpha(self, t):
        return torch.zeros_like(_as_t(t))


class VE(_AlphaOne):
    """Variance-exploding SDE: alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1]."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = 0.0, 1.0
        self.prior_scale = sigma_max
        self._log_ratio = math.log(sigma_max / sigma_min)

    def sigma(self, t):
        return self.sigma_min * torch.exp(_as_t(t) * self._log_ratio)

    def d_sigma(self, t):
        return self.sigma(t) * self._log_ratio

    def lam(self, t):
        return -(math.log(self.sigma_min) + _as_t(t) * self._log_ratio)

    def t_of_lam(self, lam):
        return (-_as_t(lam) - math.log(self.sigma_min)) / self._log_ratio

    def config(self):
        return {"type": "VE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDM(_AlphaOne):
    """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t, so time *is* the noise level.

    ``sigma_data`` is used by EDM preconditioning (see ``Denoiser(prediction='edm')``).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.t_min, self.t_max = sigma_min, sigma_max
        self.prior_scale = sigma_max

    def sigma(self, t):
        return _as_t(t).clone()

    def d_sigma(self, t):
        return torch.ones_like(_as_t(t))

    def lam(self, t):
        return -torch.log(_as_t(t))

    def t_of_lam(self, lam):
        return torch.exp(-_as_t(lam))

    def config(self):
        return {"type": "EDM", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}

