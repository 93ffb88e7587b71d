"""Model files: the checkpoint format (``checkpoint``) and ``load`` for names, checkpoint and diffusers folders."""
from .checkpoint import BUILTIN_MODELS, save_model
from .load import load

__all__ = ["load", "save_model", "BUILTIN_MODELS"]
