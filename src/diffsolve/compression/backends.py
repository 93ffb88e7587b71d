"""Real-kernel quantisation backends on CPU (measured, not assumed, to be faster: see docs/compression.md).

* ``quanto`` (optimum-quanto): QConv2d and QLinear with int8 / fp8 weights and, optionally, int8 / fp8
  activations whose static scales come from its ``Calibration`` context over our calibration inputs (one scale per
  layer, not per time bin).  Its int4 weights fail on this torch (``freeze``), so they are refused here.
* ``torchao``: ``Int8DynamicActivationInt8WeightConfig`` (int8 weights, per-token dynamic int8 activations) or
  ``Int8WeightOnlyConfig``, on Linear layers only (its CPU int8 kernels do not cover Conv2d; convolutions stay float).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .formats import get_format

QUANTO_WEIGHTS = {"int8": "qint8", "fp8_e4m3": "qfloat8_e4m3fn", "fp8_e5m2": "qfloat8_e5m2"}
QUANTO_ACTS = {"int8": "qint8", "fp8_e4m3": "qfloat8_e4m3fn", "fp8_e5m2": "qfloat8_e5m2"}


def _need(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"backend needs {module.split('.')[0]} (pip install {extra}): {e}") from None


def check_backend(backend: str, weights: str, activations: Optional[str], granularity: str) -> None:
    """A clear error for settings a real-kernel backend cannot run (before any calibration work)."""
    w = get_format(weights).name
    a = get_format(activations).name if activations is not None else None
    if granularity != "channel":
        raise ValueError(f"backend {backend!r} quantises weights per output channel only")
    if backend == "quanto":
        if w not in QUANTO_WEIGHTS:
            raise ValueError(f"backend 'quanto' supports weights {sorted(QUANTO_WEIGHTS)} here, not {w!r} "
                             "(its int4 weights fail to freeze on this torch; use backend='fake')")
        if a is not None and a not in QUANTO_ACTS:
            raise ValueError(f"backend 'quanto' supports activations {sorted(QUANTO_ACTS)}, not {a!r}")
    elif backend == "torchao":
        if w != "int8" or a not in (None, "int8"):
            raise ValueError("backend 'torchao' supports int8 weights with int8 (dynamic) or no activation "
                             f"quantisation here, not weights={w!r}, activations={a!r}")
    else:
        raise ValueError(f"unknown real-kernel backend {backend!r}")


def real_kernel_net(net: nn.Module, backend: str, weights: str, activations: Optional[str], granularity: str,
                    data: Any) -> nn.Module:
    """A quantised copy of ``net`` on a real-kernel backend (``data``: a ``CalibrationSet`` for static scales)."""
    check_backend(backend, weights, activations, granularity)
    w = get_format(weights).name
    a = get_format(activations).name if activations is not None else None
    qnet = copy.deepcopy(net).float().eval().requires_grad_(False)
    if backend == "quanto":
        q = _need("optimum.quanto", "optimum-quanto")
        q.quantize(qnet, weights=getattr(q, QUANTO_WEIGHTS[w]), activations=getattr(q, QUANTO_ACTS[a]) if a else None)
        if a is not None:
            with torch.no_grad(), q.Calibration():
                for x, t in data.batches(64):
                    qnet(x, t)
        q.freeze(qnet)
        return qnet
    if backend == "torchao":
        ao = _need("torchao.quantization", "torchao")
        cfg = ao.Int8DynamicActivationInt8WeightConfig() if a == "int8" else ao.Int8WeightOnlyConfig()
        ao.quantize_(qnet, cfg, filter_fn=lambda m, _: isinstance(m, nn.Linear))
        return qnet
    raise ValueError(f"unknown real-kernel backend {backend!r}")
