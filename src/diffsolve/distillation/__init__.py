"""Few-step students from a frozen teacher: reflow, MMD fine-tuning, consistency distillation (resumable)."""
from .api import METHODS, distill
from .mmd import mmd2_unbiased
from .run import DistillConfig

__all__ = ["distill", "METHODS", "DistillConfig", "mmd2_unbiased"]
