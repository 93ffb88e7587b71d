"""Strict JSON values from what the library produces (tensors, numpy values, NaN, dtypes)."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch


def jsonable(v: Any) -> Any:
    """Tensors and numpy values -> lists and numbers, NaN/inf -> None, tuples -> lists, dtypes -> 'float32';
    anything else that JSON cannot hold -> its ``str``."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        v = v.tolist()
    elif isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)
