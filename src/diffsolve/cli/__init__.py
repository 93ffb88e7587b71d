"""The command line (``diffsolve``): a thin layer over the library."""
from .main import main

__all__ = ["main"]
