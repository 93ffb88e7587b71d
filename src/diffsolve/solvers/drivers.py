"""The loops every solver runs on, and the two hooks that reach all of them.

A solver is a *program*: a generator that yields evaluation ``Request``s and receives ``Point``s.  ``drive``
runs a program against a model (``ds.sample``); ``Stepper`` runs it one evaluation at a time against outputs
handed in from outside (the diffusers scheduler).  Two drivers own the loop and the ``SolverState``:

* ``run_multistep``: one evaluation per step, an update rule of the history (DDIM, DPM-Solver(++) multistep,
  UniPC with its corrector, DEIS/iPNDM, momentum, DPM-Solver-v3);
* ``run_singlestep``: a step program that may request more evaluations inside the step (Heun, PNDM's first
  step, singlestep DPM-Solver, Euler-Maruyama).

A step whose target is clean data (the grid's ``clean_end``) is always the denoiser jump x <- x0(x_i, t_i).

Hooks (``ds.sample(on_call=..., after_step=...)``):

* ``on_call(call: Call)`` after every model evaluation: ``call.x`` and ``call.t`` are the state and process time
  evaluated, ``call.prediction`` the lazy prediction (``.x0``, ``.eps``, and ``.net_input`` = (network input,
  network time) for a ``Denoiser``), ``call.index`` counts evaluations from 0 and ``call.step`` is the step it
  belongs to.  It sees exactly ``SampleInfo.nfe`` calls.
* ``after_step(state, step: Step)`` after every step i (t_i -> t_{i+1}): ``state.x`` is already the new state at
  t_{i+1} and ``state.i == i + 1``; ``step.t_from`` is t_i, ``step.t_to`` is t_{i+1} (None when the step jumped
  to clean data, ``step.clean``), and ``step.denoised`` is the x0 prediction made at (x_i, t_i), i.e. at the
  start of the step.  It may return a changed ``SolverState`` (or change it in place and return None): replace
  ``state.x``, ``state.reindex(idx)`` (particle resampling: x, history, random streams, per-sample model
  kwargs and solver extras move together) or ``state.reset_history()`` (the next steps warm up again).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generator, List, Optional

import torch

from ..adapters.denoiser import Model, NonFiniteError, Prediction
from ..grids import TimeGrid
from .state import Noise, Point, SamplingError, SolverState

Tensor = torch.Tensor


@dataclass
class Request:
    """An evaluation a solver program asks for: state ``x`` at process time ``t`` ((alpha, sigma, lambda) if known)."""

    x: Tensor
    t: float
    coeffs: Optional[tuple] = None


@dataclass
class Call:
    """What ``on_call`` sees: one model evaluation."""

    index: int
    step: int
    x: Tensor
    t: float
    prediction: Prediction


@dataclass
class Step:
    """What ``after_step`` sees besides the state: step ``i`` from ``t_from`` to ``t_to`` (None: clean data)."""

    i: int
    t_from: float
    t_to: Optional[float]
    denoised: Tensor
    clean: bool


Program = Generator[Request, Point, Tensor]


class Evaluator:
    """The solver's view of the model and the run: evaluates requests (counting NFE, checking results, firing
    ``on_call``), owns the ``SolverState`` and closes every step (finiteness check, ``callback``, ``after_step``)."""

    def __init__(self, model: Model, model_kwargs: Optional[Dict[str, Any]] = None,
                 callback: Optional[Callable[[Dict[str, Any]], None]] = None, progress: Optional[Any] = None,
                 on_call: Optional[Callable[[Call], Any]] = None,
                 after_step: Optional[Callable[[SolverState, Step], Optional[SolverState]]] = None,
                 diffusion: Optional[Callable[[Tensor], Tensor]] = None):
        self.model, self.kwargs = model, dict(model_kwargs or {})
        self.callback, self.progress = callback, progress
        self.on_call, self.after_step, self.diffusion = on_call, after_step, diffusion
        self.nfe = 0
        self.step = 0
        self._state: Optional[SolverState] = None

    @property
    def state(self) -> SolverState:
        """The solver state of the run (``begin`` creates it)."""
        if self._state is None:
            raise SamplingError("the evaluator has no solver state yet: call begin(x, noise) first")
        return self._state

    @state.setter
    def state(self, st: SolverState) -> None:
        self._state = st

    @property
    def process(self):
        return self.model.process

    @property
    def den(self) -> Model:  # the former name of ``model``
        return self.model

    def diffusion2(self, t: Tensor) -> Tensor:
        """g~(t)^2 of the reverse SDE: ``diffusion`` when given, else the process's own g(t)^2."""
        if self.diffusion is None:
            return self.process.diffusion2(t)
        return torch.as_tensor(self.diffusion(t), dtype=torch.float64)

    def begin(self, x: Tensor, noise: Any) -> SolverState:
        if self._state is None:
            self._state = SolverState(x=x, noise=noise if noise is not None else Noise(), kwargs=dict(self.kwargs))
        return self._state

    # -- evaluations ----------------------------------------------------------------------
    def request(self, x: Tensor, t: float, coeffs: Optional[tuple] = None) -> Request:
        return Request(x, float(t), coeffs)

    def at(self, x: Tensor, grid: TimeGrid, i: int) -> Request:
        return Request(x, float(grid.t[i]), grid_point(grid, i))

    def evaluate(self, req: Request) -> Point:
        t, coeffs = req.t, req.coeffs
        if coeffs is None:
            p = self.process
            tt = torch.tensor(float(t), dtype=torch.float64)
            coeffs = (float(p.alpha(tt)), float(p.sigma(tt)), float(p.lam(tt)))
        a, s, lam = coeffs
        kwargs = self._state.kwargs if self._state is not None else self.kwargs
        try:
            pred = self.model.evaluate(req.x, float(t), kwargs, (a, s))
        except NonFiniteError as e:
            raise SamplingError(f"step {self.step}: {e}") from None
        if self.on_call is not None:
            self.on_call(Call(self.nfe, self.step, req.x, float(t), pred))
        self.nfe += 1
        if self.progress is not None:
            self.progress.update(1)
        return Point(float(t), lam, a, s, req.x, pred)

    def __call__(self, x: Tensor, t: float, coeffs: Optional[tuple] = None) -> Point:
        """A synchronous evaluation (outside solver programs)."""
        return self.evaluate(Request(x, float(t), coeffs))

    # -- closing a step ---------------------------------------------------------------------
    def finish_step(self, i: int, x: Tensor, grid: TimeGrid, point: Optional[Point] = None) -> Tensor:
        """Bookkeeping after step i -> i+1: finiteness check (one reduction), ``callback`` and ``after_step``;
        returns the (possibly hook-replaced) state x."""
        clean = grid.is_clean(i + 1)
        if not torch.isfinite(x.sum()):
            t_next = "clean" if clean else f"t={float(grid.t[i + 1]):.6g}"
            raise SamplingError(f"state became non-finite at step {i} ({float(grid.t[i]):.6g} -> {t_next}); "
                                "try more NFE, another grid, or a lower-order solver")
        if self._state is None:
            self._state = SolverState(x=x)
        st = self._state
        st.x, st.i = x, i + 1
        self.step = i + 1
        t_to = None if clean else float(grid.t[i + 1])
        if self.callback is not None:
            self.callback({"i": i, "x": x, "t": t_to, "t_from": float(grid.t[i]), "clean": clean,
                           "denoised": point.x0 if point is not None else None})
        if self.after_step is not None:
            den = point.x0 if point is not None else x
            t_from = point.t if point is not None else float(grid.t[i])
            new = self.after_step(st, Step(i, t_from, t_to, den, clean))
            if new is not None:
                if not isinstance(new, SolverState):
                    raise SamplingError(f"after_step must return a SolverState or None, got {type(new).__name__}")
                self.state = new
            st = self.state
            if tuple(st.x.shape[1:]) != tuple(x.shape[1:]) or not torch.isfinite(st.x.sum()):
                raise SamplingError(f"after_step at step {i} left a state of shape {tuple(st.x.shape)} "
                                    f"(expected [*, {', '.join(map(str, x.shape[1:]))}]) or non-finite values")
            st.i = i + 1
        return st.x


def grid_point(grid: TimeGrid, i: int) -> tuple:
    """(alpha, sigma, lambda) of grid point i as floats."""
    return float(grid.alpha[i]), float(grid.sigma[i]), float(grid.lam[i])


# ----------------------------------------------------------------------------------------
# running programs
# ----------------------------------------------------------------------------------------
def drive(program: Any, ev: Evaluator) -> Any:
    """Run a solver program to the end, answering each request with a model evaluation."""
    if not inspect.isgenerator(program):
        return program
    try:
        req = next(program)
        while True:
            req = program.send(ev.evaluate(req))  # type: ignore[arg-type]
    except StopIteration as stop:
        return stop.value


class Stepper:
    """A solver program run one evaluation at a time: ``request`` is the pending evaluation (None when done);
    ``give(point)`` answers it; ``result`` is the sample once ``done``."""

    def __init__(self, program: Program):
        self.program = program
        self.result: Optional[Tensor] = None
        self.request: Optional[Request] = None
        try:
            self.request = next(program)
        except StopIteration as stop:
            self.result = stop.value

    @property
    def done(self) -> bool:
        return self.request is None

    def give(self, point: Point) -> Optional[Request]:
        if self.request is None:
            raise SamplingError("the solver has finished: no evaluation is pending")
        try:
            self.request = self.program.send(point)
        except StopIteration as stop:
            self.request, self.result = None, stop.value
        return self.request


# ----------------------------------------------------------------------------------------
# the drivers
# ----------------------------------------------------------------------------------------
def step_order(i: int, steps: int, order: int, lower_order_final: bool, available: Optional[int] = None) -> int:
    """Order of step i (0-based) of a multistep method: warm up from 1 (``available`` points of history, i + 1
    by default), optionally lower at the end."""
    k = min(order, i + 1 if available is None else available)
    if lower_order_final:
        k = min(k, steps - i)
    return max(k, 1)


def resolve_lower_order_final(flag: Optional[bool], grid: TimeGrid) -> bool:
    """``None`` (auto): lower the order on the last steps when there are fewer than 15 steps, or when the
    last finite log-SNR interval is over 3x the one before (large final steps blow up high orders)."""
    if flag is not None:
        return bool(flag)
    if grid.steps < 15:
        return True
    lam = grid.lam[torch.isfinite(grid.lam)]
    if lam.numel() >= 3:
        d = lam[1:] - lam[:-1]
        return bool(d[-1] > 3 * d[-2])
    return False


UpdateFn = Callable[[Tensor, int, List[Point], int], Tensor]


def _evaluate_point(ev: Evaluator, grid: TimeGrid, i: int, history: int) -> Generator[Request, Point, Point]:
    """Evaluate at (state x, t_i) and keep the point in the state's history (the latest ``history`` points)."""
    pt = yield ev.at(ev.state.x, grid, i)
    st = ev.state
    st.history = (st.history + [pt])[-history:]
    return pt


def run_multistep(ev: Evaluator, x: Tensor, grid: TimeGrid, update: UpdateFn, order: int,
                  lower_order_final: Optional[bool] = None, history: int = 4,
                  correct: Optional[Callable[[Tensor, List[Point], int], Tensor]] = None) -> Program:
    """Shared loop of all one-evaluation-per-step methods.

    For each step i: evaluate the model at (x, t_i), optionally ``correct`` x with that evaluation
    (UniC; skipped before the jump to clean data, which uses the prediction at the uncorrected state), then
    ``update(x, i, hist, k)`` gives x_{i+1} with order k.  ``hist`` holds the latest ``history`` points,
    newest last.
    """
    lof = resolve_lower_order_final(lower_order_final, grid)
    ev.begin(x, None)
    for i in range(grid.steps):
        pt = yield from _evaluate_point(ev, grid, i, history)
        st = ev.state
        clean = grid.is_clean(i + 1)
        if correct is not None and len(st.history) > 1 and st.order > 0 and not clean:
            st.x = correct(st.x, st.history, st.order)
            st.history[-1].x = st.x
        if clean:
            x_next, st.order = pt.x0, 1
        else:
            k = step_order(i, grid.steps, order, lof, len(st.history))
            x_next, st.order = update(st.x, i, st.history, k), k
        ev.finish_step(i, x_next, grid, pt)
    return ev.state.x


StepFn = Callable[..., Any]


def run_singlestep(ev: Evaluator, x: Tensor, grid: TimeGrid, step: StepFn,
                   orders: Optional[List[int]] = None, history: int = 1) -> Program:
    """Shared loop of the methods that may evaluate inside a step.

    For each step i: evaluate at (x, t_i); a step to clean data is the denoiser jump; otherwise
    ``step(x, i, p0, k)`` (a plain function, or a generator that yields ``ev.request(...)`` for its further
    evaluations) gives x_{i+1}; ``k`` is ``orders[i]`` (1 without ``orders``).  The state's history keeps the
    latest ``history`` grid evaluations.
    """
    if orders is not None and len(orders) != grid.steps:
        raise ValueError(f"{len(orders)} step orders for a grid of {grid.steps} steps")
    ev.begin(x, None)
    for i in range(grid.steps):
        p0 = yield from _evaluate_point(ev, grid, i, history)
        st = ev.state
        if grid.is_clean(i + 1):
            x_next = p0.x0
        else:
            out = step(st.x, i, p0, orders[i] if orders is not None else 1)
            x_next = (yield from out) if inspect.isgenerator(out) else out
        st.order = 1
        ev.finish_step(i, x_next, grid, p0)
    return ev.state.x


