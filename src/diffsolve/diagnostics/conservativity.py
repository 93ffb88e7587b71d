"""Conservativity of a model's vector field: how far the Jacobian of its denoiser (or score) is from symmetric.

A true denoiser is a gradient field: D(x~, s) = x~ + s^2 grad log p_s(x~) (Tweedie), so J = dD/dx~ = I + s^2 Hessian
is symmetric.  The asymmetry

    A(x, t) = ||J - J^T||_F / ||J||_F

is zero for a conservative field.  With Rademacher probes v (E[v v^T] = I), E ||J v - J^T v||^2 = ||J - J^T||_F^2 and
E ||J v||^2 = ||J||_F^2, so each probe costs one JVP and one VJP.  The gauge-freedom paper (Horvat & Pfister 2024,
arXiv 2402.03845) shows that a non-conservative field can still sample exactly but gives wrong local geometry;
QCSBM (Chao et al. 2023, arXiv 2209.12753) regularises exactly this quantity.  For the score s = (D - x~) / s^2 the
antisymmetric part is the same up to the factor 1 / s^2 while ||J_score||_F = ||J - I||_F / s^2 (``field='score'``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..adapters.denoiser import Model
from ..adapters.derivatives import jvp
from .core import (
    DT,
    DiagnosticError,
    check_data,
    check_model,
    gaussians_for,
    probes_for,
    resolve_noise_level,
    rows_jacobian_t,
    sample_seeds,
    ve_denoiser,
)

Tensor = torch.Tensor


@dataclass
class Conservativity:
    """A(x, t) per sample [B] (the ratio of the probe sums), the pooled ratio over the batch and its standard error
    (delta method over samples), at one noise level."""

    asymmetry: Tensor
    pooled: float
    stderr: float
    t: float
    sigma: float
    field: str
    probes: int

    def summary(self) -> Dict[str, Any]:
        return {"t": self.t, "sigma": self.sigma, "field": self.field, "probes": self.probes,
                "asymmetry_pooled": self.pooled, "asymmetry_se": self.stderr,
                "asymmetry_median": float(self.asymmetry.median()), "samples": int(self.asymmetry.numel())}


def conservativity(model: Model, x: Tensor, t: Optional[float] = None, sigma: Optional[float] = None,
                   probes: int = 8, field: str = "denoiser", seed: int = 0, noised: bool = False,
                   model_kwargs: Optional[Mapping[str, Any]] = None) -> Conservativity:
    """The asymmetry ||J - J^T||_F / ||J||_F of the denoiser (``field='denoiser'``) or score (``'score'``) Jacobian
    at the points ``x`` [B, *S] (the state in the VE view, x~ = x_t / alpha) and noise level ``t`` (or ``sigma`` =
    sigma / alpha; default 0.1), from ``probes`` Rademacher probes per sample (one JVP + one VJP each).
    ``noised=True`` takes ``x`` as clean data and evaluates at x + sigma * eps (eps seeded per sample)."""
    model = check_model(model)
    x = check_data(model, x)
    if field not in ("denoiser", "score"):
        raise DiagnosticError(f"field must be 'denoiser' or 'score', got {field!r}")
    if not isinstance(probes, int) or probes < 1:
        raise DiagnosticError(f"probes must be an integer >= 1, got {probes!r}")
    t, s = resolve_noise_level(model.process, t, sigma, 0.1)
    b = x.shape[0]
    seeds = sample_seeds(b, seed)
    if noised:
        x = x + s * gaussians_for(seeds, 1, tuple(x.shape[1:]), salt=5)[0]
    den = ve_denoiser(model, dict(model_kwargs or {}))
    sv = torch.tensor(s, dtype=DT)
    fn = lambda z: den(z, sv)  # noqa: E731
    v = probes_for(seeds, probes, tuple(x.shape[1:]), salt=3)  # [k, B, *S]
    _, jtv = rows_jacobian_t(fn, x, v, what="conservativity")
    jv = torch.stack([jvp(fn, (x,), (v[j],))[1] for j in range(probes)])
    if field == "score":  # J_score = (J - I) / s^2: the same antisymmetric part, the norm of J - I
        jv, jtv = jv - v, jtv - v
    num = (jv - jtv).flatten(2).pow(2).sum(-1)  # [k, B]
    den_ = jv.flatten(2).pow(2).sum(-1)
    per = (num.sum(0) / den_.sum(0).clamp_min(1e-300)).sqrt()
    pooled, se = _ratio_se(num.mean(0), den_.mean(0))
    return Conservativity(asymmetry=per, pooled=pooled, stderr=se, t=t, sigma=s, field=field, probes=probes)


def _ratio_se(a: Tensor, b: Tensor) -> Tuple[float, float]:
    """sqrt(mean a / mean b) and its standard error over samples (delta method)."""
    n = a.numel()
    ma, mb = float(a.mean()), float(b.mean())
    r2 = ma / mb if mb > 0 else float("nan")
    if n < 2 or not r2 > 0:
        return math.sqrt(max(r2, 0.0)) if r2 == r2 else r2, float("nan")
    var = float(((a - r2 * b) ** 2).mean()) / (mb**2 * (n - 1))  # of the ratio r2
    r = math.sqrt(r2)
    return r, math.sqrt(var) / (2 * r)


def conservativity_by_t(model: Model, x0: Tensor, sigmas: Sequence[float], probes: int = 4, seed: int = 0,
                        field: str = "denoiser", model_kwargs: Optional[Mapping[str, Any]] = None
                        ) -> List[Conservativity]:
    """``conservativity`` at each noise level of ``sigmas`` (sigma / alpha), at clean data ``x0`` noised to it."""
    return [conservativity(model, x0, sigma=s, probes=probes, seed=seed, field=field, noised=True,
                           model_kwargs=model_kwargs) for s in sigmas]
