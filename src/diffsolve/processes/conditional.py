"""Conditional affine processes x_t = a(t) x0 + b(t) y + c(t) eps with a known per-sample conditioning y (the degraded
image of a restoration task), all three with b = 1 - a:

* the mean-reverting IR-SDE (Luo et al. 2023, arXiv:2301.11699): dx = theta_t (mu - x) dt + s_t dW, s_t^2 = 2 lambda^2
  theta_t, so x_t = mu + (x0 - mu) e^{-thetabar_t} + lambda sqrt(1 - e^{-2 thetabar_t}) eps: a = e^{-thetabar},
  c = lambda sqrt(1 - a^2), y = mu; prior N(mu, lambda^2);
* RDDM residual diffusion (Liu et al. 2023, arXiv:2308.13712): I_t = I_0 + alphabar_t I_res + betabar_t eps with
  I_res = I_in - I_0: a = 1 - alphabar, c = betabar, y = I_in; a DDPM is alphabar = 1 - sqrt(abar), betabar^2 =
  1 - abar with I_in = 0;
* ResShift (Yue et al. 2023, arXiv:2307.12348): q(x_t | x0, y) = N(x0 + eta_t (y - x0), kappa^2 eta_t I): a = 1 - eta,
  c = kappa sqrt(eta).

Subtracting b(t) y leaves the standard process z_t = a x0 + c eps (``Tabulated``), on which every solver, grid and
adapter runs; ``Shifted`` does that frame change for the sampler.  The MR Sampler (Li et al. 2025, arXiv:2502.07856)
is DPM-Solver(++) in that frame (tests/test_processes_new.py shows it to 1e-6).  Each process is tabulated at its
integer training times and interpolated linearly in a and c between them (as the MR Sampler does); the network sees
the integer-step time t.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .base import DT, NoiseProcess, Shifted, Tensor
from .base import as_t as _as_t
from .vp import VPDiscrete


class Tabulated(NoiseProcess):
    """x_t = a(t) x0 + c(t) eps from values a[n], c[n] at the integer times n = 0..N-1, linear in between.

    ``t_min``/``t_max`` must lie where a/c is finite, positive and strictly decreasing (a = 0 or c = 0 at an end
    of the table is allowed outside that range)."""

    def __init__(self, a: Union[Sequence[float], Tensor], c: Union[Sequence[float], Tensor], t_min: float,
                 t_max: float, prior_scale: Optional[float] = None, name: str = "tabulated"):
        self.a_table = torch.as_tensor(a, dtype=DT).flatten()
        self.c_table = torch.as_tensor(c, dtype=DT).flatten()
        n = self.a_table.numel()
        if n < 2 or self.c_table.numel() != n:
            raise ValueError(f"a and c need the same length >= 2, got {n} and {self.c_table.numel()}")
        if not (torch.isfinite(self.a_table).all() and torch.isfinite(self.c_table).all()):
            raise ValueError("a and c must be finite")
        if (self.a_table < 0).any() or (self.c_table < 0).any():
            raise ValueError("a and c must be non-negative")
        if not 0 <= t_min < t_max <= n - 1:
            raise ValueError(f"need 0 <= t_min < t_max <= {n - 1}, got [{t_min}, {t_max}]")
        self.t_min, self.t_max, self.name = float(t_min), float(t_max), name
        ts = torch.cat([torch.linspace(t_min, t_max, 257, dtype=DT),
                        torch.arange(math.ceil(t_min), math.floor(t_max) + 1, dtype=DT)]).unique()
        lam = self.lam(ts)
        if not torch.isfinite(lam).all() or (lam[1:] >= lam[:-1]).any():
            raise ValueError("a/c must be finite, positive and strictly decreasing on [t_min, t_max]")
        self.prior_scale = float(prior_scale if prior_scale is not None else self.sigma(_as_t(t_max)))

    def _interp(self, table: Tensor, t: Tensor):
        t = _as_t(t)
        tc = t.clamp(0, self.a_table.numel() - 1)
        i = tc.floor().long().clamp(max=self.a_table.numel() - 2)
        slope = table[i + 1] - table[i]
        return table[i] + (tc - i.to(DT)) * slope, slope

    def alpha(self, t):
        return self._interp(self.a_table, t)[0]

    def sigma(self, t):
        return self._interp(self.c_table, t)[0]

    def d_alpha(self, t):
        return self._interp(self.a_table, t)[1]

    def d_sigma(self, t):
        return self._interp(self.c_table, t)[1]

    def t_of_lam(self, lam):
        """Closed form on each linear piece: a_n + w da = e^lam (c_n + w dc)."""
        lam = _as_t(lam)
        flat = lam.flatten()
        knots = torch.log(self.a_table) - torch.log(self.c_table)  # decreasing, +-inf allowed at the ends
        idx = torch.searchsorted(-knots, -flat).clamp(1, self.a_table.numel() - 1) - 1
        a0, c0 = self.a_table[idx], self.c_table[idx]
        da, dc = self.a_table[idx + 1] - a0, self.c_table[idx + 1] - c0
        e = torch.exp(flat)
        w = (a0 - e * c0) / (e * dc - da)
        t = (idx.to(DT) + w.clamp(0, 1)).clamp(self.t_min, self.t_max)
        return t.reshape(lam.shape)

    def config(self):
        return {"type": "Tabulated", "name": self.name, "a": [float(v) for v in self.a_table],
                "c": [float(v) for v in self.c_table], "t_min": self.t_min, "t_max": self.t_max,
                "prior_scale": self.prior_scale}


class _Residual(Shifted):
    """b = 1 - a on a ``Tabulated`` base, the prior centred at y (x_T = y + prior_scale * noise), y in ``key``."""

    def __init__(self, base: Tabulated, key: str, name: str, prior_at_y: bool = True):
        super().__init__(base, lambda t: 1 - base.alpha(t), key=key, name=name, prior_at_y=prior_at_y)


class MeanReverting(_Residual):
    """The IR-SDE mean-reverting process (Luo et al. 2023): T steps, ``max_sigma`` = lambda (the stationary std),
    theta schedule 'cosine' (default), 'linear' or 'constant', a_T = e^{-thetabar_T} = ``eps``; conditioning ``mu``
    (model keyword ``key``).  Times are the IR-SDE's integer steps 0..T (sampling on [t_min, T], t_min = 1)."""

    def __init__(self, T: int = 100, max_sigma: float = 50 / 255, schedule: str = "cosine", eps: float = 0.01,
                 t_min: float = 1.0, key: str = "mu"):
        if int(T) != T or T < 2:
            raise ValueError(f"T must be an integer >= 2, got {T!r}")
        if not max_sigma > 0 or not 0 < eps < 1:
            raise ValueError("need max_sigma > 0 and 0 < eps < 1")
        T = int(T)
        if schedule == "cosine":  # the improved-DDPM cosine betas over T + 2 steps, the last one dropped
            n = T + 2
            u = np.arange(n + 1, dtype=np.float64) / n
            ac = np.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
            thetas = 1 - (ac / ac[0])[1:-1]
        elif schedule == "linear":
            scale = 1000 / (T + 1)
            thetas = np.linspace(scale * 1e-4, scale * 2e-2, T + 1)
        elif schedule == "constant":
            thetas = np.ones(T + 1)
        else:
            raise ValueError(f"unknown IR-SDE schedule {schedule!r}; use cosine, linear or constant")
        cum = np.cumsum(thetas) - thetas[0]  # thetabar_0 = 0
        dt = -math.log(eps) / cum[-1]
        a = np.exp(-cum * dt)
        c = max_sigma * np.sqrt(-np.expm1(-2 * cum * dt))
        base = Tabulated(torch.from_numpy(a), torch.from_numpy(c), t_min, T, prior_scale=max_sigma, name="ir-sde")
        super().__init__(base, key, "ir-sde")
        self.T, self.max_sigma, self.schedule, self.eps = T, float(max_sigma), schedule, float(eps)

    def config(self):
        return {"type": "MeanReverting", "T": self.T, "max_sigma": self.max_sigma, "schedule": self.schedule,
                "eps": self.eps, "t_min": self.t_min, "key": self.offset_key}


def rddm_coefficients(T: int, schedule: str, total: float = 1.0) -> np.ndarray:
    """RDDM's per-step coefficients summing to ``total``: 'increased' (proportional to 1..T), 'decreased' (T..1) or
    'average'."""
    if schedule == "increased":
        w = np.arange(1, T + 1, dtype=np.float64)
    elif schedule == "decreased":
        w = np.arange(T, 0, -1, dtype=np.float64)
    elif schedule == "average":
        w = np.ones(T)
    else:
        raise ValueError(f"unknown RDDM schedule {schedule!r}; use increased, decreased or average")
    return total * w / w.sum()


class RDDM(_Residual):
    """Residual denoising diffusion: I_t = (1 - alphabar_t) I_0 + alphabar_t I_in + betabar_t eps at steps 0..T-1,
    from the cumulative sums ``alphas_cumsum`` (alphabar) and ``betas2_cumsum`` (betabar^2); conditioning I_in in the
    model keyword ``key``.  The prior is centred at I_in unless the process is a converted DDPM (``from_ddpm``)."""

    def __init__(self, alphas_cumsum: Union[Sequence[float], Tensor], betas2_cumsum: Union[Sequence[float], Tensor],
                 t_max: Optional[float] = None, key: str = "y", prior_at_y: bool = True,
                 prior_scale: Optional[float] = None):
        ab = torch.as_tensor(alphas_cumsum, dtype=DT).flatten()
        b2 = torch.as_tensor(betas2_cumsum, dtype=DT).flatten()
        if ab.numel() != b2.numel():
            raise ValueError("alphas_cumsum and betas2_cumsum need the same length")
        if (b2 < 0).any() or (ab > 1 + 1e-12).any():
            raise ValueError("need betas2_cumsum >= 0 and alphas_cumsum <= 1")
        n = ab.numel()
        if t_max is None:  # a = 1 - alphabar reaches 0 at the last step when alphabar_T = 1: stop just before it
            t_max = float(n - 1) if float(ab[-1]) < 1 - 1e-12 else n - 1 - 1e-3
        base = Tabulated((1 - ab).clamp_min(0.0), b2.sqrt(), 0.0, t_max, prior_scale=prior_scale, name="rddm")
        super().__init__(base, key, "rddm", prior_at_y=prior_at_y)
        self.alphas_cumsum, self.betas2_cumsum = ab, b2
        self._named: Optional[dict] = None

    @classmethod
    def from_schedules(cls, T: int = 1000, alpha_schedule: str = "decreased", beta_schedule: str = "increased",
                       beta_sum: float = 1.0, **kw) -> "RDDM":
        """RDDM's named schedules (``gen_coefficients``): alphabar = cumsum of 'alpha_schedule' summing to 1, betabar^2
        = cumsum of 'beta_schedule' summing to ``beta_sum`` (1 for generation, 0.01 for restoration)."""
        ab = torch.from_numpy(np.cumsum(rddm_coefficients(T, alpha_schedule)))
        p = cls(ab, torch.from_numpy(np.cumsum(rddm_coefficients(T, beta_schedule, beta_sum))), **kw)
        p._named = {"T": int(T), "alpha_schedule": alpha_schedule, "beta_schedule": beta_schedule,
                    "beta_sum": float(beta_sum)}
        return p

    @classmethod
    def from_ddpm(cls, ddpm: VPDiscrete, key: str = "y") -> "RDDM":
        """A DDPM as RDDM (RDDM sec. 3.3): alphabar = 1 - sqrt(abar), betabar^2 = 1 - abar; with I_in = 0 its
        x_t is the DDPM's (equal coefficients at every integer step), and its prior is the DDPM's N(0, I)."""
        ac = ddpm.alphas_cumprod
        return cls(1 - ac.sqrt(), 1 - ac, t_max=ddpm.t_max, key=key, prior_at_y=False, prior_scale=ddpm.prior_scale)

    def to_ddpm(self) -> VPDiscrete:
        """The DDPM whose coefficients these are (needs betabar^2 = 1 - (1 - alphabar)^2 at every step)."""
        a2 = (1 - self.alphas_cumsum) ** 2
        if not torch.allclose(a2 + self.betas2_cumsum, torch.ones_like(a2), rtol=0, atol=1e-12):
            raise ValueError("this RDDM is not variance preserving (betabar^2 != 1 - (1 - alphabar)^2): no DDPM")
        return VPDiscrete(a2)

    def config(self):
        cfg = {"type": "RDDM", "key": self.offset_key, "t_max": self.t_max, "prior_at_y": self.prior_at_y,
               "prior_scale": self.prior_scale}
        if self._named is not None:
            return {**cfg, **self._named}
        return {**cfg, "alphas_cumsum": [float(v) for v in self.alphas_cumsum],
                "betas2_cumsum": [float(v) for v in self.betas2_cumsum]}


class ResShift(_Residual):
    """ResShift: x_t = x0 + eta_t (y - x0) + kappa sqrt(eta_t) eps at steps 0..T-1, sqrt(eta) rising geometrically
    (bent by ``power``) from min(min_noise / kappa, min_noise) to ``sqrt_eta_end`` (the official
    ``get_named_eta_schedule('exponential')``); prior N(y, kappa^2 eta_T).  Defaults: the journal SR configuration
    (4 steps, kappa 2, power 0.3, min_noise 0.2)."""

    def __init__(self, T: int = 4, kappa: float = 2.0, min_noise: float = 0.2, sqrt_eta_end: float = 0.99,
                 power: float = 0.3, key: str = "y"):
        if int(T) != T or T < 2 or not kappa > 0 or not min_noise > 0 or not 0 < sqrt_eta_end < 1:
            raise ValueError("need an integer T >= 2, kappa > 0, min_noise > 0 and 0 < sqrt_eta_end < 1")
        T = int(T)
        start = min(min_noise / kappa, min_noise)
        grow = math.exp(math.log(sqrt_eta_end / start) / (T - 1))
        sqrt_eta = start * grow ** (np.linspace(0, 1, T) ** power * (T - 1))
        eta = sqrt_eta**2
        base = Tabulated(torch.from_numpy(1 - eta), torch.from_numpy(kappa * sqrt_eta), 0.0, T - 1, name="resshift")
        super().__init__(base, key, "resshift")
        self.T, self.kappa, self.min_noise, self.sqrt_eta_end, self.power = T, float(kappa), float(min_noise), \
            float(sqrt_eta_end), float(power)

    def config(self):
        return {"type": "ResShift", "T": self.T, "kappa": self.kappa, "min_noise": self.min_noise,
                "sqrt_eta_end": self.sqrt_eta_end, "power": self.power, "key": self.offset_key}
