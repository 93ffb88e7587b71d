"""Networks that diffsolve can train and ship (``diffsolve.training``, ``ds.load``): the image ``UNet``, the
``MLP`` of low-dimensional data and the noise-level classifier of Denoising MCMC."""
from .build import architecture, build_model
from .mlp import MLP, MLPConfig
from .noise_level import NoiseLevelClassifier, NoiseLevelNet
from .unet import FeatureCache, UNet, UNetConfig, count_parameters, timestep_embedding

__all__ = ["FeatureCache", "MLP", "MLPConfig", "NoiseLevelClassifier", "NoiseLevelNet", "UNet", "UNetConfig",
           "architecture", "build_model", "count_parameters", "timestep_embedding"]
