"""Exponential-integrator math, written once for every solver.

All solvers integrate the probability-flow ODE (or the reverse SDE) of x_t = alpha x0 + sigma eps
on a ``TimeGrid``.  In the half log-SNR lambda = log(alpha/sigma) the exact solution is
(Lu et al. 2022, DPM-Solver; 2022b, DPM-Solver++)

  noise form:  x_t = (alpha_t/alpha_s) x_s - sigma_t * int_{lam_s}^{lam_t} e^{lam_t - lam} eps(lam) dlam
  data form:   x_t = (sigma_t/sigma_s) x_s + alpha_t * int_{lam_s}^{lam_t} e^{lam - lam_t} x0(lam) dlam

Expanding eps or x0 in powers of (lam - lam_s) gives the phi-function coefficients
h^{k+1} phi_{k+1}(+-h) below.  Equivalently, in the 'VE view' x~ = x/alpha, s = sigma/alpha
the ODE is dx~/ds = eps, which is where Euler, Heun and the Adams-type (PNDM) methods live.

A step whose target is clean data (the grid's ``clean_end``) is always the denoiser jump
x <- x0(x_s, s): the one last-step rule shared by every solver.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, List, Sequence, Union

import numpy as np
import torch

from .state import Point

Tensor = torch.Tensor


class Form(str, Enum):
    """What an exponential step expands: the data prediction x0 (DPM-Solver++) or the noise eps (DPM-Solver)."""

    DATA = "data"
    NOISE = "noise"


def as_form(form: Union[str, Form]) -> Form:
    try:
        return Form(form)
    except ValueError:
        raise ValueError(f"form must be 'data' or 'noise', got {form!r}") from None


def model_output(p: Point, form: Union[str, Form]) -> Tensor:
    """The term a step of ``form`` expands: x0 (data) or eps (noise)."""
    return p.x0 if form == Form.DATA else p.eps


# ----------------------------------------------------------------------------------------
# phi functions: phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du,  phi_0(z) = e^z
# ----------------------------------------------------------------------------------------
def phi_float(k: int, z: float) -> float:
    """phi_k(z) = int_0^1 e^{(1-u) z} u^{k-1}/(k-1)! du (phi_0 = e^z) in float64: the series
    sum_j z^j/(j+k)! for small |z|, the recurrence phi_{k+1} = (phi_k - 1/k!)/z otherwise."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 0.2:
        series, term = 0.0, 1.0 / math.factorial(k)
        for j in range(25):
            series += term
            term = term * z / (j + k + 1)
        return series
    rec = math.expm1(z) / z
    for j in range(1, k):
        rec = (rec - 1.0 / math.factorial(j)) / z
    return rec


# ----------------------------------------------------------------------------------------
# exponential-integrator building blocks
# ----------------------------------------------------------------------------------------
def exp_step(x: Tensor, s: Point, alpha_t: float, sigma_t: float, lam_t: float,
             terms: Sequence[Tensor], form: Union[str, Form]) -> Tensor:
    """One exponential-integrator step from point s to time t.

    ``terms[k]`` is the k-th derivative-like term c_k such that the model output is modelled as
    sum_k c_k (lam - lam_s)^k / k!  (c_0 = model output at s).  ``form`` is 'data' (x0) or
    'noise' (eps).  Returns x_t exactly for that polynomial model.
    """
    cx, scale = exp_frame(s, alpha_t, sigma_t, form)
    w = exp_coefficients(lam_t - s.lam, len(terms), form)
    return lincomb([(cx, x)] + [(scale * wk, c) for wk, c in zip(w, terms)])


def lincomb(pairs: Sequence[tuple]) -> Tensor:
    """sum_j c_j * T_j with one fused pass per term (c_j floats, T_j same-shape tensors)."""
    (c0, t0), *rest = pairs
    out = torch.mul(t0, c0)
    for c, t in rest:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def exp_coefficients(h: float, order: int, form: Union[str, Form]) -> List[float]:
    """[h^1 phi_1, ..., h^order phi_order] at -h (data form) or +h (noise form), as floats."""
    h = float(h)
    sign = -1.0 if form == Form.DATA else 1.0
    return [h**k * phi_float(k, sign * h) for k in range(1, order + 1)]


def exp_frame(s: "Point", alpha_t: float, sigma_t: float, form: Union[str, Form]) -> tuple[float, float]:
    """(coefficient of x_s, signed scale of the model terms) of an exponential step s -> t:
    data form x_t = (sigma_t/sigma_s) x_s + alpha_t * (...), noise form x_t = (alpha_t/alpha_s) x_s - sigma_t * (...)."""
    if form == Form.DATA:
        return sigma_t / s.sigma, alpha_t
    return alpha_t / s.alpha, -sigma_t


def lagrange_weights(nodes: Sequence[float], a: float, b: float,
                     dsigma: Callable[[np.ndarray], np.ndarray], n_quad: int = 16) -> np.ndarray:
    """w_j = int_a^b L_j(u) dsigma(u)/du du for the Lagrange basis L_j through ``nodes``.

    Used by Adams-type multistep methods in the VE view (x~_t = x~_s + sum_j w_j eps_j);
    the interpolation variable u is lambda (DEIS 'logrho'), sigma/alpha (iPNDM) or t (tAB).
    Gauss-Legendre quadrature in u (exact for polynomials, ~machine precision for exp).
    """
    xs, ws = np.polynomial.legendre.leggauss(n_quad)
    u = 0.5 * (b - a) * xs + 0.5 * (b + a)
    jac = dsigma(u) * ws * 0.5 * (b - a)
    node_arr = np.asarray(nodes, dtype=np.float64)
    out = np.empty(len(node_arr))
    for j, uj in enumerate(node_arr):
        L = np.ones_like(u)
        for m, um in enumerate(node_arr):
            if m != j:
                L *= (u - um) / (uj - um)
        out[j] = np.sum(L * jac)
    return out


