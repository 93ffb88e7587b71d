"""``python -m diffsolve.training`` = ``diffsolve train``."""
from .train import main

raise SystemExit(main())
