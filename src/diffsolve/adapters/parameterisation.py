"""The one table of network parameterisations: how a raw output converts to and from (x0, eps).

With x_t = alpha x0 + sigma eps (in the standard frame of the process):

=============  =====================================  =========================================================
name           the network outputs                    to (x0, eps)
=============  =====================================  =========================================================
``epsilon``    eps                                    x0 = (x - sigma eps) / alpha
``x0``         x0                                     eps = (x - alpha x0) / sigma
``v``          v = alpha eps - sigma x0               x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)
               (Salimans & Ho 2022)
``score``      grad log p = -eps / sigma              eps = -sigma score
``velocity``   u = alpha' x0 + sigma' eps (dx/dt,     solve the 2x2 system with det = alpha sigma' - sigma alpha'
               flow matching)
``edm``        F with EDM preconditioning (Karras     x~ = x/alpha, s = sigma/alpha: x0 = c_skip x~ + c_out F,
               et al. 2022) in the VE view            network input c_in x~ at time c_noise = log(s) / 4
``residual``   r = y - x0 (RDDM, Liu et al. 2023,     x0 = y - r with the conditioning y of a ``Shifted``
               arXiv:2308.13712; ResShift)            process (a residual or mean-reverting one)
=============  =====================================  =========================================================

``x0_gain`` is |d x0 / d output|, the factor by which an output error becomes an x0 error; training's EDM
loss weighting uses it.  The adapter, training, the CLI and the diffusers integration all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor


class Coeffs(NamedTuple):
    """alpha, sigma and their time derivatives at the evaluation time, EDM's sigma_data, and the conditioning y of
    a process with an offset (the residual parameterisation reads it)."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Optional[Tensor] = None
    d_sigma: Optional[Tensor] = None
    sigma_data: float = 0.5
    y: Optional[Tensor] = None


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> dict:
    """EDM preconditioning scalars (Karras et al. 2022, Table 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    return {"c_skip": sigma_data**2 / (sigma**2 + sigma_data**2),
            "c_out": sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2),
            "c_in": 1 / torch.sqrt(sigma**2 + sigma_data**2),
            "c_noise": torch.log(sigma) / 4}


def edm_noise_time(sigma_ve: Tensor) -> Tensor:
    """EDM's c_noise = log(sigma/alpha) / 4: the network time of EDM-preconditioned models."""
    return torch.log(sigma_ve) / 4


@dataclass(frozen=True)
class Parameterisation:
    """One way a network can parameterise the denoiser (see the module table)."""

    name: str
    #: (x0, eps) from the raw output ``out`` at state ``x``; eps may be None when only x0 is free
    to_x0_eps: Callable[[Tensor, Tensor, Coeffs], Tuple[Tensor, Optional[Tensor]]]
    #: the output a perfect network would give for (x0, eps) at state x (training targets)
    from_x0_eps: Callable[[Tensor, Tensor, Tensor, Coeffs], Tensor]
    #: |d x0 / d out|
    x0_gain: Callable[[Coeffs], Tensor]
    #: 'x0' or 'eps' when the output is one of them (no conversion), else None
    native: Optional[str] = None
    #: needs alpha' and sigma'
    needs_rates: bool = False
    #: EDM-style preconditioning: the network sees c_in x/alpha at time c_noise
    preconditioned: bool = False
    aliases: Tuple[str, ...] = ()
    #: diffusers' ``prediction_type`` for it, if diffusers has one
    diffusers: Optional[str] = None
    #: needs the conditioning y of a process with an offset (``Coeffs.y``)
    needs_offset: bool = False


def _vel_det(c: Coeffs) -> Tensor:
    return c.alpha * c.d_sigma - c.sigma * c.d_alpha  # type: ignore[operator]


def _edm(c: Coeffs) -> dict:
    return edm_coefficients(c.sigma / c.alpha, c.sigma_data)


def _edm_to_x0(out: Tensor, x: Tensor, c: Coeffs) -> Tuple[Tensor, Optional[Tensor]]:
    k = _edm(c)
    return k["c_skip"] * (x / c.alpha) + k["c_out"] * out, None


def _edm_from_x0(x0: Tensor, eps: Tensor, x: Tensor, c: Coeffs) -> Tensor:
    k = _edm(c)
    return (x0 - k["c_skip"] * (x / c.alpha)) / k["c_out"]


def _offset_y(c: Coeffs) -> Tensor:
    if c.y is None:
        raise ValueError("the 'residual' prediction (y - x0) needs a process with an offset and its conditioning y")
    return c.y


PARAMETERISATIONS: Dict[str, Parameterisation] = {p.name: p for p in [
    Parameterisation(
        "epsilon", lambda out, x, c: ((x - c.sigma * out) / c.alpha, out), lambda x0, eps, x, c: eps,
        lambda c: c.sigma / c.alpha, native="eps", aliases=("eps", "noise"), diffusers="epsilon"),
    Parameterisation(
        "x0", lambda out, x, c: (out, (x - c.alpha * out) / c.sigma), lambda x0, eps, x, c: x0,
        lambda c: torch.ones_like(torch.as_tensor(c.alpha)), native="x0", aliases=("sample", "data"),
        diffusers="sample"),
    Parameterisation(
        "v", lambda out, x, c: ((c.alpha * x - c.sigma * out) / (c.alpha**2 + c.sigma**2),
                                (c.sigma * x + c.alpha * out) / (c.alpha**2 + c.sigma**2)),
        lambda x0, eps, x, c: c.alpha * eps - c.sigma * x0,
        lambda c: c.sigma / (c.alpha**2 + c.sigma**2), aliases=("v_prediction", "v-prediction"),
        diffusers="v_prediction"),
    Parameterisation(
        "score", lambda out, x, c: ((x + c.sigma**2 * out) / c.alpha, -c.sigma * out),
        lambda x0, eps, x, c: -eps / c.sigma, lambda c: c.sigma**2 / c.alpha),
    Parameterisation(
        "velocity", lambda out, x, c: ((c.d_sigma * x - c.sigma * out) / _vel_det(c),  # type: ignore[operator]
                                       (c.alpha * out - c.d_alpha * x) / _vel_det(c)),  # type: ignore[operator]
        lambda x0, eps, x, c: c.d_alpha * x0 + c.d_sigma * eps,  # type: ignore[operator]
        lambda c: c.sigma / _vel_det(c),
        needs_rates=True, aliases=("flow", "flow_matching"), diffusers="flow_prediction"),
    Parameterisation(
        "edm", _edm_to_x0, _edm_from_x0,
        lambda c: _edm(c)["c_out"], preconditioned=True),
    Parameterisation(
        "residual", lambda out, x, c: (_offset_y(c) - out, None), lambda x0, eps, x, c: _offset_y(c) - x0,
        lambda c: torch.ones_like(torch.as_tensor(c.alpha)), aliases=("res", "pred_res"), needs_offset=True),
]}
_ALIASES = {a: p.name for p in PARAMETERISATIONS.values() for a in p.aliases}
PREDICTIONS = tuple(PARAMETERISATIONS)


def get_parameterisation(name: str) -> Parameterisation:
    """The parameterisation called ``name`` (or one of its aliases); a clear error otherwise."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in PARAMETERISATIONS:
        raise ValueError(f"unknown prediction {name!r}; choose one of {', '.join(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[key]


def canonical(name: str) -> str:
    """The registry name of a prediction given by name or alias."""
    return get_parameterisation(name).name


def from_diffusers(prediction_type: str) -> str:
    """Our name for a diffusers ``prediction_type``."""
    for p in PARAMETERISATIONS.values():
        if p.diffusers == prediction_type:
            return p.name
    known = sorted(p.diffusers for p in PARAMETERISATIONS.values() if p.diffusers)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; diffsolve reads {known}")
