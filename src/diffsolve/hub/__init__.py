"""Model files: the checkpoint format (``checkpoint``) and ``load`` for names, checkpoint and diffusers folders."""
from .checkpoint import BUILTIN_MODELS, save_model
from .load import load, load_noise_classifier
from .spec import load_spec, parse_spec

__all__ = ["load", "load_spec", "parse_spec", "save_model", "BUILTIN_MODELS", "load_noise_classifier"]
