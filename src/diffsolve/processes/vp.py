"""Variance-preserving processes: DDPM's discrete schedules (Ho et al. 2020; made continuous by
interpolating log alpha piecewise-linearly as in DPM-Solver, Lu et al. 2022) and the continuous VP SDE
(Song et al. 2021; linear and cosine, Nichol & Dhariwal 2021)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .base import DT, NoiseProcess, Tensor
from .base import as_t as _as_t


class _LogAlpha(NoiseProcess):
    """A VP process (alpha^2 + sigma^2 = 1) given by ``_log_alpha(t) -> (log alpha, d log alpha / dt)``."""

    def _log_alpha(self, t: Tensor) -> tuple:
        raise NotImplementedError

    def alpha(self, t):
        return torch.exp(self._log_alpha(t)[0])

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self._log_alpha(t)[0]))

    def d_alpha(self, t):
        la, dla = self._log_alpha(t)
        return torch.exp(la) * dla

    def d_sigma(self, t):
        la, dla = self._log_alpha(t)
        return -torch.exp(2 * la) * dla / torch.sqrt(-torch.expm1(2 * la))

    def lam(self, t):
        la = self._log_alpha(t)[0]
        return la - 0.5 * torch.log(-torch.expm1(2 * la))


class VPDiscrete(_LogAlpha):
    """DDPM's discrete schedule alphas_cumprod[0..N-1], made continuous.

    Time is the (fractional) timestep index t in [0, N-1], exactly what a DDPM UNet is
    trained on.  log alpha is interpolated linearly between integer indices, so alpha(n)**2
    equals ``alphas_cumprod[n]`` at every grid point.
    """

    def __init__(self, alphas_cumprod: Union[Sequence[float], Tensor]):
        ac = torch.as_tensor(alphas_cumprod, dtype=DT).flatten()
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if not torch.all(torch.isfinite(ac)) or torch.any(ac <= 0) or torch.any(ac >= 1):
            raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
        if torch.any(ac[1:] >= ac[:-1]):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = ac
        self.log_alpha_grid = 0.5 * torch.log(ac)
        self.num_train_timesteps = ac.numel()
        self.t_min = 0.0
        self.t_max = float(ac.numel() - 1)
        self.prior_scale = 1.0
        lam = self.log_alpha_grid - 0.5 * torch.log1p(-ac)
        self._lam_grid = lam
        #: named schedule and its arguments (set by the named constructors) so that ``config()``
        #: round-trips; ``None`` means the raw alphas_cumprod go into the config instead
        self.schedule: Optional[str] = None
        self.schedule_kwargs: dict = {}

    # constructors ------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: Union[Sequence[float], Tensor]) -> "VPDiscrete":
        b = torch.as_tensor(betas, dtype=DT).flatten()
        if torch.any(b <= 0) or torch.any(b >= 1):
            raise ValueError("betas must lie strictly inside (0, 1)")
        return cls(torch.cumprod(1 - b, 0))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "VPDiscrete":
        return cls(alphas_cumprod)

    @classmethod
    def linear(cls, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> "VPDiscrete":
        """DDPM linear betas (Ho et al. 2020)."""
        p = cls.from_betas(torch.linspace(beta_start, beta_end, n, dtype=torch.float32).to(DT))
        return p._named("linear", beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def scaled_linear(cls, n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "VPDiscrete":
        """Latent-diffusion 'scaled linear' betas (linear in sqrt(beta))."""
        b = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        return cls.from_betas(b.to(DT))._named("scaled_linear", beta_start=beta_start, beta_end=beta_end)

    @classmethod
    def cosine(cls, n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "VPDiscrete":
        """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021), betas clipped at max_beta."""
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        b = [min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)]
        return cls.from_betas(b)._named("cosine", s=s, max_beta=max_beta)

    def _named(self, schedule: str, **kwargs) -> "VPDiscrete":
        self.schedule, self.schedule_kwargs = schedule, {k: float(v) for k, v in kwargs.items()}
        return self

    # interpolation -----------------------------------------------------------------
    def _log_alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _as_t(t)
        g = self.log_alpha_grid
        tc = t.clamp(0, self.t_max)
        i = tc.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = tc - i.to(DT)
        slope = g[i + 1] - g[i]
        return g[i] + w * slope, slope

    def t_of_lam(self, lam):
        lam = _as_t(lam)
        # invert lambda -> log alpha in closed form, then the piecewise-linear log alpha
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        g = self.log_alpha_grid  # decreasing
        flat = log_alpha.flatten()
        idx = torch.searchsorted(-g, -flat).clamp(1, self.num_train_timesteps - 1)
        lo, hi = g[idx - 1], g[idx]
        t = (idx - 1).to(DT) + (lo - flat) / (lo - hi)
        return t.clamp(0, self.t_max).reshape(log_alpha.shape)

    def config(self):
        cfg = {"type": "VPDiscrete", "num_train_timesteps": self.num_train_timesteps}
        if self.schedule is not None:
            cfg.update(schedule=self.schedule, **self.schedule_kwargs)
        else:  # no named schedule: the exact float64 values (JSON floats round-trip exactly)
            cfg["alphas_cumprod"] = [float(v) for v in self.alphas_cumprod]
        return cfg

    def __repr__(self) -> str:
        args = {k: v for k, v in self.config().items() if k not in ("type", "alphas_cumprod")}
        return "VPDiscrete(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"


class VPContinuous(_LogAlpha):
    """Continuous-time VP SDE (Song et al. 2021) on t in [t_min, 1].

    ``linear``: log alpha = -beta_min t / 2 - (beta_max - beta_min) t^2 / 4.
    ``cosine``: alpha = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)) (Nichol & Dhariwal 2021).
    """

    def __init__(self, kind: str = "linear", beta_min: float = 0.1, beta_max: float = 20.0,
                 s: float = 0.008, t_min: float = 1e-3, t_max: float = 1.0):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"unknown VP kind {kind!r}; use 'linear' or 'cosine'")
        self.kind, self.beta_min, self.beta_max, self.s = kind, beta_min, beta_max, s
        if kind == "cosine":
            t_max = min(t_max, 0.9946)  # alpha -> 0 at t = 1: stop where log-SNR is still finite
        if not 0 < t_min < t_max <= 1:
            raise ValueError("need 0 < t_min < t_max <= 1")
        self.t_min, self.t_max = t_min, t_max

    @classmethod
    def linear(cls, beta_min: float = 0.1, beta_max: float = 20.0, **kw) -> "VPContinuous":
        return cls("linear", beta_min=beta_min, beta_max=beta_max, **kw)

    @classmethod
    def cosine(cls, s: float = 0.008, **kw) -> "VPContinuous":
        return cls("cosine", s=s, **kw)

    def _log_alpha(self, t):
        t = _as_t(t)
        if self.kind == "linear":
            la = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
            dla = -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        else:
            c = math.pi / 2 / (1 + self.s)
            la = torch.log(torch.cos(c * (t + self.s))) - math.log(math.cos(c * self.s))
            dla = -c * torch.tan(c * (t + self.s))
        return la, dla

    def t_of_lam(self, lam):
        lam = _as_t(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2 * lam)
        if self.kind == "linear":
            a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
            # a t^2 + b t + log_alpha = 0, positive root (stable form)
            disc = b * b - 4 * a * log_alpha
            return (-2 * log_alpha) / (b + torch.sqrt(disc))
        c = math.pi / 2 / (1 + self.s)
        return torch.acos(torch.exp(log_alpha + math.log(math.cos(c * self.s)))) / c - self.s

    def config(self):
        return {"type": "VPContinuous", "kind": self.kind, "beta_min": self.beta_min,
                "beta_max": self.beta_max, "s": self.s, "t_min": self.t_min, "t_max": self.t_max}

