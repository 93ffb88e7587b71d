"""Networks that diffsolve can train and ship (``diffsolve.training``, ``ds.load``)."""
from .build import build_model
from .unet import FeatureCache, UNet, UNetConfig, architecture, count_parameters, timestep_embedding

__all__ = ["FeatureCache", "UNet", "UNetConfig", "architecture", "build_model", "count_parameters", "timestep_embedding"]
