"""Evaluation: image metrics (FD-LeNet and its shipped LeNet-5)."""
