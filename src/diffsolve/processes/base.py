"""The noise-process contract: x_t = alpha(t) x0 + b(t) y + sigma(t) eps.

Every process exposes, in float64: ``alpha(t)``, ``sigma(t)``, their time derivatives, the half log-SNR
``lam(t) = log(alpha / sigma)`` and its inverse ``t_of_lam``, and the coefficients of the forward SDE
``dx = f(t) x dt + g(t) dW`` with ``f = alpha'/alpha`` and ``g^2 = 2 sigma^2 (log(sigma/alpha))'``.
Time runs from ``t_min`` (almost clean) to ``t_max`` (almost pure noise); ``model_time(t)`` is what the
network is called with.

Capabilities, which solvers and samplers read instead of assuming them:

* ``prior_from_noise(z)`` / ``prior(shape, generator)``: the distribution sampling starts from, as a map of
  standard normal noise (``prior_scale * z`` for the Gaussian processes), so a seed means the same start on
  every process.
* ``gaussian``: whether the marginals given x0 are Gaussian (SDE solvers need it); ``perturbation(z)`` maps
  standard normal noise to the standardised perturbation of q(x_t | x0) (the identity for Gaussian processes,
  PFGM++'s heavy-tailed kernel otherwise), so x_t = alpha x0 + sigma perturbation(z).
* ``offset(t)``: the coefficient b(t) of a known per-sample conditioning ``y`` (0 unless the process is
  ``Shifted``); samplers then work in the standard frame x - b(t) y, where every solver applies unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor
DT = torch.float64


def as_t(t: Union[float, Tensor]) -> Tensor:
    """``t`` as a float64 tensor."""
    return torch.as_tensor(t, dtype=DT)


class NoiseProcess:
    """Base class: subclasses implement ``alpha``, ``sigma`` and their derivatives (and ``config``)."""

    t_min: float
    t_max: float
    #: standard deviation of the noise that starts sampling (x_T = prior_scale * N(0, I))
    prior_scale: float = 1.0
    #: variable Euler/Heun integrate in by default: 'sigma' (x/alpha against sigma/alpha, the smooth VE view
    #: of EDM and k-diffusion) or 't' (x against process time, the flow-matching convention)
    ode_variable: str = "sigma"
    #: the marginals q(x_t | x0) are Gaussian (reverse-SDE solvers rely on it)
    gaussian: bool = True
    #: name of the model keyword that carries the offset's conditioning y (None: no offset)
    offset_key: Optional[str] = None

    # -- to implement ---------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    # -- generic --------------------------------------------------------------------
    def lam(self, t: Tensor) -> Tensor:
        """Half log-SNR lambda(t) = log alpha(t) - log sigma(t), decreasing in t."""
        t = as_t(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def t_of_lam(self, lam: Tensor) -> Tensor:
        """Inverse of ``lam`` (bisection in float64 unless a subclass has a closed form)."""
        lam = as_t(lam)
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

    @property
    def lam_range(self) -> Tuple[float, float]:
        """(lambda(t_max), lambda(t_min)): the log-SNR span of sampling, increasing."""
        return float(self.lam(as_t(self.t_max))), float(self.lam(as_t(self.t_min)))

    def sigma_ve(self, t: Tensor) -> Tensor:
        """sigma/alpha: the noise level of x/alpha (the 'VE view', k-diffusion's sigma)."""
        t = as_t(t)
        return self.sigma(t) / self.alpha(t)

    def t_of_sigma_ve(self, s: Tensor) -> Tensor:
        return self.t_of_lam(-torch.log(as_t(s)))

    def drift(self, t: Tensor) -> Tensor:
        """f(t) = alpha'(t) / alpha(t)."""
        t = as_t(t)
        return self.d_alpha(t) / self.alpha(t)

    def diffusion2(self, t: Tensor) -> Tensor:
        """g(t)^2 = d sigma^2/dt - 2 f(t) sigma^2 (>= 0)."""
        t = as_t(t)
        s = self.sigma(t)
        return 2 * s * self.d_sigma(t) - 2 * self.drift(t) * s * s

    def model_time(self, t: Tensor) -> Tensor:
        """The time value handed to the network (identity unless a subclass says otherwise)."""
        return t

    def offset(self, t: Tensor) -> Tensor:
        """b(t), the coefficient of the conditioning y in x_t (0: no offset)."""
        return torch.zeros_like(as_t(t))

    # -- the prior ----------------------------------------------------------------------
    def perturbation(self, noise: Tensor) -> Tensor:
        """Standard normal noise -> the perturbation of q(x_t | x0) at unit scale (identity: Gaussian)."""
        return noise

    def prior_from_noise(self, noise: Tensor) -> Tensor:
        """The start of sampling (in the standard frame, x - b(t_max) y) as a map of standard normal noise."""
        return noise * self.prior_scale

    def prior(self, shape: Sequence[int], generator: Optional[torch.Generator] = None,
              device: Optional[Union[str, torch.device]] = None) -> Tensor:
        """Draw the start of sampling [*shape] (float64) from ``generator``."""
        z = torch.randn(tuple(shape), generator=generator, dtype=DT, device=device)
        return self.prior_from_noise(z)

    def marginal(self, x0: Tensor, noise: Tensor, t: Union[float, Tensor], y: Optional[Tensor] = None) -> Tensor:
        """Sample x_t = alpha(t) x0 + b(t) y + sigma(t) noise (t scalar or per-sample)."""
        t = as_t(t)
        shape = (-1,) + (1,) * (x0.dim() - 1) if t.dim() else ()
        a = self.alpha(t).reshape(shape) if t.dim() else self.alpha(t)
        s = self.sigma(t).reshape(shape) if t.dim() else self.sigma(t)
        out = a.to(x0.dtype) * x0 + s.to(x0.dtype) * self.perturbation(noise)
        if self.offset_key is not None:
            if y is None:
                raise ValueError(f"{type(self).__name__} has an offset: pass its conditioning y")
            b = self.offset(t).reshape(shape) if t.dim() else self.offset(t)
            out = out + b.to(x0.dtype) * y
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class OnBase(NoiseProcess):
    """A process defined on another one, ``self.base``: its schedule (alpha, sigma, their derivatives, lambda and
    its inverse, the model's time) is the base's; subclasses change the rest."""

    base: NoiseProcess

    def alpha(self, t):
        return self.base.alpha(t)

    def sigma(self, t):
        return self.base.sigma(t)

    def d_alpha(self, t):
        return self.base.d_alpha(t)

    def d_sigma(self, t):
        return self.base.d_sigma(t)

    def lam(self, t):
        return self.base.lam(t)

    def t_of_lam(self, lam):
        return self.base.t_of_lam(lam)

    def model_time(self, t):
        return self.base.model_time(t)


class Shifted(OnBase):
    """``base`` with a known per-sample offset: x_t = alpha(t) x0 + b(t) y + sigma(t) eps.

    ``offset(t)`` gives b(t) (float64 in and out); ``y`` travels with the batch as the model keyword
    ``key``.  Subtracting b(t) y gives ``base``'s process, so every solver, grid and adapter applies in that
    frame; mean-reverting (IR-SDE) and residual processes are instances (``processes.conditional``).

    The prior: ``base``'s in the standard frame (x_T = b(t_max) y + base prior), or with ``prior_at_y`` centred
    at y (x_T = y + base prior, as the IR-SDE, RDDM and ResShift samplers start).
    """

    def __init__(self, base: NoiseProcess, offset, key: str = "y", name: str = "shifted", prior_at_y: bool = False):
        if not isinstance(base, NoiseProcess):
            raise TypeError(f"base must be a NoiseProcess, got {type(base).__name__}")
        self.base, self._offset, self.offset_key, self.name = base, offset, key, name
        self.prior_at_y = bool(prior_at_y)
        self.t_min, self.t_max, self.prior_scale = base.t_min, base.t_max, base.prior_scale
        self.ode_variable, self.gaussian = base.ode_variable, base.gaussian

    def offset(self, t):
        return torch.as_tensor(self._offset(as_t(t)), dtype=DT)

    def perturbation(self, noise):
        return self.base.perturbation(noise)

    def prior_from_noise(self, noise):
        return self.base.prior_from_noise(noise)

    def config(self):
        return {"type": "Shifted", "name": self.name, "key": self.offset_key, "base": self.base.config()}


class Restricted(OnBase):
    """``base`` on the shorter range [t_min, ``t_max``] (with base's everything else), so that a spacing lays its grid
    on part of the range (sampling after an analytic start)."""

    def __init__(self, base: NoiseProcess, t_max: float):
        if not base.t_min < t_max <= base.t_max:
            raise ValueError(f"t_max must lie in ({base.t_min}, {base.t_max}], got {t_max}")
        self.base, self.t_min, self.t_max = base, base.t_min, float(t_max)
        self.prior_scale, self.ode_variable, self.gaussian = base.prior_scale, base.ode_variable, base.gaussian
        self.offset_key = base.offset_key

    def __getattr__(self, name):  # capabilities and attributes of the base (prior_scale, gaussian, D, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def offset(self, t):
        return self.base.offset(t)

    def config(self):
        return {"type": "Restricted", "t_max": self.t_max, "base": self.base.config()}
