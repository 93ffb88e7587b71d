"""Networks that diffsolve can train and ship (``diffsolve.training``, ``ds.load``)."""
from .unet import UNet, UNetConfig, architecture, build_model, count_parameters, timestep_embedding

__all__ = ["UNet", "UNetConfig", "architecture", "build_model", "count_parameters", "timestep_embedding"]
