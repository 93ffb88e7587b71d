"""Evaluation: the teacher every score is measured against (``teacher``: exact mixture ODE or a high-NFE run of
the same model) and image metrics (``metrics``: FD-LeNet and its shipped LeNet-5)."""
from .teacher import ExactTeacher, ModelTeacher, Teacher, make_teacher

__all__ = ["Teacher", "ExactTeacher", "ModelTeacher", "make_teacher"]
