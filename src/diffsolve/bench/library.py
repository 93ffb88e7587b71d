"""The library names the bench calls (as ``ds.<name>`` in its modules), imported from the layers below it."""
from ..adapters.denoiser import Denoiser
from ..grids import explicit
from ..hub import load
from ..processes import VPDiscrete
from ..reference import GaussianMixture, exact_targets
from ..sampling import sample
from ..solvers import get_solver, solvers
from ..tuning import tune

__all__ = ["Denoiser", "explicit", "load", "VPDiscrete", "GaussianMixture", "exact_targets", "sample",
           "get_solver", "solvers", "tune"]
