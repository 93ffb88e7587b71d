"""The sampling facade: ``sample`` puts a model, a time grid and a solver together; ``analytic``: the closed-form
Gaussian start that skips the early steps."""
from .analytic import GaussianStart, skipped_fraction, truncated_times
from .sample import SampleInfo, SamplerSpec, plan_run, sample

__all__ = ["sample", "SampleInfo", "SamplerSpec", "plan_run", "GaussianStart", "skipped_fraction", "truncated_times"]
