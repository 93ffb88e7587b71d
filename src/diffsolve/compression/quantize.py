"""Timestep-aware post-training quantisation of a frozen network (PTQ4DM, arXiv:2211.15736; Q-Diffusion,
arXiv:2302.04304; TFMQ-DM, arXiv:2311.16503).

``quantize(model, weights=..., activations=..., granularity=..., calibration=..., backend=...)`` returns the same
kind of model with its network's Conv2d and Linear layers quantised, so it samples with every solver.

* Weights: ``int8``, ``int4``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp4_e2m1`` (``formats``), one scale per output channel
  (``granularity='channel'``) or per tensor, s = max|W| / qmax; ``rounding='learned'`` replaces round-to-nearest
  by AdaRound-style block reconstruction (``rounding.learn_rounding``).
* Activations (the inputs of every quantised layer): ``None``, ``int8`` (asymmetric, range [lo, hi]) or
  ``fp8_e4m3`` / ``fp8_e5m2`` (symmetric).  Their ranges are calibrated per **time bin**: the calibration inputs are
  recorded along the full-precision model's own sampling trajectories (``Calibration``: the ``on_call`` hook's
  ``prediction.net_input``), binned by network time into bins uniform in log-SNR, and each sample of a batch is
  quantised with the range of its own bin.  Bins without calibration data take the nearest calibrated bin's range,
  so a calibration on one grid serves another.
* Backends: ``fake`` (exact simulation in float32: the honest quality figure), ``quanto`` (optimum-quanto's
  QConv2d / QLinear with its own static activation scales) and ``torchao`` (Linear layers only); see ``backends``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.denoiser import Denoiser, Model
from ..grids.coords import from_unit
from ..sampling import sample
from ..util import seeding
from .formats import Format, get_format

Tensor = torch.Tensor
GRANULARITIES = ("channel", "tensor")
BACKENDS = ("fake", "quanto", "torchao")
ACTIVATIONS = (None, "int8", "fp8_e4m3", "fp8_e5m2")
ROUNDINGS = ("nearest", "learned")


# ----------------------------------------------------------------------------------------
# calibration inputs
# ----------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Where calibration inputs come from: ``samples`` trajectories of the full-precision model (``solver`` at
    ``nfe`` on each of ``spacings``), from sample seeds ``seed``, ``seed + 1``, ... (disjoint from the evaluation seeds
    0, 1, ...); every network call's input and time is kept.  ``bins``: time bins, uniform in log-SNR."""

    samples: int = 32
    nfe: int = 20
    solver: str = "dpm++2m"
    spacings: Tuple[str, ...] = ("logsnr", "uniform")
    seed: int = 1_000_000
    bins: int = 16

    def __post_init__(self):
        self.spacings = tuple([self.spacings] if isinstance(self.spacings, str) else self.spacings)
        if self.samples < 1 or self.nfe < 1 or self.bins < 1 or not self.spacings:
            raise ValueError("Calibration needs samples, nfe and bins >= 1 and at least one spacing")


@dataclass
class CalibrationSet:
    """Recorded network inputs ``x`` [N, ...] (float32) and network times ``t`` [N]."""

    x: Tensor
    t: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, size: int):
        for i in range(0, len(self), size):
            yield self.x[i:i + size], self.t[i:i + size]


def record_inputs(model: Model, calib: Calibration, shape: Optional[Sequence[int]] = None) -> CalibrationSet:
    """Run ``model`` (full precision) along its own trajectories and keep every network input and time."""
    shape = tuple(shape or getattr(model, "sample_shape", None) or ())
    if not shape:
        raise ValueError("calibration needs the sample shape (a model loaded with ds.load, or shape=)")
    xs: List[Tensor] = []
    ts: List[Tensor] = []

    def keep(call) -> None:
        inp = call.prediction.net_input
        if inp is None:
            raise ValueError("this model does not report its network inputs (prediction.net_input): calibrate "
                             "a ds.Denoiser")
        xs.append(inp[0].detach().float().cpu())
        ts.append(inp[1].detach().float().cpu().reshape(-1).expand(inp[0].shape[0]))

    noise = seeding.noise(range(calib.seed, calib.seed + calib.samples), shape)
    with torch.no_grad():
        for spacing in calib.spacings:
            sample(model, noise, solver=calib.solver, nfe=calib.nfe, spacing=spacing, on_call=keep)
    return CalibrationSet(torch.cat(xs), torch.cat(ts))


class TimeBins:
    """Bins of network time, uniform in log-SNR; ``current`` holds each sample's bin during a forward pass."""

    def __init__(self, edges: Tensor):
        self.edges = edges.float().contiguous()  # [n_bins - 1] ascending network times
        self.current: Optional[Tensor] = None

    @property
    def n(self) -> int:
        return self.edges.numel() + 1

    @classmethod
    def for_model(cls, den: Denoiser, n: int) -> "TimeBins":
        u = torch.linspace(0, 1, n + 1, dtype=torch.float64)[1:-1]
        t = from_unit(den.process, torch.cat([torch.zeros(1, dtype=torch.float64), u]), fix_last=False)[1:]
        tm = torch.as_tensor(den.model_time(t), dtype=torch.float64).reshape(-1)
        return cls(torch.sort(tm).values)

    def index(self, t: Tensor) -> Tensor:
        return torch.bucketize(t.float().reshape(-1), self.edges)


# ----------------------------------------------------------------------------------------
# the quantised layer
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: Tensor) -> Tensor:
    """AdaRound's h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1) (learned rounding; ``rounding``)."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

# ----------------------------------------------------------------------------------------
def weight_scale(w: Tensor, fmt: Format, granularity: str) -> Tensor:
    """s = max|W| / qmax per output channel ([C_out, 1, ...]) or per tensor (a [1, 1, ...] tensor)."""
    if granularity == "channel":
        m = w.detach().abs().flatten(1).amax(1).reshape((-1,) + (1,) * (w.dim() - 1))
    else:
        m = w.detach().abs().amax().reshape((1,) * w.dim())
    return (m / fmt.qmax).clamp_min(1e-12).float()


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose weight is a quantised code table times a scale and whose input is quantised with
    per-time-bin ranges.  ``weight`` holds the dequantised weight the forward pass uses; ``codes`` / ``scale`` are
    what a packed checkpoint stores.  ``alpha`` (set by learned rounding while it optimises) makes the rounding soft:
    W = s (lo + h(alpha) (hi - lo)) between the representable neighbours lo <= W / s < hi."""

    def __init__(self, layer: nn.Module, wfmt: Format, granularity: str, afmt: Optional[Format],
                 bins: TimeBins, scale: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"only Conv2d and Linear layers are quantised, got {type(layer).__name__}")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        self.conv_args: Dict[str, Any] = {}
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError("only zero-padded convolutions are quantised")
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                                  groups=layer.groups)
        self.wfmt, self.granularity, self.afmt, self.bins = wfmt, granularity, afmt, bins
        w = layer.weight.detach().float()
        self.register_buffer("w_float", w.clone(), persistent=False)  # for learned rounding; dropped when packed
        self.register_buffer("scale", (scale if scale is not None else weight_scale(w, wfmt, granularity)).clone())
        self.register_buffer("codes", wfmt.encode(w, self.scale).to(torch.int16))
        self.register_buffer("weight", wfmt.decode(self.codes, self.scale))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone(),
                                                               requires_grad=False)
        n = bins.n
        self.register_buffer("act_lo", torch.full((n,), float("nan")))
        self.register_buffer("act_hi", torch.full((n,), float("nan")))
        self.alpha: Optional[nn.Parameter] = None

    # -- weights -------------------------------------------------------------------------------------
    def set_codes(self, codes: Tensor) -> None:
        self.codes = codes.to(torch.int16)
        self.weight = self.wfmt.decode(self.codes, self.scale)

    def current_weight(self) -> Tensor:
        if self.alpha is None:
            return self.weight
        g = self.wfmt.grid
        lo, hi = self.lo_idx, self.hi_idx
        return self.scale * (g[lo] + rectified_sigmoid(self.alpha) * (g[hi] - g[lo]))

    # -- activations -----------------------------------------------------------------------------------
    @property
    def act_calibrated(self) -> bool:
        return bool(torch.isfinite(self.act_lo).all())

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.afmt is None:
            return x
        idx = self.bins.current
        if idx is None or idx.numel() != x.shape[0]:
            raise RuntimeError("activation quantisation needs the time of every sample (call the quantised "
                               "network through QuantizedNet)")
        shp = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = self.act_lo[idx].reshape(shp), self.act_hi[idx].reshape(shp)
        if self.afmt.kind == "int":  # asymmetric uint8 grid over [lo, hi]
            s = ((hi - lo) / 255.0).clamp_min(1e-12)
            zp = torch.round(-lo / s)
            q = torch.clamp(torch.round(x / s) + zp, 0, 255)
            return (q - zp) * s
        s = (torch.maximum(hi.abs(), lo.abs()) / self.afmt.qmax).clamp_min(1e-12)
        return self.afmt.quantize(x, s)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(x)
        w = self.current_weight()
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        a = self.afmt.name if self.afmt is not None else "none"
        return f"{self.kind}, weights={self.wfmt.name}/{self.granularity}, activations={a}"


class QuantizedNet(nn.Module):
    """The network with its layers replaced by ``QuantLayer``s; ``forward(x, t, **kw)`` tells the layers each
    sample's time bin.  ``spec`` records the settings (weights, activations, granularity, rounding, bins)."""

    def __init__(self, net: nn.Module, bins: TimeBins, spec: Dict[str, Any]):
        super().__init__()
        self.net, self.time_bins, self.spec = net, bins, dict(spec)
        self.register_buffer("bin_edges", bins.edges)

    @property
    def config(self):  # the architecture of the wrapped network (save_model, peft)
        return getattr(self.net, "config", None)

    def quant_layers(self) -> Dict[str, QuantLayer]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, QuantLayer)}

    def forward(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        self.time_bins.current = self.time_bins.index(t.expand(x.shape[0]) if t.dim() == 0 else t)
        try:
            return self.net(x, t, *args, **kwargs)
        finally:
            self.time_bins.current = None


def quantizable_layers(net: nn.Module, skip: Sequence[str] = ()) -> List[str]:
    """Names of the Conv2d and Linear layers of ``net`` (less ``skip``)."""
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in set(skip)]


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def build_quantized(net: nn.Module, bins: TimeBins, weights: str, activations: Optional[str], granularity: str,
                    skip: Sequence[str] = (), rounding: str = "nearest") -> QuantizedNet:
    """A ``QuantizedNet`` over a float copy of ``net`` with round-to-nearest weights and uncalibrated activations."""
    wfmt = get_format(weights)
    afmt = get_format(activations) if activations is not None else None
    qnet = copy.deepcopy(net).float().eval().requires_grad_(False)
    for name in quantizable_layers(qnet, skip):
        _replace(qnet, name, QuantLayer(qnet.get_submodule(name), wfmt, granularity, afmt, bins))
    spec = {"weights": wfmt.name, "activations": afmt.name if afmt else None, "granularity": granularity,
            "rounding": rounding, "bins": bins.n, "skip": list(skip)}
    return QuantizedNet(qnet, bins, spec)


@torch.no_grad()
def calibrate_activations(qnet: QuantizedNet, float_net: nn.Module, data: CalibrationSet, batch: int = 64,
                          margin: float = 1.0, float_input: bool = True) -> None:
    """Per time bin, the range [min, max] of every quantised layer's input under the full-precision network,
    widened about its centre by ``margin``; empty bins take the nearest calibrated bin's range.

    ``float_input``: a layer that reads the network's own input x_t keeps it unquantised.  For an epsilon (or v)
    network near the noise end, x0 = (x - sigma eps) / alpha multiplies any error of eps that follows x by
    sigma / alpha (156 at t_max of DDPM's linear schedule), so rounding or clipping the input there ruins samples."""
    layers = qnet.quant_layers()
    reads_input: set = set()
    lo = {n: torch.full((qnet.time_bins.n,), float("inf")) for n in layers}
    hi = {n: torch.full((qnet.time_bins.n,), float("-inf")) for n in layers}
    current: Dict[str, Tensor] = {}
    hooks = []
    for name in layers:
        def hook(mod, inp, name=name):
            if inp[0].data_ptr() == current["x"].data_ptr():
                reads_input.add(name)
            x = inp[0].detach().float().flatten(1)
            b = current["bins"]
            lo[name].scatter_reduce_(0, b, x.amin(1), "amin")
            hi[name].scatter_reduce_(0, b, x.amax(1), "amax")
        hooks.append(float_net.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for x, t in data.batches(batch):
            current["bins"], current["x"] = qnet.time_bins.index(t), x
            float_net(x, t)
    finally:
        for h in hooks:
            h.remove()
    seen = torch.isfinite(lo[next(iter(layers))]) if layers else torch.zeros(0, dtype=torch.bool)
    if layers and not bool(seen.any()):
        raise ValueError("the calibration set is empty")
    idx = torch.arange(qnet.time_bins.n)
    have = idx[seen]
    nearest = have[(idx[:, None] - have[None, :]).abs().argmin(1)]
    for name, layer in layers.items():
        a, b = lo[name][nearest], hi[name][nearest]
        c, r = (a + b) / 2, (b - a) / 2 * margin
        layer.act_lo.copy_(c - r)
        layer.act_hi.copy_(c + r)
        if float_input and name in reads_input:
            layer.afmt = None
    qnet.spec["float_input_layers"] = sorted(reads_input) if float_input else []
    qnet.spec["act_margin"] = margin
