"""``sample``: one entry point that puts model, time grid and solver together.

validate -> plan (NFE budget or explicit grid) -> build the state and the evaluator -> run the solver program
under the gradient policy -> ``SampleInfo``.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

from ..adapters.denoiser import Model
from ..grids import FINALS, TimeGrid, explicit, make_grid
from ..solvers import get_solver
from ..solvers.drivers import Call, Evaluator, Step, drive
from ..solvers.registry import Plan, SolverInfo
from ..solvers.state import Noise, SamplingError, SolverState
from ..util import seeding
from .analytic import GaussianStart, restricted, spacing_after_start
from .defaults import (
    LEGACY_FINAL,
    LEGACY_SOLVER,
    LEGACY_SPACING,
    default_sampler,
    model_guidance,
    model_parameterisation,
)

Tensor = torch.Tensor


@dataclass
class SampleInfo:
    """What a sampling run did: the solver, the NFE it actually used and the grid it stepped on.

    ``check_calls``: network calls made outside the solver, to verify a profile or statistics against the model
    (0 once that model object is verified)."""

    solver: str
    nfe: int
    steps: int
    grid: TimeGrid
    options: Dict[str, Any] = field(default_factory=dict)
    check_calls: int = 0

    @property
    def ends_clean(self) -> bool:
        return self.grid.clean_end


@runtime_checkable
class SamplerSpec(Protocol):
    """A tuned sampler (``ds.Profile``): per NFE the solver, grid and options to run with a model.

    ``settings(model, nfe, shape)`` returns (solver, grid, options, check_calls), raising a ``ModelMismatch``
    for a model it was not made for."""

    def settings_for(self, model: Model, nfe: Optional[int], shape: Sequence[int]) -> Tuple[str, TimeGrid,
                                                                                             Dict[str, Any], int]: ...


def _check_noise(noise: Any) -> None:
    if not isinstance(noise, Tensor) or noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError("noise must be a tensor of shape [batch, ...] with batch >= 1")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")


def plan_run(info: SolverInfo, model: Model, nfe: Optional[int], spacing: Union[str, Callable],
             grid: Optional[Union[TimeGrid, Sequence[float], Tensor]], final: str,
             t_start: Optional[float] = None) -> Tuple[TimeGrid, Plan]:
    """The grid and the plan of a run: the largest grid of ``spacing`` within ``nfe`` (10 when neither nfe nor
    grid is given; laid on [t_min, ``t_start``] when given), or the given grid, whose cost must fit ``nfe`` when
    both are given."""
    proc = restricted(model.process, t_start)
    if t_start is not None:
        spacing = spacing_after_start(spacing)
    if grid is None:
        nfe = 10 if nfe is None else nfe
        clean = final == "denoise"
        need = info.min_nfe(clean)
        if nfe < need:
            raise ValueError(f"solver {info.name!r} needs nfe >= {need} (final={final!r}), got {nfe}")
        plan = info.plan_budget(nfe, clean)
        n_points = plan.steps if clean else plan.steps + 1
        return make_grid(proc, n_points, spacing, final), plan
    proc = model.process
    tgrid = grid if isinstance(grid, TimeGrid) else explicit(proc, t=grid, final=final)  # type: ignore[arg-type]
    if tgrid.steps < 1:
        raise ValueError("an explicit grid needs at least two points (or one point and final='denoise')")
    plan = info.plan_grid(tgrid)
    if nfe is not None and plan.cost > nfe:
        raise ValueError(f"the grid needs {plan.cost} NFE with solver {info.name!r}, more than nfe={nfe}")
    return tgrid, plan


def _solver_options(info: SolverInfo, plan: Plan, options: Dict[str, Any]) -> Dict[str, Any]:
    opts = {**info.defaults, **plan.options, **options}
    accepted = inspect.signature(info.fn).parameters
    unknown = [k for k in opts if k not in accepted]
    if unknown:
        valid = [k for k in accepted if k not in ("ev", "x", "grid", "noise", "orders")]
        raise ValueError(f"solver {info.name!r} has no option(s) {unknown}; it takes {valid}")
    return opts


def sample(model: Model, noise: Optional[Tensor] = None, solver: Optional[str] = None, nfe: Optional[int] = None,
           spacing: Optional[Union[str, Callable]] = None,
           grid: Optional[Union[TimeGrid, Sequence[float], Tensor]] = None, final: Optional[str] = None,
           seeds: Optional[Sequence[int]] = None,
           generators: Optional[Sequence[torch.Generator]] = None, model_kwargs: Optional[Dict[str, Any]] = None,
           callback: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = False,
           return_info: bool = False, scale_noise: bool = True, dtype: Optional[torch.dtype] = None,
           profile: Optional[SamplerSpec] = None, on_call: Optional[Callable[[Call], Any]] = None,
           after_step: Optional[Callable[[SolverState, Step], Optional[SolverState]]] = None, grad: bool = False,
           diffusion: Optional[Callable[[Tensor], Tensor]] = None, shape: Optional[Sequence[int]] = None,
           start: Optional[GaussianStart] = None, **options: Any):
    """Sample from a frozen model in at most ``nfe`` network evaluations.

    Args:
        model: anything with the ``ds.Model`` protocol (``ds.Denoiser``, guidance wrappers, ...).
        noise: standard normal noise [B, ...]; the process maps it to the start of sampling
            (``process.prior_from_noise``: ``prior_scale * noise`` for Gaussian processes; pass
            ``scale_noise=False`` if it already is x_T).  ``None``: drawn from ``seeds`` (needs ``shape`` or
            ``model.sample_shape``) by the one seeding convention (``diffsolve.util.seeding``).
        solver: a name from ``ds.solvers()``.  ``None`` (and no ``grid``): the default rule
            ``diffsolve.sampling.defaults.default_sampler(nfe, process, parameterisation)`` picks the solver,
            its options, the spacing and the last step by NFE (see ``docs/default_rule.md``); an explicit
            ``spacing``/``final``/option still overrides its part of that choice.  ``None`` with a ``grid``:
            'dpm++2m' (the rule is a rule for NFE budgets, not for given grids).  The previous default is
            ``solver="dpm++2m", spacing="logsnr", final="denoise"``.
        nfe: budget of network evaluations (the solver picks the largest grid that fits); 10 when
            neither ``nfe`` nor ``grid`` is given.  With an explicit ``grid`` it is an upper bound only.
        spacing: time-step spacing name (``ds.grids.SPACINGS``) or a callable ``(process, n) -> t``
            (``None``: the rule's with ``solver=None``, else 'logsnr').
        grid: an explicit ``TimeGrid`` (``ds.explicit``) or a sequence of process times.
        final: 'denoise' (last step jumps to clean data with the denoiser) or 't_min' (stop there)
            (``None``: the rule's with ``solver=None`` and no grid, else 'denoise').
        seeds / generators: per-sample seeds (solver randomness, and the starting noise when ``noise`` is None)
            or generators for stochastic solvers (batch-size independent).
        model_kwargs: extra keyword arguments for the network (labels, embeddings; an offset's y).
        callback: called after every step i with {'i', 'x' (the state at t_{i+1}), 't' (t_{i+1}; None after
            the jump to clean data), 't_from' (t_i), 'clean', 'denoised' (the x0 prediction at (x_i, t_i))}.
        progress: show a progress bar over network evaluations.
        return_info: also return a ``SampleInfo`` (NFE used, grid, options).
        dtype: dtype of the solver state (default float64; float32 on MPS).
        profile: a tuned sampler (``ds.Profile``; load paths with ``ds.Profile.load``): its entry for ``nfe``
            sets solver, grid, last step and options (``solver``, ``spacing``, ``final`` are ignored; ``grid``
            must be None).  A profile made for another model, process, guidance scale or data shape is refused.
        on_call / after_step: hooks, see ``diffsolve.solvers.drivers``.
        grad: build autograd graphs through the run (default: no graphs; gradient-based wrappers enable them
            locally either way).
        diffusion: g~(t)^2 of the reverse SDE for the SDE solvers that take one (default: the process's g(t)^2).
        start: an analytic start (``ds.GaussianStart``: the data's Gaussian, whose ODE is closed form): the run
            jumps from t_max to the switch time without a network call and the solver starts there.  The switch
            time is the option ``skip`` (the fraction of the log-SNR range to jump over, e.g. ``skip=0.25``), or
            the first time of an explicit ``grid``.
        **options: solver options (e.g. ``order=3``, ``eta=0.5``, ``lower_order_final=False``), and ``skip``.
    Returns:
        the sample (float64 on CPU/CUDA), or ``(sample, info)`` with ``return_info=True``.
    """
    if not isinstance(model, Model):
        raise TypeError("model must provide the diffsolve model protocol (process, evaluate, identity); wrap "
                        "your network: ds.Denoiser(net, process, ...)")
    if noise is None:
        if seeds is None:
            raise ValueError("pass noise, or seeds (with shape= or a model that knows its sample_shape)")
        shape = shape if shape is not None else getattr(model, "sample_shape", None)
        if shape is None:
            raise ValueError("noise=None needs shape= (the model does not record its sample_shape)")
        noise = seeding.noise(list(seeds), shape)
    _check_noise(noise)
    if nfe is not None and (not isinstance(nfe, int) or isinstance(nfe, bool)):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    check_calls = 0
    if profile is None:
        solver, spacing, final, options = _resolve_defaults(model, nfe, grid, solver, spacing, final, options)
    else:
        if grid is not None:
            raise ValueError("pass either profile= or grid=, not both (the profile's entry has its own grid)")
        if not isinstance(profile, SamplerSpec):
            raise TypeError("profile must be a tuned sampler such as ds.Profile (load a path with ds.Profile.load)")
        solver, grid, p_opts, check_calls = profile.settings_for(model, nfe, tuple(noise.shape[1:]))
        options = {**p_opts, **options}
        final = "denoise" if grid.clean_end else "t_min"
        spacing = LEGACY_SPACING  # unused: the profile's entry has its grid
    assert solver is not None and spacing is not None and final is not None
    t_switch = _switch_time(model.process, start, options.pop("skip", None), grid)
    info = get_solver(solver)
    if final not in FINALS:
        raise ValueError(f"unknown final={final!r}; use one of {FINALS}")
    proc = model.process
    info.check_process(proc)
    if diffusion is not None and info.name != "euler-maruyama":
        raise ValueError(f"diffusion= is taken by the SDE solver 'euler-maruyama', not by {info.name!r}")
    tgrid, plan = plan_run(info, model, nfe, spacing, grid, final, t_switch)
    opts = _solver_options(info, plan, options)
    if seeds is not None:
        if len(seeds) != noise.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {noise.shape[0]}")
        generators = seeding.solver_generators(seeds, device=noise.device)
    rng = Noise(generators)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.cost, desc=info.name, unit="nfe", leave=False)
    ev = Evaluator(model, model_kwargs, callback, bar, on_call=on_call, after_step=after_step, diffusion=diffusion)
    sd = dtype or (torch.float32 if noise.device.type == "mps" else torch.float64)
    if sd not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {sd}")
    x = proc.prior_from_noise(noise.to(sd)) if scale_noise else noise.to(sd)
    offset_y = _offset(proc, ev.kwargs, x)
    t_x = proc.t_max if start is not None else tgrid.t[0]  # where x is: an analytic start begins at t_max
    if offset_y is not None and not scale_noise:  # a given x_T: solve in the standard frame x - b(t) y
        x = x - _b(proc, t_x) * offset_y
    elif offset_y is not None and getattr(proc, "prior_at_y", False):  # x_T = y + prior: its standard frame
        x = x + (1 - _b(proc, t_x)) * offset_y
    if start is not None and float(tgrid.t[0]) < proc.t_max:  # the closed-form Gaussian ODE to the grid's start
        x = start.solve(proc, x, proc.t_max, float(tgrid.t[0]))
    ev.begin(x, rng)
    mode = contextlib.nullcontext() if grad else torch.no_grad()
    try:
        with mode:
            out = drive(info.fn(ev, x, tgrid, rng, **opts), ev)
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(out).all():
        raise SamplingError(f"solver {info.name!r} produced a non-finite sample")
    if offset_y is not None and not tgrid.clean_end:  # back to x_t at t_min
        out = out + _b(proc, tgrid.t[-1]) * ev.state.kwargs[str(proc.offset_key)].to(out)  # rows after any reindex
    if return_info:
        opts.pop("orders", None)
        return out, SampleInfo(info.name, ev.nfe, tgrid.steps, tgrid, opts, check_calls)
    return out


def _resolve_defaults(model: Model, nfe: Optional[int], grid: Any, solver: Optional[str],
                      spacing: Optional[Union[str, Callable]], final: Optional[str],
                      options: Dict[str, Any]) -> Tuple[str, Union[str, Callable], str, Dict[str, Any]]:
    """(solver, spacing, final, options) of a run without a profile: the default rule fills what is not given
    when no solver and no grid are given; otherwise the previous defaults (dpm++2m, logsnr, denoise) do."""
    if solver is None and grid is None:
        rule = default_sampler(10 if nfe is None else nfe, model.process, model_parameterisation(model),
                               model_guidance(model))
        return (rule.solver, rule.spacing if spacing is None else spacing, rule.final if final is None else final,
                {**rule.options, **options})
    return (LEGACY_SOLVER if solver is None else solver, LEGACY_SPACING if spacing is None else spacing,
            LEGACY_FINAL if final is None else final, options)


def _switch_time(proc, start: Optional[GaussianStart], skip: Optional[float], grid: Any) -> Optional[float]:
    """Where the solver takes over from an analytic start: ``skip``'s switch time (a budget's grid is laid from
    there), None for an explicit grid (its first time) or without a start."""
    if start is None:
        if skip is not None:
            raise ValueError("skip= is the switch point of an analytic start: pass start=ds.GaussianStart(...) too")
        return None
    if not isinstance(start, GaussianStart):
        raise TypeError(f"start must be a ds.GaussianStart, got {type(start).__name__}")
    if grid is not None:
        return None
    if skip is None:
        raise ValueError("an analytic start needs skip= (the fraction of the log-SNR range it jumps over, in [0, 1)) "
                         "or an explicit grid that starts at the switch time")
    return start.switch_time(proc, float(skip))


def _offset(proc, kwargs: Dict[str, Any], x: Tensor) -> Optional[Tensor]:
    if proc.offset_key is None:
        return None
    y = kwargs.get(proc.offset_key)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        raise ValueError(f"the process has an offset: model_kwargs[{proc.offset_key!r}] must be a tensor shaped like "
                         f"the batch {tuple(x.shape)}")
    return y.to(x)


def _b(proc, t: Union[float, Tensor]) -> float:
    return float(proc.offset(torch.as_tensor(float(t), dtype=torch.float64)))
