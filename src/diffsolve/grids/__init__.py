"""Time grids, independent of solvers: spacings, ``TimeGrid``, explicit grids and unit log-SNR coordinates."""
from .coords import from_unit, to_unit
from .grid import FINALS, TimeGrid, explicit, make_grid, validate_times
from .spacings import SPACINGS, five_step, karras, leading, linspace, logsnr, quadratic, trailing, uniform

__all__ = ["TimeGrid", "FINALS", "explicit", "make_grid", "validate_times", "SPACINGS", "to_unit", "from_unit",
           "five_step", "karras", "leading", "linspace", "logsnr", "quadratic", "trailing", "uniform"]
