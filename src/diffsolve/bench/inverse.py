"""``diffsolve bench --inverse``: posterior samplers against the exact posterior, ours and the peers' on the same
prior, operator, measurement, start noise and budget, in one run.

Suites (a problem = a prior, an operator A [d_y, d], sigma_y and y; all drawn from one generator seeded with
10^6 d + 10^3 d_y + rep, in this order):

* ``grid`` -- the protocol of MCGdiff (Cardoso et al. 2023, arXiv:2308.07983): 25 components N(mu_ij, I_d),
  mu_ij = (-8i, -8j) repeated d/2 times (i, j in -2..2), weights w ~ N(0, 1)^2 normalised, d in {8, 80, 800};
* ``lowrank`` -- the library's low-rank mixtures ``gmm64`` / ``gmm3072`` (``reference.REFERENCES``), d in {64, 3072}.

In both, A = U diag(s) V with U, V from the SVD of a Gaussian d_y x d matrix and s = sort(U(0, 1)) descending,
sigma_y = U(0, 1) max(s), y = A x* + sigma_y n with x* from the prior, d_y in {1, 2, 4}.  The model is the exact
prior denoiser under ``VPDiscrete.linear(1000)`` (float64); every method sees only it (its x0 prediction and VJPs).

Each method draws ``samples`` samples at <= ``nfe`` NFE-equivalents per sample (a VJP through the model counts 2;
a particle method's cost per sample is its total network calls / the number of samples it returns).  Score: the
protocol's sliced Wasserstein distance (mean over 100 random directions of the 1-D W1) to as many exact posterior
samples; beside every row the Monte-Carlo floor (two exact sample sets) and the ignore-y baseline (prior samples).
``oracle`` (a reference row, not a contender) is the exact posterior denoiser under the same solver and budget.

DPS's step size is chosen per cell on a grid, on separate tuning problems (rep >= 1000), for ours and azula's.
Rows go to ``inverse_runs.jsonl`` as they finish (a rerun resumes); the end writes ``inverse_bench.{md,csv,png}``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..evaluation.distances import sliced_wasserstein
from ..inverse import Dense, ExactPosterior, LowRankPosterior
from ..inverse import sample as inverse_sample
from ..inverse.api import METHODS as LIBRARY_METHODS
from ..processes import VPDiscrete
from ..reference import REFERENCES, DenseGaussianMixture, SharedCovarianceMixture
from ..sampling import sample as run_sampler
from ..util import seeding
from . import inverse_peers as peers
from .inverse_roles import BASELINES, DPS_PEERS, PEERS, REFERENCE_ROWS, _kind, _median

Tensor = torch.Tensor
DT = torch.float64
PROCESS = VPDiscrete.linear(1000)
SUITES = {"grid": (8, 80, 800), "lowrank": (64, 3072)}
DYS = (1, 2, 4)
ORACLE_SOLVER = "dpm++2m"
ZETAS = (0.03, 0.1, 0.3, 1.0)  # DPS step sizes tried per cell (azula's: times sqrt(samples), see below)
TUNE_REP = 1000  # tuning problems are reps TUNE_REP, TUNE_REP + 1, ...
OURS = tuple(m for m in LIBRARY_METHODS if m != "oracle")
DPS_OURS = ("dps", "dps-x0")


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One problem: the measurement, the prior model the methods see, and the exact references."""

    suite: str
    d: int
    d_y: int
    rep: int
    seed: int
    op: Dense
    y: Tensor  # [d_y]
    sigma_y: float
    singular_values: Tensor
    model: Any  # the prior denoiser (the only thing a method sees)
    prior_sample: Callable[[int, torch.Generator], Tensor]
    exact_sample: Callable[[int, torch.Generator], Tensor]
    oracle: Optional[Any]  # the exact posterior denoiser (None where too large)
    modes: int  # posterior components with weight > 1e-3
    prior: Any = None
    exact: Any = None


def problem_seed(d: int, d_y: int, rep: int) -> int:
    return 1_000_000 * d + 1000 * d_y + rep


def grid_means(d: int) -> Tensor:
    """The 25 means (-8i, -8j) repeated d/2 times, i, j in {-2..2} (i the outer index)."""
    if d < 2 or d % 2:
        raise ValueError(f"the grid protocol needs an even dimension d >= 2, got {d}")
    return torch.tensor([[-8.0 * i, -8.0 * j] * (d // 2) for i in range(-2, 3) for j in range(-2, 3)], dtype=DT)


def _operator(g: torch.Generator, d: int, d_y: int) -> Tuple[Tensor, Tensor]:
    U, _, Vh = torch.linalg.svd(torch.randn(d_y, d, generator=g, dtype=DT), full_matrices=False)
    s = torch.sort(torch.rand(d_y, generator=g, dtype=DT), descending=True).values
    return U @ torch.diag(s) @ Vh, s


def grid_problem(d: int, d_y: int, rep: int) -> Problem:
    """Problem ``rep`` of cell (d, d_y) of the MCGdiff protocol (everything from one generator, in its order)."""
    if not 1 <= d_y <= d:
        raise ValueError(f"need 1 <= d_y <= d, got d_y={d_y}, d={d}")
    seed = problem_seed(d, d_y, rep)
    g = torch.Generator().manual_seed(seed)
    means = grid_means(d)
    w = torch.randn(len(means), generator=g, dtype=DT) ** 2
    w = w / w.sum()
    prior = DenseGaussianMixture(means, torch.eye(d, dtype=DT).expand(len(means), d, d), w)
    A, s = _operator(g, d, d_y)
    x_star = prior.sample(1, g)
    sigma_y = float(torch.rand(1, generator=g, dtype=DT)[0] * s.max())
    y = (x_star @ A.T + sigma_y * torch.randn(1, d_y, generator=g, dtype=DT))[0]
    op = Dense(A)
    exact = ExactPosterior(prior, op, y, sigma_y)
    # closed forms at O(B K d): the prior's covariance is I, the posterior's I - A^T (A A^T + sigma_y^2 I)^{-1} A
    prior_cf = SharedCovarianceMixture(means, prior.log_weights)
    _, S, V = op.svd()
    post_cf = SharedCovarianceMixture(exact.mixture.means, exact.mixture.log_weights, V, S**2 / (S**2 + sigma_y**2))
    modes = int((exact.mixture.log_weights.exp() > 1e-3).sum())
    return Problem("grid", d, d_y, rep, seed, op, y, sigma_y, s, prior_cf.denoiser(PROCESS), prior.sample,
                   post_cf.sample, post_cf.denoiser(PROCESS), modes, prior, exact)


def lowrank_problem(d: int, d_y: int, rep: int) -> Problem:
    """Problem ``rep`` of cell (d, d_y) on the low-rank mixture ``gmm{d}``, with the grid protocol's operators."""
    name = f"gmm{d}"
    if name not in REFERENCES:
        raise ValueError(f"no low-rank mixture of dimension {d} (known: gmm64, gmm3072)")
    prior = REFERENCES[name][1]()
    seed = problem_seed(d, d_y, rep)
    g = torch.Generator().manual_seed(seed)
    A, s = _operator(g, d, d_y)
    x_star = prior.sample(1, g).reshape(1, -1)
    sigma_y = float(torch.rand(1, generator=g, dtype=DT)[0] * s.max())
    y = (x_star @ A.T + sigma_y * torch.randn(1, d_y, generator=g, dtype=DT))[0]
    op = Dense(A)
    exact = LowRankPosterior(prior, op, y, sigma_y)
    oracle = ExactPosterior(prior, op, y, sigma_y).denoiser(PROCESS) if d <= 256 else None
    modes = int((exact.log_weights.exp() > 1e-3).sum())
    return Problem("lowrank", d, d_y, rep, seed, op, y, sigma_y, s, prior.denoiser(PROCESS), prior.sample,
                   exact.sample, oracle, modes, prior, exact)


MAKERS = {"grid": grid_problem, "lowrank": lowrank_problem}


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class InverseBenchConfig:
    """What ``diffsolve bench --inverse`` runs (see the module docstring)."""

    out: str = "out/inverse-bench"
    suites: Sequence[str] = ("grid", "lowrank")
    dims: Optional[Sequence[int]] = None  # default: every dimension of the suites
    dys: Sequence[int] = DYS
    problems: int = 20
    problems_large: Optional[int] = None  # problems per cell for d >= 800 (default: ``problems``)
    samples: int = 2000
    nfe: int = 100
    ours: Sequence[str] = OURS
    peers: Sequence[str] = tuple(PEERS)
    oracle: bool = True
    zetas: Sequence[float] = ZETAS
    tune_problems: int = 5
    tune_max_d: int = 100  # DPS is tuned in cells with d <= this; larger d reuse the largest tuned d's choice
    skip: Dict[str, int] = field(default_factory=dict)  # method -> the smallest d at which it is not run (time)
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # method -> options (ours)
    threads: int = 1
    progress: bool = True
    command: str = ""


def _cells(cfg: InverseBenchConfig) -> List[Tuple[str, int, int]]:
    out = []
    for suite in cfg.suites:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
        dims = [d for d in (cfg.dims or SUITES[suite]) if d in SUITES[suite]]
        out += [(suite, d, dy) for d in dims for dy in cfg.dys]
    if not out:
        raise ValueError("no cell to run: the dimensions match no suite")
    return out


def _reps(cfg: InverseBenchConfig, d: int) -> int:
    return cfg.problems_large if (d >= 800 and cfg.problems_large is not None) else cfg.problems


def sw(a: Tensor, b: Tensor, p: int = 1) -> float:
    """The protocol's distance (p=1: mean over 100 directions of the 1-D W1); NaN when a has non-finite rows."""
    a = a.reshape(a.shape[0], -1)
    if not torch.isfinite(a).all():
        return float("nan")
    return sliced_wasserstein(a, b.reshape(b.shape[0], -1), directions=100, p=p)


def run_method(pb: Problem, method: str, n: int, nfe: int, options: Dict[str, Any]) -> Tuple[Optional[Tensor],
                                                                                            Dict[str, Any]]:
    """One row: (samples or None, cost and error).  ``method``: one of ours (library name), a peer (``PEERS``) or
    'oracle'."""
    seeds = [pb.seed * 10_000 + i for i in range(n)]
    t0 = time.perf_counter()
    cost: Dict[str, Any] = {"nfe": "", "vjps": "", "nfe_eq": ""}
    try:
        if method == "oracle":
            if pb.oracle is None:
                raise ValueError("no exact posterior denoiser at this size")
            noise = seeding.noise(seeds, pb.op.in_shape)
            x, si = run_sampler(pb.oracle, noise, ORACLE_SOLVER, nfe=nfe, return_info=True)
            cost = {"nfe": si.nfe, "vjps": 0, "nfe_eq": float(si.nfe)}
        elif method in PEERS:
            kind, base = PEERS[method]
            opts = {**base, **options}
            x_T = PROCESS.prior_from_noise(seeding.noise(seeds, pb.op.in_shape))
            if kind.startswith("azula:"):
                x, c = peers._azula_run(kind.split(":")[1], pb.model, pb.op, pb.y, pb.sigma_y, x_T, nfe, pb.seed, opts)
                cost = {"nfe": c.nfe, "vjps": c.vjps, "nfe_eq": c.nfe + peers.VJP_COST * c.vjps}
            elif kind == "paper:mcgdiff":
                x, c = peers.mcgdiff_paper(pb.model, pb.op, pb.y, pb.sigma_y, x_T, nfe,
                                           torch.Generator().manual_seed(pb.seed), **opts)
                cost = {"nfe": c.nfe, "vjps": 0, "nfe_eq": float(c.nfe)}
            else:  # the library's implementation of the paper's equations
                x, info = inverse_sample(pb.model, pb.op, pb.y, pb.sigma_y, method=kind.split(":")[1], nfe=nfe, n=n,
                                         seeds=seeds, **opts)
                cost = {"nfe": info.nfe, "vjps": info.vjps, "nfe_eq": info.nfe_equivalents}
        else:
            x, info = inverse_sample(pb.model, pb.op, pb.y, pb.sigma_y, method=method, nfe=nfe, n=n, seeds=seeds,
                                     **options)
            cost = {"nfe": info.nfe, "vjps": info.vjps, "nfe_eq": info.nfe_equivalents}
        err = ""
    except Exception as e:  # a method that breaks is reported, not hidden
        x, err = None, f"{type(e).__name__}: {e}".replace("\n", " ")
    return x, {**cost, "seconds": round(time.perf_counter() - t0, 3), "error": err}


# ----------------------------------------------------------------------------------------------------------------
class RunStore:
    """The rows of a run, appended to a JSON-lines file as they finish (fsync'd), so a rerun skips what is done."""

    def __init__(self, path: str):
        self.path = path
        self.rows: Dict[str, Dict[str, Any]] = {}
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # a torn last line of an interrupted run
                        continue
                    self.rows[r["key"]] = r

    @staticmethod
    def key(phase: str, pb: Problem, method: str, options: Dict[str, Any]) -> str:
        opts = ",".join(f"{k}={options[k]}" for k in sorted(options))
        return f"{phase}|{pb.suite}|{pb.d}|{pb.d_y}|{pb.rep}|{method}|{opts}"

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: Dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _row(phase: str, pb: Problem, method: str, options: Dict[str, Any], x: Optional[Tensor], ref: Tensor,
         cost: Dict[str, Any], n: int) -> Dict[str, Any]:
    bad = -1 if x is None else int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum())
    return {"key": RunStore.key(phase, pb, method, options), "phase": phase, "suite": pb.suite, "d": pb.d,
            "d_y": pb.d_y, "rep": pb.rep, "seed": pb.seed, "sigma_y": pb.sigma_y,
            "singular_values": ";".join(f"{v:.4f}" for v in pb.singular_values.tolist()), "modes": pb.modes,
            "method": method, "kind": _kind(method), "options": json.dumps(options, sort_keys=True),
            "sw": float("nan") if x is None else sw(x, ref), "sw2": float("nan") if x is None else sw(x, ref, 2),
            "nonfinite": bad, "samples": n, **cost}


def _reference(pb: Problem, n: int) -> Tensor:
    return pb.exact_sample(n, torch.Generator().manual_seed(pb.seed * 8 + 1)).reshape(n, -1)


def _baselines(pb: Problem, n: int, ref: Tensor) -> Dict[str, Tensor]:
    g = lambda k: torch.Generator().manual_seed(pb.seed * 8 + k)  # noqa: E731
    return {"floor": pb.exact_sample(n, g(2)).reshape(n, -1), "ignore-y": pb.prior_sample(n, g(3)).reshape(n, -1)}


def tune_dps(cfg: InverseBenchConfig, store: RunStore, bar=None) -> Dict[Tuple[str, int, int, str], float]:
    """The DPS step size per cell and DPS method (ours and azula's): the lowest median SW over ``cfg.zetas`` on
    ``cfg.tune_problems`` tuning problems.  azula normalises by the residual norm of the whole batch, so its grid
    is ``zetas`` x sqrt(samples) (the same per-sample step for a batch of equal residuals)."""
    methods = [m for m in DPS_OURS if m in cfg.ours] + [m for m in DPS_PEERS if m in cfg.peers]
    chosen: Dict[Tuple[str, int, int, str], float] = {}
    if not methods or cfg.tune_problems < 1:
        return chosen
    cells = _cells(cfg)
    for suite, d, dy in _tuned_cells(cfg):
        med: Dict[Tuple[str, float], List[float]] = {}
        for rep in range(TUNE_REP, TUNE_REP + cfg.tune_problems):
            pb = MAKERS[suite](d, dy, rep)
            ref = None
            for m in methods:
                for z in cfg.zetas:
                    zeta = z * math.sqrt(cfg.samples) if m in DPS_PEERS else z
                    opts = {"zeta": zeta}
                    k = RunStore.key("tune", pb, m, opts)
                    if k not in store:
                        ref = _reference(pb, cfg.samples) if ref is None else ref
                        x, cost = run_method(pb, m, cfg.samples, cfg.nfe, opts)
                        store.add(_row("tune", pb, m, opts, x, ref, cost, cfg.samples))
                    med.setdefault((m, z), []).append(float(store.rows[k]["sw"]))
                    if bar is not None:
                        bar.update(1)
        for m in methods:
            scores = {z: _median(med[(m, z)]) for z in cfg.zetas}
            finite = {z: v for z, v in scores.items() if not math.isnan(v)}
            best = min(finite, key=finite.get) if finite else cfg.zetas[0]  # type: ignore[arg-type]
            chosen[(suite, d, dy, m)] = best * math.sqrt(cfg.samples) if m in DPS_PEERS else best
    for suite, d, dy in cells:  # larger cells: the choice of the largest tuned d of the suite, same d_y
        tuned = [dd for s_, dd, y_ in _tuned_cells(cfg) if s_ == suite and y_ == dy]
        for m in methods:
            if (suite, d, dy, m) not in chosen and tuned:
                chosen[(suite, d, dy, m)] = chosen[(suite, max(tuned), dy, m)]
    return chosen


def _tuned_cells(cfg: InverseBenchConfig) -> List[Tuple[str, int, int]]:
    cells = _cells(cfg)
    out = [c for c in cells if c[1] <= cfg.tune_max_d]
    for suite, d, dy in cells:  # a suite with only large cells tunes its smallest
        if not any(c[0] == suite for c in out):
            out += [c for c in cells if c[0] == suite and c[1] == min(cc[1] for cc in cells if cc[0] == suite)]
    return sorted(set(out))


def inverse_bench(cfg: InverseBenchConfig) -> Dict[str, Any]:
    """Run (or resume) the benchmark of ``cfg`` and write its report; returns {'rows', 'summary', 'files', ...}."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    unknown = [m for m in cfg.ours if m not in OURS] + [m for m in cfg.peers if m not in PEERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; ours: {', '.join(OURS)}; peers: {', '.join(PEERS)}")
    azula_peers = [m for m in cfg.peers if PEERS[m][0].startswith("azula:")]
    skipped: List[str] = []
    peer_list = list(cfg.peers)
    if azula_peers and not peers.azula_available():
        skipped = azula_peers
        peer_list = [m for m in peer_list if m not in azula_peers]
    cfg.peers = tuple(peer_list)
    cells = _cells(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    store = RunStore(os.path.join(cfg.out, "inverse_runs.jsonl"))
    methods = (list(REFERENCE_ROWS) if cfg.oracle else []) + list(cfg.ours) + list(cfg.peers)
    run_at = lambda d: [m for m in methods if d < cfg.skip.get(m, d + 1)]  # noqa: E731
    n_tune = (sum(1 for m in DPS_OURS if m in cfg.ours) + sum(1 for m in DPS_PEERS if m in cfg.peers)) * \
        len(cfg.zetas) * cfg.tune_problems * len(_tuned_cells(cfg))
    total = n_tune + sum(_reps(cfg, d) * len(run_at(d)) for _, d, _ in cells)
    t0 = time.perf_counter()
    with tqdm(total=total, disable=not cfg.progress, unit="run", desc="bench --inverse") as bar:
        zetas = tune_dps(cfg, store, bar)
        for suite, d, dy in cells:
            for rep in range(_reps(cfg, d)):
                pb = MAKERS[suite](d, dy, rep)
                ref = None
                for m in list(BASELINES) + run_at(d):
                    opts = dict(cfg.options.get(m, {}))
                    if (suite, d, dy, m) in zetas:
                        opts["zeta"] = zetas[(suite, d, dy, m)]
                    k = RunStore.key("run", pb, m, opts)
                    if k in store:
                        bar.update(m not in BASELINES)
                        continue
                    ref = _reference(pb, cfg.samples) if ref is None else ref
                    bar.set_postfix_str(f"{suite} d={d} d_y={dy} #{rep} {m}")
                    if m in BASELINES:
                        x, cost = _baselines(pb, cfg.samples, ref)[m], {"nfe": 0, "vjps": 0, "nfe_eq": 0.0,
                                                                         "seconds": 0.0, "error": ""}
                    else:
                        x, cost = run_method(pb, m, cfg.samples, cfg.nfe, opts)
                    store.add(_row("run", pb, m, opts, x, ref, cost, cfg.samples))
                    bar.update(m not in BASELINES)
    rows = [r for r in store.rows.values() if r["phase"] == "run" and (r["suite"], r["d"], r["d_y"]) in set(cells)
            and r["rep"] < _reps(cfg, r["d"]) and (r["method"] in methods or r["method"] in BASELINES)]
    tune_rows = [r for r in store.rows.values() if r["phase"] == "tune" and (r["suite"], r["d"], r["d_y"]) in
                 set(cells) and TUNE_REP <= r["rep"] < TUNE_REP + cfg.tune_problems]
    summary = summarise(rows, methods, cells)
    meta = {"command": cfg.command, "wall_s": time.perf_counter() - t0, "skipped": skipped, "skip": dict(cfg.skip),
            "zetas": {
        f"{s}/{d}/{dy}/{m}": z for (s, d, dy, m), z in zetas.items()}, "torch": torch.__version__,
        "threads": cfg.threads, "samples": cfg.samples, "nfe": cfg.nfe, "version": _version()}
    from . import inverse_report as report

    files = report.write(cfg, rows, tune_rows, summary, methods, meta)
    return {"rows": rows, "tune_rows": tune_rows, "summary": summary, "files": files, "meta": meta}


def summarise(rows: List[Dict[str, Any]], methods: Sequence[str], cells: Sequence[Tuple[str, int, int]]
              ) -> List[Dict[str, Any]]:
    """Per cell: the median SW of every method and baseline, NaN counts, our best and the best peer."""
    out = []
    for suite, d, dy in cells:
        rs = [r for r in rows if (r["suite"], r["d"], r["d_y"]) == (suite, d, dy)]
        c: Dict[str, Any] = {"suite": suite, "d": d, "d_y": dy, "n": len({r["rep"] for r in rs}), "median": {},
                             "nan": {}, "mean": {}}
        for m in list(BASELINES) + list(methods):
            v = [float(r["sw"]) for r in rs if r["method"] == m]
            if not v:
                continue
            c["median"][m] = _median(v)
            c["nan"][m] = sum(math.isnan(x) for x in v)
            fin = [x for x in v if not math.isnan(x)]
            c["mean"][m] = (float(np.mean(fin)), 1.96 * float(np.std(fin, ddof=1)) / math.sqrt(len(fin))
                            if len(fin) > 1 else float("nan")) if fin else (float("nan"), float("nan"))
        for who in ("ours", "peer"):
            cand = [(v, m) for m, v in c["median"].items() if _kind(m) == who and not math.isnan(v)]
            c[f"best_{who}"] = min(cand) if cand else (float("nan"), "")
        o, p = c["best_ours"][0], c["best_peer"][0]
        c["ratio"] = o / p if p and not math.isnan(p) and p > 0 else float("nan")
        out.append(c)
    return out


def _version() -> str:
    import subprocess

    where = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                           cwd=where)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------------
def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsolve bench --inverse", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/inverse-bench", help="output folder (default: %(default)s)")
    p.add_argument("--suites", default="grid,lowrank", help="grid (the MCGdiff protocol) and/or lowrank")
    p.add_argument("--dims", default=None, help="dimensions to run (default: 8,80,800 for grid, 64,3072 for lowrank)")
    p.add_argument("--dys", default="1,2,4")
    p.add_argument("--problems", type=int, default=20, help="problems per cell (default: %(default)s)")
    p.add_argument("--problems-large", type=int, default=None, help="problems per cell for d >= 800")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--nfe", type=int, default=100, help="NFE-equivalents per sample (default: %(default)s)")
    p.add_argument("--ours", default=",".join(OURS), help="our methods (default: all of ds.inverse but the oracle)")
    p.add_argument("--peers", default=",".join(PEERS), help="peer rows (default: all)")
    p.add_argument("--no-oracle", action="store_true", help="leave out the exact-posterior oracle row")
    p.add_argument("--zetas", default=",".join(map(str, ZETAS)), help="DPS step sizes tried per cell")
    p.add_argument("--tune-problems", type=int, default=5, help="tuning problems per cell for DPS (default: 5)")
    p.add_argument("--tune-max-d", type=int, default=100,
                   help="tune DPS in cells with d <= this; larger cells reuse the choice (default: 100)")
    p.add_argument("--skip", default="", help="METHOD@D,...: do not run METHOD at dimensions >= D (time)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an option of one of our methods, repeatable (e.g. mcgdiff:oversample=2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: d=8 of the grid suite, 2 problems, 500 samples")
    p.add_argument("--no-progress", action="store_true")
    return p


def _parse_options(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        m, _, kv = item.partition(":")
        k, eq, v = kv.partition("=")
        if not (m and k and eq):
            raise ValueError(f"--option takes METHOD:KEY=VALUE, got {item!r}")
        try:
            val: Any = json.loads(v)
        except json.JSONDecodeError:
            val = v
        out.setdefault(m, {})[k] = val
    return out


def _parse_skip(text: str) -> Dict[str, int]:
    out = {}
    for item in (v for v in text.split(",") if v):
        m, _, dmin = item.partition("@")
        if not (m and dmin.isdigit()):
            raise ValueError(f"--skip takes METHOD@D items, got {item!r}")
        out[m] = int(dmin)
    return out


def config_from_args(a: argparse.Namespace, command: str = "") -> InverseBenchConfig:
    cfg = InverseBenchConfig(
        out=a.out, suites=[s for s in a.suites.split(",") if s], dims=_ints(a.dims) if a.dims else None,
        dys=_ints(a.dys), problems=a.problems, problems_large=a.problems_large, samples=a.samples, nfe=a.nfe,
        ours=[m for m in a.ours.split(",") if m], peers=[m for m in a.peers.split(",") if m], oracle=not a.no_oracle,
        zetas=[float(v) for v in a.zetas.split(",") if v], tune_problems=a.tune_problems,
        options=_parse_options(a.option), threads=a.threads, progress=not a.no_progress, command=command,
        tune_max_d=a.tune_max_d, skip=_parse_skip(a.skip))
    if a.quick:
        cfg.suites, cfg.dims, cfg.problems, cfg.samples, cfg.tune_problems = ["grid"], [8], 2, 500, 1
    if cfg.samples < 2 or cfg.problems < 1 or cfg.nfe < 1:
        raise ValueError("need --samples >= 2, --problems >= 1 and --nfe >= 1")
    _cells(cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a, "diffsolve bench --inverse " + " ".join(argv))
        res = inverse_bench(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .inverse_report import summary_text

    print(summary_text(res["summary"]))
    print("wrote " + ", ".join(res["files"].values()))
    return 0
