"""The sampling facade: ``sample`` puts a model, a time grid and a solver together."""
from .sample import SampleInfo, SamplerSpec, plan_run, sample

__all__ = ["sample", "SampleInfo", "SamplerSpec", "plan_run"]
