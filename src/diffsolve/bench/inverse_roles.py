"""The rows of ``diffsolve bench --inverse`` by role: the peers (how each one runs), the baselines and the
reference rows, and the median that every summary uses."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import numpy as np

#: peer rows: name -> (runner kind, options).  azula's samplers with an eta run with eta = 0 (DDIM) and 1 (DDPM)
PEERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "azula:dps": ("azula:dps", {"zeta": 1.0}),  # azula's default; tuned per cell (``tune_dps``)
    "azula:pigdm": ("azula:pigdm", {"eta": 0.0}),
    "azula:pigdm-ddpm": ("azula:pigdm", {"eta": 1.0}),
    "azula:mmps": ("azula:mmps", {"eta": 0.0}),
    "azula:mmps-ddpm": ("azula:mmps", {"eta": 1.0}),
    "azula:tmpd": ("azula:tmpd", {"eta": 0.0}),
    "azula:tmpd-ddpm": ("azula:tmpd", {"eta": 1.0}),
    "azula:diffpir": ("azula:diffpir", {"eta": 0.0}),
    "azula:diffpir-ddpm": ("azula:diffpir", {"eta": 1.0}),
    "azula:tds": ("azula:tds", {}),
    "paper:mcgdiff": ("paper:mcgdiff", {"eta": 0.85, "kappa": 1e-4, "particles": 1000}),
    "paper:ddrm": ("library:ddrm", {"eta": 0.85, "eta_b": 1.0}),
    "paper:daps": ("library:daps", {"ode_steps": 5, "data_var": 1e12}),
}
DPS_PEERS = ("azula:dps",)
BASELINES = ("floor", "ignore-y")
REFERENCE_ROWS = ("oracle",)


def _kind(method: str) -> str:
    return ("baseline" if method in BASELINES else "reference" if method in REFERENCE_ROWS
            else "peer" if method in PEERS else "ours")


def _median(v: Sequence[float]) -> float:
    v = [x for x in v if not math.isnan(x)]
    return float(np.median(v)) if v else float("nan")
