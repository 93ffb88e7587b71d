"""Inverse problems with a frozen prior: operators, the exact posterior of Gaussian-mixture problems, and
posterior-guidance methods behind one entry point (``sample``, ``methods``)."""
from .api import METHODS, InverseInfo, guided_model, methods, sample
from .exact import ExactPosterior
from .methods.ddrm import DDRM
from .methods.diffpir import DiffPIR
from .methods.dps import DPS, DPSStep
from .methods.mmps import MMPS
from .methods.oracle import Oracle
from .methods.pigdm import PiGDM, PiGDMStep
from .methods.reddiff import REDDiff
from .methods.tds import TDS
from .methods.tmpd import TMPD
from .operators import AvgPool, Dense, Function, GaussianBlur, Identity, Mask, Operator

__all__ = ["sample", "methods", "guided_model", "METHODS", "InverseInfo", "ExactPosterior", "Operator", "Identity",
           "Mask", "Dense", "AvgPool", "GaussianBlur", "Function", "DPS", "MMPS", "PiGDM", "TMPD", "TDS", "DDRM", "DiffPIR", "REDDiff", "DPSStep", "PiGDMStep", "Oracle"]

from .exact import LowRankPosterior  # noqa: E402
from .methods.afdps import AFDPS  # noqa: E402
from .methods.mcgdiff import MCGDiff  # noqa: E402

__all__ += ["LowRankPosterior", "MCGDiff", "AFDPS"]
