"""Training: ``train`` with ``TrainConfig`` (UNet, objectives from the parameterisation table, EMA, exact resume)."""
from .train import TrainConfig, read_log, train, training_pair

__all__ = ["TrainConfig", "train", "read_log", "training_pair"]
