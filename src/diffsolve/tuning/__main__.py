"""``python -m diffsolve.tuning`` = ``diffsolve tune``."""
from .cli import main

raise SystemExit(main())
