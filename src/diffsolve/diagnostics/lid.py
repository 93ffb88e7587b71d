"""Local intrinsic dimension (LID) of data points, read from a frozen model three ways.

* **FLIPD** (Kamkari et al. 2024, arXiv 2406.03537): for data concentrated on a manifold of dimension r,
  log p_delta(x) ~ (r - d) log delta as the Gaussian smoothing delta -> 0, and the heat equation gives its slope:

      r ~ d + delta^2 (tr grad s + ||s||^2)  at x,   s = grad log p_delta,

  the paper's estimator (its official code evaluates d + sigma^2 tr(grad s) + ||sigma s||^2 at alpha x, which is the
  same in the VE view).  With the denoiser, s = (D - x) / delta^2, this is  tr(dD/dx) + ||D(x, delta) - x||^2 / delta^2:
  one denoiser call and one trace (exact, or Hutchinson with a standard error) per point.
* **Normal bundle** (Stanczuk et al. 2024, arXiv 2212.12611): at a small noise level the scores of K perturbations
  x + delta eps_i point into the normal space of the manifold; the singular values of the K x d matrix of score
  vectors (here D - x~, the score times delta^2) drop after the codimension, and the largest drop (the difference of
  consecutive singular values, as in the authors' code; K = 4 d by default) gives LID = d - codimension.
* **Flow Jacobian** (the gauge-freedom paper, Horvat & Pfister 2024, arXiv 2402.03845): encode x with the
  probability-flow ODE to noise level sigma_end and take the singular values of the Jacobian of the decoding flow
  map back to sigma_start.  Tangent directions keep their length (singular values ~1), normal ones shrink by
  ~sigma_start / sigma_end; LID = the number of singular values above ``threshold`` (default: the geometric mean of
  1 and that ratio).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from ..adapters.denoiser import Model
from ..grids import explicit
from ..sampling import sample
from .core import (
    DT,
    DiagnosticError,
    check_data,
    check_model,
    divergence_mode,
    gaussians_for,
    probes_for,
    resolve_noise_level,
    rows_jacobian_t,
    sample_seeds,
    select_kwargs,
    sigma_of,
    unit_tangents,
    value_and_trace,
    ve_denoiser,
)
from .likelihood import flow

Tensor = torch.Tensor


@dataclass
class LID:
    """Per-point estimates [B] (float; integers for the spectral methods), their standard errors (FLIPD with
    Hutchinson) and, for the spectral methods, the singular values [B, *]."""

    lid: Tensor
    method: str
    sigma: float
    t: float
    stderr: Optional[Tensor] = None
    singular_values: Optional[Tensor] = None

    def summary(self) -> Dict[str, Any]:
        v = self.lid.double()
        return {"method": self.method, "sigma": self.sigma, "t": self.t, "samples": int(v.numel()),
                "median": float(v.median()), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def flipd(model: Model, x: Tensor, sigma: Optional[float] = None, t: Optional[float] = None,
          divergence: str = "auto", probes: int = 16, seed: int = 0,
          model_kwargs: Optional[Mapping[str, Any]] = None, max_rows: int = 4096) -> LID:
    """FLIPD at data points ``x`` [B, *S] and smoothing ``sigma`` (= sigma/alpha of the process time; or ``t``;
    default 0.05): tr(dD/dx) + ||D(x, sigma) - x||^2 / sigma^2 (see the module doc)."""
    model = check_model(model)
    x = check_data(model, x)
    t, s = resolve_noise_level(model.process, t, sigma, 0.05)
    d = x[0].numel()
    mode = divergence_mode(divergence, d)
    sv = torch.tensor(s, dtype=DT)
    b = x.shape[0]
    kwargs = dict(model_kwargs or {})

    def fn(z: Tensor) -> Tensor:
        return ve_denoiser(model, select_kwargs(kwargs, b, None, z.shape[0] // b))(z, sv)

    pr = probes_for(sample_seeds(b, seed), probes, tuple(x.shape[1:]), salt=11) if mode == "hutchinson" else None
    dval, tr = value_and_trace(fn, x, pr, max_rows, "FLIPD")
    resid = (dval - x).flatten(1).pow(2).sum(1) / s**2
    est = tr.mean(1) + resid
    se = tr.std(1) / math.sqrt(tr.shape[1]) if tr.shape[1] > 1 else torch.zeros(b, dtype=DT)
    return LID(lid=est, method="flipd", sigma=s, t=t, stderr=se)


def largest_gap(sv: Tensor) -> Tensor:
    """1 + the index of the largest drop between consecutive singular values (sorted descending) [B]: how many
    lie above the gap."""
    return (sv[:, :-1] - sv[:, 1:]).argmax(1) + 1


def normal_bundle(model: Model, x: Tensor, sigma: Optional[float] = None, t: Optional[float] = None,
                  scores: Optional[int] = None, seed: int = 0, model_kwargs: Optional[Mapping[str, Any]] = None,
                  max_rows: int = 4096, progress: bool = False) -> LID:
    """The normal-bundle estimate at data points ``x`` [B, *S]: ``scores`` (default 4 d) perturbations
    x + sigma eps_i (default sigma 0.01), score vectors D - x~, LID = d - (1 + the largest singular-value drop)."""
    model = check_model(model)
    x = check_data(model, x)
    t, s = resolve_noise_level(model.process, t, sigma, 0.01)
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = x[0].numel()
    k = 4 * d if scores is None else int(scores)
    if k < 2:
        raise DiagnosticError(f"scores must be >= 2, got {k}")
    kwargs = dict(model_kwargs or {})
    seeds = sample_seeds(b, seed)
    svs, lids = [], []
    it = range(b)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="normal bundle", unit="point", leave=False)
    with torch.no_grad():
        for i in it:
            eps = gaussians_for(seeds[i:i + 1], k, shape, salt=13)[:, 0]  # [k, *S]
            xi = x[i:i + 1] + s * eps
            kw = select_kwargs(kwargs, b, torch.tensor([i]), 1)
            rows = []
            for j in range(0, k, max(1, max_rows)):
                xj = xi[j:j + max_rows]
                kj = {key: (v.expand(xj.shape[0], *v.shape[1:]) if isinstance(v, Tensor) and v.dim() > 0
                            and v.shape[0] == 1 else v) for key, v in kw.items()}
                rows.append((ve_denoiser(model, kj)(xj, torch.tensor(s, dtype=DT)) - xj).reshape(xj.shape[0], d))
            sv = torch.linalg.svdvals(torch.cat(rows))
            svs.append(sv)
            lids.append(d - int(largest_gap(sv[None])[0]))
    return LID(lid=torch.tensor(lids), method="normal_bundle", sigma=s, t=t, singular_values=torch.stack(svs))


def flow_jacobian(model: Model, x: Tensor, sigma_start: Optional[float] = None, sigma_end: float = 0.5,
                  steps: int = 40, solver: str = "dpm++2m", directions: Optional[int] = None,
                  threshold: Optional[float] = None, seed: int = 0, rtol: float = 1e-6,
                  model_kwargs: Optional[Mapping[str, Any]] = None, max_rows: int = 4096) -> LID:
    """LID from the decoding flow map's Jacobian (see the module doc).  ``x`` [B, *S] sits at ``sigma_start``
    (default: the process's smallest noise level); it is encoded to ``sigma_end`` by the adaptive ODE solve and
    decoded back by ``solver`` on ``steps`` log-SNR-uniform steps, differentiated in reverse mode: the full
    Jacobian (d VJPs) or, with ``directions`` = m, the singular values of Omega^T J for m random directions Omega
    (the top m of J up to the sketch)."""
    model = check_model(model)
    x = check_data(model, x)
    proc = model.process
    s0 = float(sigma_of(proc, proc.t_min)) if sigma_start is None else float(sigma_start)
    t0, s0 = resolve_noise_level(proc, None, s0, s0)
    t1, s1 = resolve_noise_level(proc, None, sigma_end, sigma_end)
    if not s1 > s0:
        raise DiagnosticError(f"sigma_end ({s1:g}) must exceed sigma_start ({s0:g})")
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = x[0].numel()
    kwargs = dict(model_kwargs or {})
    with torch.no_grad():
        y = flow(model, x, s0, s1, rtol=rtol, atol=rtol, model_kwargs=kwargs)
    lam = torch.linspace(float(proc.lam(torch.tensor(t1, dtype=DT))), float(proc.lam(torch.tensor(t0, dtype=DT))),
                         steps + 1, dtype=DT)
    tt = proc.t_of_lam(lam)
    tt[0], tt[-1] = t1, t0
    grid = explicit(proc, t=tt, final="t_min")
    a0, a1 = float(proc.alpha(torch.tensor(t0, dtype=DT))), float(proc.alpha(torch.tensor(t1, dtype=DT)))

    def decode(z: Tensor) -> Tensor:
        kw = select_kwargs(kwargs, b, None, z.shape[0] // b)
        return sample(model, a1 * z, solver=solver, grid=grid, nfe=None, scale_noise=False, grad=True,
                      model_kwargs=kw) / a0

    if directions is None:
        cot = unit_tangents(y)
    else:
        cot = gaussians_for(sample_seeds(b, seed), int(directions), shape, salt=17) / math.sqrt(d)
    _, g = rows_jacobian_t(decode, y, cot, max_rows, "the flow-Jacobian LID")  # [m, B, *S]: rows Omega^T J
    sv = torch.linalg.svdvals(g.reshape(g.shape[0], b, d).permute(1, 0, 2))  # [B, min(m, d)]
    if directions is not None:
        sv = sv * math.sqrt(d / int(directions))  # a Gaussian sketch's scale
    thr = math.sqrt(s0 / s1) if threshold is None else float(threshold)
    return LID(lid=(sv > thr).sum(1), method="flow_jacobian", sigma=s1, t=t1, singular_values=sv)
