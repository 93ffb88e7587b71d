"""One entry point for posterior sampling with a frozen prior: ``ds.inverse.sample``.

    x, info = ds.inverse.sample(model, operator, y, sigma_y, method="mmps", nfe=100, n=64, seeds=range(64))

``nfe`` is the budget in NFE-equivalents per sample (a VJP through the network costs about 2 NFE): the number of
solver evaluations is the largest that fits.  Methods are model wrappers that correct the x0 prediction
(``guided``), so ``solver`` may be any solver of the library.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch

from ..adapters.denoiser import Model, ModelWrapper
from ..grids import make_grid
from ..guidance.precision import PrecisionWeighted
from ..sampling import sample as run_sampler
from ..solvers import get_solver
from ..solvers.state import Noise
from ..util import seeding
from .exact import ExactPosterior, Prior, check_measurement
from .methods.afdps import AFDPS
from .methods.daps import DAPS
from .methods.ddrm import DDRM
from .methods.diffpir import DiffPIR
from .methods.dpm_encoder import DPMEncoder
from .methods.dps import DPS, DPSStep
from .methods.flowchef import FlowChef
from .methods.joint import Product
from .methods.mbir import SliceTV, as_volume
from .methods.mcgdiff import MCGDiff
from .methods.mmps import MMPS
from .methods.oracle import Oracle
from .methods.pigdm import PiGDM, PiGDMStep
from .methods.reddiff import REDDiff
from .methods.repaint import RePaint
from .methods.tds import TDS
from .methods.tmpd import TMPD
from .methods.tsmc import TSMC
from .operators import Operator

Tensor = torch.Tensor
VJP_COST = 2.0  # NFE-equivalents of one vector-Jacobian product through the network


@dataclass(frozen=True)
class Method:
    """A registered method: its wrapper, VJPs per evaluation (as a function of its options) and defaults."""

    build: Callable[..., Any]
    vjps: Callable[[Dict[str, Any]], int]
    defaults: Dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    loop: bool = False  # a method with its own sampling loop (``run``), not a model wrapper run by a solver
    spacing: str = "logsnr"  # the time grid of a loop method
    per_point: Callable[[Dict[str, Any]], int] = lambda o: 1  # network evaluations per grid point of a loop method
    composite: bool = False  # runs another method (option ``inner``) on a model it builds (``joint``)
    adapt: Optional[Callable[[Model, Operator], Model]] = None  # the prior the method runs (``mbir``: a volume)
    coupled: bool = False  # its samples interact (SMC) or share one posterior: one measurement per call


METHODS: Dict[str, Method] = {
    "dps": Method(DPSStep, lambda o: 1, {"zeta": 0.3},
                  "DPS as published: DDPM step minus zeta grad ||y - A x0_hat||, per sample (Chung et al. 2022)",
                  loop=True),
    "dps-x0": Method(DPS, lambda o: 1, {"zeta": 1.0}, "DPS's likelihood approximation as an x0 correction"),
    "pigdm": Method(PiGDM, lambda o: 1, {}, "PiGDM: pseudo-inverse guidance, isotropic x0 covariance (Song et al. 2023)"),
    "pigdm-step": Method(PiGDMStep, lambda o: 1, {"eta": 0.0},
                         "PiGDM as a DDIM step plus alpha_s alpha_t J^T (A^+ y - A^+ A x0_hat)", loop=True),
    "mmps": Method(MMPS, lambda o: int(o.get("iterations", 3)) + 1, {"iterations": 3},
                   "MMPS: full Tweedie covariance, CG solve (Rozet et al. 2024)"),
    "tmpd": Method(TMPD, lambda o: 2, {}, "TMPD: row-sum Tweedie covariance (Boys et al. 2023)"),
    "diffpir": Method(DiffPIR, lambda o: 0, {"lam": 1.0}, "DiffPIR: prox of the data term at x0_hat (Zhu et al. 2023)"),
    "reddiff": Method(REDDiff, lambda o: 0, {"lam": 0.25, "lr": 0.1},
                      "RED-diff: variational point estimate with a score-distillation prior (Mardani et al. 2023)",
                      loop=True, spacing="uniform"),
    "tds": Method(TDS, lambda o: 1, {"kappa": 1.0, "data_var": 1.0, "ess": 0.5, "full": False},
                  "TDS: twisted SMC with resampling (Wu et al. 2023)", loop=True, coupled=True),
    "ddrm": Method(DDRM, lambda o: 0, {"eta": 0.85, "eta_b": 1.0},
                   "DDRM: spectral DDIM in the operator's SVD (Kawar et al. 2022)", loop=True),
    "daps": Method(DAPS, lambda o: 0, {"ode_steps": 1, "data_var": 1.0},
                   "DAPS: decoupled annealing, the Gaussian conditional sampled exactly in the SVD (Zhang et al. 2024)",
                   loop=True, per_point=lambda o: int(o.get("ode_steps", 1))),
    "oracle": Method(lambda model, op, y, sigma_y, posterior: Oracle(model, posterior), lambda o: 0, {},
                     "exact likelihood term of a Gaussian-mixture problem (needs prior=)", coupled=True),
    "mcgdiff": Method(MCGDiff, lambda o: 0, {"kappa": 1e-4, "eta": 1.0, "ess": 0.5, "oversample": 1, "start": 3},
                      "MCGdiff: SMC with the measurement pinned in A's SVD basis (Cardoso et al. 2023)", loop=True,
                      coupled=True, per_point=lambda o: int(o.get("oversample", 1))),
    "afdps": Method(AFDPS, lambda o: 0, {"gamma": 1.0, "eta": 1.0, "ess": 0.5, "oversample": 1, "start": 3},
                    "AFDPS: Feynman-Kac ensemble on p_t(x) exp(-mu_y(x)), exact Gaussian steps (Chen et al. 2025)",
                    loop=True, coupled=True, per_point=lambda o: int(o.get("oversample", 1))),
    "tsmc": Method(TSMC, lambda o: 0, {"gamma": 2.0, "eta": 1.0, "ess": 0.5, "oversample": 1, "probes": 8,
                                       "start": 3},
                   "TSMC: twisted SMC in A's SVD, the model's own covariance in the twist (ours)", loop=True,
                   coupled=True, per_point=lambda o: int(o.get("oversample", 1))),
    "repaint": Method(RePaint, lambda o: 0, {"resample": 3, "jump": 1, "eta": 1.0},
                      "RePaint: replacement of the measured part with resampling jumps (Lugmayr et al. 2022)",
                      loop=True, per_point=lambda o: int(o.get("resample", 3)) + 1),
    "flowchef": Method(FlowChef, lambda o: 0, {"zeta": 0.5},
                       "FlowChef: steer the state down the data gradient at x0_hat, no VJP (Patel et al. 2024)"),
    "joint": Method(Product, lambda o: METHODS[o.get("inner", "repaint")].vjps(o), {"inner": "repaint", "resample": 0},
                    "two frozen priors, y = w1 x1 + w2 x2 + n: method `inner` on the product prior (Stevens et al. 2023)",
                    composite=True),
    "mbir": Method(SliceTV, lambda o: 0, {"lam": 1.0, "tv": 0.02, "iterations": 10},
                   "a 2-D prior per slice with ADMM total variation across slices, for volumes (Chung et al. 2023)",
                   adapt=as_volume),
    "dpm-encoder": Method(DPMEncoder, lambda o: 0, {"eta": 1.0, "t0": 1.0},
                          "DPM-Encoder: encode y into a stochastic sampler's noises, decode with `decoder` "
                          "(CycleDiffusion, Wu & De la Torre 2023)", loop=True, per_point=lambda o: 2),
    "precision": Method(lambda *a, **o: _precision(*a, **o),
                        lambda o: METHODS[o.get("inner", "dps-x0")].vjps(o), {"inner": "dps-x0"},
                        "precision-weighted guidance: method `inner`'s correction weighted per pixel by the "
                        "variance of the recent x0 predictions (CogDPM, Chen et al. 2024)"),
}


def _precision(model: Model, op: Operator, y: Tensor, sigma_y: float, inner: str = "dps-x0", window: int = 3,
               power: float = 1.0, **options: Any) -> PrecisionWeighted:
    """Method 'precision': the wrapper method ``inner`` under precision weighting."""
    if inner not in METHODS or METHODS[inner].loop or METHODS[inner].composite or inner in ("precision", "oracle"):
        known = [m for m in methods() if not (METHODS[m].loop or METHODS[m].composite) and m not in ("precision", "oracle")]
        raise ValueError(f"precision weighting needs a guidance wrapper as inner method, got {inner!r}; "
                         f"known: {', '.join(known)}")
    guided = guided_model(model, op, y, sigma_y, inner, **options)
    if not isinstance(guided, ModelWrapper):
        raise TypeError(f"{inner} did not build a model wrapper")
    return PrecisionWeighted(guided, window, power)


def methods() -> List[str]:
    """The method names ``inverse.sample`` accepts."""
    return sorted(METHODS)


@dataclass
class InverseInfo:
    """What a run cost and how it was set up (per sample: ``nfe`` network evaluations, ``vjps``)."""

    method: str
    solver: str
    evaluations: int
    nfe: int
    vjps: int
    nfe_equivalents: float
    seconds: float
    sigma_y: float
    options: Dict[str, Any]


def guided_model(model: Model, operator: Operator, y: Tensor, sigma_y: float, method: str = "mmps",
                 prior: Optional[Prior] = None, **options: Any) -> Model:
    """``model`` wrapped by ``method`` for the measurement (y, sigma_y): a model every solver can run
    (y [B, *out_shape]: one measurement per sample of a batch of B)."""
    if method not in METHODS:
        raise ValueError(f"unknown inverse method {method!r}; known: {', '.join(methods())}")
    spec = METHODS[method]
    check_measurement(operator, y, sigma_y, batch=not spec.coupled)
    if spec.adapt is not None:
        model = spec.adapt(model, operator)
    opts = {**spec.defaults, **options}
    if method == "oracle":
        if prior is None:
            raise ValueError("method='oracle' needs the Gaussian-mixture prior (prior=...)")
        return spec.build(model, operator, y, sigma_y, ExactPosterior(prior, operator, y, sigma_y))
    return spec.build(model, operator, y, sigma_y, **opts)


def sample(model: Model, operator: Operator, y: Tensor, sigma_y: float, method: str = "mmps", nfe: int = 100,
           n: int = 16, seeds: Optional[Sequence[int]] = None, solver: str = "dpm++2m",
           prior: Optional[Prior] = None, progress: bool = False, spacing: Optional[str] = None,
           **options: Any) -> Tuple[Tensor, InverseInfo]:
    """``n`` samples of p(x0 | y) under ``model``'s prior; see the module docstring.  ``spacing``: the time grid
    (``ds.grids.SPACINGS``; default: the solver's for wrappers, the method's own for loop methods)."""
    if method not in METHODS:
        raise ValueError(f"unknown inverse method {method!r}; known: {', '.join(methods())}")
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    n = len(seeds)
    _check_per_sample(method, operator, y, n)
    check_measurement(operator, y, sigma_y, batch=not METHODS[method].coupled)
    if METHODS[method].composite:
        return _run_joint(model, operator, y, sigma_y, nfe, n, seeds, solver, prior, progress,
                          dict(options, **({"spacing": spacing} if spacing else {})))
    adapt = METHODS[method].adapt
    if adapt is not None:
        model = adapt(model, operator)
    if operator.in_shape != _shape(model, operator):
        raise ValueError(f"the operator acts on {list(operator.in_shape)}, the model's data are "
                         f"{list(_shape(model, operator))}")
    info = get_solver(solver)
    spec = METHODS[method]
    opts = {**spec.defaults, **options}
    per_eval = 1.0 + VJP_COST * spec.vjps(opts)
    evals = int(nfe // per_eval)
    steps, used = info.steps_for_nfe(max(evals, 1), True)
    if evals < 1 or steps < 1:
        raise ValueError(f"a budget of {nfe} NFE-equivalents does not fit one step of {method} "
                         f"({per_eval:g} NFE-equivalents per evaluation)")
    noise = seeding.noise(seeds, operator.in_shape)
    if spec.loop:
        return _run_loop(spec, method, model, operator, y, sigma_y, evals, noise, seeds, opts, progress,
                         spacing or spec.spacing)
    guided = guided_model(model, operator, y, sigma_y, method, prior, **options)
    t0 = time.perf_counter()
    x, si = run_sampler(guided, noise, info.name, nfe=used, seeds=seeds if info.stochastic else None,
                        return_info=True, progress=progress, after_step=getattr(guided, "after_step", None),
                        spacing=spacing)
    seconds = time.perf_counter() - t0
    vjps = int(getattr(guided, "vjps", 0))
    return x, InverseInfo(method, info.name, si.nfe, si.nfe, vjps, si.nfe + VJP_COST * vjps, seconds,
                          float(sigma_y), {**{k: v for k, v in opts.items() if isinstance(v, (int, float, str))},
                                           "spacing": spacing or "logsnr"})


class _Progress(ModelWrapper):
    """The model, ticking a progress bar at every evaluation (the loop methods call the model directly)."""

    def __init__(self, inner: Model, bar: Any):
        super().__init__(inner)
        self.bar = bar

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        out = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        self.bar.update(1)
        return out


def _run_loop(spec: Method, method: str, model: Model, operator: Operator, y: Tensor, sigma_y: float,
              evals: int, noise: Tensor, seeds: List[int], opts: Dict[str, Any],
              progress: bool = False, spacing: str = "logsnr") -> Tuple[Tensor, InverseInfo]:
    if evals < 2:
        raise ValueError(f"{method} needs at least 2 evaluations; raise nfe")
    points = evals // max(1, spec.per_point(opts))
    if points < 2:
        raise ValueError(f"{method} needs at least 2 grid points of {spec.per_point(opts)} evaluations; raise nfe")
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=evals, desc=method, unit="nfe", leave=False)
        model = cast(Model, _Progress(model, bar))
    smc = spec.build(model, operator, y, sigma_y, **opts)
    grid = make_grid(model.process, points, spacing, "t_min")
    g = seeding.stream(seeds[0], seeding.SOLVER)
    t0 = time.perf_counter()
    try:
        x = smc.run(noise, grid, Noise(seeding.solver_generators(seeds)), g)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return x.reshape(noise.shape), InverseInfo(method, method, smc.nfe, smc.nfe, smc.vjps,
                                               smc.nfe + VJP_COST * smc.vjps, seconds, float(sigma_y),
                                               {**{k: v for k, v in opts.items() if isinstance(v, (int, float, str))},
                                                "spacing": spacing,
                                                **({"resamplings": smc.resamplings} if hasattr(smc, "resamplings")
                                                   else {})})


def _run_joint(model: Model, operator: Operator, y: Tensor, sigma_y: float, nfe: int, n: int,
               seeds: Optional[Sequence[int]], solver: str, prior: Optional[Prior], progress: bool,
               options: Dict[str, Any]) -> Tuple[Tensor, InverseInfo]:
    """Method ``joint``: ``inner`` on the product of ``model`` and ``second`` (default: ``model`` again), with
    half the budget (one product evaluation is two network evaluations); the costs reported are per pair."""
    opts = {**METHODS["joint"].defaults, **options}
    second, inner, spacing = opts.pop("second", None), opts.pop("inner"), opts.pop("spacing", None)
    if inner not in METHODS or METHODS[inner].composite:
        raise ValueError(f"joint: unknown inner method {inner!r}; known: "
                         f"{', '.join(m for m in methods() if not METHODS[m].composite)}")
    if inner != "repaint" and "resample" not in options:  # the default belongs to the default inner method
        opts.pop("resample")
    x, info = sample(Product(model, second), operator, y, sigma_y, method=inner, nfe=nfe // 2, n=n, seeds=seeds,
                     solver=solver, prior=prior, progress=progress, spacing=spacing, **opts)
    return x, InverseInfo(f"joint:{inner}", info.solver, info.evaluations, 2 * info.nfe, 2 * info.vjps,
                          2 * info.nfe_equivalents, info.seconds, info.sigma_y, {"inner": inner, **info.options})


def _check_per_sample(method: str, operator: Operator, y: Any, n: int) -> None:
    """y [n, *out_shape] is one measurement per sample (many problems in one call): the method must treat its
    samples independently and n must match."""
    y = torch.as_tensor(y) if not isinstance(y, Tensor) else y
    if y.dim() != len(operator.out_shape) + 1 or y.shape[0] == 1:
        return
    if y.shape[0] != n:
        raise ValueError(f"y holds {y.shape[0]} measurements for {n} samples (one per sample, or one for all)")
    inner = METHODS[method]
    if inner.coupled:
        raise ValueError(f"{method} couples its samples (one posterior per call): give one measurement, not {n}")


def _shape(model: Model, operator: Operator) -> Tuple[int, ...]:
    shape = getattr(model, "sample_shape", None)
    return tuple(shape) if shape else operator.in_shape


