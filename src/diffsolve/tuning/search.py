"""``ds.tune``: fit a sampler to one frozen model at each NFE budget, and the profile file that keeps it.

For every NFE budget the tuner chooses a (solver, time grid, last step, solver options) on **calibration
noise** by its RMSE against a **teacher** -- a high-NFE solution of the *same* model (``dpm++3m`` with 100
NFE on a log-SNR grid by default), or, for the exact Gaussian-mixture reference, the exact probability-flow
ODE solution (``teacher=GaussianMixture``) -- and then reports the error of the choice on **evaluation
noise** drawn from seeds disjoint from the calibration seeds.  Everything it found goes into one small
profile: ``<out>.json`` (the choices, the errors, the model's fingerprint, process, guidance scale, data
shape, the teacher and the seeds) and ``<out>.safetensors`` (the fingerprint probe and, when DPM-Solver-v3
was tuned, its model statistics).  ``ds.sample(den, noise, profile=path, nfe=n)`` then samples with the
profile's entry for ``n``; a profile is refused, with a clear error, by another model, another process,
another guidance scale or another data shape, and when its files are corrupted.

What is searched, per NFE budget (``method``):

* ``'v3'``: DPM-Solver-v3 with empirical model statistics of this model (``tuning.statistics.compute_statistics`` on
  ``data``), ``'grids'``: the statistics-free multistep solvers (UniPC-bh2, DPM-Solver++(3M)),
  ``'auto'`` (default): both (v3 only when statistics can be had).
* the grids: the named spacings (log-SNR, quadratic, Karras, five-step) with both last-step rules, and a
  two-parameter family -- ``n`` evaluations power-spaced in log-SNR from the start up to a free end point
  ``u_end``, then one last step to ``t_min`` -- scanned on a coarse (u_end, warp) lattice; the best point is
  refined by a pattern search, then the solver options are tried on it (v3: pseudo-order predictor and
  corrector on/off; UniPC: order 2/3), then an evolutionary search over the free time points
  (AutoDiffusion-style, the moves of ``schedules.evolve``) polishes it until the NFE's time share is spent.
* screening and refining run on a subset of the calibration noise when the full set is too expensive; the
  final choice is made on the *whole* calibration set among the best few candidates, the library default
  (``dpm++2m``, log-SNR, denoise) and the best named-spacing configuration, so the tuned error on
  calibration is never above the starting configuration's.

Time: ``time_budget_s`` (default 270 s) bounds the whole run.  The calibration size, the statistics' K and
lambda points, the screening subset and the search length are derived from the measured cost of one network
evaluation, and every search stops early with the best so far when its share is spent (a slow or loaded
machine gives a shorter search, never a longer run).  Progress is shown with tqdm.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters import identity
from ..adapters.denoiser import Model as Denoiser
from ..evaluation.teacher import TeacherSpec, make_teacher
from ..grids import explicit, from_unit, make_grid, validate_times
from ..reference import GaussianMixture
from ..sampling import sample
from ..solvers import get_solver
from ..solvers.dpm_v3_stats import Statistics
from ..util import seeding
from .evolution import evolve_points, free_points, grid_times
from .grid_search import steps_for_nfe
from .profile import DT, Entry, PathLike, Profile, fmt
from .statistics import compute_statistics

Tensor = torch.Tensor
DEFAULT_NFES = (5, 6, 8, 10)
DEFAULT_START = ("dpm++2m", "logsnr", "denoise")  # what ds.sample does without options
GENERIC_SOLVERS = ("unipc-bh2", "dpm++3m")
NAMED_SPACINGS = ("logsnr", "uniform", "quadratic", "karras", "five-step")
#: below this many data points the statistics are too noisy to help (method 'auto' then skips DPM-Solver-v3)
MIN_AUTO_K = 256

# ----------------------------------------------------------------------------------------
# noise, teacher, sets
# ----------------------------------------------------------------------------------------
def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """Standard normal noise [len(seeds), *shape] (float64) by the library's one seeding convention
    (``diffsolve.util.seeding.noise``): sample i depends on ``seeds[i]`` alone, whatever the batch."""
    return seeding.noise(seeds, shape)


def _seed_list(seeds: Union[int, Sequence[int], range, None], default_start: int, default_n: int) -> List[int]:
    if seeds is None:
        seeds = default_n
    if isinstance(seeds, bool):
        raise ValueError("seeds must be a count or a sequence of integers")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"need at least one seed, got {seeds}")
        return list(range(default_start, default_start + seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("empty seed list")
    if len(set(out)) != len(out):
        raise ValueError("seed list has duplicates")
    return out


def _compact_seeds(seeds: Sequence[int]) -> Any:
    s = list(seeds)
    if s and s == list(range(s[0], s[0] + len(s))):
        return {"start": s[0], "count": len(s)}
    return s


class _Set:
    """Noise with its teacher targets; ``err(x, final)`` -> per-sample mean squared error."""

    def __init__(self, noise: Tensor, at_t_min: Tensor, denoised: Tensor):
        self.noise, self.tmin, self.den = noise, at_t_min, denoised

    @classmethod
    def of(cls, noise: Tensor, targets: Any) -> "_Set":
        return cls(noise, targets.at_t_min, targets.denoised)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def subset(self, n: int) -> "_Set":
        return _Set(self.noise[:n], self.tmin[:n], self.den[:n])

    def err(self, x: Tensor, final: str) -> Tensor:
        tgt = self.den if final == "denoise" else self.tmin
        return ((x.to(DT) - tgt) ** 2).flatten(1).mean(1)


def _objective(d2: Tensor, metric: str) -> float:
    if metric == "rmse":
        v = float(d2.mean().sqrt())
    elif metric == "median":
        v = float(d2.median().sqrt())
    elif metric == "trimmed":  # drop the worst 1%
        k = max(1, int(math.ceil(0.99 * d2.numel())))
        v = float(d2.sort()[0][:k].mean().sqrt())
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'rmse', 'trimmed' or 'median'")
    return v if math.isfinite(v) else math.inf


# ----------------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    solver: str
    t: Tensor
    final: str
    options: Dict[str, Any]
    label: str

    @property
    def key(self) -> tuple:
        return (self.solver, self.final, tuple(sorted(self.options.items())), tuple(np.round(self.t.numpy(), 9)))

    def with_(self, **kw) -> "Candidate":
        d = dict(solver=self.solver, t=self.t, final=self.final, options=self.options, label=self.label)
        d.update(kw)
        return Candidate(**d)


def _n_points(solver: str, nfe: int, final: str) -> Tuple[int, int]:
    """(grid points, NFE used) of the largest grid of ``solver`` within ``nfe``."""
    steps, used = steps_for_nfe(solver, nfe, final == "denoise")
    return (steps if final == "denoise" else steps + 1), used


def family_times(process, nfe: int, u_end: float, warp: float, final: str = "t_min", solver: str = "dpm-v3") -> Tensor:
    """The tuner's grid family: the evaluated points power-spaced in normalised log-SNR u (0 = t_max,
    1 = t_min), u_i = u_end (i / (n-1))^warp, then (``final='t_min'``) one last step to t_min."""
    n_pts, _ = _n_points(solver, nfe, final)
    n_eval = n_pts if final == "denoise" else n_pts - 1
    if n_eval < 1:
        raise ValueError("no evaluation fits the budget")
    hi = 1.0 if final == "denoise" else 1.0 - 1e-3
    u_end = float(min(max(u_end, 1e-3 * n_eval), hi))
    u = u_end * (np.arange(n_eval) / max(n_eval - 1, 1)) ** float(warp) if n_eval > 1 else np.zeros(1)
    if final == "t_min":
        u = np.concatenate([u, [1.0]])
    return from_unit(process, torch.from_numpy(u), fix_last=True)


def _named(process, solver: str, nfe: int, spacing: str, final: str) -> Candidate:
    n_pts, _ = _n_points(solver, nfe, final)
    t = make_grid(process, n_pts, spacing, "t_min").t
    return Candidate(solver, t, final, {}, f"{spacing}/{final}")


# ----------------------------------------------------------------------------------------
# the tuner
# ----------------------------------------------------------------------------------------
class _Clock:
    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.budget = float(budget)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


class _Runner:
    """Runs candidates on noise in chunks of ``batch``, and models the cost of a run as
    ``a * nfe + b * n * nfe`` (a: the solver's per-step set-up, e.g. DPM-Solver-v3's coefficients for a new grid;
    b: the network per sample), fitted to the runs so far."""

    def __init__(self, den: Denoiser, batch: int, kwargs: Dict[str, Any], stats: Optional[Statistics]):
        self.den, self.batch, self.kwargs, self.stats = den, batch, kwargs, stats
        self.tau = None  # seconds per (sample x NFE) of the network, measured before the first run
        self.log: List[Tuple[int, int, float]] = []
        self.runs = 0

    def options(self, c: Candidate) -> Dict[str, Any]:
        o = dict(c.options)
        if c.solver == "dpm-v3":
            o.update(stats=self.stats, check_stats=False)
        return o

    def run(self, c: Candidate, noise: Tensor, nfe: int) -> Optional[Tensor]:

        grid = explicit(self.den.process, t=c.t, final=c.final)
        opts = self.options(c)
        t0 = time.perf_counter()
        outs = []
        try:
            for i in range(0, noise.shape[0], self.batch):
                outs.append(sample(self.den, noise[i:i + self.batch], c.solver, grid=grid, nfe=nfe,
                                   model_kwargs=self.kwargs, **opts).to(DT))
        except (ValueError, RuntimeError):  # a grid or setting the solver cannot run (non-finite, ...)
            return None
        self.log = (self.log + [(nfe, noise.shape[0], time.perf_counter() - t0)])[-60:]
        self.runs += 1
        return torch.cat(outs)

    def coefficients(self) -> Tuple[float, float]:
        b0 = self.tau or 1e-3
        if len(self.log) < 4 or len({n for _, n, _ in self.log}) < 2:
            return 0.0, b0
        A = np.array([[f, f * n] for f, n, _ in self.log], dtype=float)
        y = np.array([t for _, _, t in self.log])
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        if b <= 0 or a < 0:
            return max(0.0, float(np.median(y / A[:, 0]) - b0 * np.median(A[:, 1] / A[:, 0]))), b0
        return float(a), float(b)

    def cost(self, n: int, nfe: int) -> float:
        a, b = self.coefficients()
        return a * nfe + b * n * nfe


class _Search:
    """All evaluations of one NFE budget on the current working set, cached with their per-sample squared errors,
    and two objectives computed from them:

    * ``'rmse'``: the RMSE; on a stratified working set the weighted estimate of the full calibration set's RMSE.
    * ``'bulk'``: the trimmed RMSE of the working set's random part (its worst ``trim`` fraction dropped): the
      accuracy of the typical sample, blind to the rare samples that a small error sends to another mode.

    ``score_full`` scores a candidate on the whole calibration set (the finalists)."""

    def __init__(self, runner: _Runner, full: _Set, nfe: int, metric: str, trim: float = 0.02):
        self.runner, self.full, self.nfe, self.metric, self.trim = runner, full, nfe, metric, trim
        self.work, self.weights, self.random_part = full, None, None
        self.d2: Dict[tuple, Optional[Tensor]] = {}
        self.cands: Dict[tuple, Candidate] = {}
        self.full_scores: Dict[tuple, Tuple[float, Optional[Tensor], Candidate]] = {}
        self.evaluations = 0
        self.previous: Dict[str, List[Tuple[float, Candidate]]] = {"rmse": [], "bulk": []}

    @property
    def work_is_full(self) -> bool:
        return self.work is self.full

    def set_work(self, work: _Set, weights: Optional[Tensor] = None, random_part: Optional[Tensor] = None) -> None:
        """Score on ``work`` from now on (``weights``: per-sample weights of the 'rmse' estimate;
        ``random_part``: mask of the samples the 'bulk' objective uses).  Earlier rankings stay in ``previous``."""
        for obj in ("rmse", "bulk"):
            self.previous[obj] = self.ranked(obj) + self.previous[obj]
        self.work, self.weights, self.random_part = work, weights, random_part
        self.d2, self.cands = {}, {}

    def value(self, key: tuple, obj: str) -> float:
        d2 = self.d2.get(key)
        if d2 is None:
            return math.inf
        if obj == "bulk":
            part = d2 if self.random_part is None else d2[self.random_part]
            k = max(1, int(math.ceil((1 - self.trim) * part.numel())))
            v = float(part.sort()[0][:k].mean().sqrt())
        elif self.weights is not None and self.metric == "rmse":
            v = float(((self.weights * d2).sum() / self.weights.sum()).sqrt())
        else:
            v = _objective(d2, self.metric)
        return v if math.isfinite(v) else math.inf

    def _run(self, c: Candidate, s: _Set) -> Optional[Tensor]:
        try:
            validate_times(self.runner.den.process, c.t)
            x = self.runner.run(c, s.noise, self.nfe)
        except ValueError:
            x = None
        self.evaluations += 1
        if x is None:
            return None
        d2 = s.err(x, c.final)
        return d2 if torch.isfinite(d2).all() else None

    def score(self, c: Candidate, obj: str = "rmse") -> float:
        if c.key not in self.d2:
            if self.work_is_full and c.key in self.full_scores:
                self.d2[c.key] = self.full_scores[c.key][1]
            else:
                self.d2[c.key] = self._run(c, self.work)
            self.cands[c.key] = c
            if self.work_is_full and c.key not in self.full_scores:
                d2 = self.d2[c.key]
                self.full_scores[c.key] = (math.inf if d2 is None else _objective(d2, self.metric), d2, c)
        return self.value(c.key, obj)

    def score_full(self, c: Candidate) -> Tuple[float, Optional[Tensor]]:
        """RMSE (``metric``) and per-sample squared errors on the whole calibration set."""
        hit = self.full_scores.get(c.key)
        if hit is None:
            d2 = self._run(c, self.full)
            hit = (math.inf if d2 is None else _objective(d2, self.metric), d2, c)
            self.full_scores[c.key] = hit
            if self.work_is_full:
                self.d2[c.key], self.cands[c.key] = d2, c
        return hit[0], hit[1]

    def ranked(self, obj: str = "rmse") -> List[Tuple[float, Candidate]]:
        return sorted(((self.value(k, obj), c) for k, c in self.cands.items()), key=lambda r: r[0])

    def ranked_all(self, obj: str = "rmse") -> List[Tuple[float, Candidate]]:
        """This working set's ranking, then the earlier working sets' (for candidates not scored here)."""
        now = self.ranked(obj)
        return now + [r for r in self.previous[obj] if r[1].key not in self.cands]

    def best(self, obj: str = "rmse") -> Tuple[float, Optional[Candidate]]:
        r = self.ranked(obj)
        return r[0] if r else (math.inf, None)


def _group(c: Candidate) -> str:
    """A candidate's structural group (for diverse finalists): solver, last step, origin of its grid."""
    lab = c.label.split(" +evolve")[0]
    if "family(" in lab:
        ue, w = _parse_family(lab)
        return f"{c.solver} family u_end~{round(ue * 20) / 20:.2f}{' +evolve' if '+evolve' in c.label else ''}"
    return f"{c.solver} {lab.split(' ')[1] if ' ' in lab else lab}"


def _diverse(ranked: List[Tuple[float, Candidate]], k: int, exclude: set) -> List[Candidate]:
    """Up to k candidates, best first, at most one per group and none in ``exclude`` (nor the default)."""
    out, groups, excl = [], set(), set(exclude)
    for v, c in ranked:
        if len(out) >= k:
            break
        g = _group(c)
        if not math.isfinite(v) or g in groups or c.key in excl or c.label == "default":
            continue
        out.append(c)
        groups.add(g)
        excl.add(c.key)
    return out


def _option_variants(solver: str) -> List[Dict[str, Any]]:
    if solver == "dpm-v3":
        return [{"predictor_pseudo": p, "corrector": c} for p in (False, True) for c in (True, False)]
    if solver == "unipc-bh2":
        return [{"order": 3}]
    return []


def tune(den: Denoiser, nfes: Sequence[int] = DEFAULT_NFES, method: str = "auto", *,
         calib_seeds: Union[int, Sequence[int], None] = None, eval_seeds: Union[int, Sequence[int], None] = None,
         data: Any = None, stats: Optional[Statistics] = None, shape: Optional[Sequence[int]] = None,
         teacher: TeacherSpec = "auto", eval_teacher: TeacherSpec = None,
         time_budget_s: float = 270.0, out: Optional[PathLike] = None, metric: str = "rmse",
         solvers: Optional[Sequence[str]] = None, stats_K: Optional[int] = None,
         stats_n_lambda: Optional[int] = None, batch_size: Optional[int] = None,
         model_kwargs: Optional[Dict[str, Any]] = None, seed: int = 0, progress: bool = True,
         log: Optional[Callable[[str], None]] = None) -> Profile:
    """Tune a sampler of ``den`` for each NFE budget in ``nfes`` and return (and with ``out``, write) a Profile.

    Args:
        den: the frozen model (``ds.Denoiser``).
        nfes: NFE budgets; one profile entry each (exactly that many network evaluations).
        method: 'auto' (DPM-Solver-v3 with statistics when ``data``/``stats`` allow, and the statistics-free
            solvers), 'v3' (DPM-Solver-v3 only) or 'grids' (statistics-free solvers only).
        calib_seeds: calibration noise: a count (seeds 1_000_000, 1_000_001, ...) or explicit seeds; default: as
            many as the time budget allows (128..2048).  One generator per sample (``seeded_noise``).
        eval_seeds: evaluation noise, a count (seeds 0, 1, ...) or explicit seeds; must be disjoint from
            ``calib_seeds``; default 256 (128 for a model too slow to give 256 teacher targets in 10% of the budget).  Only used to report the tuned error, never to choose.
        data: clean samples for the v3 statistics ([N, *shape] tensor, a callable ``(n, generator)``, or a
            ``GaussianMixture`` to sample from); ``None``: draw them from the model itself (dpm++3m, 50 NFE);
            ``False``: no statistics (method 'auto' then tunes the statistics-free solvers only).
        stats: precomputed ``dpm_v3.Statistics`` of this model (skips computing them).
        shape: the data shape (default: ``den.sample_shape``, the data's, or the mixture's).
        teacher: calibration targets: 'auto' / 'dpm++3m:100' (a high-NFE solution of the same model), a
            'solver:nfe' string, 'exact' with a GaussianMixture ``data``, or a ``GaussianMixture`` (exact ODE).
        eval_teacher: evaluation targets (default: the same teacher).
        time_budget_s: wall-clock budget of the whole run (sizes and search lengths adapt to it).
        out: write the profile there (``.json`` + ``.safetensors``).
        metric: the calibration objective: 'rmse' (default; the reported error), 'trimmed' (worst 1% of the
            samples dropped) or 'median' (median per-sample RMSE).
        solvers: the statistics-free solvers to consider (default unipc-bh2, dpm++3m).
        stats_K / stats_n_lambda: v3 statistics size (default: by the time budget, K 128..1024).
        batch_size: network batch (default: the fastest per sample, measured).
        model_kwargs: fixed network keyword arguments (e.g. a class label for every sample).
    """
    if method not in ("auto", "v3", "grids"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'v3' or 'grids'")
    if not isinstance(den, Denoiser):
        raise TypeError("den must be a diffsolve.Denoiser")
    nfes = sorted({int(n) for n in nfes})
    if not nfes or nfes[0] < 2:
        raise ValueError(f"NFE budgets must be integers >= 2, got {nfes}")
    clock = _Clock(time_budget_s)
    say = log or (lambda m: None)
    kwargs = dict(model_kwargs or {})
    proc = den.process
    ref = data if isinstance(data, GaussianMixture) else None
    if shape is None:
        shape = getattr(den, "sample_shape", None) or (ref.shape if ref is not None else None)
        if shape is None and isinstance(data, Tensor):
            shape = tuple(data.shape[1:])
        if shape is None and stats is not None and stats.shape:
            shape = stats.shape
        if shape is None:
            raise ValueError("tune needs the data shape: pass shape= (or data, or set den.sample_shape)")
    shape = tuple(int(s) for s in shape)
    teach = make_teacher(teacher, den, ref)
    eteach = teach if eval_teacher is None else make_teacher(eval_teacher, den, ref)
    old_nfe = getattr(den, "nfe", None)

    from tqdm.auto import tqdm

    def bar(total, desc, unit="it"):
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, dynamic_ncols=True)

    # 1. fingerprint and the cost of one evaluation
    lo, hi = proc.lam_range
    probe_l = [float(np.clip(0.0, lo, hi)), lo + 0.8 * (hi - lo)]
    model, probe = identity.record(den, shape, probe_l, 0)
    fp = model["fingerprint"]
    model.update(shape=list(shape), **{"class": type(getattr(den, "net", None)).__name__})
    batch, tau = _measure(den, shape, kwargs, batch_size)
    say(f"model {fp}: {tau * 1e3:.3f} ms per sample-evaluation at batch {batch}")

    # 2. sizes from the budget
    B = float(time_budget_s)
    t_nfe = teach.cost_nfe
    if eval_seeds is None:  # 256, or 128 when the teacher's targets for 256 would take over 10% of the budget
        eval_seeds = 256 if 256 * t_nfe * tau <= 0.1 * B else 128
    eval_list = _seed_list(eval_seeds, 0, 256)
    if calib_seeds is None:
        n_cal = 128
        for n in (2048, 1536, 1024, 768, 512, 384, 256):
            if n * t_nfe * tau <= 0.12 * B:
                n_cal = n
                break
        cal_list = _seed_list(n_cal, 1_000_000, n_cal)
    else:
        cal_list = _seed_list(calib_seeds, 1_000_000, 512)
    overlap = set(cal_list) & set(eval_list)
    if overlap:
        raise ValueError(f"calibration and evaluation seeds must be disjoint; both contain {sorted(overlap)[:5]}")
    use_v3 = method in ("auto", "v3") and (stats is not None or data is not False)
    if method == "v3" and not use_v3:
        raise ValueError("method='v3' needs statistics: pass data= (or stats=)")
    generic = [] if method == "v3" else [get_solver(s).name for s in (solvers or GENERIC_SOLVERS)]

    # 3. statistics
    st_info: Dict[str, Any] = {}
    K, n_lam = stats_K, stats_n_lambda
    if use_v3 and stats is None and (K is None or n_lam is None):
        for k_, n_ in ((1024, 41), (512, 41), (256, 31), (128, 21)):
            if k_ * n_ * 10 * tau <= 0.12 * B or k_ == 128:
                K, n_lam = K or k_, n_lam or n_
                break
        if method == "auto" and stats_K is None and K < MIN_AUTO_K:
            use_v3 = False
            st_info = {"skipped": f"the time budget allows only K={K} data points (< {MIN_AUTO_K}): too noisy "
                                  "statistics; pass stats_K= or a longer time budget"}
            say(f"DPM-Solver-v3 skipped: {st_info['skipped']}")
    if use_v3 and stats is None:
        say(f"computing DPM-Solver-v3 statistics (K={K}, {n_lam} log-SNR points) ...")
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(12345 + seed)
        if isinstance(data, GaussianMixture):
            dsrc = data.sample(K, g)
        else:
            dsrc = data
        if isinstance(dsrc, Tensor) and dsrc.shape[0] < K:
            K = dsrc.shape[0]
        elif isinstance(dsrc, Tensor) and dsrc.shape[0] > K:  # a random subset, not the first K (often sorted)
            dsrc = dsrc[torch.randperm(dsrc.shape[0], generator=g)[:K]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            stats = compute_statistics(den, dsrc, K=K, n_lambda=n_lam, shape=shape, batch_size=max(batch, 16),
                                         seed=seed, progress=progress, model_kwargs=kwargs or None)
        st_info = {"K": K, "n_lambda": n_lam, "seconds": round(time.perf_counter() - t0, 2),
                   "data": "GaussianMixture samples" if ref is not None else
                   ("model samples (dpm++3m, 50 NFE)" if data is None else "given data")}
        say(f"statistics done in {st_info['seconds']} s")
    elif use_v3:
        stats.check(den, shape)
        st_info = {"K": stats.meta.get("K"), "n_lambda": int(stats.lam.numel()), "seconds": 0.0, "data": "given"}

    # 4. teacher targets
    cal_noise = seeded_noise(cal_list, shape)
    ev_noise = seeded_noise(eval_list, shape)
    t0 = time.perf_counter()
    b = bar(len(cal_list) + len(eval_list), "teacher targets", "sample")
    with torch.no_grad():
        cal = _Set.of(cal_noise, teach.targets(cal_noise, kwargs, batch, b.update))
        ev = _Set.of(ev_noise, eteach.targets(ev_noise, kwargs, batch, b.update))
    b.close()
    t_teacher = time.perf_counter() - t0
    say(f"teacher targets for {len(cal)} calibration + {len(ev)} evaluation samples in {t_teacher:.1f} s")
    runner = _Runner(den, batch, kwargs, stats)
    runner.tau = tau

    # 5. per-NFE search
    cand_solvers = (["dpm-v3"] if use_v3 else []) + generic
    n_total = sum(nfes)
    reserve_eval = 3 * len(ev) * n_total * tau * 1.3  # tuned + two baselines on the evaluation set
    entries: Dict[int, Entry] = {}
    outer = bar(len(nfes), "tuning", "NFE budget")
    for j, nfe in enumerate(nfes):
        left = clock.left() - reserve_eval * sum(nfes[j:]) / n_total
        # shares grow like sqrt(NFE): a run costs ~NFE, but the small budgets gain most from a longer search
        share = max(0.0, left * math.sqrt(nfe) / sum(math.sqrt(n) for n in nfes[j:]))
        deadline = clock.elapsed() + share
        outer.set_postfix_str(f"NFE {nfe}, {share:.0f} s")
        entries[nfe] = _tune_one(den, runner, cal, ev, nfe, cand_solvers, metric, deadline, clock, seed, say,
                                 progress)
        outer.update(1)
        e = entries[nfe]
        say(f"NFE {nfe}: {e.describe()}  calib {fmt(e.calib_error)} (default {fmt(e.baselines['default']['calib_error'])})"
            f"  eval {fmt(e.eval_error)} (default {fmt(e.baselines['default'].get('eval_error'))}, best named "
            f"{fmt(e.baselines.get('best_named', {}).get('eval_error'))})")
    outer.close()
    if old_nfe is not None:
        den.nfe = old_nfe
    uses = any(e.uses_stats for e in entries.values())
    meta = {
        "method": method, "metric": metric, "teacher": teach.describe(), "eval_teacher": eteach.describe(),
        "calibration": {"seeds": _compact_seeds(cal_list), "n": len(cal_list)},
        "evaluation": {"seeds": _compact_seeds(eval_list), "n": len(eval_list)},
        "noise": "sample i = torch.randn(shape, generator=torch.Generator().manual_seed(seed_i), dtype=float64)",
        "statistics": st_info if uses or "skipped" in st_info else
        ({"computed_but_unused": st_info} if st_info else None),
        "batch": batch, "seconds": round(clock.elapsed(), 2), "teacher_seconds": round(t_teacher, 2),
        "time_budget_s": time_budget_s, "solvers": cand_solvers, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version
        meta["diffsolve"] = version("diffsolve")
    except Exception:
        pass
    prof = Profile(entries, model, probe, stats if uses else None, meta)
    if out is not None:
        prof.save(out)
    return prof


def _measure(den: Denoiser, shape, kwargs, batch_size: Optional[int]) -> Tuple[int, float]:
    """(batch, seconds per sample-evaluation): the fastest of a few batch sizes (or the given one)."""
    nfe = getattr(den, "nfe", None)
    sizes = [batch_size] if batch_size else [8, 16, 32, 64, 128, 256]
    best = (sizes[0], math.inf)
    g = torch.Generator().manual_seed(7)
    proc = den.process
    t_mid = float(proc.t_of_lam(torch.tensor(0.0, dtype=DT).clamp(*proc.lam_range)))
    with torch.no_grad():
        for b in sizes:
            x = torch.randn((b,) + tuple(shape), generator=g, dtype=DT)
            reps = []
            for _ in range(3):
                t0 = time.perf_counter()
                den.evaluate(x, t_mid, kwargs).eps
                reps.append((time.perf_counter() - t0) / b)
            per = min(reps)
            if per < best[1] * 0.97:
                best = (b, per)
            elif per > best[1] * 1.3:
                break
    if nfe is not None:
        den.nfe = nfe
    return best[0], best[1] * 1.15  # + solver overhead


def _tune_one(den: Denoiser, runner: _Runner, cal: _Set, ev: _Set, nfe: int, solvers: List[str], metric: str,
              deadline: float, clock: _Clock, seed: int, say, progress: bool) -> Entry:
    """Search one NFE budget until ``deadline`` (clock seconds); the final choice on the full calibration set.

    Two objectives guide the search (see ``_Search``): the RMSE, which rare mode switches of a few samples
    dominate, and the 'bulk' (trimmed) RMSE of the typical sample.  Screening, a pattern search over the grid
    family, the solver options and an evolutionary polish run for both; the best few of each (structurally
    diverse) become finalists, scored on the whole calibration set, and ``_choose`` picks one.

    When the full calibration set is too expensive to search on, screening runs on a random subset; then a few
    diverse screened candidates ("probes") run on the full set, every sample with an outlying error under a probe
    (squared error > 10x that probe's median: the few that a small error sends to another mode) is kept, and the
    search continues on them plus a random part of the rest, weighted so that the 'rmse' objective estimates the
    full set's RMSE (stratified sampling: a small random subset would see too few mode switches)."""
    from tqdm.auto import tqdm

    proc = den.process
    t_start = clock.elapsed()
    budget = max(deadline - t_start, 1e-3)
    N = len(cal)
    rng = np.random.default_rng(seed * 7919 + nfe)
    has_v3 = "dpm-v3" in solvers
    # candidates, in priority order (a slow machine screens only the first ones)
    fam_core = [(0.5, 0.7), (0.45, 0.55), (0.6, 0.8), (0.4, 0.55)]
    fam_rest = [(ue, w) for ue in (0.35, 0.45, 0.55, 0.65, 0.75, 0.9) for w in (0.45, 0.6, 0.75, 0.9, 1.15)]
    default = _named(proc, DEFAULT_START[0], nfe, DEFAULT_START[1], DEFAULT_START[2]).with_(label="default")
    named = [_named(proc, s, nfe, sp, fi).with_(label=f"{s} {sp}/{fi}")
             for s in solvers for sp in NAMED_SPACINGS for fi in ("t_min", "denoise")]

    def fam(s, pts):
        out = []
        for ue, w in pts:
            try:
                out.append(Candidate(s, family_times(proc, nfe, ue, w, "t_min", s), "t_min", {},
                                     f"{s} family(u_end={ue:.3f}, warp={w:.3f})"))
            except ValueError:
                pass
        return out
    core = [c for s in solvers for c in fam(s, fam_core)]
    # with statistics, the statistics-free solvers get the family's core only (they never win there)
    rest = [c for s in solvers if s == "dpm-v3" or not has_v3 for c in fam(s, fam_rest)]
    cands = core + named + rest
    # sizes: the finalists' reserve, the probes and the screening subset
    full_cost = runner.cost(N, nfe)
    k_final = 3
    while k_final > 1 and (2 * k_final + 2) * full_cost > 0.35 * budget:
        k_final -= 1
    n_screen = N
    while n_screen > 64 and len(cands) * runner.cost(n_screen, nfe) > 0.3 * budget:
        n_screen = max(64, n_screen // 2)
    stratify = n_screen < N
    n_probe = 0
    if stratify:
        n_probe = 4
        while n_probe > 1 and n_probe * full_cost > 0.15 * budget:
            n_probe -= 1
    reserve = (2 * k_final + 2) * full_cost if stratify else 0.0
    stop = lambda: clock.elapsed() > deadline - reserve
    S = _Search(runner, cal, nfe, metric)
    if stratify:
        S.set_work(cal.subset(n_screen))
    b = tqdm(total=len(cands), desc=f"NFE {nfe}: screening on {n_screen}", unit="cand", leave=False,
             disable=not progress, dynamic_ncols=True)
    S.score(default)
    for c in cands:
        if stop() and S.evaluations >= 2:
            break
        S.score(c)
        b.update(1)
        b.set_postfix(best=f"{S.best()[0]:.4g}")
    b.close()
    phases: Dict[str, Any] = {"screened": S.evaluations}
    # probes on the full set, then the stratified working set
    if stratify:
        probes = _diverse(S.ranked("rmse"), (n_probe + 1) // 2, set())
        probes += _diverse(S.ranked("bulk"), n_probe - len(probes), {c.key for c in probes})
        d2s = []
        for c in probes:
            v, d2 = S.score_full(c)
            if d2 is not None:
                d2s.append(d2 / d2.median().clamp_min(1e-30))
        work_n = n_screen  # larger when the network is cheap next to the solver's per-grid set-up
        while 2 * work_n <= N // 2 and runner.cost(2 * work_n, nfe) <= 1.6 * runner.cost(n_screen, nfe):
            work_n *= 2
        if d2s:
            r = torch.stack(d2s).max(0)[0]
            order = torch.argsort(r, descending=True)
            risk = order[: min(int((r > 10).sum()), max(1, int(0.1 * N)), work_n // 3)]
        else:
            risk = torch.zeros(0, dtype=torch.long)
        risk_n = int(risk.numel())
        restidx = torch.from_numpy(np.setdiff1d(np.arange(N), risk.numpy()))
        bulk = restidx[torch.from_numpy(rng.permutation(restidx.numel())[: max(work_n - risk_n, 64)])]
        idx = torch.cat([risk, bulk])
        w = torch.cat([torch.ones(risk_n, dtype=DT), torch.full((bulk.numel(),), (N - risk_n) / bulk.numel(), dtype=DT)])
        part = torch.cat([torch.zeros(risk_n, dtype=torch.bool), torch.ones(bulk.numel(), dtype=torch.bool)])
        S.set_work(_Set(cal.noise[idx], cal.tmin[idx], cal.den[idx]), w, part)
        phases.update(probes=len(probes), at_risk=risk_n, work_n=int(idx.numel()))
        # the screened leaders again, on the working set
        for obj in ("rmse", "bulk"):
            for v, c in S.previous[obj][:4]:
                if stop():
                    break
                S.score(c)
    n1 = S.evaluations
    # refine: pattern search in (u_end, warp) from the best family member, for each objective
    for obj in ("rmse", "bulk"):
        for s in solvers:
            if s != "dpm-v3" and has_v3:
                continue
            start = next((c for v, c in S.ranked_all(obj) if c.solver == s and "family(" in c.label
                          and "+evolve" not in c.label and not c.options and math.isfinite(v)), None)
            if start is None:
                continue
            ue, w = _parse_family(start.label)
            step = [0.05, 0.15]
            cur = (S.score(start, obj), ue, w)
            it = 0
            while not stop() and it < 16 and max(step) > 0.01:
                moved = False
                for due, dw in ((step[0], 0), (-step[0], 0), (0, step[1]), (0, -step[1])):
                    if stop():
                        break
                    nu, nw = cur[1] + due, max(0.2, cur[2] + dw)
                    if not 0.05 < nu <= 0.999:
                        continue
                    cc = fam(s, [(nu, nw)])
                    if not cc:
                        continue
                    v = S.score(cc[0], obj)
                    it += 1
                    if v < cur[0]:
                        cur, moved = (v, nu, nw), True
                if not moved:
                    step = [step[0] / 2, step[1] / 2]
    phases["refined"] = S.evaluations - n1
    # options on the best grids
    n1 = S.evaluations
    tried = set()
    for obj in ("rmse", "bulk"):
        for s in solvers:
            c = next((c for v, c in S.ranked(obj) if c.solver == s and c.label != "default" and math.isfinite(v)
                      and not c.options), None)
            if c is None or c.key in tried:
                continue
            tried.add(c.key)
            for o in _option_variants(s):
                if stop():
                    break
                S.score(c.with_(options=o, label=c.label + " " + ",".join(f"{k}={v}" for k, v in o.items())))
    phases["options"] = S.evaluations - n1
    # evolutionary polish of the best candidate of each objective (half the remaining time each)
    n1 = S.evaluations
    for j, obj in enumerate(("rmse", "bulk")):
        v_best, c_best = S.best(obj)
        if c_best is None or c_best.label == "default" or stop():
            continue
        t_end = clock.elapsed() + (deadline - reserve - clock.elapsed()) / (2 - j)
        _evolve(S, c_best, proc, lambda: stop() or clock.elapsed() > t_end, obj,
                np.random.default_rng(seed + nfe + j))
    phases["evolution"] = S.evaluations - n1
    # finalists, scored on the whole calibration set: the best (diverse) of both objectives, the probes, the
    # default and the best named-spacing configuration
    finalists = _diverse(S.ranked_all("rmse"), k_final, set())
    finalists += _diverse(S.ranked_all("bulk"), k_final, {c.key for c in finalists})
    seen = {c.key for c in finalists}
    for v, d2, c in list(S.full_scores.values()):
        if c.key not in seen and c.label != "default":
            finalists.append(c)
            seen.add(c.key)
    named_labels = {n.label for n in named}
    best_named = next((c for v, c in S.ranked_all("rmse") if c.label in named_labels and math.isfinite(v)), None)
    for c in (default, best_named):
        if c is not None and c.key not in seen:
            finalists.append(c)
            seen.add(c.key)
    full, d2s = {}, {}
    for c in finalists:
        full[c.key], d2s[c.key] = S.score_full(c)
    chosen = _choose(finalists, full, d2s, [default, best_named])
    # evaluation (never used to choose)
    ev_err = {}
    for name, c in (("tuned", chosen), ("default", default), ("best_named", best_named)):
        if c is None:
            continue
        x = runner.run(c, ev.noise, nfe)
        if x is None:
            ev_err[name] = (math.inf, math.inf)
        else:
            d2 = ev.err(x, c.final)
            ev_err[name] = (_objective(d2, "rmse"), _objective(d2, "median"))
    _, used = _n_points(chosen.solver, nfe, chosen.final)
    if used != nfe:
        raise RuntimeError(f"internal: the chosen grid uses {used} NFE, not {nfe}")
    base = {"default": {"label": f"{DEFAULT_START[0]} {DEFAULT_START[1]}/{DEFAULT_START[2]}",
                        "calib_error": full[default.key], "eval_error": ev_err["default"][0]}}
    if best_named is not None:
        base["best_named"] = {"label": best_named.label, "calib_error": full[best_named.key],
                              "eval_error": ev_err["best_named"][0]}
    search = {"evaluations": S.evaluations, "phases": phases, "screen_n": n_screen, "calib_n": N,
              "finalists": [{"label": c.label, "calib_error": full[c.key],
                             "calib_trimmed": None if d2s[c.key] is None else _objective(d2s[c.key], "trimmed")}
                            for c in sorted(finalists, key=lambda c: full[c.key])[:12]],
              "n_finalists": len(finalists),
              "chosen": chosen.label, "seconds": round(clock.elapsed() - t_start, 2)}
    return Entry(nfe, chosen.solver, [float(v) for v in chosen.t], chosen.final, dict(chosen.options),
                 chosen.solver == "dpm-v3", full[chosen.key], ev_err["tuned"][0], ev_err["tuned"][1], base, search)


def _choose(finalists: List[Candidate], full: Dict[tuple, float], d2s: Dict[tuple, Optional[Tensor]],
            starts: List[Optional[Candidate]]) -> Candidate:
    """The final choice on the full calibration set: among the finalists whose mean squared error is within one
    standard error of the smallest (statistically tied: typically one rare mode switch more or fewer), the one
    with the smallest trimmed RMSE (worst 1% of the samples dropped: the typical sample's accuracy).  Never one
    with a larger RMSE than a starting configuration's."""
    best = min(finalists, key=lambda c: (full[c.key], c.label != "default"))
    d2 = d2s.get(best.key)
    if d2 is None or not math.isfinite(full[best.key]):
        return best
    mse, se = float(d2.mean()), float(d2.std() / math.sqrt(d2.numel()))
    cap = min([full[c.key] for c in starts if c is not None] + [math.inf])
    tied = [c for c in finalists if d2s.get(c.key) is not None and math.isfinite(full[c.key])
            and float(d2s[c.key].mean()) <= mse + se and full[c.key] <= cap]
    if not tied:
        return best
    return min(tied, key=lambda c: (_objective(d2s[c.key], "trimmed"), full[c.key]))


def _parse_family(label: str) -> Tuple[float, float]:
    inner = label[label.index("family(") + 7:label.index(")")]
    d = dict(p.strip().split("=") for p in inner.split(","))
    return float(d["u_end"]), float(d["warp"])


def _evolve(S: _Search, start: Candidate, proc, stop: Callable[[], bool], obj: str, rng: np.random.Generator,
            population: int = 10, elite: int = 2, mutation: float = 0.3, patience: int = 6) -> None:
    """Evolutionary polish (``evolution.evolve_points``, annealed mutation) of the free log-SNR positions of
    ``start``'s grid, seeded with the good candidates of the same solver, last step and options, scored by ``S``
    on objective ``obj`` (every child lands in ``S``'s rankings), until ``stop()``."""
    clean = start.final == "denoise"
    label = start.label.split(" +evolve")[0] + " +evolve"
    starts, scores = [free_points(proc, start.t, clean)], [S.score(start, obj)]
    if starts[0].size == 0:
        return
    for v, c in S.ranked(obj)[:12]:
        if c.solver == start.solver and c.final == start.final and c.options == start.options and c.key != start.key:
            starts.append(free_points(proc, c.t, clean))
            scores.append(v)

    def fitness(free: np.ndarray) -> float:
        return S.score(start.with_(t=grid_times(proc, free, clean), label=label), obj)

    evolve_points(fitness, starts, clean, rng, population=population, elite=elite, mutation=mutation,
                  patience=patience, stop=stop, fill=False, anneal=True, scores=scores)
