"""diffusers interop, both ways (diffusers is an optional dependency).

* ``load_diffusers(path)``: a saved diffusers model folder (``DDPMPipeline.save_pretrained`` layout,
  or a bare UNet folder with a ``scheduler_config.json``) -> a ready ``ds.Denoiser``; the schedule
  (betas), ``prediction_type`` and timestep convention come from the scheduler config.
* ``DiffsolveScheduler``: a diffusers-compatible scheduler that runs any diffsolve solver inside an
  unmodified diffusers pipeline.  Pipelines push one model output per ``step``; the solver runs in its
  steppable form and hands each state it wants evaluated back to the pipeline as ``prev_sample``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..adapters.denoiser import Denoiser
from ..adapters.parameterisation import PARAMETERISATIONS, from_diffusers
from ..grids import FINALS, SPACINGS, explicit
from ..processes import VPDiscrete
from ..sampling import plan_run
from ..sampling.defaults import AUTO, LEGACY_FINAL, LEGACY_SOLVER, LEGACY_SPACING, default_sampler
from ..solvers import get_solver
from ..solvers.drivers import Evaluator, Stepper, drive
from ..solvers.state import Noise

try:  # diffusers is optional
    from diffusers import ConfigMixin, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError:  # pragma: no cover - exercised only without diffusers
    ConfigMixin = SchedulerMixin = object  # type: ignore

    def register_to_config(fn):  # type: ignore
        return fn

    SchedulerOutput = None  # type: ignore

PREDICTION_TYPES = {p.diffusers: p.name for p in PARAMETERISATIONS.values() if p.diffusers}


def _require_diffusers() -> None:
    if SchedulerOutput is None:
        raise ImportError("diffusers is not installed: pip install 'diffsolve[bench]' (or pip install diffusers)")


def process_from_scheduler_config(cfg: Dict[str, Any]) -> VPDiscrete:
    """The training schedule a diffusers scheduler config describes."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        return VPDiscrete.from_betas(torch.as_tensor(cfg["trained_betas"], dtype=torch.float64))
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return VPDiscrete.linear(n, b0, b1)
    if kind == "scaled_linear":
        return VPDiscrete.scaled_linear(n, b0, b1)
    if kind == "squaredcos_cap_v2":
        return VPDiscrete.cosine(n)
    raise ValueError(f"unsupported beta_schedule {kind!r} in the scheduler config")


def prediction_from_config(cfg: Dict[str, Any]) -> str:
    return from_diffusers(cfg.get("prediction_type", "epsilon"))


def load_diffusers(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Denoiser:
    """Load a diffusers UNet and its scheduler config from a local folder (never downloads)."""
    _require_diffusers()
    from diffusers import UNet2DModel

    path = os.fspath(path)
    sched = next((p for p in (os.path.join(path, "scheduler", "scheduler_config.json"),
                              os.path.join(path, "scheduler_config.json")) if os.path.isfile(p)), None)
    if sched is None:
        raise ValueError(f"{path}: no scheduler_config.json (expected scheduler/scheduler_config.json "
                         "as DDPMPipeline.save_pretrained writes it)")
    unet_dir = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"{path}: no UNet config.json (looked in {unet_dir})")
    with open(sched) as f:
        cfg = json.load(f)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    except Exception as e:  # diffusers raises many kinds; say which file failed
        raise ValueError(f"{unet_dir}: could not load the UNet ({type(e).__name__}: {e})") from None
    unet.eval().requires_grad_(False)
    if dtype is not None:
        unet.to(dtype)

    def net(x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        return unet(x, t, **kw).sample  # the caller's grad mode decides (ds.sample runs without graphs)

    den = Denoiser(net, process_from_scheduler_config(cfg), prediction_from_config(cfg), dtype=unet.dtype)
    den.module = unet  # keep a handle on the network (device moves, inspection)
    return den


# ----------------------------------------------------------------------------------------
# the scheduler
# ----------------------------------------------------------------------------------------
class _Handed:
    """The network of the scheduler's model: returns the output the pipeline handed to ``step``."""

    def __init__(self):
        self.output: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            raise RuntimeError("no model output was handed to the scheduler")
        out, self.output = self.output, None
        return out.to(x.dtype)


class DiffsolveScheduler(SchedulerMixin, ConfigMixin):
    """Run any diffsolve solver inside a diffusers pipeline.

    ``set_timesteps(n)`` treats ``n`` as the NFE budget; ``timesteps`` are the exact (possibly
    fractional) model times the solver will evaluate, in order; ``step`` returns, as ``prev_sample``,
    the next state the solver wants evaluated, and after the last evaluation the final sample.  The solver
    runs in its steppable form (``solvers.drivers.Stepper``): each ``step`` answers the pending evaluation
    with the pipeline's model output and advances the solver to its next request.
    Build it from any diffusers scheduler config: ``DiffsolveScheduler.from_config(pipe.scheduler.config,
    solver="unipc-bh2")``.

    ``solver``, ``spacing`` and ``final`` default to ``"auto"``: as in ``ds.sample``, the default rule
    (``diffsolve.sampling.defaults.default_sampler``) picks them by the NFE budget ``set_timesteps(n)`` gets,
    the process and the prediction type, with ``solver_options`` on top of the rule's options.  With an
    explicit ``solver`` (or explicit ``timesteps``) an ``"auto"`` spacing is 'logsnr' and an ``"auto"`` final
    is 'denoise', the previous defaults (reachable as ``solver="dpm++2m", spacing="logsnr", final="denoise"``).
    """

    order = 1
    _compatibles: List[str] = []

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
                 prediction_type: str = "epsilon", solver: str = AUTO, spacing: str = AUTO,
                 final: str = AUTO, solver_options: Optional[Dict[str, Any]] = None):
        _require_diffusers()
        if solver != AUTO:
            get_solver(solver)  # fail early on an unknown name
        if spacing != AUTO and spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; known: {AUTO}, {', '.join(SPACINGS)}")
        if final != AUTO and final not in FINALS:
            raise ValueError(f"unknown final={final!r}; use one of {(AUTO,) + tuple(FINALS)}")
        cfg = {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
               "beta_schedule": beta_schedule, "trained_betas": trained_betas, "prediction_type": prediction_type}
        self.process = process_from_scheduler_config(cfg)
        self.prediction = prediction_from_config(cfg)
        self.init_noise_sigma = float(self.process.prior_scale)
        self.timesteps = torch.zeros(0)
        self.num_inference_steps: Optional[int] = None
        self._grid = None
        self._stepper: Optional[Stepper] = None

    # -- diffusers API ------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample  # the network sees x_t itself (VP): nothing to scale

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Any = None,
                      timesteps: Optional[List[float]] = None) -> None:
        """Plan the run: ``num_inference_steps`` is the NFE budget; ``timesteps`` an explicit grid of
        model times (then the last step jumps to clean data when ``final='denoise'``)."""
        self._stepper = None
        if timesteps is None and num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps (the NFE budget) or timesteps")
        nfe = None if timesteps is not None else int(num_inference_steps)  # type: ignore[arg-type]
        solver, spacing, final, opts = self.resolved(nfe)
        grid = None
        if timesteps is not None:
            grid = explicit(self.process, t=[float(t) for t in timesteps], final=final)
        info = get_solver(solver)
        self._info = info
        self._tgrid, plan = plan_run(info, Denoiser(_Handed(), self.process, self.prediction), nfe, spacing,
                                     grid, final)
        self._opts = {**info.defaults, **plan.options, **opts}
        times = self._evaluation_times()
        self.timesteps = torch.tensor(times, dtype=torch.float32, device=device)
        self.num_inference_steps = len(times)

    def resolved(self, nfe: Optional[int]):
        """(solver, spacing, final, solver options) a run with NFE budget ``nfe`` uses (``None``: explicit
        timesteps): the default rule fills the ``"auto"`` fields when the solver is ``"auto"`` and the budget is
        known, the previous defaults (dpm++2m, logsnr, denoise) otherwise."""
        cfg: Any = self.config  # diffusers' FrozenDict: attribute access to the registered arguments
        opts = dict(cfg.solver_options or {})
        if cfg.solver == AUTO and nfe is not None:
            rule = default_sampler(nfe, self.process, self.prediction)
            return (rule.solver, rule.spacing if cfg.spacing == AUTO else cfg.spacing,
                    rule.final if cfg.final == AUTO else cfg.final, {**rule.options, **opts})
        return (LEGACY_SOLVER if cfg.solver == AUTO else cfg.solver,
                LEGACY_SPACING if cfg.spacing == AUTO else cfg.spacing,
                LEGACY_FINAL if cfg.final == AUTO else cfg.final, opts)

    def _program(self, x_T: torch.Tensor, net: Any, generators=None):
        den = Denoiser(net, self.process, self.prediction, dtype=torch.float64)
        ev = Evaluator(den)
        x = x_T.detach().to(torch.float64)
        rng = Noise(generators)
        ev.begin(x, rng)
        return ev, self._info.fn(ev, x, self._tgrid, rng, **self._opts)

    def _evaluation_times(self) -> List[float]:
        """The model times the solver evaluates at: its requests, answered with zeros on a one-number state
        (the times of every registered solver depend on the grid alone)."""
        seen: List[float] = []

        def zero(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            seen.append(float(t.flatten()[0]))
            return torch.zeros_like(x)

        ev, program = self._program(torch.zeros(1, 1), zero)
        with torch.no_grad():
            drive(program, ev)
        return seen

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **_: Any):
        """Take the model output at ``sample``; return the next state to evaluate (or the result)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._stepper is None or self._stepper.done:
            gens = [generator] * sample.shape[0] if (self._info.stochastic and generator is not None) else None
            self._handed = _Handed()
            self._ev, program = self._program(sample, self._handed, gens)
            self._stepper = Stepper(program)
        self._handed.output = model_output.to(torch.float64)
        with torch.no_grad():
            point = self._ev.evaluate(self._stepper.request)
            req = self._stepper.give(point)
        prev = (self._stepper.result if req is None else req.x).to(sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.process.marginal(original, noise, timesteps.to(torch.float64)).to(original.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
