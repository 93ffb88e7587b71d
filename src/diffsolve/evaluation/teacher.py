"""The one teacher: where the "right answer" for a sampler run comes from.

A sampler that starts from noise ``z`` (standard normal, mapped to the prior by ``process.prior_from_noise``)
and follows the probability-flow ODE has one correct result for every place it can stop: the ODE state at
time t, and, for a run that ends with the jump to clean data, the posterior mean E[x0 | x_{t_min}] at the
t_min state.  Two teachers give it:

* ``ExactTeacher``: the exact Gaussian-mixture reference -- the ODE solved adaptively (DOP853, ``rtol``) and
  its closed-form posterior mean; it also knows the exact log-density of data and of every marginal.
* ``ModelTeacher``: any model -- a high-NFE solution of the *same* model (``solver`` with ``nfe`` evaluations on
  a ``spacing`` grid), and the model's own x0 prediction at t_min for the jump.

The tuner (calibration and evaluation targets), the bench (scoring every run), the CLI (``sample --exact``,
``compare``) and the grid searches read their targets from here.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from ..adapters.denoiser import Model
from ..grids import explicit, make_grid
from ..processes import NoiseProcess
from ..reference import ExactTargets, GaussianMixture, exact_targets
from ..sampling import sample
from ..solvers import get_solver

Tensor = torch.Tensor
DT = torch.float64
Progress = Optional[Callable[[int], None]]


class Trajectory:
    """The teacher's ODE solutions from fixed noise: ``at(times)`` gives the states at decreasing process times."""

    def __init__(self, noise: Tensor, read: Callable[[Sequence[float]], List[Tensor]]):
        self.noise, self._read = noise, read

    def __len__(self) -> int:
        return self.noise.shape[0]

    def at(self, times: Sequence[float]) -> List[Tensor]:
        return self._read(times)


class DenseTrajectory(Trajectory):
    """A recorded high-NFE solution: states x_j and x0 predictions D_j at the teacher's points (lambda_j), read at
    any time between two points by the exponential integrator with D linear in lambda between D_j and D_{j+1},

        x_t = (sigma_t/sigma_j) x_j + alpha_t [(1 - e^{-h}) D_j + (h - 1 + e^{-h}) (D_{j+1} - D_j) / H],

    h = lambda_t - lambda_j, H = lambda_{j+1} - lambda_j (local error O(H^3), the order of a second-order step;
    at a recorded point the recorded state).  States are kept in float32, the last one in float64."""

    def __init__(self, noise: Tensor, process, t: Tensor, xs: Tensor, ds: Tensor, last: Tensor):
        super().__init__(noise, self._interpolate)
        self.process, self.t, self.xs, self.ds, self.last = process, t.to(DT), xs, ds, last
        self.lam = process.lam(self.t)

    def targets(self) -> ExactTargets:
        """The run's end: the state at t_min and the model's x0 prediction there."""
        return ExactTargets(self.process.t_min, self.last, self.ds[-1].to(DT))

    def _interpolate(self, times: Sequence[float]) -> List[Tensor]:
        p = self.process
        ts = _check_times(p, times)
        out = []
        for t in ts:
            j = int(torch.searchsorted(-self.t, torch.tensor(-t, dtype=DT), right=True)) - 1
            j = min(max(j, 0), self.t.numel() - 1)
            if j == self.t.numel() - 1 or t == float(self.t[j]):
                out.append(self.last if j == self.t.numel() - 1 else self.xs[j].to(DT))
                continue
            tt = torch.tensor(t, dtype=DT)
            a_t, s_t, lam_t = float(p.alpha(tt)), float(p.sigma(tt)), float(p.lam(tt))
            s_j = float(p.sigma(self.t[j]))
            h, H = lam_t - float(self.lam[j]), float(self.lam[j + 1] - self.lam[j])
            e = math.exp(-h)
            d0, d1 = self.ds[j].to(DT), self.ds[j + 1].to(DT)
            out.append((s_t / s_j) * self.xs[j].to(DT) + a_t * (-math.expm1(-h) * d0 + (h - 1 + e) / H * (d1 - d0)))
        return out


class Teacher(ABC):
    """Targets for sampler runs from standard normal noise ``z`` [B, *shape]."""

    exact: bool = False
    process: NoiseProcess
    #: the teacher's cost in network-evaluation equivalents per sample (sizes the tuner's budget)
    cost_nfe: int = 100

    @abstractmethod
    def targets(self, noise: Tensor, kwargs: Optional[Mapping[str, Any]] = None, batch: Optional[int] = None,
                progress: Progress = None) -> ExactTargets:
        """The ODE state at t_min and the clean target of the jump, for each noise sample (float64)."""

    @abstractmethod
    def state_at(self, noise: Tensor, t: float, kwargs: Optional[Mapping[str, Any]] = None) -> Tensor:
        """The ODE state at process time ``t`` (t_min <= t <= t_max) started from ``noise`` at t_max."""

    @abstractmethod
    def trajectory(self, noise: Tensor, times: Sequence[float], kwargs: Optional[Mapping[str, Any]] = None,
                   batch: Optional[int] = None) -> List[Tensor]:
        """The ODE states at each of the decreasing process ``times`` (t_max >= times[0], ..., times[-1] >=
        t_min), started from ``noise`` at t_max: one [B, *shape] float64 tensor per time."""

    def dense(self, noise: Tensor, kwargs: Optional[Mapping[str, Any]] = None, batch: Optional[int] = None
              ) -> "Trajectory":
        """The teacher's solutions from ``noise``, to be read at any times later (``Trajectory.at``); the default
        solves again at every read."""
        return Trajectory(noise, lambda times: self.trajectory(noise, times, kwargs, batch))

    @abstractmethod
    def describe(self) -> Dict[str, Any]:
        """What the targets are, for the records of a profile or a report."""

    @abstractmethod
    def error_bar(self, noise: Tensor, at_t_min: Optional[Tensor] = None) -> float:
        """max |difference| of the t_min targets (``at_t_min`` when already computed) to a cheaper solve of the
        same teacher: their accuracy."""


class ExactTeacher(Teacher):
    """The exact probability-flow ODE of a ``GaussianMixture`` (adaptive DOP853, ``rtol``) and its exact posterior
    mean for the jump.  ``threads``: torch threads during the solve (its right-hand side is many small ops, so one
    thread is fastest; None leaves the setting)."""

    exact = True
    cost_nfe = 60

    def __init__(self, reference: GaussianMixture, process: NoiseProcess, rtol: float = 1e-10,
                 threads: Optional[int] = 1):
        self.reference, self.process, self.rtol, self.threads = reference, process, float(rtol), threads

    def _solve(self, fn: Callable[[], Any]) -> Any:
        if self.threads is None:
            return fn()
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    def targets(self, noise, kwargs=None, batch=None, progress=None) -> ExactTargets:
        p = self.process
        n = noise.shape[0]
        step = batch or n
        parts = []
        for i in range(0, n, step):
            z = noise[i:i + step].to(DT)
            parts.append(self._solve(lambda: exact_targets(self.reference, p, p.prior_from_noise(z), rtol=self.rtol)))
            if progress is not None:
                progress(z.shape[0])
        return ExactTargets(p.t_min, torch.cat([q.at_t_min for q in parts]), torch.cat([q.denoised for q in parts]))

    def state_at(self, noise, t, kwargs=None) -> Tensor:
        p = self.process
        x_T = p.prior_from_noise(noise.to(DT))
        return self._solve(lambda: self.reference.ode_solution(p, x_T, p.t_max, float(t), self.rtol))

    def trajectory(self, noise, times, kwargs=None, batch=None) -> List[Tensor]:
        p = self.process
        ts = _check_times(p, times)
        x, t_prev, out = p.prior_from_noise(noise.to(DT)), p.t_max, []
        for t in ts:
            if t != t_prev:
                x = self._solve(lambda: self.reference.ode_solution(p, x, t_prev, t, self.rtol))
            out.append(x)
            t_prev = t
        return out

    def beyond_t_min(self, at_t_min: Tensor, sigma_end: float) -> Tensor:
        """The ODE continued from the t_min state down to sigma/alpha = ``sigma_end`` (returned in the VE view,
        x / alpha): the target of samplers that integrate to sigma = 0 instead of jumping."""
        tm = torch.tensor(self.process.t_min, dtype=DT)
        a, s = float(self.process.alpha(tm)), float(self.process.sigma_ve(tm))
        return self._solve(lambda: self.reference.ode_solve_ve(at_t_min / a, s, sigma_end, self.rtol))

    def log_prob(self, x: Tensor, t: Optional[float] = None) -> Tensor:
        """Exact log-density of ``x``: under the data mixture (``t`` None) or the marginal at process time t."""
        if t is None:
            return self.reference.log_prob(x)
        tt = torch.tensor(float(t), dtype=DT)
        a, s = float(self.process.alpha(tt)), float(self.process.sigma_ve(tt))
        return self.reference.log_prob_ve(x / a, s)

    def loglik_gap(self, x: Tensor, target: Tensor, t: Optional[float] = None) -> Tensor:
        """Per sample [log p(target) - log p(x)] / dim (data density, or the marginal at ``t``): how much less
        likely the samples are than the exact answers from the same noise."""
        d = x[0].numel()
        return (self.log_prob(target, t) - self.log_prob(x, t)) / d

    def error_bar(self, noise, at_t_min=None) -> float:
        p = self.process
        x_T = p.prior_from_noise(noise.to(DT))
        _, err = self._solve(lambda: self.reference.ode_solution(p, x_T, p.t_max, p.t_min, rtol=self.rtol,
                                                                 check=True))
        return float(err)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "exact", "what": f"exact probability-flow ODE of the Gaussian-mixture reference (DOP853, "
                f"rtol {self.rtol:g}); the jump's target is its exact posterior mean at t_min"}


class ModelTeacher(Teacher):
    """A high-NFE solution of the same model: ``solver`` with ``nfe`` evaluations on a ``spacing`` grid to t_min;
    the jump's target is the model's x0 prediction at that state."""

    def __init__(self, model: Model, solver: str = "dpm++3m", nfe: int = 100, spacing: str = "logsnr"):
        if int(nfe) < 2:
            raise ValueError(f"a teacher needs at least 2 NFE, got {nfe}")
        self.model, self.solver, self.nfe, self.spacing = model, get_solver(solver).name, int(nfe), spacing
        self.process = model.process
        self.cost_nfe = self.nfe

    def _run(self, noise: Tensor, nfe: int, kwargs: Mapping[str, Any]) -> Tensor:
        return sample(self.model, noise, self.solver, nfe=nfe, spacing=self.spacing, final="t_min",
                      model_kwargs=dict(kwargs)).to(DT)

    def targets(self, noise, kwargs=None, batch=None, progress=None) -> ExactTargets:
        kw = dict(kwargs or {})
        t_min = self.process.t_min
        n = noise.shape[0]
        step = batch or n
        xs, x0s = [], []
        for i in range(0, n, step):
            x = self._run(noise[i:i + step], self.nfe, kw)
            with torch.no_grad():
                x0s.append(self.model.evaluate(x, t_min, kw).x0.to(DT))
            xs.append(x)
            if progress is not None:
                progress(x.shape[0])
        return ExactTargets(t_min, torch.cat(xs), torch.cat(x0s))

    def state_at(self, noise, t, kwargs=None) -> Tensor:
        """``solver`` on ``nfe`` steps evenly spaced in log-SNR from t_max to ``t``."""
        p = self.process
        lo, hi = p.lam(torch.tensor(p.t_max, dtype=DT)), p.lam(torch.tensor(float(t), dtype=DT))
        ts = p.t_of_lam(torch.linspace(float(lo), float(hi), self.nfe + 1, dtype=DT))
        ts[0], ts[-1] = p.t_max, float(t)
        return sample(self.model, noise, self.solver, grid=explicit(p, t=ts, final="t_min"), nfe=None,
                      model_kwargs=dict(kwargs or {})).to(DT)

    def trajectory(self, noise, times, kwargs=None, batch=None) -> List[Tensor]:
        """``solver`` on the teacher's own grid (``nfe`` + 1 points of ``spacing`` to t_min) with ``times`` added,
        its states recorded at ``times``: the targets cost ``nfe`` + len(times) evaluations per sample."""
        p = self.process
        ts = _check_times(p, times)
        own = make_grid(p, self.nfe + 1, self.spacing, "t_min").t
        tol = 1e-9 * max(1.0, abs(p.t_max))
        extra = [float(v) for v in own if all(abs(float(v) - u) > tol for u in ts)]
        fine = sorted(set(ts) | set(extra) | {p.t_max}, reverse=True)
        if fine[-1] > p.t_min + tol:
            fine.append(p.t_min)
        want = {t: k for k, t in enumerate(ts)}
        step = batch or noise.shape[0]
        parts: List[List[Tensor]] = []
        for i in range(0, noise.shape[0], step):
            z = noise[i:i + step].to(DT)
            got: Dict[int, Tensor] = {}
            if p.t_max in want:
                got[want[p.t_max]] = p.prior_from_noise(z)

            def record(state, st):
                k = want.get(st.t_to) if st.t_to is not None else None
                if k is not None:
                    got[k] = state.x.to(DT).clone()

            sample(self.model, z, self.solver, grid=explicit(p, t=torch.tensor(fine, dtype=DT), final="t_min"),
                   nfe=None, model_kwargs=dict(kwargs or {}), after_step=record)
            parts.append([got[k] for k in range(len(ts))])
        return [torch.cat([q[k] for q in parts]) for k in range(len(ts))]

    def dense(self, noise, kwargs=None, batch=None) -> DenseTrajectory:
        """One teacher run (the same as ``targets``) that records its states and x0 predictions at every point of
        its grid, read later at any time by interpolation (``DenseTrajectory``)."""
        p = self.process
        kw = dict(kwargs or {})
        grid = make_grid(p, self.nfe + 1, self.spacing, "t_min")
        step = batch or noise.shape[0]
        xs, ds, last = [], [], []
        for i in range(0, noise.shape[0], step):
            z = noise[i:i + step].to(DT)
            rec_x, rec_d = [p.prior_from_noise(z).float()], []
            end = sample(self.model, z, self.solver, grid=grid, nfe=None, model_kwargs=kw,
                         on_call=lambda call: rec_d.append(call.prediction.x0.float()),
                         after_step=lambda state, st: rec_x.append(state.x.float())).to(DT)
            with torch.no_grad():
                rec_d.append(self.model.evaluate(end, p.t_min, kw).x0.float())
            rec_x[-1] = end.float()
            xs.append(torch.stack(rec_x, 1))
            ds.append(torch.stack(rec_d, 1))
            last.append(end)
        return DenseTrajectory(noise, p, grid.t, torch.cat(xs).transpose(0, 1), torch.cat(ds).transpose(0, 1),
                               torch.cat(last))

    def error_bar(self, noise, at_t_min=None) -> float:
        full = self._run(noise, self.nfe, {}) if at_t_min is None else at_t_min
        half = self._run(noise, max(2, self.nfe // 2), {})
        return float((half - full).abs().max())

    def describe(self) -> Dict[str, Any]:
        return {"kind": "model", "solver": self.solver, "nfe": self.nfe, "spacing": self.spacing,
                "what": f"the same model, {self.solver} with {self.nfe} NFE on a {self.spacing} grid to t_min; "
                        "the jump's target is the model's x0 prediction at that state"}


def _check_times(process, times: Sequence[float]) -> List[float]:
    """``times`` as floats, decreasing and within [t_min, t_max], or a clear error."""
    ts = [float(t) for t in times]
    if not ts:
        raise ValueError("trajectory needs at least one time")
    if any(b >= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"trajectory times must be strictly decreasing, got {ts}")
    tol = 1e-9 * max(1.0, abs(process.t_max))
    if ts[0] > process.t_max + tol or ts[-1] < process.t_min - tol:
        raise ValueError(f"trajectory times leave [{process.t_min:.6g}, {process.t_max:.6g}]: {ts[0]:.6g} .. {ts[-1]:.6g}")
    return ts


def fine_grid(process) -> str:
    """The grid of a converged high-NFE solution of a trained model: uniform in t (every DDPM timestep of a discrete
    schedule, which is rough near t = 0 for a trained network), Karras for EDM (uniform in sigma would spend the
    steps at large noise).  Two such 1000-NFE third-order solutions agree to ~1e-4 RMSE on the shipped models, while
    the former bench reference (log-SNR, 200 NFE) was 1e-3-3e-3 off (``benchmarks/reference_convergence.py``)."""
    return "karras" if type(process).__name__ == "EDM" else "uniform"


TeacherSpec = Union[str, Teacher, GaussianMixture, None]


def make_teacher(spec: TeacherSpec, model: Model, reference: Optional[GaussianMixture] = None,
                 nfe: int = 100) -> Teacher:
    """A teacher from a spec: None/'auto' (``ModelTeacher`` with dpm++3m and ``nfe`` on a log-SNR grid; at 100 NFE
    it is 3e-3-7e-3 RMSE off a converged solution on the shipped models, as close as the fine grid at that NFE),
    'solver:nfe[:spacing]' (grid
    default logsnr), 'exact'
    (needs ``reference``), a ``GaussianMixture`` (exact) or a ``Teacher`` (returned as is)."""
    if spec is None or spec == "auto":
        return ModelTeacher(model, nfe=nfe)
    if isinstance(spec, Teacher):
        return spec
    if isinstance(spec, GaussianMixture):
        return ExactTeacher(spec, model.process)
    if isinstance(spec, str):
        if spec == "exact":
            if reference is None:
                raise ValueError("teacher='exact' needs the GaussianMixture reference (reference=...)")
            return ExactTeacher(reference, model.process)
        name, _, rest = spec.partition(":")
        n, _, spacing = rest.partition(":")
        try:
            k = int(n) if n else nfe
        except ValueError:
            raise ValueError(f"teacher {spec!r}: the NFE after ':' must be an integer") from None
        return ModelTeacher(model, name, k, spacing or "logsnr")
    raise TypeError(f"teacher must be 'solver:nfe[:spacing]', 'exact', a GaussianMixture or a Teacher, got {spec!r}")

