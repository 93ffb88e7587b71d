"""The peers' samplers, driven exactly as their users drive them, on any discrete VP model.

* diffusers schedulers run the loop of every diffusers pipeline: ``set_timesteps(n)``, then for each
  timestep ``scale_model_input`` -> network -> ``step``.  The scheduler is configured with the model's
  own DDPM schedule (``beta_schedule`` for the named ones, ``trained_betas`` otherwise).
* k-diffusion samplers (``sample_euler`` ... ``sample_dpm_adaptive``) run on a denoiser
  ``model(x, sigma)`` in k-diffusion's VE view (x~ = x / alpha, sigma = sigma / alpha) that we build
  around the epsilon network: t = ``process.t_of_sigma_ve(sigma)``, network input c_in x~ with
  c_in = 1 / sqrt(1 + sigma^2), denoised = x~ - sigma eps.  k-diffusion's package ``__init__`` imports
  torchvision, clip, wandb ... which do not import beside our torch, so ``k_diffusion/sampling.py`` is
  loaded by file path under a small stub package that provides ``utils.append_dims``
  (``load_k_sampling``); ``torchdiffeq`` / ``torchsde`` are stubbed when they are missing (only
  ``log_likelihood`` and the SDE noise samplers, which we never call, need them).

Every peer configuration is a ``PeerConfig`` (library, the table row it belongs to, the variant, the
exact constructor / sampler options).  ``plan_steps`` turns an NFE budget into the peer's own step
count (the largest whose pipeline makes at most that many network calls) and ``run_peer`` runs it,
returning the final state, the view it is in (the VP state, or the VE view x / alpha) and the last noise
level the run reports (``sigmas[-1]``, or the DDIM/PNDM final alpha).  What the run actually did is
decided by the harness, not assumed here.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..adapters.parameterisation import edm_coefficients

Tensor = torch.Tensor
DT = torch.float64

# ----------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------
_K_SAMPLING = None


def have_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def have_k_diffusion() -> bool:
    return importlib.util.find_spec("k_diffusion") is not None


def _append_dims(x: Tensor, target_dims: int) -> Tensor:
    """k_diffusion.utils.append_dims: trailing singleton dims up to ``target_dims``."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def load_k_sampling():
    """k-diffusion's ``sampling`` module, loaded without the package ``__init__`` (which imports torchvision).

    Raises ImportError when k-diffusion is not installed.
    """
    global _K_SAMPLING
    if _K_SAMPLING is not None:
        return _K_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "sampling.py")
    pkg_name = "_diffsolve_k_diffusion"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = []  # a package, so that `from . import utils` resolves
    utils = types.ModuleType(pkg_name + ".utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    added = {pkg_name: pkg, pkg_name + ".utils": utils}
    for dep, attrs in (("torchdiffeq", ("odeint",)), ("torchsde", ("BrownianInterval",))):
        if importlib.util.find_spec(dep) is None:  # only log_likelihood / SDE noise samplers use them
            stub = types.ModuleType(dep)
            for a in attrs:
                setattr(stub, a, _missing(dep))
            added[dep] = stub
    stubs = [k for k in added if k in ("torchdiffeq", "torchsde")]
    sys.modules.update(added)
    try:
        mspec = importlib.util.spec_from_file_location(pkg_name + ".sampling", path)
        mod = importlib.util.module_from_spec(mspec)
        mod.__package__ = pkg_name
        sys.modules[mspec.name] = mod
        mspec.loader.exec_module(mod)
    finally:
        for k in stubs:  # never leave fake third-party modules behind
            sys.modules.pop(k, None)
    _K_SAMPLING = mod
    return mod


def _missing(dep: str) -> Callable:
    def fail(*_a, **_k):
        raise ImportError(f"{dep} is not installed; this k-diffusion function needs it")
    return fail


def available_libraries() -> Dict[str, Optional[str]]:
    """{library: None if usable else the reason it is skipped}."""
    out: Dict[str, Optional[str]] = {}
    out["diffusers"] = None if have_diffusers() else "diffusers is not installed (pip install 'diffsolve[bench]')"
    if not have_k_diffusion():
        out["k-diffusion"] = "k-diffusion is not installed (pip install --no-deps k-diffusion)"
    else:
        try:
            load_k_sampling()
            out["k-diffusion"] = None
        except Exception as e:  # pragma: no cover - depends on the environment
            out["k-diffusion"] = f"k-diffusion's sampling module does not load: {type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------
@dataclass
class PeerConfig:
    """One peer sampler configuration.

    library: 'diffusers' or 'k-diffusion'.  family: the table row (one algorithm of one library).
    variant: what distinguishes this configuration inside the row (grid / last step).
    kind: the diffusers scheduler class or the k-diffusion sampler function.
    options: the exact constructor options (diffusers) or sampler options plus 'grid' (k-diffusion).
    algorithm: the diffsolve solver that implements the same algorithm ('' when none does).
    """

    library: str
    family: str
    variant: str
    kind: str
    options: Dict[str, Any] = field(default_factory=dict)
    algorithm: str = ""
    tolerances: Optional[Sequence[float]] = None  # adaptive samplers: one run per tolerance, not per NFE

    @property
    def adaptive(self) -> bool:
        return self.tolerances is not None

    @property
    def name(self) -> str:
        return f"{self.library}:{self.family}"

    def describe(self) -> Dict[str, Any]:
        opts = {k: (v if not callable(v) else getattr(v, "__doc__", None) or "callable") for k, v in self.options.items()}
        return {"library": self.library, "family": self.family, "variant": self.variant, "kind": self.kind,
                "options": opts, "algorithm": self.algorithm}


def _tau_zero(t):
    """tau = 0: SA-Solver integrates the probability-flow ODE"""
    return 0


# views: the diffusers Euler family keeps x in the VE view (init_noise_sigma > 1, scale_model_input
# divides by sqrt(sigma^2 + 1)); the others keep the VP state
_VE_SCHEDULERS = {"EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                  "KDPM2DiscreteScheduler"}


def _grid_opts(grid: str) -> Dict[str, Any]:
    """diffusers options for a grid name: an index spacing or one of the sigma conversions."""
    if grid in ("linspace", "leading", "trailing"):
        return {"timestep_spacing": grid}
    return {"karras": {"use_karras_sigmas": True}, "lu": {"use_lu_lambdas": True},
            "exponential": {"use_exponential_sigmas": True}}[grid]


def diffusers_configs(quick: bool = False) -> List[PeerConfig]:
    """Every diffusers configuration benchmarked (``quick``: a handful)."""
    C: List[PeerConfig] = []

    def add(family, kind, base, variants, algorithm=""):
        for variant, opts in variants:
            C.append(PeerConfig("diffusers", family, variant, kind, {**base, **opts}, algorithm))

    if quick:
        add("DDIM", "DDIMScheduler", {"clip_sample": False}, [("leading/alpha1", {"set_alpha_to_one": True})], "ddim")
        add("DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2},
            [("linspace/zero", {"final_sigmas_type": "zero"}),
             ("karras/sigma_min", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"})], "dpm++2m")
        add("UniPC bh2 order 2", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2},
            [("linspace/zero", {"final_sigmas_type": "zero"})], "unipc-bh2")
        add("Euler", "EulerDiscreteScheduler", {}, [("linspace/zero", {})], "euler")
        return C

    add("DDIM", "DDIMScheduler", {"clip_sample": False},
        [(f"{sp}/{'alpha1' if a1 else 'alpha0'}", {"timestep_spacing": sp, "set_alpha_to_one": a1})
         for sp in ("leading", "trailing", "linspace") for a1 in (True, False)], "ddim")
    for skip in (False, True):  # diffsolve's pndm is the PLMS variant (skip_prk_steps=True)
        add("PNDM", "PNDMScheduler", {},
            [(f"{'plms' if skip else 'prk+plms'}/{sp}/{'alpha1' if a1 else 'alpha0'}",
              {"skip_prk_steps": skip, "timestep_spacing": sp, "set_alpha_to_one": a1})
             for sp in ("leading", "trailing") for a1 in (False, True)], "pndm" if skip else "")
    finals = ("zero", "sigma_min")
    grids = ("linspace", "trailing", "karras", "lu")
    for order in (2, 3):
        add(f"DPMSolverMultistep dpmsolver++ {order}M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": order},
            [(f"{g}/{f}", {**_grid_opts(g), "final_sigmas_type": f}) for g in grids for f in finals],
            f"dpm++{order}m")
    for order in (2, 3):  # noise prediction: diffusers refuses final_sigmas_type='zero'
        add(f"DPMSolverMultistep dpmsolver {order}M", "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver", "solver_order": order},
            [(f"{g}/sigma_min", {**_grid_opts(g), "final_sigmas_type": "sigma_min"}) for g in grids],
            f"dpm-solver-{order}m")
    for order in (2, 3):
        add(f"DPMSolverSinglestep dpmsolver++ order {order}", "DPMSolverSinglestepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": order},
            [(f"{g}/{f}", {**({"use_karras_sigmas": True} if g == "karras" else {}), "final_sigmas_type": f})
             for g in ("linspace", "karras") for f in finals])
    for variant, order in (("bh2", 2), ("bh2", 3), ("bh1", 2), ("bh1", 3)):
        gs = ("linspace", "trailing", "karras", "exponential") if order == 2 else ("linspace", "karras")
        add(f"UniPC {variant} order {order}", "UniPCMultistepScheduler", {"solver_type": variant, "solver_order": order},
            [(f"{g}/{f}", {**_grid_opts(g), "final_sigmas_type": f}) for g in gs for f in finals],
            f"unipc-{variant}")
    for order in (2, 3):  # DEIS always stops at timestep 0 (sigmas[-1] = sigma_min)
        add(f"DEIS order {order}", "DEISMultistepScheduler", {"solver_order": order},
            [(g, _grid_opts(g)) for g in ("linspace", "trailing", "karras", "exponential")], "deis")
    add("Euler", "EulerDiscreteScheduler", {},
        [("linspace/zero", {}), ("linspace/sigma_min", {"final_sigmas_type": "sigma_min"}),
         ("trailing/zero", {"timestep_spacing": "trailing"}), ("karras/zero", {"use_karras_sigmas": True}),
         ("exponential/zero", {"use_exponential_sigmas": True})], "euler")
    for kind, family in (("HeunDiscreteScheduler", "Heun"), ("LMSDiscreteScheduler", "LMS"),
                         ("KDPM2DiscreteScheduler", "KDPM2")):
        add(family, kind, {}, [(g, _grid_opts(g)) for g in ("linspace", "trailing", "karras")],
            "heun" if family == "Heun" else "")
    add("SA-Solver (tau=0)", "SASolverScheduler", {"tau_func": _tau_zero},
        [(f"{g}/p{p}c{c}", {**_grid_opts(g), "predictor_order": p, "corrector_order": c})
         for g in ("linspace", "karras") for p, c in ((2, 2), (3, 4))])
    return C


K_GRIDS = ("karras", "exponential")
K_SAMPLERS = {  # sampler -> (table row, options, matching diffsolve solver, NFE of n sigmas before the 0)
    "sample_euler": ("euler", {}, "euler"),
    "sample_heun": ("heun", {}, "heun"),
    "sample_dpm_2": ("dpm_2", {}, ""),
    "sample_lms": ("lms", {}, ""),
    "sample_dpmpp_2m": ("dpmpp_2m", {}, "dpm++2m"),
    "sample_dpmpp_3m_sde": ("dpmpp_3m_sde (eta=0)", {"eta": 0.0}, "dpm++3m"),
}


def kdiffusion_configs(quick: bool = False) -> List[PeerConfig]:
    C: List[PeerConfig] = []
    samplers = ("sample_euler", "sample_dpmpp_2m") if quick else tuple(K_SAMPLERS)
    for s in samplers:
        family, opts, algo = K_SAMPLERS[s]
        for g in (("karras",) if quick else K_GRIDS):
            C.append(PeerConfig("k-diffusion", family, f"{g}/zero", s, {**opts, "grid": g}, algo))
    if not quick:
        C.append(PeerConfig("k-diffusion", "dpm_fast", "logsnr/sigma_min", "sample_dpm_fast", {}, "dpm-solver-3"))
        C.append(PeerConfig("k-diffusion", "dpm_adaptive (order 3)", "rtol", "sample_dpm_adaptive", {"order": 3},
                            tolerances=(0.2, 0.05, 0.01)))
    return C


def flow_configs(quick: bool = False) -> List[PeerConfig]:
    """diffusers' flow-matching samplers, as a flow pipeline (SD3, Flux) configures them with ``shift = 1``:
    FlowMatchEuler / FlowMatchHeun, and DPM-Solver++ / UniPC on flow sigmas with flow predictions."""
    C: List[PeerConfig] = []

    def add(family, kind, base, variants, algorithm=""):
        for variant, opts in variants:
            C.append(PeerConfig("diffusers", family, variant, kind, {**base, **opts}, algorithm))

    flow = {"use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction"}
    grids = [("default", {})] if quick else [("default", {}), ("karras", {"use_karras_sigmas": True}),
                                             ("exponential", {"use_exponential_sigmas": True})]
    add("FlowMatchEuler", "FlowMatchEulerDiscreteScheduler", {"shift": 1.0}, grids, "euler")
    if quick:
        add("DPMSolverMultistep dpmsolver++ 2M (flow)", "DPMSolverMultistepScheduler",
            {**flow, "algorithm_type": "dpmsolver++", "solver_order": 2}, [("flow/zero", {"final_sigmas_type": "zero"})],
            "dpm++2m")
        return C
    add("FlowMatchHeun", "FlowMatchHeunDiscreteScheduler", {"shift": 1.0}, [("default", {})], "heun")
    for order in (2, 3):
        add(f"DPMSolverMultistep dpmsolver++ {order}M (flow)", "DPMSolverMultistepScheduler",
            {**flow, "algorithm_type": "dpmsolver++", "solver_order": order},
            [(f"flow/{f}", {"final_sigmas_type": f}) for f in ("zero", "sigma_min")], f"dpm++{order}m")
    for variant, order in (("bh2", 2), ("bh2", 3), ("bh1", 2), ("bh1", 3)):
        add(f"UniPC {variant} order {order} (flow)", "UniPCMultistepScheduler",
            {**flow, "solver_type": variant, "solver_order": order},
            [(f"flow/{f}", {"final_sigmas_type": f}) for f in ("zero", "sigma_min")], f"unipc-{variant}")
    return C


def edm_configs(quick: bool = False) -> List[PeerConfig]:
    """diffusers' EDM samplers (EDMEuler, EDMDPMSolverMultistep) on the model's sigma range and sigma_data."""
    C: List[PeerConfig] = []
    schedules = ("karras",) if quick else ("karras", "exponential")
    finals = ("zero",) if quick else ("zero", "sigma_min")
    for g in schedules:
        for f in finals:
            C.append(PeerConfig("diffusers", "EDMEuler", f"{g}/{f}", "EDMEulerScheduler",
                                {"sigma_schedule": g, "final_sigmas_type": f}, "euler"))
            for order in ((2,) if quick else (2, 3)):
                C.append(PeerConfig("diffusers", f"EDMDPMSolverMultistep dpmsolver++ {order}M", f"{g}/{f}",
                                    "EDMDPMSolverMultistepScheduler",
                                    {"sigma_schedule": g, "final_sigmas_type": f, "solver_order": order,
                                     "algorithm_type": "dpmsolver++"}, f"dpm++{order}m"))
    return C


def peer_family(process) -> Optional[str]:
    """Which peer samplers fit a process: 'ddpm' (discrete VP), 'flow' (rectified flow), 'edm'; None: none."""
    from ..processes import EDM, RectifiedFlow, VPDiscrete

    if isinstance(process, VPDiscrete):
        return "ddpm"
    if isinstance(process, RectifiedFlow):
        return "flow"
    if isinstance(process, EDM):
        return "edm"
    return None


def peer_configs(quick: bool = False, libraries: Optional[Sequence[str]] = None,
                 family: str = "ddpm") -> List[PeerConfig]:
    """The peer configurations for a model family (``peer_family``): diffusers' and k-diffusion's."""
    libs = set(libraries) if libraries is not None else {"diffusers", "k-diffusion"}
    out: List[PeerConfig] = []
    if "diffusers" in libs:
        out += {"ddpm": diffusers_configs, "flow": flow_configs, "edm": edm_configs}[family](quick)
    if "k-diffusion" in libs:
        out += kdiffusion_configs(quick)
    return out


# ----------------------------------------------------------------------------------------
# running diffusers
# ----------------------------------------------------------------------------------------
def schedule_options(process) -> Dict[str, Any]:
    """diffusers constructor options that give the scheduler exactly ``process``'s DDPM schedule."""
    N = int(process.num_train_timesteps)
    sched = getattr(process, "schedule", None)
    kw = getattr(process, "schedule_kwargs", {}) or {}
    if sched == "linear":
        return {"num_train_timesteps": N, "beta_schedule": "linear", "beta_start": kw["beta_start"],
                "beta_end": kw["beta_end"]}
    if sched == "scaled_linear":
        return {"num_train_timesteps": N, "beta_schedule": "scaled_linear", "beta_start": kw["beta_start"],
                "beta_end": kw["beta_end"]}
    ac = process.alphas_cumprod.to(DT)
    betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]])
    return {"num_train_timesteps": N, "trained_betas": betas.tolist()}


_QUIET = False


def _quiet_diffusers() -> None:
    global _QUIET
    if not _QUIET:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        _QUIET = True


def constructor_options(cfg: PeerConfig, process) -> Dict[str, Any]:
    """The diffusers constructor call of a configuration on ``process``: the DDPM schedule and epsilon
    predictions (discrete VP), the flow sigmas (rectified flow) or EDM's sigma range and sigma_data."""
    fam = peer_family(process)
    if fam == "flow":
        return {"num_train_timesteps": 1000, **cfg.options}
    if fam == "edm":
        return {"sigma_min": process.sigma_min, "sigma_max": process.sigma_max, "sigma_data": process.sigma_data,
                "prediction_type": "epsilon", **cfg.options}
    return {**schedule_options(process), "prediction_type": "epsilon", **cfg.options}


def make_scheduler(cfg: PeerConfig, process):
    _quiet_diffusers()
    import diffusers.schedulers as S

    cls = getattr(S, cfg.kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**constructor_options(cfg, process))


def diffusers_nfe(sched, n: int) -> int:
    """Network calls of a pipeline run with ``n`` inference steps: one per entry of ``timesteps``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.set_timesteps(n)
    return len(sched.timesteps)


@dataclass
class PeerOutput:
    x: Tensor  # the final state as the library returns it
    view: str  # 'vp' (x = alpha x0 + sigma eps) or 've' (x / alpha)
    last_sigma: float  # sigma / alpha of the last point the run reports (0: clean data)
    steps: int  # the peer's own step count (set_timesteps n, number of sigmas before the 0, ...)
    info: Dict[str, Any] = field(default_factory=dict)


def _ddim_final_sigma(sched) -> float:
    """The alpha the last DDIM/PNDM step goes to, read off the scheduler as its ``step`` computes it."""
    t_last = int(sched.timesteps[-1])
    prev = t_last - sched.config.num_train_timesteps // sched.num_inference_steps
    ac = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
    ac = float(ac)
    return 0.0 if ac >= 1.0 else math.sqrt((1 - ac) / ac)


def _float64_schedule(sched, process) -> None:
    """Diagnostic only: replace a scheduler's float32 schedule tensors by the process's float64 ones."""
    ac = process.alphas_cumprod.to(DT)
    sched.alphas_cumprod = ac
    if hasattr(sched, "alpha_t"):
        sched.alpha_t, sched.sigma_t = ac.sqrt(), (1 - ac).sqrt()
    if hasattr(sched, "lambda_t"):
        sched.lambda_t = torch.log(sched.alpha_t) - torch.log(sched.sigma_t)
    if hasattr(sched, "final_alpha_cumprod") and float(sched.final_alpha_cumprod) != 1.0:
        sched.final_alpha_cumprod = ac[0]


def run_diffusers(cfg: PeerConfig, net, process, x_T: Tensor, steps: int, dtype: torch.dtype,
                  seed: int = 0, exact_start: bool = False, float64_schedule: bool = False) -> PeerOutput:
    """The diffusers pipeline loop: set_timesteps, x = x_T * init_noise_sigma, then per timestep
    scale_model_input, network, step.

    ``exact_start``: start the VE-view schedulers from x_T * sqrt(sigma_0^2 + 1), the exact VE image of
    x_T, instead of ``init_noise_sigma`` (which is sigma_0 for 'linspace'/'trailing' spacings): used by
    the parity check, which compares algorithms from the same state.  ``float64_schedule``: a diagnostic
    of the parity check that swaps the scheduler's float32 schedule tensors for float64 ones.
    """
    sched = make_scheduler(cfg, process)
    if float64_schedule:
        _float64_schedule(sched, process)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched.set_timesteps(steps)
    if float64_schedule and torch.is_tensor(getattr(sched, "sigmas", None)):
        sched.sigmas = sched.sigmas.to(DT)
    fam = peer_family(process)
    scale = getattr(sched, "init_noise_sigma", 1.0)  # flow-matching schedulers start from the noise itself
    if exact_start and cfg.kind in _VE_SCHEDULERS:
        scale = math.sqrt(float(sched.sigmas[0]) ** 2 + 1)
    x = x_T.to(dtype) * scale
    b = x.shape[0]
    step_kw: Dict[str, Any] = {}
    if cfg.kind in ("SASolverScheduler", "EulerDiscreteScheduler"):
        step_kw["generator"] = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            out = net(inp, t.to(DT).expand(b))
            x = sched.step(out, t, x, **step_kw).prev_sample
    if hasattr(sched, "sigmas") and cfg.kind not in ("DDIMScheduler", "PNDMScheduler"):
        last = float(sched.sigmas[-1])
        if fam == "flow":  # flow sigma s: x = (1 - s) x0 + s eps, so sigma / alpha = s / (1 - s)
            last = last / (1.0 - last)
    else:
        last = _ddim_final_sigma(sched)
    view = "ve" if cfg.kind in _VE_SCHEDULERS else "vp"
    return PeerOutput(x, view, last, steps)


# ----------------------------------------------------------------------------------------
# running k-diffusion
# ----------------------------------------------------------------------------------------
class KDenoiser:
    """k-diffusion's denoiser contract ``model(x, sigma) -> denoised`` around an epsilon network of a
    discrete VP process (what k-diffusion's ``DiscreteEpsDDPMDenoiser`` does, with our time map):
    x and sigma are in the VE view; t = process.t_of_sigma_ve(sigma); the network sees c_in x with
    c_in = 1 / sqrt(1 + sigma^2) (= alpha(t)); denoised = x - sigma eps."""

    def __init__(self, net, process):
        self.net, self.process = net, process

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        s = sigma.to(DT)
        t = self.process.t_of_sigma_ve(s)
        c_in = (1.0 / torch.sqrt(1.0 + s * s)).to(x.dtype)
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps = self.net(x * c_in.reshape(shape), t, **kwargs)
        return x - eps.to(x.dtype) * sigma.to(x.dtype).reshape(shape)


class PeerModel:
    """The network as each peer's loop calls it, for any model (``ds.Model``): one model evaluation per call.

    Called as ``net(x, timestep)`` by a diffusers loop, it answers what the scheduler expects for the model's
    family: epsilon at the VP state and DDPM timestep (discrete VP); the flow velocity ``eps - x0`` at the flow
    state and ``timestep = 1000 sigma`` (rectified flow; sigma = 1, where pure noise carries no x0 and our process
    ends at t_max < 1, is evaluated at t_max); EDM's raw output F at the input ``c_in x`` and
    ``c_noise = log(sigma) / 4``, so that ``c_skip x + c_out F`` is the model's x0 (EDM).  ``denoised_ve`` is
    k-diffusion's ``model(x, sigma)`` in the VE view."""

    def __init__(self, model):
        self.model, self.process = model, model.process
        self.family = peer_family(model.process)

    def _eval(self, x: Tensor, t: Tensor):
        return self.model.evaluate(x, t.to(DT), {})

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        if self.family == "flow":  # sigma = 1 (the schedulers' first point) is evaluated at the model's t_max
            p = self._eval(x, (timestep.to(DT) / 1000.0).clamp(max=self.process.t_max))
            return (p.eps - p.x0).to(x.dtype)
        if self.family == "edm":
            sigma = torch.exp(4.0 * timestep.to(DT))
            k = self._coeffs(sigma, x.dim())
            xs = x.to(DT) / k["c_in"]
            p = self._eval(xs, sigma)
            return ((p.x0.to(DT) - k["c_skip"] * xs) / k["c_out"]).to(x.dtype)
        return self._eval(x, timestep).eps.to(x.dtype)

    def _coeffs(self, sigma: Tensor, ndim: int) -> Dict[str, Tensor]:
        shape = (-1,) + (1,) * (ndim - 1)
        return {k: v.reshape(shape) for k, v in edm_coefficients(sigma, self.process.sigma_data).items()}

    def denoised_ve(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        s = sigma.to(DT)
        t = self.process.t_of_sigma_ve(s)
        a = self.process.alpha(t).reshape((-1,) + (1,) * (x.dim() - 1))
        return self._eval(x.to(DT) * a, t).x0.to(x.dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """k-diffusion builds its sigma grids and DPM-Solver times with torch's default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _never(*_a, **_k):  # eta = 0: the SDE samplers never draw noise
    raise RuntimeError("noise sampler called with eta = 0")


def k_sigmas(K, grid: str, n: int, sigma_min: float, sigma_max: float) -> Tensor:
    if grid == "karras":
        return K.get_sigmas_karras(n, sigma_min, sigma_max)
    if grid == "exponential":
        return K.get_sigmas_exponential(n, sigma_min, sigma_max)
    raise ValueError(f"unknown k-diffusion grid {grid!r}")


def k_nfe(cfg: PeerConfig, n: int) -> int:
    """Network calls of a k-diffusion sampler on n sigmas (+ the final 0), as its loop makes them."""
    if cfg.kind in ("sample_heun", "sample_dpm_2"):
        return 2 * n - 1  # two per step, one for the last step to sigma = 0 (Euler)
    return n


def run_kdiffusion(cfg: PeerConfig, net, process, x_T: Tensor, steps: int, dtype: torch.dtype,
                   tolerance: Optional[float] = None) -> PeerOutput:
    K = load_k_sampling()
    den = net.denoised_ve if isinstance(net, PeerModel) else KDenoiser(net, process)
    t_lo, t_hi = torch.tensor(process.t_min, dtype=DT), torch.tensor(process.t_max, dtype=DT)
    smin, smax = float(process.sigma_ve(t_lo)), float(process.sigma_ve(t_hi))
    a_max = float(process.alpha(t_hi))
    opts = {k: v for k, v in cfg.options.items() if k != "grid"}
    info: Dict[str, Any] = {}
    with default_dtype(dtype), torch.no_grad():
        # the VE image of our start at t_max (same start for everyone)
        x = (process.prior_from_noise(x_T.to(DT)) / a_max).to(dtype)
        if cfg.kind == "sample_dpm_fast":
            out = K.sample_dpm_fast(den, x, smin, smax, steps, disable=True, **opts)
            last = smin
        elif cfg.kind == "sample_dpm_adaptive":
            out, ainfo = K.sample_dpm_adaptive(den, x, smin, smax, disable=True, rtol=tolerance,
                                               return_info=True, **opts)
            last = smin
            info = {k: int(v) for k, v in ainfo.items()}
        else:
            sigmas = k_sigmas(K, cfg.options["grid"], steps, smin, smax).to(dtype)
            if cfg.kind == "sample_dpmpp_3m_sde":
                opts["noise_sampler"] = _never
            out = getattr(K, cfg.kind)(den, x, sigmas, disable=True, **opts)
            last = float(sigmas[-1])
    return PeerOutput(out, "ve", last, steps, info)


# ----------------------------------------------------------------------------------------
def plan_steps(cfg: PeerConfig, process, budget: int) -> Optional[int]:
    """The peer's largest step count whose run makes at most ``budget`` network calls (None if none)."""
    if cfg.adaptive:
        return None
    if cfg.library == "k-diffusion":
        if cfg.kind == "sample_dpm_fast":
            return budget
        n = budget
        while n >= 1 and k_nfe(cfg, n) > budget:
            n -= 1
        return n if n >= 1 else None
    sched = make_scheduler(cfg, process)
    for n in range(budget, 0, -1):
        try:
            if diffusers_nfe(sched, n) <= budget:
                return n
        except Exception:
            continue
    return None


def run_peer(cfg: PeerConfig, net, process, x_T: Tensor, steps: int, dtype: torch.dtype = torch.float32,
             tolerance: Optional[float] = None, seed: int = 0, exact_start: bool = False,
             float64_schedule: bool = False) -> PeerOutput:
    if cfg.library == "diffusers":
        return run_diffusers(cfg, net, process, x_T, steps, dtype, seed, exact_start, float64_schedule)
    return run_kdiffusion(cfg, net, process, x_T, steps, dtype, tolerance)
