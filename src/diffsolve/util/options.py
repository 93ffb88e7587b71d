"""``KEY=VALUE`` command-line options as Python values."""
from __future__ import annotations

import ast
from typing import Any, Dict, Sequence


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """``["order=3", "eta=0.5", "variant=bh1"]`` -> options (Python literals, else strings); ValueError otherwise."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out
