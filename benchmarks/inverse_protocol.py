#!/usr/bin/env python
"""Posterior sampling against the exact posterior: the Gaussian-mixture protocol of MCGdiff (Cardoso et al. 2023,
arXiv:2308.07983), as written out in the research note INVERSE.md, sections 2.1 and 2.4.

One problem of cell (d, d_y), all drawn from one seeded generator:

    prior     25 Gaussians N(mu_ij, I_d), mu_ij = (-8i, -8j) repeated d/2 times, i, j in {-2..2},
              weights w ~ N(0, 1)^2, normalised
    operator  A = U diag(s) V [d_y, d]: U, V from the SVD of a Gaussian d_y x d matrix, s = sort(U(0, 1)), descending
    noise     sigma_y = U(0, 1) * max(s)
    data      y = A x* + sigma_y n, x* drawn from the prior

Every method draws ``--samples`` samples of p(x0 | y) through ``ds.inverse.sample`` at ``--nfe`` NFE-equivalents
per sample (a VJP through the model counts 2), default options, with the exact prior denoiser as the model.  The score is the sliced Wasserstein distance of the protocol: the mean over 100 random unit directions of
the 1-D W1 distance (``sliced_wasserstein(..., p=1)``) to ``--samples`` exact posterior samples
(``ExactPosterior.sample``).  Beside every row: the Monte-Carlo floor (two independent exact sample sets) and the
ignore-y baseline (prior samples against the posterior).

``oracle`` is the exact posterior denoiser E[x0 | x_t, y] under the same solver, budget and starting noise: what
``method="oracle"`` computes with the exact prior model (tests/test_inverse_protocol.py checks the two agree), so
its distance to the floor is the sampler's error alone: the discretisation plus the start from N(0, I) in place of
p_T(x | y) (at d = 800 the means still shift x_T by alpha_T |mu| ~ 3, and the mode weights are set there).
``oracle_pT`` starts the same run from exact samples of p_T(x | y): the discretisation error alone.

The prior and its posterior share one covariance (I and I - V diag(c) V^T, V the operator's right singular
vectors), so both models are evaluated here in closed form at O(B K d) (``SharedCovarianceMixture``, equal to
``DenseGaussianMixture.denoiser`` to float rounding): that is what makes d = 800 with 2000 samples affordable.

Writes ``inverse_protocol.md`` (median SW per cell and method, floor, ignore-y, the research note's best-peer
medians), ``inverse_protocol.csv`` (one row per problem) and ``inverse_protocol.png`` under ``--out``.

    python benchmarks/inverse_protocol.py --out out/inverse                      # the full protocol, every method
    python benchmarks/inverse_protocol.py --out out/inverse --problems 20 --problems-large 4 \
        --skip ddrm@80,reddiff@80                  # the run of docs/inverse.md (about 20 min on one busy core)
    python benchmarks/inverse_protocol.py --out /tmp/inv --quick                 # smoke test (< 1 minute)

Model-wrapper methods run under ``--solver`` (the library's default); loop methods (``tds``, ``ddrm``, ...) run
their own sampler.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import diffsolve as ds
from diffsolve.evaluation.distances import sliced_wasserstein
from diffsolve.inverse import Dense, ExactPosterior
from diffsolve.reference import ClosedFormPrior, DenseGaussianMixture
from diffsolve.util import seeding

Tensor = torch.Tensor
DT = torch.float64
PROCESS = ds.VPDiscrete.linear(1000)
ORACLES = ("oracle", "oracle_pT")  # exact guidance: the sampler's error check, not a method one can deploy
# every method of ds.inverse.sample that needs no exact likelihood, in the library's order
OURS = tuple(m for m in ds.inverse.methods() if m != "oracle")
METHODS = ORACLES + OURS
DEFAULT_SOLVER = inspect.signature(ds.inverse.sample).parameters["solver"].default
# Best peer median SW per cell at <= 100 NFE-equivalents (the better of the 20- and 100-step runs of MCGdiff with
# 1000 particles, DPS with zeta = 0.1 and DDRM), as measured by the research note INVERSE.md section 2.4 (10
# problems per cell for d <= 80, 5 for d = 800); not re-measured in this harness.
PEER_BEST: Dict[Tuple[int, int], Tuple[float, str]] = {
    (8, 1): (0.88, "MCGdiff@100"), (8, 2): (0.36, "MCGdiff@100"), (8, 4): (0.31, "MCGdiff@100"),
    (80, 1): (1.27, "MCGdiff@20"), (80, 2): (0.41, "MCGdiff@20"), (80, 4): (0.32, "DPS@100"),
    (800, 1): (2.71, "MCGdiff@100"), (800, 2): (2.38, "MCGdiff@20"), (800, 4): (0.47, "MCGdiff@20"),
}


# ----------------------------------------------------------------------------------------------------------------
class SharedCovarianceMixture(ClosedFormPrior):
    """x0 ~ sum_k pi_k N(mu_k, C) with one covariance C = I - V diag(c) V^T (V [d, r] orthonormal, 0 <= c < 1).

    At VE noise level s, with P = (C + s^2 I)^{-1} = (I - V V^T) / (1 + s^2) + V diag(1 / (1 - c + s^2)) V^T:
    E[x0 | x~] = x~ - s^2 P (x~ - sum_k w_k mu_k), w = softmax_k(log pi_k + x~^T P mu_k - mu_k^T P mu_k / 2),
    all by [B, d] x [d, K] products.  r = 0 is the unit-covariance grid prior, r = d_y its posterior."""

    def __init__(self, means: Tensor, log_weights: Tensor, V: Optional[Tensor] = None, c: Optional[Tensor] = None):
        self.means = torch.as_tensor(means, dtype=DT)
        K, d = self.means.shape
        self.V = torch.zeros(d, 0, dtype=DT) if V is None else torch.as_tensor(V, dtype=DT)
        self.c = torch.zeros(0, dtype=DT) if c is None else torch.as_tensor(c, dtype=DT)
        if self.V.shape != (d, self.c.numel()) or (self.c.numel() and not (0 <= float(self.c.min()) and
                                                                            float(self.c.max()) < 1)):
            raise ValueError("V must be [d, r] and 0 <= c < 1 (r entries)")
        lw = torch.as_tensor(log_weights, dtype=DT)
        self.log_weights = lw - torch.logsumexp(lw, 0)
        self.shape, self.dim, self.n_components = (d,), d, K
        self.lam = 1.0 - self.c  # eigenvalues of C along V (1 elsewhere)
        self.mV = self.means @ self.V  # [K, r]
        self.msq = (self.means**2).sum(1)  # [K]

    def covariance_matrix(self) -> Tensor:
        return torch.eye(self.dim, dtype=DT) - (self.V * self.c) @ self.V.T

    def _precision(self, sigma_ve: Union[float, Tensor], batch: int) -> Tuple[Tensor, Tensor, Tensor]:
        s2 = torch.as_tensor(sigma_ve, dtype=DT) ** 2
        s2 = (s2.reshape(-1, 1) if s2.dim() else s2.reshape(1, 1)).expand(batch, 1)
        iso = 1.0 / (1.0 + s2)  # [B, 1]
        delta = 1.0 / (self.lam[None] + s2) - iso  # [B, r]: extra precision along V
        return s2, iso, delta

    def _logits(self, xf: Tensor, iso: Tensor, delta: Tensor) -> Tuple[Tensor, Tensor]:
        xV = xf @ self.V
        xPm = iso * (xf @ self.means.T) + (xV * delta) @ self.mV.T  # [B, K]
        mPm = iso * self.msq[None] + delta @ (self.mV**2).T
        return self.log_weights[None] + xPm - 0.5 * mPm, xV

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        xf = self._flat(x)
        s2, iso, delta = self._precision(sigma_ve, xf.shape[0])
        logits, _ = self._logits(xf, iso, delta)
        r = xf - torch.softmax(logits, -1) @ self.means
        Pr = iso * r + ((r @ self.V) * delta) @ self.V.T
        return (xf - s2 * Pr).reshape(x.shape)

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        xf = self._flat(x)
        s2, iso, delta = self._precision(sigma_ve, xf.shape[0])
        logits, xV = self._logits(xf, iso, delta)
        xPx = iso[:, 0] * (xf**2).sum(1) + (delta * xV**2).sum(1)
        logdet = (self.dim - self.c.numel()) * torch.log(1.0 + s2[:, 0]) + torch.log(self.lam[None] + s2).sum(1)
        return torch.logsumexp(logits, -1) - 0.5 * (xPx + logdet + self.dim * math.log(2 * math.pi))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=DT)
        return self.means[k] + z - ((z @ self.V) * (1.0 - self.lam.sqrt())) @ self.V.T


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One problem of the protocol: the prior (dense and closed form), the operator, the measurement and the exact
    posterior (``ExactPosterior`` and its closed form)."""

    d: int
    d_y: int
    seed: int
    weights: Tensor  # [25]
    A: Tensor  # [d_y, d]
    singular_values: Tensor  # [d_y], descending
    sigma_y: float
    x_star: Tensor  # [1, d]
    y: Tensor  # [d_y]
    prior: DenseGaussianMixture
    op: Dense
    exact: ExactPosterior
    prior_cf: SharedCovarianceMixture
    posterior_cf: SharedCovarianceMixture

    @property
    def modes(self) -> int:
        """Posterior components with weight > 1e-3."""
        return int((self.exact.mixture.log_weights.exp() > 1e-3).sum())


def grid_means(d: int) -> Tensor:
    """The 25 means (-8i, -8j) repeated d/2 times, i, j in {-2..2} (i the outer index)."""
    if d < 2 or d % 2:
        raise ValueError(f"the protocol needs an even dimension d >= 2, got {d}")
    return torch.tensor([[-8.0 * i, -8.0 * j] * (d // 2) for i in range(-2, 3) for j in range(-2, 3)], dtype=DT)


def problem_seed(d: int, d_y: int, rep: int) -> int:
    return 1_000_000 * d + 1000 * d_y + rep


def make_problem(d: int, d_y: int, seed: int) -> Problem:
    """The protocol's problem number ``seed`` for (d, d_y); everything from one generator, in the protocol's order."""
    if not 1 <= d_y <= d:
        raise ValueError(f"need 1 <= d_y <= d, got d_y={d_y}, d={d}")
    g = torch.Generator().manual_seed(int(seed))
    means = grid_means(d)
    w = torch.randn(len(means), generator=g, dtype=DT) ** 2
    w = w / w.sum()
    prior = DenseGaussianMixture(means, torch.eye(d, dtype=DT).expand(len(means), d, d), w)
    U, _, Vh = torch.linalg.svd(torch.randn(d_y, d, generator=g, dtype=DT), full_matrices=False)
    s = torch.sort(torch.rand(d_y, generator=g, dtype=DT), descending=True).values
    A = U @ torch.diag(s) @ Vh
    x_star = prior.sample(1, g)
    sigma_y = float(torch.rand(1, generator=g, dtype=DT)[0] * s.max())
    y = (x_star @ A.T + sigma_y * torch.randn(1, d_y, generator=g, dtype=DT))[0]
    op = Dense(A)
    exact = ExactPosterior(prior, op, y, sigma_y)
    # closed forms: the prior's covariance is I; the posterior's is I - A^T (A A^T + sigma_y^2 I)^{-1} A
    prior_cf = SharedCovarianceMixture(means, prior.log_weights)
    _, S, V = op.svd()
    post_cf = SharedCovarianceMixture(exact.mixture.means, exact.mixture.log_weights, V, S**2 / (S**2 + sigma_y**2))
    err = float((post_cf.covariance_matrix() - exact.mixture.covs[0]).abs().max())
    if err > 1e-8:
        raise AssertionError(f"closed-form posterior covariance differs from ExactPosterior's by {err:.2e}")
    return Problem(d, d_y, int(seed), w, A, s, sigma_y, x_star, y, prior, op, exact, prior_cf, post_cf)


# ----------------------------------------------------------------------------------------------------------------
def sw(a: Tensor, b: Tensor, p: int = 1) -> float:
    """The protocol's distance (p=1: mean over 100 directions of the 1-D W1); NaN when a has non-finite rows."""
    if not torch.isfinite(a).all():
        return float("nan")
    return sliced_wasserstein(a, b, directions=100, p=p)


def run_method(pb: Problem, method: str, n: int, nfe: int, solver: str, seeds: Sequence[int]) -> Dict[str, object]:
    """One method on one problem: samples scored later; cost and errors recorded here."""
    model = pb.prior_cf.denoiser(PROCESS)
    t0 = time.perf_counter()
    try:
        if method in ("oracle", "oracle_pT"):
            info = ds.get_solver(solver)
            noise = seeding.noise(seeds, pb.op.in_shape)
            scale = True
            if method == "oracle_pT":  # start from the exact p_T(x | y) = alpha_T p(x0 | y) * N(0, sigma_T^2 I)
                t = torch.tensor(PROCESS.t_max, dtype=DT)
                x0 = pb.exact.sample(n, torch.Generator().manual_seed(pb.seed * 8 + 4))
                noise, scale = PROCESS.alpha(t) * x0 + PROCESS.sigma(t) * noise, False
            x, si = ds.sample(pb.posterior_cf.denoiser(PROCESS), noise, info.name, nfe=nfe, return_info=True,
                              seeds=seeds if info.stochastic else None, scale_noise=scale)
            cost = {"nfe": si.nfe, "vjps": 0, "nfe_eq": float(si.nfe)}
        else:
            x, inf = ds.inverse.sample(model, pb.op, pb.y, pb.sigma_y, method=method, nfe=nfe, n=n, seeds=seeds,
                                       solver=solver)
            cost = {"nfe": inf.nfe, "vjps": inf.vjps, "nfe_eq": inf.nfe_equivalents}
        err = ""
    except Exception as e:  # a method that breaks is reported, not hidden
        x, cost, err = None, {"nfe": "", "vjps": "", "nfe_eq": ""}, f"{type(e).__name__}: {e}".replace("\n", " ")
    return {"x": x, "seconds": time.perf_counter() - t0, "error": err, **cost}


def run_problem(pb: Problem, methods: Sequence[str], n: int, nfe: int, solver: str,
                bar=None) -> Dict[str, object]:
    g = lambda k: torch.Generator().manual_seed(pb.seed * 8 + k)  # noqa: E731
    ref = pb.exact.sample(n, g(1))
    row: Dict[str, object] = {
        "d": pb.d, "d_y": pb.d_y, "seed": pb.seed, "sigma_y": pb.sigma_y,
        "singular_values": ";".join(f"{v:.4f}" for v in pb.singular_values.tolist()), "modes": pb.modes,
        "floor": sw(pb.exact.sample(n, g(2)), ref), "ignore_y": sw(pb.prior.sample(n, g(3)), ref),
    }
    seeds = [pb.seed * 10_000 + i for i in range(n)]
    for m in methods:
        if bar is not None:
            bar.set_postfix_str(f"d={pb.d} d_y={pb.d_y} {m}")
        r = run_method(pb, m, n, nfe, solver, seeds)
        x = r.pop("x")
        bad = -1 if x is None else int((~torch.isfinite(x.reshape(n, -1))).any(1).sum())
        row.update({f"{m}_sw": float("nan") if x is None else sw(x, ref),
                    f"{m}_sw2": float("nan") if x is None else sw(x, ref, p=2),
                    f"{m}_nonfinite": bad, f"{m}_nfe": r["nfe"], f"{m}_vjps": r["vjps"],
                    f"{m}_nfe_eq": r["nfe_eq"], f"{m}_seconds": round(float(r["seconds"]), 3),  # type: ignore
                    f"{m}_error": r["error"]})
        if bar is not None:
            bar.update(1)
    return row


# ----------------------------------------------------------------------------------------------------------------
def _med(v: List[float]) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(np.median(v)) if v else float("nan")


def fmt(v: float) -> str:
    return "NaN" if math.isnan(v) else f"{v:.1e}" if abs(v) >= 1000 else f"{v:.2f}"


def _ci(v: List[float]) -> str:
    v = [x for x in v if not math.isnan(x)]
    if not v:
        return "NaN"
    half = 1.96 * float(np.std(v, ddof=1)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{fmt(float(np.mean(v)))} ± {fmt(half)}"


def cells(rows: List[Dict[str, object]]) -> List[Tuple[int, int]]:
    return sorted({(int(r["d"]), int(r["d_y"])) for r in rows})  # type: ignore[call-overload]


def summarise(rows: List[Dict[str, object]], methods: Sequence[str]) -> List[Dict[str, object]]:
    """One entry per cell: medians, means with 95% intervals, NaN / error counts, best of ours vs the peers."""
    out = []
    for d, dy in cells(rows):
        rs = [r for r in rows if r["d"] == d and r["d_y"] == dy]
        c: Dict[str, object] = {"d": d, "d_y": dy, "n": len(rs)}
        for k in ("floor", "ignore_y", *methods):
            col = "floor" if k == "floor" else "ignore_y" if k == "ignore_y" else f"{k}_sw"
            vals = [float(r[col]) for r in rs if col in r]  # type: ignore[arg-type]
            c[k + "_run"] = bool(vals)
            c[k], c[k + "_ci"], c[k + "_nan"] = _med(vals), _ci(vals) if vals else "-", sum(math.isnan(v) for v in vals)
        for m in methods:
            c[m + "_seconds"] = _med([float(r[f"{m}_seconds"]) for r in rs if f"{m}_seconds" in r])  # type: ignore
            c[m + "_errors"] = sorted({str(r[f"{m}_error"]) for r in rs if r.get(f"{m}_error")})
        ours = [(float(c[m]), m) for m in methods if m in OURS and not math.isnan(float(c[m]))]  # type: ignore
        c["best"], c["best_method"] = min(ours) if ours else (float("nan"), "")
        peer = PEER_BEST.get((d, dy))
        c["peer"], c["peer_method"] = peer if peer else (float("nan"), "")
        out.append(c)
    return out


def _cell(c: Dict[str, object], k: str) -> str:
    if not c.get(k + "_run", True):
        return "-"
    v = float(c[k])  # type: ignore[arg-type]
    nan = int(c.get(k + "_nan", 0))  # type: ignore[call-overload]
    return fmt(v) + (f" ({nan} NaN)" if nan and not math.isnan(v) else "")


def code_version() -> str:
    """``git describe --always --dirty`` of the diffsolve package that runs (its folder, if not a git checkout)."""
    import subprocess

    where = os.path.dirname(os.path.abspath(ds.__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=where)
        return out.stdout.strip() or f"diffsolve at {where}"
    except (OSError, subprocess.SubprocessError):
        return f"diffsolve at {where}"


def markdown(rows, summary, methods, args, command: str, wall: float, version: str) -> str:
    n_s = args.samples
    lines = [
        "# Exact-posterior benchmark: the MCGdiff Gaussian-mixture protocol",
        "",
        f"Command: `{command}` (code `{version}`, torch {torch.__version__})",
        "",
        f"{n_s} samples per method and problem, at most {args.nfe} NFE-equivalents per sample (a VJP counts 2 NFE), "
        f"solver `{args.solver}` for the model-wrapper methods (the others run their own loop, see the cost table), "
        "default options, VP-discrete linear betas (1000 steps), float64, "
        f"{args.threads} torch thread(s); total wall time {wall / 60:.1f} min.  SW = mean over 100 random "
        "directions of the 1-D W1 distance to "
        f"{n_s} exact posterior samples (lower is better).  floor: SW between two independent exact sample sets; "
        "ignore-y: prior samples against the posterior; oracle: the exact posterior denoiser under the same solver, "
        "budget and N(0, I) start (the sampler's error only); oracle_pT: the same from exact samples of "
        "p_T(x | y) (discretisation error only).  *best* is the lowest median of "
        f"{', '.join(m for m in methods if m in OURS)}; *peer* is the best-peer median of the research note "
        "(INVERSE.md section 2.4, not re-measured here)."
        + (f"  '-': not run (`--skip {args.skip}`: METHOD@D skips METHOD at d >= D, for time)." if args.skip else ""),
        "",
        "## Median SW per cell",
        "",
        "| d | d_y | n | floor | ignore-y | " + " | ".join(methods) + " | best (ours) | peer | best / peer | <= 0.5x |",
        "|---|---|---|---|---|" + "---|" * len(methods) + "---|---|---|---|",
    ]
    for c in summary:
        ratio = float(c["best"]) / float(c["peer"]) if not math.isnan(float(c["peer"])) else float("nan")
        ok = "" if math.isnan(ratio) else ("yes" if ratio <= 0.5 else "no")
        lines.append(f"| {c['d']} | {c['d_y']} | {c['n']} | {_cell(c, 'floor')} | {_cell(c, 'ignore_y')} | "
                     + " | ".join(_cell(c, m) for m in methods)
                     + f" | {float(c['best']):.2f} ({c['best_method']}) | "
                     + (f"{float(c['peer']):.2f} ({c['peer_method']})" if not math.isnan(float(c["peer"])) else "-")
                     + f" | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} | {ok or '-'} |")
    lines += ["", "## Mean ± 1.96 sd/√n per cell", "",
              "| d | d_y | n | floor | ignore-y | " + " | ".join(methods) + " |",
              "|---|---|---|---|---|" + "---|" * len(methods)]
    for c in summary:
        lines.append(f"| {c['d']} | {c['d_y']} | {c['n']} | {c['floor_ci']} | {c['ignore_y_ci']} | "
                     + " | ".join(str(c[m + "_ci"]) for m in methods) + " |")
    lines += ["", "## Cost per sample and median seconds per problem (all samples)", "",
              "| method | sampler | NFE | VJPs | NFE-equivalents | "
              + " | ".join(f"s (d={d})" for d in sorted({c["d"] for c in summary}))
              + " |", "|---|---|---|---|---|" + "---|" * len({c["d"] for c in summary})]
    for m in methods:
        r0 = next((r for r in rows if r.get(f"{m}_nfe", "") != ""), None)
        per_d = []
        for d in sorted({c["d"] for c in summary}):
            t = [float(r[f"{m}_seconds"]) for r in rows if r["d"] == d and f"{m}_seconds" in r]
            per_d.append(f"{_med(t):.1f}" if t else "-")
        cost = (f"{r0[f'{m}_nfe']} | {float(r0[f'{m}_vjps']):g} | {float(r0[f'{m}_nfe_eq']):g}" if r0
                else "- | - | -")
        loop = getattr(ds.inverse.METHODS.get(m), "loop", False)  # methods with their own sampling loop
        lines.append(f"| {m} | {'own loop' if loop else args.solver} | {cost} | " + " | ".join(per_d) + " |")
    problems = []
    for c in summary:
        for m in methods:
            if c[m + "_nan"]:
                problems.append(f"- d={c['d']}, d_y={c['d_y']}, {m}: {c[m + '_nan']} of {c['n']} problems without a "
                                "finite sample set" + (f" ({'; '.join(c[m + '_errors'])})" if c[m + "_errors"] else ""))
    lines += ["", "## Non-finite samples and errors", ""] + (problems or ["None."])
    return "\n".join(lines) + "\n"


def plot(summary, methods, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.arange(len(summary))
    labels = [f"d={c['d']}\nd_y={c['d_y']}" for c in summary]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(summary) + 4), 4.8))
    top = 2.0 * max(float(c["ignore_y"]) for c in summary)
    others = [m for m in methods if m not in ORACLES]
    colours = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    for m in methods:
        v = np.array([float(c[m]) for c in summary])
        if m in ORACLES:
            style = {"color": "k" if m == "oracle" else "0.45", "marker": "s" if m == "oracle" else "D",
                     "ls": "-.", "ms": 4, "lw": 1.0}
        else:
            style = {"color": colours(others.index(m)), "marker": "o", "ls": "-", "ms": 5, "lw": 1.2}
        (line,) = ax.plot(xs, np.minimum(v, top), label=m, **style)
        if (v > top).any():  # diverged medians are drawn at the top of the plot
            ax.plot(xs[v > top], np.full(int((v > top).sum()), top), "^", color=line.get_color(), ms=9)
    ax.plot(xs, [float(c["floor"]) for c in summary], "k:", label="floor (exact vs exact)")
    ax.plot(xs, [float(c["ignore_y"]) for c in summary], color="0.6", ls="--", label="ignore y (prior)")
    peer = [float(c["peer"]) for c in summary]
    ax.plot(xs, peer, "kx", ms=9, mew=2, ls="none", label="best peer (research note)")
    ax.plot(xs, [0.5 * p for p in peer], "k_", ms=14, mew=2, ls="none", label="0.5 x best peer")
    ax.set_yscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("median sliced W1 to the exact posterior\n(triangles: median above the axis)")
    ax.set_title("MCGdiff Gaussian-mixture protocol, <= 100 NFE-equivalents per sample", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def parse(argv=None):
    p = argparse.ArgumentParser(description="The MCGdiff Gaussian-mixture protocol: every ds.inverse method against "
                                "the exact posterior (median sliced W1 per cell, floor, ignore-y).")
    p.add_argument("--out", default="out/inverse", help="output folder (default: out/inverse)")
    p.add_argument("--problems", type=int, default=20, help="problems per cell (default: 20)")
    p.add_argument("--problems-large", type=int, default=None,
                   help="problems per cell for d >= 800 (default: --problems)")
    p.add_argument("--dims", default="8,80,800")
    p.add_argument("--dys", default="1,2,4")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=100, help="NFE-equivalents per sample (default: 100)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--skip", default="", help="METHOD@D,...: do not run METHOD at dimensions >= D (time)")
    p.add_argument("--solver", default=DEFAULT_SOLVER)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: small tensors, and faster than 2 on a busy machine)")
    p.add_argument("--quick", action="store_true", help="smoke test: d=8, one problem per d_y, 500 samples")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.dims, a.problems, a.samples = "8", 1, 500
    return a


def main(argv=None) -> int:
    from tqdm import tqdm

    a = parse(argv)
    torch.set_num_threads(a.threads)
    dims, dys, methods = _ints(a.dims), _ints(a.dys), [m for m in a.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    skip = {}  # method -> smallest d at which it is not run
    for item in (v for v in a.skip.split(",") if v):
        m, _, dmin = item.partition("@")
        if m not in METHODS or not dmin.isdigit():
            raise SystemExit(f"--skip takes METHOD@D items (METHOD one of {', '.join(METHODS)}), got {item!r}")
        skip[m] = int(dmin)
    run = lambda d: [m for m in methods if d < skip.get(m, d + 1)]  # noqa: E731
    plan = [(d, dy, rep) for d in dims for dy in dys
            for rep in range(a.problems_large if (d >= 800 and a.problems_large is not None) else a.problems)]
    command = "python benchmarks/inverse_protocol.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(a.out, exist_ok=True)
    version = code_version()  # before the run: the code that is imported now is the code that runs
    t0 = time.perf_counter()
    rows = []
    with tqdm(total=sum(len(run(d)) for d, _, _ in plan), disable=a.no_progress, unit="run") as bar:
        for d, dy, rep in plan:
            pb = make_problem(d, dy, problem_seed(d, dy, rep))
            row = run_problem(pb, run(d), a.samples, a.nfe, a.solver, bar)
            row["problem"] = rep
            rows.append(row)
    wall = time.perf_counter() - t0
    summary = summarise(rows, methods)
    fields = ["d", "d_y", "problem", "seed", "sigma_y", "singular_values", "modes", "floor", "ignore_y"]
    fields += [f"{m}_{k}" for m in methods for k in ("sw", "sw2", "nonfinite", "nfe", "vjps", "nfe_eq", "seconds",
                                                      "error")]
    with open(os.path.join(a.out, "inverse_protocol.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in fields})
    md = markdown(rows, summary, methods, a, command, wall, version)
    with open(os.path.join(a.out, "inverse_protocol.md"), "w") as f:
        f.write(md)
    plot(summary, methods, os.path.join(a.out, "inverse_protocol.png"))
    print(md)
    print(f"wrote {a.out}/inverse_protocol.{{md,csv,png}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
