"""Guidance as wrappers around a model: each corrects the model's prediction, so it reaches every solver."""
from .cfg import ClassifierFreeGuidance
from .classifier import ClassifierGuidance
from .precision import PrecisionWeighted

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "PrecisionWeighted"]
