"""diffsolve: fast, exactly-checked samplers for frozen diffusion and flow models.

    import diffsolve as ds
    proc = ds.VPDiscrete.linear(1000)
    den = ds.Denoiser(net, proc, prediction="epsilon")
    x0 = ds.sample(den, noise, solver="dpm++2m", nfe=10)

The package is layered (docs/architecture.md); this module is the facade over it.  ``bench``, ``tune`` and
``Profile`` load on first use.
"""
from __future__ import annotations

import functools
import os
from typing import Any

from . import grids, inverse, reference
from . import solvers as _solvers_pkg
from .adapters import (
    Conditioned,
    Denoiser,
    Model,
    ModelWrapper,
    NonFiniteError,
    Prediction,
    edm_coefficients,
    outputs_from,
)
from .adapters.identity import ModelMismatch
from .grids import TimeGrid, explicit, make_grid
from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .hub import load, save_model
from .processes import (
    EDM,
    RDDM,
    VE,
    AffineInterpolant,
    MeanReverting,
    NoiseProcess,
    PFGMpp,
    RectifiedFlow,
    ResShift,
    Shifted,
    VPContinuous,
    VPDiscrete,
    process_from_config,
)
from .reference import GaussianMixture, exact_targets
from .sampling import GaussianStart, SampleInfo, SamplerSpec
from .sampling import sample as _sample
from .solvers import SOLVERS, SamplingError, SolverInfo, SolverState, dpm_v3, get_solver, momentum, solvers

__version__ = "0.1.0"
timesteps = grids  # the former name of the grids package

__all__ = [
    "Conditioned", "Denoiser", "Model", "ModelWrapper", "Prediction", "NonFiniteError", "ModelMismatch", "edm_coefficients",
    "outputs_from", "ClassifierFreeGuidance", "ClassifierGuidance",
    "NoiseProcess", "VPDiscrete", "VPContinuous", "VE", "EDM", "RectifiedFlow", "AffineInterpolant", "Shifted",
    "process_from_config", "GaussianMixture", "exact_targets", "reference", "inverse",
    "sample", "SampleInfo", "SamplerSpec", "solvers", "get_solver", "SOLVERS", "SolverInfo", "SolverState",
    "SamplingError", "TimeGrid", "make_grid", "explicit", "grids", "load", "save_model", "dpm_v3", "momentum",
    "bench", "tune", "Profile", "compute_statistics", "restore",
]
__all__ += ["GaussianStart", "PFGMpp", "MeanReverting", "RDDM", "ResShift"]


@functools.wraps(_sample)
def sample(*args: Any, profile: Any = None, **kwargs: Any):
    if isinstance(profile, (str, os.PathLike)):
        from .tuning import Profile as _Profile
        profile = _Profile.load(profile)
    return _sample(*args, profile=profile, **kwargs)


def restore(model: Any, image: Any, operator: Any = "box:14", **kwargs: Any):
    """Posterior samples of a degraded image, their mean and spread (``diffsolve.evaluation.restore.restore``);
    ``model`` may be a name for ``ds.load``: ``ds.restore("mnist-flow", "digit.png", "box:14", out="out/r")``."""
    from .evaluation.restore import restore as _restore
    return _restore(load(model) if isinstance(model, (str, os.PathLike)) else model, image, operator, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "bench":
        from .bench import bench
        return bench
    if name in ("tune", "Profile", "compute_statistics"):
        from . import tuning
        return getattr(tuning, name)
    if name == "schedules":
        from .tuning import grid_search
        return grid_search
    raise AttributeError(f"module 'diffsolve' has no attribute {name!r}")
