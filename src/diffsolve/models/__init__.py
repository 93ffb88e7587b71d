"""Networks that diffsolve can train and ship (``diffsolve.training``, ``ds.load``): the image ``UNet`` and the
``MLP`` of low-dimensional data."""
from .build import architecture, build_model
from .mlp import MLP, MLPConfig
from .unet import FeatureCache, UNet, UNetConfig, count_parameters, timestep_embedding

__all__ = ["FeatureCache", "MLP", "MLPConfig", "UNet", "UNetConfig", "architecture", "build_model",
           "count_parameters", "timestep_embedding"]
