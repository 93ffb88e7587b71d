"""Networks that diffsolve can train and ship (``diffsolve.training``, ``ds.load``): the UNet, and the noise-level
classifier of Denoising MCMC."""
from .noise_level import NoiseLevelClassifier, NoiseLevelNet
from .unet import UNet, UNetConfig, architecture, build_model, count_parameters, timestep_embedding

__all__ = ["UNet", "UNetConfig", "architecture", "build_model", "count_parameters", "timestep_embedding",
           "NoiseLevelNet", "NoiseLevelClassifier"]
