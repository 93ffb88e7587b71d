"""Optimised time steps for a given model, solver and NFE budget.

* ``gits``: dynamic programming over a fine teacher trajectory (Chen et al. 2024, "On the Trajectory Regularity
  of ODE-based Diffusion Sampling", GITS).  The cost of jumping from fine point i to j is the error of one DDIM
  (first-order exponential) step from the teacher state at i against the teacher state at j; the cheapest path
  with exactly the grid's number of steps is found by DP.
* ``evolve``: evolutionary search over step grids (Li et al. 2023, AutoDiffusion's time-step search) whose
  fitness is the RMSE against a high-NFE teacher on calibration noise (not FID).
* ``five_step``: the truncated two-level Karras schedule of "Hyperparameters are all you need" (Li 2025,
  arXiv:2510.02390) as the named spacing ``'five-step'``.

The searches return an ``OptimizedGrid``: valid times (strictly decreasing, inside the process range, costing
exactly the NFE budget with the solver) that are never worse on the calibration set than the grid the search
started from (that grid is a candidate: if nothing beats it, it is returned).  Use it with
``ds.sample(den, noise, solver, grid=result.grid(process))`` or as a spacing callable, ``spacing=result.spacing``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters.denoiser import Model as Denoiser
from ..evaluation.teacher import ModelTeacher, Teacher
from ..grids import TimeGrid, explicit, from_unit, make_grid, to_unit, validate_times
from ..processes import NoiseProcess
from ..sampling import sample
from ..solvers import get_solver
from ..util import seeding
from .evolution import evolve_points, free_points, grid_times

Tensor = torch.Tensor
DT = torch.float64


# ----------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------
@dataclass
class OptimizedGrid:
    """A searched time grid: the process times ``t`` (decreasing, without the clean point), the last-step rule
    ``final``, and what it was searched for.  ``error`` and ``baseline_error`` are calibration RMSEs against the
    teacher; ``baseline`` is the grid the search started from."""

    t: Tensor
    final: str
    solver: str
    nfe: int
    method: str
    error: float
    baseline: Tensor
    baseline_error: float
    options: Dict[str, Any] = field(default_factory=dict)
    history: List[float] = field(default_factory=list)
    evaluations: int = 0

    def grid(self, process: NoiseProcess) -> TimeGrid:
        return explicit(process, t=self.t, final=self.final)

    @property
    def improvement(self) -> float:
        """baseline_error / error (>= 1)."""
        return self.baseline_error / self.error if self.error > 0 else math.inf

    def spacing(self, process: NoiseProcess, n: int) -> Tensor:
        """A spacing callable: these times for ``n == len(t)``, else the same shape resampled in log-SNR."""
        if n == self.t.numel():
            return self.t.clone()
        u = to_unit(process, self.t)
        pos = np.linspace(0, 1, self.t.numel())
        new = np.interp(np.linspace(0, 1, n), pos, u.numpy())
        return from_unit(process, torch.from_numpy(new), fix_last=True)

    def to_dict(self) -> Dict[str, Any]:
        return {"t": [float(v) for v in self.t], "final": self.final, "solver": self.solver, "nfe": self.nfe,
                "method": self.method, "error": self.error, "baseline": [float(v) for v in self.baseline],
                "baseline_error": self.baseline_error, "options": _plain(self.options), "history": self.history,
                "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "OptimizedGrid":
        d = dict(d)
        d["t"] = torch.tensor(d["t"], dtype=DT)
        d["baseline"] = torch.tensor(d["baseline"], dtype=DT)
        return cls(**d)


def _plain(opts: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in opts.items() if isinstance(v, (int, float, str, bool, type(None)))}


# ----------------------------------------------------------------------------------------
# calibration: solver runs on calibration noise against a high-NFE teacher
# ----------------------------------------------------------------------------------------
def steps_for_nfe(solver: str, nfe: int, clean_end: bool) -> Tuple[int, int]:
    """(steps, NFE used) of the largest explicit grid the solver can run within ``nfe`` (``SolverInfo.steps_for_nfe``)."""
    return get_solver(solver).steps_for_nfe(nfe, clean_end)


class Calibration:
    """Calibration noise, the teacher's answer for it (``targets``, or ``teacher``; default a ``ModelTeacher`` with
    ``teacher_solver`` and ``teacher_nfe``), and a cached ``error(t)`` for a solver at an NFE budget."""

    def __init__(self, den: Denoiser, solver: str, nfe: int, noise: Optional[Tensor] = None, n: int = 128,
                 shape: Optional[Sequence[int]] = None, seed: int = 0, final: str = "denoise",
                 targets: Optional[Tensor] = None, teacher_solver: str = "dpm++3m", teacher_nfe: int = 200,
                 model_kwargs: Optional[Dict[str, Any]] = None, solver_options: Optional[Dict[str, Any]] = None,
                 metric: str = "rmse", teacher: Optional[Teacher] = None):

        self.den, self.process = den, den.process
        self.solver, self.nfe, self.final = get_solver(solver).name, int(nfe), final
        if noise is None:
            if shape is None:
                raise ValueError("calibration needs noise= or shape=")
            noise = seeding.noise(range(seed, seed + n), shape)  # sample i: the library's noise of seed `seed + i`
        self.noise = noise
        self.kwargs = dict(model_kwargs or {})
        self.options = dict(solver_options or {})
        self.clean = final == "denoise"
        self.steps, self.nfe_used = steps_for_nfe(self.solver, self.nfe, self.clean)
        self.n_points = self.steps if self.clean else self.steps + 1
        if targets is None:
            teacher = ModelTeacher(den, teacher_solver, teacher_nfe) if teacher is None else teacher
            targets = teacher.targets(noise, self.kwargs).for_grid(self.clean)
        self.targets = targets.to(DT)
        if metric not in ("rmse", "median"):
            raise ValueError(f"metric must be 'rmse' or 'median' (per-sample RMSE), got {metric!r}")
        self.metric = metric
        self.cache: Dict[tuple, float] = {}
        self.evaluations = 0

    def score(self, x: Tensor) -> float:
        """RMSE of samples ``x`` against the teacher (``metric='median'``: median per-sample RMSE)."""
        d2 = ((x.to(DT) - self.targets) ** 2).flatten(1).mean(1)
        err = float(d2.mean().sqrt()) if self.metric == "rmse" else float(d2.sqrt().median())
        return err if math.isfinite(err) else math.inf

    def run(self, t: Tensor) -> Tensor:

        grid = explicit(self.process, t=t, final=self.final)
        return sample(self.den, self.noise, self.solver, grid=grid, nfe=self.nfe, model_kwargs=self.kwargs,
                      **self.options)

    def error(self, t: Tensor) -> float:
        key = tuple(np.round(t.numpy(), 10))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        try:
            err = self.score(self.run(t))
        except (ValueError, RuntimeError):  # a grid the solver cannot run (non-finite state, ...)
            err = math.inf
        self.evaluations += 1
        self.cache[key] = err
        return err

    def start_times(self, start: Union[str, Callable, Tensor, Sequence[float], "OptimizedGrid"]) -> Tensor:
        """Times of the starting grid (a spacing name/callable, explicit times or a previous result)."""
        if isinstance(start, OptimizedGrid):
            t = start.t.clone()
        elif isinstance(start, (str,)) or callable(start):
            t = make_grid(self.process, self.n_points, start, "t_min").t
        else:
            t = torch.as_tensor(start, dtype=DT).flatten()
        if t.numel() != self.n_points:
            raise ValueError(f"the starting grid has {t.numel()} times; solver {self.solver!r} at nfe={self.nfe} "
                             f"with final={self.final!r} needs {self.n_points}")
        validate_times(self.process, t)
        return t


def _calibration(den, solver, nfe, calibration, **kw) -> Calibration:
    if calibration is not None:
        if calibration.solver != get_solver(solver).name or calibration.nfe != nfe:
            raise ValueError("the calibration object was made for another solver or NFE")
        return calibration
    return Calibration(den, solver, nfe, **kw)


# ----------------------------------------------------------------------------------------
# (a) GITS: dynamic programming over a fine teacher trajectory
# ----------------------------------------------------------------------------------------
def gits(den: Denoiser, solver: str = "dpm++2m", nfe: int = 6, *, start: Union[str, Callable, Tensor] = "logsnr",
         n_fine: int = 80, fine_spacing: Union[str, Callable] = "logsnr", teacher_substeps: int = 4,
         teacher_solver: str = "dpm++3m", calibration: Optional[Calibration] = None,
         **calib_kwargs) -> OptimizedGrid:
    """GITS time steps: the k-step path through ``n_fine`` teacher points minimising the summed DDIM jump error.

    The teacher trajectory is ``teacher_solver`` on the fine grid refined ``teacher_substeps`` times; costs
    C[i, j] = mean squared error of one DDIM step from the teacher state at fine point i to fine point j (and,
    with final='denoise', of the denoiser jump from i to the teacher's clean target).  The DP path is then
    checked with the actual ``solver`` on the calibration noise and returned only if it beats ``start``.
    """

    cal = _calibration(den, solver, nfe, calibration, teacher_solver=teacher_solver, **calib_kwargs)
    proc = den.process
    base_t = cal.start_times(start)
    base_err = cal.error(base_t)
    fine = make_grid(proc, n_fine, fine_spacing, "t_min").t
    # teacher states at the fine points
    lam_f = proc.lam(fine)
    sub = [proc.t_of_lam(lam_f[i] + (lam_f[i + 1] - lam_f[i]) * torch.arange(teacher_substeps, dtype=DT) / teacher_substeps)
           for i in range(n_fine - 1)]
    t_ref = torch.cat(sub + [fine[-1:]])
    t_ref[0] = proc.t_max
    states: List[Tensor] = [cal.noise.to(DT) * proc.prior_scale]

    def record(info):
        if (info["i"] + 1) % teacher_substeps == 0:
            states.append(info["x"].to(DT).clone())

    sample(den, cal.noise, teacher_solver, grid=explicit(proc, t=t_ref, final="t_min"), nfe=None,
           callback=record, model_kwargs=cal.kwargs)
    X = torch.stack(states)  # [n_fine, B, ...]
    a_f, s_f = proc.alpha(fine), proc.sigma(fine)
    clean = cal.clean
    N = n_fine + (1 if clean else 0)  # node n_fine = the clean end
    C = torch.full((N, N), math.inf, dtype=DT)
    for i in range(n_fine - 1 if not clean else n_fine):
        x0, _ = den.predict(X[i], float(fine[i]), **cal.kwargs)
        x0 = x0.to(DT)
        if i < n_fine - 1:
            j = torch.arange(i + 1, n_fine)
            h = lam_f[j] - lam_f[i]
            shp = (-1,) + (1,) * X[i].dim()
            pred = (s_f[j] / s_f[i]).reshape(shp) * X[i] + (a_f[j] * (-torch.expm1(-h))).reshape(shp) * x0
            C[i, j] = ((pred - X[j]) ** 2).flatten(1).mean(1)
        if clean:
            C[i, n_fine] = float(((x0 - cal.targets) ** 2).mean())
    # DP: exactly `steps` edges from node 0 to the terminal node
    S = cal.steps
    term = n_fine if clean else n_fine - 1
    best = torch.full((S + 1, N), math.inf, dtype=DT)
    arg = torch.zeros((S + 1, N), dtype=torch.long)
    best[0, 0] = 0.0
    for k in range(1, S + 1):
        tot = best[k - 1][:, None] + C  # [from, to]
        best[k], arg[k] = tot.min(0)
    if not math.isfinite(float(best[S, term])):
        raise ValueError(f"no {S}-step path through {n_fine} fine points; use a larger n_fine")
    path = [term]
    for k in range(S, 0, -1):
        path.append(int(arg[k, path[-1]]))
    path = path[::-1]
    nodes = [p for p in path if p < n_fine]
    t_dp = fine[nodes].clone()
    if not clean:
        t_dp[-1] = proc.t_min
    err = cal.error(t_dp)
    better = err < base_err
    return OptimizedGrid(t_dp if better else base_t, cal.final, cal.solver, cal.nfe_used, "gits",
                         err if better else base_err, base_t, base_err, cal.options,
                         history=[base_err, err], evaluations=cal.evaluations)


# ----------------------------------------------------------------------------------------
# (b) evolutionary search
# ----------------------------------------------------------------------------------------
def evolve(den: Denoiser, solver: str = "dpm++2m", nfe: int = 6, *,
           start: Union[str, Callable, Tensor, OptimizedGrid] = "logsnr",
           population: int = 16, generations: int = 12, elite: int = 2, mutation: float = 0.25,
           crossover: float = 0.5,
           extra_starts: Sequence[Union[str, Callable]] = ("logsnr", "karras", "uniform", "five-step"),
           patience: int = 5, seed: int = 0, calibration: Optional[Calibration] = None,
           progress: bool = False, **calib_kwargs) -> OptimizedGrid:
    """AutoDiffusion-style evolutionary search over time grids (fitness: calibration RMSE vs the teacher).

    Individuals are the free log-SNR positions u in (0, 1] of the grid (u = 0 is t_max, always the first point;
    with final='t_min' the last point is t_min).  Each generation keeps ``elite`` best, then fills the population
    with children of tournament-selected parents (uniform crossover with probability ``crossover``, then a
    Gaussian mutation of 1-2 positions scaled by ``mutation`` times the local gap).  The starting grid is in
    the first population and elitism keeps the best, so the result is never worse than ``start``.
    """
    cal = _calibration(den, solver, nfe, calibration, **calib_kwargs)
    proc = den.process
    base_t = cal.start_times(start)
    base_err = cal.error(base_t)
    clean = cal.clean
    starts = [free_points(proc, base_t, clean)]
    for sp in extra_starts:
        try:
            starts.append(free_points(proc, make_grid(proc, cal.n_points, sp, "t_min").t, clean))
        except ValueError:
            pass

    def fitness(free: np.ndarray) -> float:
        t = grid_times(proc, free, clean)
        try:
            validate_times(proc, t)
        except ValueError:
            return math.inf
        return cal.error(t)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=generations, desc=f"evolve {cal.solver} nfe={nfe}", leave=False)

    def tick(best: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rmse=f"{best:.4g}")

    res = evolve_points(fitness, starts, clean, np.random.default_rng(seed), population=population, elite=elite,
                        mutation=mutation, crossover=crossover, patience=patience, generations=generations,
                        on_generation=tick)
    if bar is not None:
        bar.close()
    t_best, best_err = grid_times(proc, res.best, clean), res.value
    if not best_err < base_err * (1 - 1e-9):  # the start itself (up to coordinate round-off) keeps its exact times
        t_best, best_err = base_t, base_err
    return OptimizedGrid(t_best, cal.final, cal.solver, cal.nfe_used, "evolution", best_err, base_t, base_err,
                         cal.options, res.history, cal.evaluations)
