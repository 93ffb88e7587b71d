"""Subspace structure of a denoiser (Wang et al. 2024, "Diffusion models learn low-dimensional distributions via
subspace clustering", arXiv 2409.02426).

For data from a mixture of low-rank Gaussians (MoLRG: x0 = mu_k + U_k z + delta n, U_k d x r orthonormal) the ideal
denoiser near component k is affine with Jacobian

    dD/dx~ = U_k diag(lam^2 / (lam^2 + s^2)) U_k^T + delta^2 / (delta^2 + s^2) (I - U_k U_k^T),

so at noise levels delta << s << lam its Jacobian has rank r (singular values above 1/2: directions where the signal
outweighs the noise) and its top-r singular subspace is span(U_k).  ``denoiser_jacobian`` gives the full Jacobian
(d VJPs, small d), ``jacobian_structure`` its rank and principal subspace by noise level, and
``subspace_distance`` the largest principal angle (its sine) between two subspaces, e.g. against the mixture's bases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..adapters.denoiser import Model
from .core import (
    DT,
    DiagnosticError,
    check_data,
    check_model,
    gaussians_for,
    resolve_noise_level,
    rows_jacobian_t,
    sample_seeds,
    select_kwargs,
    unit_tangents,
    ve_denoiser,
)

Tensor = torch.Tensor


def denoiser_jacobian(model: Model, x: Tensor, t: Optional[float] = None, sigma: Optional[float] = None,
                      model_kwargs: Optional[Mapping[str, Any]] = None, max_rows: int = 4096) -> Tensor:
    """dD/dx~ [B, d, d] at states ``x`` [B, *S] (VE view) and noise level ``t`` or ``sigma`` (default 0.1)."""
    model = check_model(model)
    x = check_data(model, x)
    _, s = resolve_noise_level(model.process, t, sigma, 0.1)
    b, d = x.shape[0], x[0].numel()
    kwargs = dict(model_kwargs or {})
    sv = torch.tensor(s, dtype=DT)

    def fn(z: Tensor) -> Tensor:
        return ve_denoiser(model, select_kwargs(kwargs, b, None, z.shape[0] // b))(z, sv)

    _, g = rows_jacobian_t(fn, x, unit_tangents(x), max_rows, "the denoiser Jacobian")  # g[j] = e_j^T J
    return g.reshape(d, b, d).permute(1, 0, 2)


@dataclass
class JacobianStructure:
    """At one noise level: per point the singular values [B, d], the rank (singular values > ``threshold``), the
    top-``rank`` right singular vectors (a list of [d, r_i]) and the 16 leading ones [B, 16, d] (for pictures)."""

    sigma: float
    t: float
    singular_values: Tensor
    rank: Tensor
    subspaces: List[Tensor]
    threshold: float
    leading: Tensor

    def summary(self) -> Dict[str, Any]:
        r = self.rank.double()
        return {"sigma": self.sigma, "t": self.t, "threshold": self.threshold, "rank_median": float(r.median()),
                "rank_mean": float(r.mean()), "rank_min": int(r.min()), "rank_max": int(r.max()),
                "singular_values_mean": self.singular_values.mean(0)[: min(32, self.singular_values.shape[1])].tolist()}


def jacobian_structure(model: Model, x0: Tensor, sigmas: Sequence[float], threshold: float = 0.5, seed: int = 0,
                       noised: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                       max_rows: int = 4096) -> List[JacobianStructure]:
    """The denoiser Jacobian's rank and principal subspace at each noise level of ``sigmas``, at clean data ``x0``
    noised to that level (``noised=False``: at ``x0`` itself)."""
    model = check_model(model)
    x0 = check_data(model, x0, "x0")
    if not 0 < threshold < 1:
        raise DiagnosticError(f"threshold must lie in (0, 1), got {threshold}")
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    seeds = sample_seeds(b, seed)
    out = []
    for s_req in sigmas:
        t, s = resolve_noise_level(model.process, None, float(s_req), float(s_req))
        x = x0 + s * gaussians_for(seeds, 1, shape, salt=29)[0] if noised else x0
        jac = denoiser_jacobian(model, x, sigma=s, model_kwargs=model_kwargs, max_rows=max_rows)
        _, sv, vh = torch.linalg.svd(jac)
        rank = (sv > threshold).sum(1)
        subs = [vh[i, : int(rank[i])].T for i in range(b)]
        out.append(JacobianStructure(sigma=s, t=t, singular_values=sv, rank=rank, subspaces=subs, threshold=threshold,
                                     leading=vh[:, :16].clone()))
    return out


def subspace_distance(a: Tensor, b: Tensor) -> float:
    """sin of the largest principal angle between span(a) and span(b) (a [d, r], b [d, r'], orthonormal columns):
    ||(I - B B^T) A||_2, 0 for a subspace of span(b), 1 when some direction of a is orthogonal to b."""
    a, b = a.to(DT), b.to(DT)
    if a.shape[1] == 0:
        return 0.0
    resid = a - b @ (b.T @ a)
    return float(torch.linalg.matrix_norm(resid, ord=2))
