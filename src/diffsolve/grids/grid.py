"""Time grids: decreasing evaluation times with their coefficients and the last-step policy.

``make_grid`` turns a spacing into a ``TimeGrid`` and adds the last-step policy: ``final='denoise'`` appends
the clean point (alpha=1, sigma=0, lambda=+inf) that the last step jumps to with the denoiser;
``final='t_min'`` stops at t_min.  ``explicit`` accepts grids of t, sigma (= sigma/alpha) or lambda values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from ..processes import NoiseProcess
from .spacings import SPACINGS

Tensor = torch.Tensor
DT = torch.float64
FINALS = ("denoise", "t_min")


@dataclass
class TimeGrid:
    """Decreasing times t[0] > ... > t[-1] with their alpha, sigma and lambda (float64).

    When ``clean_end`` is set, the last point is clean data (t = nan, alpha = 1, sigma = 0,
    lambda = inf): the final step to it returns the denoiser's x0 prediction.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    clean_end: bool

    @property
    def steps(self) -> int:
        return self.t.numel() - 1

    def __len__(self) -> int:
        return self.t.numel()

    def is_clean(self, i: int) -> bool:
        return self.clean_end and i == self.t.numel() - 1

    @classmethod
    def from_times(cls, process: NoiseProcess, t: Tensor, clean_end: bool) -> "TimeGrid":
        t = torch.as_tensor(t, dtype=DT).flatten()
        a, s, lam = process.alpha(t), process.sigma(t), process.lam(t)
        if clean_end:
            one, nan = torch.ones(1, dtype=DT), torch.full((1,), math.nan, dtype=DT)
            t = torch.cat([t, nan])
            a = torch.cat([a, one])
            s = torch.cat([s, torch.zeros(1, dtype=DT)])
            lam = torch.cat([lam, torch.full((1,), math.inf, dtype=DT)])
        return cls(t, a, s, lam, clean_end)


def explicit(process: NoiseProcess, t: Union[Tensor, Sequence[float], None] = None,
             sigmas: Union[Tensor, Sequence[float], None] = None, lambdas: Union[Tensor, Sequence[float], None] = None,
             final: str = "denoise") -> TimeGrid:
    """A grid from explicit values of exactly one of t, sigma (= sigma/alpha) or lambda.

    A trailing 0 in ``sigmas`` (or +inf in ``lambdas``) means "jump to clean data";
    otherwise ``final`` decides.
    """
    given = [v is not None for v in (t, sigmas, lambdas)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of t=, sigmas=, lambdas=")
    clean = final == "denoise"
    if sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=DT).flatten()
        if s.numel() and s[-1] == 0:
            s, clean = s[:-1], True
        _check_finite(s, "sigmas")
        if torch.any(s <= 0):
            raise ValueError("sigmas must be positive (a single trailing 0 means 'denoise')")
        t_vals = process.t_of_sigma_ve(s)
    elif lambdas is not None:
        lam = torch.as_tensor(lambdas, dtype=DT).flatten()
        if lam.numel() and math.isinf(float(lam[-1])) and lam[-1] > 0:
            lam, clean = lam[:-1], True
        _check_finite(lam, "lambdas")
        t_vals = process.t_of_lam(lam)
    else:
        t_vals = torch.as_tensor(t, dtype=DT).flatten()
        _check_finite(t_vals, "t")
    validate_times(process, t_vals)
    return TimeGrid.from_times(process, t_vals, clean)


def _check_finite(v: Tensor, name: str) -> None:
    if not torch.all(torch.isfinite(v)):
        raise ValueError(f"time grid {name}= contains NaN or inf")


def validate_times(process: NoiseProcess, t: Tensor, tol: float = 1e-9) -> None:
    """Raise ValueError unless t is finite, strictly decreasing and inside [t_min, t_max]."""
    if t.numel() < 1:
        raise ValueError("time grid is empty")
    _check_finite(t, "t")
    if t.numel() > 1 and not torch.all(t[1:] < t[:-1]):
        i = int(torch.nonzero(t[1:] >= t[:-1])[0])
        raise ValueError(f"time grid must be strictly decreasing (noisy -> clean); t[{i}]={float(t[i]):.6g} "
                         f"is followed by t[{i + 1}]={float(t[i + 1]):.6g}")
    span = tol * max(1.0, abs(process.t_max))
    if float(t.max()) > process.t_max + span or float(t.min()) < process.t_min - span:
        raise ValueError(f"time grid leaves the process range [{process.t_min:.6g}, {process.t_max:.6g}]: "
                         f"got [{float(t.min()):.6g}, {float(t.max()):.6g}]")


def make_grid(process: NoiseProcess, n_points: int, spacing: Union[str, Callable] = "logsnr",
              final: str = "denoise", **spacing_kwargs) -> TimeGrid:
    """``n_points`` evaluation times by ``spacing``, plus the clean point when ``final='denoise'``."""
    if final not in FINALS:
        raise ValueError(f"unknown final={final!r}; use one of {FINALS}")
    if n_points < 1 or (n_points < 2 and final == "t_min"):
        raise ValueError(f"a grid needs at least {2 if final == 't_min' else 1} time points, got {n_points}")
    if isinstance(spacing, str):
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
        fn = SPACINGS[spacing]
    else:
        fn = spacing
    t = torch.as_tensor(fn(process, n_points, **spacing_kwargs), dtype=DT)
    if n_points == 1:
        t = torch.tensor([process.t_max], dtype=DT)
    validate_times(process, t)
    return TimeGrid.from_times(process, t, final == "denoise")
