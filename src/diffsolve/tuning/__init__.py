"""Fit a sampler to one frozen model (``ds.tune``) and keep it in a profile (``ds.Profile``).

* ``search``: the tuner (``tune``, in phases; ``budget``: the search of one NFE budget, ``BudgetSearch``): per NFE budget, solver, time grid, last step and options chosen on calibration
  noise against a teacher, reported on disjoint evaluation noise.
* ``profile``: the profile file (``Profile``), refused by another model, process, guidance scale or data shape.
* ``grid_search``: GITS and evolutionary searches of time grids (``OptimizedGrid``).
* ``statistics``: estimation of DPM-Solver-v3's model statistics.
* ``cli``: ``diffsolve tune`` (``python -m diffsolve.tuning``).
"""
from ..evaluation.teacher import ExactTeacher, ModelTeacher, Teacher, make_teacher
from .budget import family_times
from .cli import main
from .grid_search import Calibration, OptimizedGrid, evolve, gits
from .profile import FORMAT, Entry, Profile, ProfileError, ProfileMismatch, load_profile
from .search import DEFAULT_NFES, seeded_noise, tune
from .statistics import compute_statistics

__all__ = ["tune", "Profile", "Entry", "ProfileError", "ProfileMismatch", "load_profile", "compute_statistics",
           "Teacher", "ExactTeacher", "ModelTeacher", "make_teacher", "seeded_noise", "family_times", "FORMAT", "DEFAULT_NFES", "main", "gits", "evolve",
           "Calibration", "OptimizedGrid"]
