"""Noise processes x_t = alpha(t) x0 + sigma(t) eps.

Every process exposes, in float64: ``alpha(t)``, ``sigma(t)``, their time derivatives,
the half log-SNR ``lam(t) = log(alpha / sigma)`` and its inverse ``t_of_lam``, and the
coefficients of the forward SDE ``dx = f(t) x dt + g(t) dW`` with ``f = alpha'/alpha`` and
``g^2 = 2 sigma^2 (log(sigma/alpha))'``.  Time runs from ``t_min`` (almost clean) to
``t_max`` (almost pure noise); ``model_time(t)`` is what the network is called with.

Processes: discrete VP (DDPM, Ho et al. 2020; made continuous by interpolating log alpha
piecewise-linearly as in DPM-Solver, Lu et al. 2022), continuous VP (linear and cosine),
VE (Song et al. 2021), EDM (Karras et al. 2022), rectified flow / flow matching
(Liu et al. 2022; Lipman et al. 2022) and general affine interpolants (Albergo et al. 2023).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
DT = torch.float64


def _as_t(t: Union[float, Tensor]) -> Tensor:
    return torch.as_tensor(t, dtype=DT)


class NoiseProcess:
    """Base class: subclasses implement ``alpha``, ``sigma`` and their derivatives."""

    t_min: float
    t_max: float
    #: standard deviation of the noise that starts sampling (x_T = prior_scale * N(0, I))
    prior_scale: float = 1.0
    #: variable Euler/Heun integrate in: 'sigma' (x/alpha against sigma/alpha, the smooth VE view
    #: of EDM and k-diffusion) or 't' (x against process time, the flow-matching convention)
    ode_variable: str = "sigma"

    # -- to implement ---------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # -- generic --------------------------------------------------------------------
    def lam(self, t: Tensor) -> Tensor:
        """Half log-SNR lambda(t) = log alpha(t) - log sigma(t), decreasing in t."""
        t = _as_t(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        """Inverse of ``lam`` (bisection in float64 unless a subclass has a closed form)."""
        lam = _as_t(lam)
        lo = torch.full_like(lam, self.t_min)
        hi = torch.full_like(lam, self.t_max)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            go_up = self.lam(mid) > lam  # lam decreases in t: target lies above mid
            lo = torch.where(go_up, mid, lo)
            hi = torch.where(go_up, hi, mid)
            if torch.all(hi - lo <= 1e-15 * (1 + hi.abs())):
                break
        return 0.5 * (lo + hi)

    def sigma_ve(self, t: Tensor) -> Tensor:
        """sigma/alpha: the noise level of x/alpha (the 'VE view', k-diffusion's sigma)."""
        t = _as_t(t)
        return self.sigma(t) / self.alpha(t)

    def t_of_sigma_ve(self, s: Tensor) -> Tensor:
        return self.t_of_lam(-torch.log(_as_t(s)))

    def drift(self, t: Tensor) -> Tensor:
        """f(t) = alpha'(t) / alpha(t)."""
        t = _as_t(t)
        return self.d_alpha(t) / self.alpha(t)

    def diffusion2(self, t: Tensor) -> Tensor:
        """g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2 (>= 0)."""
        t = _as_t(t)
        s = self.sigma(t)
        return 2 * s * self.d_sigma(t) - 2 * self.drift(t) * s * s

    def model_time(self, t: Tensor) -> Tensor:
        """The time value handed to the network (identity unless a subclass says otherwise)."""
        return t

    def marginal(self, x0: Tensor, noise: Tensor, t: Union[float, Tensor]) -> Tensor:
        """Sample x_t = alpha(t) x0 + sigma(t) noise (t scalar or per-sample)."""
        t = _as_t(t)
        shape = (-1,) + (1,) * (x0.dim() - 1) if t.dim() else ()
        a = self.alpha(t).reshape(shape) if t.dim() else self.alpha(t)
        s = self.sigma(t).reshape(shape) if t.dim() else self.sigma(t)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise

    def config(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------------------
# Variance preserving
# ----------------------------------------------------------------------------------------
class VPDiscrete(NoiseProcess):
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

    def alpha(self, t):
        return torch.exp(self._log_alpha(t)[0])

    def sigma(self, t):
        la = self._log_alpha(t)[0]
        return torch.sqrt(-torch.expm1(2 * la))

    def d_alpha(self, t):
        la, slope = self._log_alpha(t)
        return torch.exp(la) * slope

    def d_sigma(self, t):
        la, slope = self._log_alpha(t)
        a2 = torch.exp(2 * la)
        return -a2 * slope / torch.sqrt(-torch.expm1(2 * la))

    def lam(self, t):
        la = self._log_alpha(t)[0]
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

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


class VPContinuous(NoiseProcess):
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


# ----------------------------------------------------------------------------------------
# Variance exploding and EDM (alpha = 1)
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Interpolants
# ----------------------------------------------------------------------------------------
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


PROCESSES = {"VPDiscrete": VPDiscrete, "VPContinuous": VPContinuous, "VE": VE, "EDM": EDM,
             "RectifiedFlow": RectifiedFlow}


def process_from_config(cfg: dict) -> NoiseProcess:
    """Rebuild a process from ``config()`` (VPDiscrete needs ``alphas_cumprod`` or ``betas``)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "VPDiscrete":
        if "alphas_cumprod" in cfg:
            return VPDiscrete(cfg["alphas_cumprod"])
        if "betas" in cfg:
            return VPDiscrete.from_betas(cfg["betas"])
        sched = cfg.pop("schedule", "linear")
        n = cfg.pop("num_train_timesteps", 1000)
        if sched not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(f"unknown VPDiscrete schedule {sched!r}; use linear, scaled_linear or cosine")
        return getattr(VPDiscrete, sched)(n, **cfg)
    if kind == "VPContinuous":
        return VPContinuous(**cfg)
    if kind in PROCESSES:
        return PROCESSES[kind](**cfg)
    raise ValueError(f"unknown process type {kind!r}; known: {sorted(PROCESSES)}")
