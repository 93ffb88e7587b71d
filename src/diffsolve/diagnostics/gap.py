"""The ODE-SDE gap of one model, and the score's Fokker-Planck residual ("Closing the ODE-SDE gap in score-based
diffusion models through the Fokker-Planck equation", Deveney et al. 2023, arXiv 2311.15996).

With the true score, the probability-flow ODE and the reverse SDE have the same marginals at every t.  A learned
score makes them differ, and the paper bounds the difference by how far the score is from solving the score
Fokker-Planck equation.  In the VE view (x~ = x / alpha, noise level s = sigma / alpha) the smoothed densities obey
the heat equation d p / ds = s Lap p, so the true score S = grad log p_s satisfies

    dS/ds = s grad(div S + ||S||^2),

and ``fokker_planck_residual`` reports r = dS/ds - s grad(div S + ||S||^2) for the model's S = (D - x~) / s^2:
dS/ds by a central difference in log s, the gradient by reverse mode over an exact or Hutchinson divergence (two
independent probe sets, so that E[r_a . r_b] = ||r||^2 is unbiased), relative to ||dS/ds||.

``ode_sde_gap`` samples the ODE and the SDE (independent noise) on one fine grid and compares their states at
chosen noise levels and the final samples by sliced Wasserstein distance and MMD, each with a permutation null
(the same statistic between random re-splits of the pooled samples): under equal distributions the statistic is
a draw from that null, so 'at Monte-Carlo noise level' means a permutation p-value that is not small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from ..adapters.denoiser import Model
from ..evaluation.distances import kernel_matrix, mmd2_from_kernel
from ..grids import make_grid
from ..sampling import sample
from ..solvers import get_solver
from ..solvers.drivers import Step
from ..solvers.state import SolverState
from ..util import seeding
from .core import (
    DT,
    NO_GRAD,
    DiagnosticError,
    check_data,
    check_model,
    divergence_mode,
    gaussians_for,
    probes_for,
    resolve_noise_level,
    sample_seeds,
    select_kwargs,
    unit_tangents,
    ve_denoiser,
)

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------
# two-sample statistics with a permutation null
# ----------------------------------------------------------------------------------------
def two_sample(a: Tensor, b: Tensor, permutations: int = 100, directions: int = 64, seed: int = 0) -> Dict[str, float]:
    """Sliced 2-Wasserstein distance and MMD^2 between sample sets a and b (equal sizes), with the mean and standard
    deviation of each under ``permutations`` random re-splits of the pooled samples and the permutation p-values."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape or a.shape[0] < 2:
        raise DiagnosticError(f"two sample sets of one shape and >= 2 samples are needed, got {list(a.shape)}, "
                              f"{list(b.shape)}")
    n = a.shape[0]
    z = torch.cat([a, b])
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(z.shape[1], directions, generator=g, dtype=DT)
    proj = z @ (u / u.norm(dim=0, keepdim=True))
    k = kernel_matrix(z)

    def stats(first: Tensor):
        pa, pb = proj[first].sort(0)[0], proj[~first].sort(0)[0]
        return float((pa - pb).pow(2).mean().sqrt()), mmd2_from_kernel(k, first)

    first = torch.zeros(2 * n, dtype=torch.bool)
    first[:n] = True
    sw, mm = stats(first)
    null = []
    for _ in range(permutations):
        f = torch.zeros(2 * n, dtype=torch.bool)
        f[torch.randperm(2 * n, generator=g)[:n]] = True
        null.append(stats(f))
    nt = torch.tensor(null, dtype=DT) if null else torch.zeros(0, 2, dtype=DT)
    out = {"sliced_w2": sw, "mmd2": mm}
    if permutations:
        out.update({"sliced_w2_null_mean": float(nt[:, 0].mean()), "sliced_w2_null_sd": float(nt[:, 0].std()),
                    "mmd2_null_mean": float(nt[:, 1].mean()), "mmd2_null_sd": float(nt[:, 1].std()),
                    "p_sliced_w2": (1 + int((nt[:, 0] >= sw).sum())) / (1 + permutations),
                    "p_mmd2": (1 + int((nt[:, 1] >= mm).sum())) / (1 + permutations)})
    return out


class _Recorder:
    """``after_step`` hook keeping the state after the steps in ``at`` (grid index -> label)."""

    def __init__(self, at: Dict[int, str]):
        self.at = at
        self.states: Dict[str, Tensor] = {}

    def __call__(self, state: SolverState, step: Step) -> None:
        label = self.at.get(step.i + 1)
        if label is not None:
            self.states[label] = state.x.detach().clone()


@dataclass
class Gap:
    """Rows per noise level (and 'final' for the samples): sigma, t and the ``two_sample`` statistics."""

    rows: List[Dict[str, Any]]
    info: Dict[str, Any]


def ode_sde_gap(model: Model, n: int = 1000, steps: int = 200, sigmas: Sequence[float] = (1.0, 0.3, 0.1),
                ode_solver: str = "dpm++2m", sde_solver: str = "ddpm", spacing: str = "logsnr", seed: int = 0,
                permutations: int = 100, directions: int = 64, shape: Optional[Sequence[int]] = None,
                model_kwargs: Optional[Dict[str, Any]] = None, progress: bool = False,
                features: Optional[Callable[[Tensor], Tensor]] = None) -> Gap:
    """Sample ``n`` points with ``ode_solver`` and ``n`` with ``sde_solver`` (independent noise) on one ``steps``-step
    grid of ``spacing``, and compare their states at the grid times nearest to the noise levels ``sigmas``
    (sigma / alpha) and their final samples (``two_sample``; with ``features``, also the final samples' features,
    e.g. a classifier's for images).  Both runs cost ``steps`` NFE per sample."""
    model = check_model(model)
    proc = model.process
    if not get_solver(sde_solver).stochastic:
        raise DiagnosticError(f"sde_solver must be a stochastic solver, got {sde_solver!r}")
    if get_solver(ode_solver).stochastic:
        raise DiagnosticError(f"ode_solver must be an ODE solver, got {ode_solver!r}")
    shape = tuple(shape if shape is not None else (getattr(model, "sample_shape", None) or ()))
    if not shape:
        raise DiagnosticError("pass shape= (the model does not record its sample_shape)")
    if n < 2 or steps < 2:
        raise DiagnosticError(f"need n >= 2 and steps >= 2, got n={n}, steps={steps}")
    grid = make_grid(proc, steps, spacing, "denoise")
    gs = proc.sigma_ve(grid.t[:-1])
    at: Dict[int, str] = {}
    for s in sigmas:
        i = int((torch.log(gs) - math.log(float(s))).abs().argmin())
        if i > 0:
            at[i] = f"{float(s):g}"
    runs = {}
    for name, solver, base in (("ode", ode_solver, 0), ("sde", sde_solver, 1)):
        seeds = seeding.run_seeds(seed * 2 + base, n)
        rec = _Recorder(at)
        out = sample(model, seeding.noise(seeds, shape), solver=solver, grid=grid, nfe=None, after_step=rec,
                     model_kwargs=model_kwargs, progress=progress,
                     seeds=seeds if get_solver(solver).stochastic else None)
        runs[name] = {**rec.states, "final": out}
    rows = []
    for i, label in sorted(at.items()):
        row = {"sigma": float(gs[i]), "t": float(grid.t[i]), "label": label}
        row.update(two_sample(runs["ode"][label], runs["sde"][label], permutations, directions, seed))
        rows.append(row)
    rows.append({"sigma": 0.0, "t": None, "label": "final",
                 **two_sample(runs["ode"]["final"], runs["sde"]["final"], permutations, directions, seed)})
    if features is not None:
        fa, fb = (torch.as_tensor(features(runs[k]["final"])).double() for k in ("ode", "sde"))
        rows.append({"sigma": 0.0, "t": None, "label": "final-features",
                     **two_sample(fa, fb, permutations, directions, seed)})
    return Gap(rows=rows, info={"n": n, "steps": steps, "ode_solver": ode_solver, "sde_solver": sde_solver,
                                "spacing": spacing, "nfe_per_sample": steps, "permutations": permutations})


# ----------------------------------------------------------------------------------------
# the score's Fokker-Planck residual
# ----------------------------------------------------------------------------------------
def fokker_planck_residual(model: Model, x0: Tensor, sigmas: Sequence[float], divergence: str = "auto",
                           probes: int = 4, h: float = 1e-3, seed: int = 0,
                           model_kwargs: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
    """The relative residual ||dS/ds - s grad(div S + ||S||^2)|| / ||dS/ds|| of the model's score (module doc) at
    clean data ``x0`` noised to each level of ``sigmas`` (sigma / alpha), pooled over the batch (root mean squares)."""
    model = check_model(model)
    x0 = check_data(model, x0, "x0")
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    d = x0[0].numel()
    mode = divergence_mode(divergence, d)
    kwargs = dict(model_kwargs or {})
    seeds = sample_seeds(b, seed)
    rows = []
    for s_req in sigmas:
        t, s = resolve_noise_level(model.process, None, float(s_req), float(s_req))
        x = x0 + s * gaussians_for(seeds, 1, shape, salt=19)[0]
        den = ve_denoiser(model, kwargs)

        def score(z: Tensor, sv: float) -> Tensor:
            return (den(z, torch.tensor(sv, dtype=DT)) - z) / sv**2

        with torch.no_grad():
            lo, hi = s * math.exp(-h), s * math.exp(h)
            ds = (score(x, hi) - score(x, lo)) / (hi - lo)
        sets = [None] if mode == "exact" else [probes_for(seeds, probes, shape, salt=23 + j) for j in range(2)]
        grads = [_grad_phi(model, kwargs, x, s, pr) for pr in sets]
        ra = (ds - s * grads[0]).flatten(1)
        rb = (ds - s * grads[-1]).flatten(1)
        r2 = float((ra * rb).sum(1).mean())
        ref = float(ds.flatten(1).pow(2).sum(1).mean())
        rows.append({"sigma": s, "t": t, "residual_rms": math.copysign(math.sqrt(abs(r2)), r2),
                     "dS_ds_rms": math.sqrt(ref), "relative_residual": math.copysign(math.sqrt(abs(r2) / ref), r2),
                     "divergence": mode, "probes": 0 if mode == "exact" else probes, "samples": b})
    return rows


def _grad_phi(model: Model, kwargs: Dict[str, Any], x: Tensor, s: float, probes: Optional[Tensor]) -> Tensor:
    """grad_x (div S + ||S||^2) [B, *S] with S = (D - x) / s^2, the divergence exact (``probes`` None) or by the
    probes [k, B, *S], through double reverse mode."""
    b, d = x.shape[0], x[0].numel()
    cot = unit_tangents(x) if probes is None else probes.to(x)
    m = cot.shape[0]
    sv = torch.tensor(s, dtype=DT)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        xs = xg.repeat(m, *([1] * (x.dim() - 1)))
        out = ve_denoiser(model, select_kwargs(kwargs, b, None, m))(xs, sv)
        if not out.requires_grad:
            raise DiagnosticError(NO_GRAD.format(what="the Fokker-Planck residual"))
        (g,) = torch.autograd.grad(out, xs, cot.reshape(m * b, *x.shape[1:]), create_graph=True)
        quad = (g * cot.reshape(m * b, *x.shape[1:])).flatten(1).sum(1).reshape(m, b)
        tr = quad.sum(0) if probes is None else quad.mean(0)
        resid = (out[:b] - xg).flatten(1).pow(2).sum(1)
        phi = (tr - d) / s**2 + resid / s**4
        (grad,) = torch.autograd.grad(phi.sum(), xg)
    return grad.detach()
