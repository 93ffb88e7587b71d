"""Solvers: one program per method family on shared drivers, the exponential-integrator math and the registry."""
from .drivers import Call, Evaluator, Request, Step, Stepper, drive, run_multistep, run_singlestep
from .registry import SOLVERS, Plan, SolverInfo, get_solver, solvers
from .state import Noise, Point, SamplingError, SolverState

__all__ = ["SolverInfo", "SOLVERS", "get_solver", "solvers", "SamplingError", "Plan", "SolverState", "Noise",
           "Point", "Evaluator", "Call", "Step", "Request", "Stepper", "drive", "run_multistep", "run_singlestep"]
