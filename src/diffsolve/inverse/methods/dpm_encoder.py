"""DPM-Encoder: the latent code of an image under a stochastic sampler (Wu & De la Torre 2023, CycleDiffusion,
arXiv:2210.05559).

A DDIM(eta) sampler (eta > 0) on a grid t_0 > t_1 > ... > t_K = t_min turns a code z = (x_{t_0}, e_1, ..., e_K,
e_end) into an image:

    x_{t_{i+1}} = mu_i + c_i e_{i+1},   mu_i = alpha_s x0_hat + sqrt(sigma_s^2 - c_i^2) eps_hat   (from x_{t_i}),
    c_i = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2),
    x = x0_hat(x_{t_K}) + S_K e_end   (S_K = sigma / alpha at t_min: the step into clean data carries the rest).

The encoder draws the path from the process itself given the image x: x_{t_0} ~ q(x_{t_0} | x) and
x_{t_{i+1}} ~ q(x_{t_{i+1}} | x_{t_i}, x) = N(alpha_s x + sqrt(sigma_s^2 - c_i^2) (x_{t_i} - alpha_t x) / sigma_t, c_i^2)
(DDIM's non-Markovian forward process, whose marginals are q(x_t | x) for every eta), and records the noise that
makes the sampler follow it: e_{i+1} = (x_{t_{i+1}} - mu_i) / c_i, and e_end = (x - x0_hat(x_{t_K})) / S_K.  Decoding
the code with the same model reproduces x up to floating-point rounding; decoding it with another model or
another condition (CycleDiffusion) translates x.  One evaluation per step to encode and one to decode.

As an inverse-problem method (``method='dpm-encoder'``, the ``Identity`` operator, y the source image): each
sample encodes y with its own noise and decodes with ``decoder`` (default: the model itself, which returns y), from
the fraction ``t0`` of the time range (1: the whole way; smaller: a partial encoding, closer to y).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid, explicit
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Identity, Operator

Tensor = torch.Tensor
DT = torch.float64


@dataclass
class Latents:
    """The code of a batch of images: the start ``x_start`` [B, ...], the step noises ``eps`` [K + 1, B, ...] (the
    last one is the clean end's), the ``grid`` (final='t_min') and ``eta``."""

    x_start: Tensor
    eps: Tensor
    grid: TimeGrid
    eta: float


def _coeffs(grid: TimeGrid, i: int, eta: float):
    a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
    a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
    c = eta * s_s * math.sqrt(max(1 - (a_t * s_s / (a_s * s_t)) ** 2, 0.0))
    return a_t, s_t, a_s, s_s, c, math.sqrt(max(s_s**2 - c**2, 0.0))


def _check(grid: TimeGrid, eta: float) -> None:
    if not 0 < eta <= 1:
        raise ValueError(f"the DPM-Encoder needs a stochastic sampler: eta in (0, 1], got {eta}")
    if grid.is_clean(grid.t.numel() - 1) or grid.t.numel() < 2:
        raise ValueError("the DPM-Encoder runs on a grid of at least 2 points ending at t_min (final='t_min')")


def _predict(model: Model, x: Tensor, grid: TimeGrid, i: int, kwargs: Optional[Dict[str, Any]]):
    with torch.no_grad():
        p = model.evaluate(x, float(grid.t[i]), kwargs or {}, (float(grid.alpha[i]), float(grid.sigma[i])))
        return p.x0.to(DT), p.eps.to(DT)


def encode(model: Model, x: Tensor, grid: TimeGrid, eta: float = 1.0, rng: Optional[Noise] = None,
           model_kwargs: Optional[Dict[str, Any]] = None) -> Latents:
    """The code of images ``x`` [B, ...] under ``model``'s DDIM(eta) sampler on ``grid``; ``rng`` draws the
    forward path (per-sample streams; default the global generator)."""
    _check(grid, eta)
    rng = rng if rng is not None else Noise(None)
    x = x.to(DT)
    a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    xt = a0 * x + s0 * rng.like(x)
    start = xt
    eps: List[Tensor] = []
    for i in range(grid.t.numel() - 1):
        a_t, s_t, a_s, s_s, c, keep = _coeffs(grid, i, eta)
        x0_hat, e_hat = _predict(model, xt, grid, i, model_kwargs)
        mu = a_s * x0_hat + keep * e_hat
        xs = a_s * x + keep * (xt - a_t * x) / s_t + c * rng.like(x)  # q(x_s | x_t, x)
        eps.append((xs - mu) / c)
        xt = xs
    x0_hat, _ = _predict(model, xt, grid, grid.t.numel() - 1, model_kwargs)
    eps.append((x - x0_hat) / float(grid.sigma[-1] / grid.alpha[-1]))
    return Latents(start, torch.stack(eps), grid, float(eta))


def decode(model: Model, z: Latents, model_kwargs: Optional[Dict[str, Any]] = None) -> Tensor:
    """The images the DDIM(eta) sampler of ``model`` makes from the code ``z`` (the encoder's model: the images
    encoded)."""
    grid = z.grid
    _check(grid, z.eta)
    if z.eps.shape[0] != grid.t.numel():
        raise ValueError(f"the code has {z.eps.shape[0]} noises for a grid of {grid.t.numel()} points")
    xt = z.x_start.to(DT)
    for i in range(grid.t.numel() - 1):
        _, _, a_s, _, c, keep = _coeffs(grid, i, z.eta)
        x0_hat, e_hat = _predict(model, xt, grid, i, model_kwargs)
        xt = a_s * x0_hat + keep * e_hat + c * z.eps[i]
    x0_hat, _ = _predict(model, xt, grid, grid.t.numel() - 1, model_kwargs)
    return x0_hat + float(grid.sigma[-1] / grid.alpha[-1]) * z.eps[-1]


def partial_grid(model: Model, grid: TimeGrid, t0: float) -> TimeGrid:
    """``grid``'s number of points on [t_min, t0 of the time range], uniform in log-SNR (t0 = 1: the grid)."""
    if not 0 < t0 <= 1:
        raise ValueError(f"t0 is a fraction of the time range in (0, 1], got {t0}")
    if t0 == 1:
        return grid
    p = model.process
    top = torch.tensor(p.t_min + t0 * (p.t_max - p.t_min), dtype=DT)
    lam = torch.linspace(float(p.lam(top)), float(p.lam(torch.tensor(p.t_min, dtype=DT))), grid.t.numel(), dtype=DT)
    t = p.t_of_lam(lam)
    t[0], t[-1] = top, p.t_min
    return explicit(p, t=t, final="t_min")


class DPMEncoder:
    """``inverse.sample`` form: encode y (``Identity`` operator) and decode with ``decoder``."""

    name = "dpm-encoder"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, eta: float = 1.0, t0: float = 1.0,
                 decoder: Optional[Model] = None, decoder_kwargs: Optional[Dict[str, Any]] = None):
        if not isinstance(op, Identity):
            raise TypeError("dpm-encoder encodes an image: give the Identity operator and the image as y")
        if not 0 < eta <= 1 or not 0 < t0 <= 1:
            raise ValueError(f"dpm-encoder needs eta and t0 in (0, 1], got eta={eta}, t0={t0}")
        self.model, self.y = model, check_measurement(op, y, sigma_y, batch=True)
        self.eta, self.t0 = float(eta), float(t0)
        self.decoder = decoder if decoder is not None else model
        self.decoder_kwargs = decoder_kwargs
        if self.decoder.process.config() != model.process.config():
            raise ValueError("the decoder must share the encoder's process (the code lives on its noise path)")
        self.nfe = self.vjps = 0

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        grid = partial_grid(self.model, grid, self.t0)
        z = encode(self.model, self.y.expand(noise.shape).to(DT), grid, self.eta, rng)
        out = decode(self.decoder, z, self.decoder_kwargs)
        self.nfe += 2 * grid.t.numel()
        return out
