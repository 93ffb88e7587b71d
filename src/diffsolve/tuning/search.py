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
* the peers' configurations that our solvers compute (``budget.PEER_EQUIVALENTS``, docs/tuner_space.md): UniPC
  bh1/bh2 orders 2 and 3 and DPM-Solver++(2M/3M) on diffusers' linspace / leading / trailing timesteps, Karras and
  log-SNR grids, both last steps, screened right after the default (pre-screened on fewer samples when screening
  them all would take over ``budget.PEER_SHARE`` of the time); the best of them is always a finalist.
* the grids: the named spacings (log-SNR, quadratic, Karras, five-step) with both last-step rules, and a
  two-parameter family -- ``n`` evaluations power-spaced in log-SNR from the start up to a free end point
  ``u_end``, then one last step to ``t_min`` -- scanned on a coarse (u_end, warp) lattice; the best point is
  refined by a pattern search, then the solver options are tried on it (v3: pseudo-order predictor and
  corrector on/off; UniPC: order 2/3), then an evolutionary search over the free time points
  (AutoDiffusion-style, the moves of ``schedules.evolve``) polishes it until the NFE's time share is spent.
* the fitted solver (``tuning.fitted``): the two best finalists that are coefficient matrices (every deterministic
  one-evaluation-per-step solver) are refitted by ridge least squares to the teacher's trajectory from the first
  calibration noises (mu by 2-fold cross-validation) and compete with their out-of-fold errors.
* screening and refining run on a subset of the calibration noise when the full set is too expensive; the
  final choice is made on the *whole* calibration set among the best few candidates, the library default
  (``dpm++2m``, log-SNR, denoise), the best named-spacing configuration and the best peer-equivalent, so the
  tuned error on calibration is never above any of theirs.

Time: ``time_budget_s`` (default 270 s) bounds the whole run.  The calibration size, the statistics' K and
lambda points, the screening subset and the search length are derived from the measured cost of one network
evaluation, and every search stops early with the best so far when its share is spent (a slow or loaded
machine gives a shorter search, never a longer run).  Progress is shown with tqdm.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters import identity
from ..adapters.denoiser import Model as Denoiser
from ..evaluation.teacher import ModelTeacher, Teacher, TeacherSpec, Trajectory, make_teacher
from ..reference import GaussianMixture
from ..solvers import get_solver
from ..solvers.dpm_v3_stats import Statistics
from ..util import seeding
from .budget import BudgetSearch, Candidate, _Clock, _Runner, _Set, refined
from .profile import DT, Entry, PathLike, Profile, fmt
from .statistics import compute_statistics

Tensor = torch.Tensor
DEFAULT_NFES = (5, 6, 8, 10)
GENERIC_SOLVERS = ("unipc-bh2", "dpm++3m")
#: below this many data points the statistics are too noisy to help (method 'auto' then skips DPM-Solver-v3)
MIN_AUTO_K = 256
#: the fitted solver's fitting noise: at most this many calibration samples, their trajectories within this memory
FIT_MAX = 128
FIT_MEMORY = 256 * 2**20

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
        solvers: the statistics-free solvers to consider (default unipc-bh2, dpm++3m); the peer-equivalents of
            their families (UniPC, DPM-Solver++) are searched with them.
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
    ref = data if isinstance(data, GaussianMixture) else None
    shape = _data_shape(den, shape, data, stats, ref)
    teach = make_teacher(teacher, den, ref)
    eteach = teach if eval_teacher is None else make_teacher(eval_teacher, den, ref)
    old_nfe = getattr(den, "nfe", None)

    # 1. fingerprint and the cost of one evaluation
    model, probe = _identity(den, shape)
    batch, tau = _measure(den, shape, kwargs, batch_size)
    say(f"model {model['fingerprint']}: {tau * 1e3:.3f} ms per sample-evaluation at batch {batch}")
    # 2. sizes from the budget
    cal_list, eval_list = _seeds(calib_seeds, eval_seeds, teach.cost_nfe * tau, float(time_budget_s))
    cut = _cuts(cal_list, eval_list, calib_seeds, eval_seeds, teach.cost_nfe * tau, float(time_budget_s))
    for c in cut:
        say(f"cut for the time budget: {c}")
    use_v3 = method in ("auto", "v3") and (stats is not None or data is not False)
    if method == "v3" and not use_v3:
        raise ValueError("method='v3' needs statistics: pass data= (or stats=)")
    generic = [] if method == "v3" else [get_solver(s).name for s in (solvers or GENERIC_SOLVERS)]
    # 3. statistics
    stats, st_info = _statistics(den, use_v3, method, data, stats, shape, stats_K, stats_n_lambda, tau,
                                 float(time_budget_s), batch, seed, progress, kwargs, say)
    use_v3 = use_v3 and stats is not None
    # 4. teacher targets
    t0 = time.perf_counter()
    cal, ev, traj = _targets(teach, eteach, cal_list, eval_list, shape, kwargs, batch, progress)
    t_teacher = time.perf_counter() - t0
    say(f"teacher targets for {len(cal)} calibration + {len(ev)} evaluation samples in {t_teacher:.1f} s")
    runner = _Runner(den, batch, kwargs, stats)
    runner.tau = tau
    # 5. per-NFE search
    cand_solvers = (["dpm-v3"] if use_v3 else []) + generic
    entries = _search_budgets(den, runner, cal, ev, nfes, cand_solvers, metric, clock, tau, seed, progress, say,
                              traj)
    if old_nfe is not None:
        den.nfe = old_nfe
    # 6. the profile
    uses = any(e.uses_stats for e in entries.values())
    meta = {
        "method": method, "metric": metric, "teacher": teach.describe(), "eval_teacher": eteach.describe(),
        "calibration": {"seeds": _compact_seeds(cal_list), "n": len(cal_list)},
        "evaluation": {"seeds": _compact_seeds(eval_list), "n": len(eval_list)},
        "noise": "sample seed k: torch.randn(shape, generator=torch.Generator().manual_seed(2 * k), "
                 "dtype=float64) (diffsolve.util.seeding)",
        "statistics": st_info if uses or "skipped" in st_info else
        ({"computed_but_unused": st_info} if st_info else None),
        "batch": batch, "seconds": round(clock.elapsed(), 2), "teacher_seconds": round(t_teacher, 2),
        "time_budget_s": time_budget_s, "cut": cut + ([f"DPM-Solver-v3: {st_info['skipped']}"]
                                                       if "skipped" in st_info else []),
        "solvers": cand_solvers, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
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


# ----------------------------------------------------------------------------------------
# the phases of tune
# ----------------------------------------------------------------------------------------
def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=not progress, dynamic_ncols=True)


def _data_shape(den: Denoiser, shape, data, stats, ref) -> Tuple[int, ...]:
    """The data shape: given, or the model's ``sample_shape``, the mixture's, the data's or the statistics'."""
    if shape is None:
        shape = getattr(den, "sample_shape", None) or (ref.shape if ref is not None else None)
        if shape is None and isinstance(data, Tensor):
            shape = tuple(data.shape[1:])
        if shape is None and stats is not None and stats.shape:
            shape = stats.shape
        if shape is None:
            raise ValueError("tune needs the data shape: pass shape= (or data, or set den.sample_shape)")
    return tuple(int(s) for s in shape)


def _identity(den: Denoiser, shape: Tuple[int, ...]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """The model record (fingerprint, shape, class) and its probe, at log-SNR 0 and 80% of the range."""
    lo, hi = den.process.lam_range
    model, probe = identity.record(den, shape, [float(np.clip(0.0, lo, hi)), lo + 0.8 * (hi - lo)], 0)
    model.update(shape=list(shape), **{"class": type(getattr(den, "net", None)).__name__})
    return model, probe


def _seeds(calib_seeds, eval_seeds, teacher_cost: float, budget: float) -> Tuple[List[int], List[int]]:
    """Calibration and evaluation seeds; the default sizes keep the teacher's targets (``teacher_cost`` seconds
    per sample) within ~12% (calibration) and ~10% (evaluation) of the budget."""
    if eval_seeds is None:  # 256, or fewer (down to 32) when the teacher's targets would take over 10% of the budget
        eval_seeds = next((n for n in (256, 128, 64) if n * teacher_cost <= 0.1 * budget), 32)
    eval_list = _seed_list(eval_seeds, 0, 256)
    if calib_seeds is None:  # a slow model gets fewer (down to 32): the profile records the cut
        n_cal = next((n for n in (2048, 1536, 1024, 768, 512, 384, 256, 128, 64)
                      if n * teacher_cost <= 0.12 * budget), 32)
        cal_list = _seed_list(n_cal, 1_000_000, n_cal)
    else:
        cal_list = _seed_list(calib_seeds, 1_000_000, 512)
    overlap = set(cal_list) & set(eval_list)
    if overlap:
        raise ValueError(f"calibration and evaluation seeds must be disjoint; both contain {sorted(overlap)[:5]}")
    return cal_list, eval_list


def _cuts(cal_list, eval_list, calib_seeds, eval_seeds, teacher_cost: float, budget: float) -> List[str]:
    """What a slow model lost to the budget (the default sizes are 128+ calibration, 256 evaluation samples)."""
    out = []
    if calib_seeds is None and len(cal_list) < 128:
        out.append(f"{len(cal_list)} calibration samples instead of 128+ (teacher {teacher_cost:.2f} s per sample, "
                   f"budget {budget:.0f} s)")
    if eval_seeds is None and len(eval_list) < 256:
        out.append(f"{len(eval_list)} evaluation samples instead of 256")
    return out


def _statistics(den: Denoiser, use_v3: bool, method: str, data, stats: Optional[Statistics], shape,
                stats_K: Optional[int], stats_n_lambda: Optional[int], tau: float, budget: float, batch: int,
                seed: int, progress: bool, kwargs: Dict[str, Any], say) -> Tuple[Optional[Statistics], Dict[str, Any]]:
    """DPM-Solver-v3's statistics (given, computed within ~12% of the budget, or skipped when too few data points
    fit the budget) and their record; ``(None, record)`` when v3 is not tuned."""
    if not use_v3:
        return None, {}
    if stats is not None:
        stats.check(den, shape)
        return stats, {"K": stats.meta.get("K"), "n_lambda": int(stats.lam.numel()), "seconds": 0.0, "data": "given"}
    K, n_lam = stats_K, stats_n_lambda
    if K is None or n_lam is None:
        for k_, n_ in ((1024, 41), (512, 41), (256, 31), (128, 21)):
            if k_ * n_ * 10 * tau <= 0.12 * budget or k_ == 128:
                K, n_lam = K or k_, n_lam or n_
                break
        if method == "auto" and stats_K is None and K < MIN_AUTO_K:
            info = {"skipped": f"the time budget allows only K={K} data points (< {MIN_AUTO_K}): too noisy "
                               "statistics; pass stats_K= or a longer time budget"}
            say(f"DPM-Solver-v3 skipped: {info['skipped']}")
            return None, info
    say(f"computing DPM-Solver-v3 statistics (K={K}, {n_lam} log-SNR points) ...")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(12345 + seed)
    dsrc = data.sample(K, g) if isinstance(data, GaussianMixture) else data
    if isinstance(dsrc, Tensor) and dsrc.shape[0] < K:
        K = dsrc.shape[0]
    elif isinstance(dsrc, Tensor) and dsrc.shape[0] > K:  # a random subset, not the first K (often sorted)
        dsrc = dsrc[torch.randperm(dsrc.shape[0], generator=g)[:K]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stats = compute_statistics(den, dsrc, K=K, n_lambda=n_lam, shape=shape, batch_size=max(batch, 16),
                                   seed=seed, progress=progress, model_kwargs=kwargs or None)
    info = {"K": K, "n_lambda": n_lam, "seconds": round(time.perf_counter() - t0, 2),
            "data": "GaussianMixture samples" if isinstance(data, GaussianMixture) else
            ("model samples (dpm++3m, 50 NFE)" if data is None else "given data")}
    say(f"statistics done in {info['seconds']} s")
    return stats, info


def fit_size(n_cal: int, shape: Sequence[int], teach: Teacher) -> int:
    """How many calibration noises the fitted solver is fitted on (their teacher trajectories are kept in memory:
    ~``FIT_MEMORY`` bytes at most); 0 when too few for its cross-validation."""
    dim = int(np.prod(shape))
    cap = FIT_MEMORY // max(1, dim * (teach.cost_nfe + 2) * 8) if isinstance(teach, ModelTeacher) else FIT_MAX
    n = min(n_cal, FIT_MAX, int(cap))
    return n if n >= 8 else 0


def _targets(teach, eteach, cal_list: List[int], eval_list: List[int], shape, kwargs: Dict[str, Any], batch: int,
             progress: bool) -> Tuple[_Set, _Set, Optional[Trajectory]]:
    """The calibration and evaluation sets: seeded noise and the teachers' targets for it; and the teacher's
    trajectories from the first ``fit_size`` calibration noises (recorded by the same runs where the teacher is a
    model)."""
    cal_noise, ev_noise = seeded_noise(cal_list, shape), seeded_noise(eval_list, shape)
    n_fit = fit_size(len(cal_list), shape, teach)
    b = _bar(len(cal_list) + len(eval_list), "teacher targets", "sample", progress)
    traj: Optional[Trajectory] = None
    with torch.no_grad():
        if n_fit and isinstance(teach, ModelTeacher):
            traj = teach.dense(cal_noise[:n_fit], kwargs, batch)
            b.update(n_fit)
            head = traj.targets()
            rest = teach.targets(cal_noise[n_fit:], kwargs, batch, b.update) if len(cal_list) > n_fit else None
            cal = _Set(cal_noise, *(head.at_t_min, head.denoised) if rest is None else
                       (torch.cat([head.at_t_min, rest.at_t_min]), torch.cat([head.denoised, rest.denoised])))
        else:
            cal = _Set.of(cal_noise, teach.targets(cal_noise, kwargs, batch, b.update))
            if n_fit:
                traj = teach.dense(cal_noise[:n_fit], kwargs, batch)
        ev = _Set.of(ev_noise, eteach.targets(ev_noise, kwargs, batch, b.update))
    b.close()
    return cal, ev, traj


def _search_budgets(den: Denoiser, runner: _Runner, cal: _Set, ev: _Set, nfes: List[int], solvers: List[str],
                    metric: str, clock: _Clock, tau: float, seed: int, progress: bool, say,
                    traj: Optional[Trajectory] = None) -> Dict[int, Entry]:
    """One ``BudgetSearch`` per NFE budget; the time left (less the evaluation runs' reserve) is shared in
    proportion to sqrt(NFE): a run costs ~NFE, but the small budgets gain most from a longer search."""
    n_total = sum(nfes)
    reserve_eval = 4 * len(ev) * n_total * tau * 1.3  # tuned + three baselines on the evaluation set
    entries: Dict[int, Entry] = {}
    outer = _bar(len(nfes), "tuning", "NFE budget", progress)
    for j, nfe in enumerate(nfes):
        left = clock.left() - reserve_eval * sum(nfes[j:]) / n_total
        share = max(0.0, left * math.sqrt(nfe) / sum(math.sqrt(n) for n in nfes[j:]))
        deadline = clock.elapsed() + share
        outer.set_postfix_str(f"NFE {nfe}, {share:.0f} s")
        prev = [Candidate(p.solver, torch.as_tensor(p.t, dtype=DT), p.final, dict(p.options), f"NFE-{k} profile")
                for k, p in entries.items()]
        warm = [w for w in (refined(den.process, c, nfe) for c in prev) if w is not None]
        e = entries[nfe] = BudgetSearch(den, runner, cal, ev, nfe, solvers, metric, deadline, clock, seed,
                                        progress, warm, traj).run()
        outer.update(1)
        say(f"NFE {nfe}: {e.describe()}  calib {fmt(e.calib_error)} (default {fmt(e.baselines['default']['calib_error'])})"
            f"  eval {fmt(e.eval_error)} (default {fmt(e.baselines['default'].get('eval_error'))}, best named "
            f"{fmt(e.baselines.get('best_named', {}).get('eval_error'))}, best peer-equivalent "
            f"{fmt(e.baselines.get('best_peer_equivalent', {}).get('eval_error'))})")
    outer.close()
    return entries


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
