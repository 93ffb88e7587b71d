"""diffsolve: fast, exactly-checked samplers for frozen diffusion and flow models.

    import diffsolve as ds
    proc = ds.VPDiscrete.linear(1000)
    den = ds.Denoiser(net, proc, prediction="epsilon")
    x0 = ds.sample(den, noise, solver="dpm++2m", nfe=10)
"""
from . import reference, timesteps
from .checkpoint import load, save_model
from .denoiser import Denoiser, NonFiniteError, edm_coefficients, outputs_from
from .processes import (EDM, VE, AffineInterpolant, NoiseProcess, RectifiedFlow, VPContinuous, VPDiscrete,
                        process_from_config)
from .reference import GaussianMixture, exact_targets
from .sampling import SampleInfo, sample
from .solvers import SOLVERS, SamplingError, SolverInfo, get_solver, solvers
from .solvers import dpm_v3, momentum
from . import schedules
from .timesteps import TimeGrid, explicit, make_grid

__version__ = "0.1.0"

__all__ = [
    "Denoiser", "NonFiniteError", "edm_coefficients", "outputs_from",
    "NoiseProcess", "VPDiscrete", "VPContinuous", "VE", "EDM", "RectifiedFlow", "AffineInterpolant",
    "process_from_config", "GaussianMixture", "exact_targets", "reference", "timesteps",
    "sample", "SampleInfo", "solvers", "get_solver", "SOLVERS", "SolverInfo", "SamplingError",
    "TimeGrid", "make_grid", "explicit",
    "load", "save_model",
    "dpm_v3", "momentum", "schedules",
]

from .bench import bench  # noqa: E402  (last: the bench package imports diffsolve itself)
from .tuning import Profile, tune  # noqa: E402

__all__ += ["bench", "tune", "Profile"]
