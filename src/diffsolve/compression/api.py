"""``quantize``: the entry point of timestep-aware quantisation (see ``quantize`` for the method and the layers)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

from torch import nn

from ..adapters.denoiser import Denoiser, Model, base_model, with_network
from .formats import get_format
from .quantize import (
    ACTIVATIONS,
    BACKENDS,
    GRANULARITIES,
    ROUNDINGS,
    Calibration,
    CalibrationSet,
    QuantizedNet,
    TimeBins,
    build_quantized,
    calibrate_activations,
    record_inputs,
)


# ----------------------------------------------------------------------------------------
def _check(weights: str, activations: Optional[str], granularity: str, backend: str, rounding: str) -> None:
    get_format(weights)
    if activations is not None:
        a = get_format(activations).name
        if a not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if backend != "fake":
        from .backends import check_backend
        check_backend(backend, weights, activations, granularity)
        if rounding != "nearest":
            raise ValueError(f"learned rounding is simulated (backend='fake'); backend {backend!r} rounds to nearest")


def quantize(model: Union[Model, str], weights: str = "int8", activations: Optional[str] = None,
             granularity: str = "channel", calibration: Union[Calibration, CalibrationSet, None] = None,
             backend: str = "fake", rounding: str = "nearest", skip: Sequence[str] = (),
             rounding_options: Optional[Dict[str, Any]] = None, act_margin: float = 1.0,
             float_input: bool = True) -> Model:
    """A copy of ``model`` whose network is quantised (see the module doc); wrappers around it are kept.

    ``calibration``: a ``Calibration`` (default: ``Calibration()`` when activations are quantised or rounding is
    learned) or an already recorded ``CalibrationSet``.  ``skip``: layer names kept in float.
    """
    if isinstance(model, str):
        from ..hub import load
        model = load(model)
    if activations in ("none", "None", ""):
        activations = None
    _check(weights, activations, granularity, backend, rounding)
    den = base_model(model)
    if not isinstance(den, Denoiser) or not isinstance(den.net, nn.Module):
        raise TypeError("quantize needs a model whose base is a ds.Denoiser over a torch.nn.Module network")
    needs_data = activations is not None or rounding == "learned" or backend == "quanto"
    data: Optional[CalibrationSet] = None
    calib = calibration if isinstance(calibration, Calibration) else Calibration()
    if needs_data:
        data = calibration if isinstance(calibration, CalibrationSet) else record_inputs(den, calib)
    float_net = den.net.float().eval()
    if backend != "fake":
        from .backends import real_kernel_net
        net = real_kernel_net(float_net, backend, weights, activations, granularity, data)
        return with_network(model, lambda _: net)
    bins = TimeBins.for_model(den, calib.bins)
    qnet = build_quantized(float_net, bins, weights, activations, granularity, skip, rounding)
    if rounding == "learned":
        from .rounding import learn_rounding
        assert data is not None
        learn_rounding(qnet, float_net, data, **(rounding_options or {}))
    if activations is not None:
        assert data is not None
        calibrate_activations(qnet, float_net, data, margin=act_margin, float_input=float_input)
    return with_network(model, lambda _: qnet)


def describe(qnet: QuantizedNet) -> Dict[str, Any]:
    return {**qnet.spec, "layers": len(qnet.quant_layers())}
