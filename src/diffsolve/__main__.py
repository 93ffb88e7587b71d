"""``python -m diffsolve``: the command line (see ``diffsolve.cli``)."""
import sys

from .cli import main

sys.exit(main())
