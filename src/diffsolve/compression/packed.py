"""Packed quantised checkpoints: integer codes instead of float weights, in safetensors (nothing is unpickled).

A folder with ``quantized.safetensors`` and ``config.json``.  Each quantised layer stores its weight codes
(indices into the format's value table: one byte each for 8-bit formats, two per byte for 4-bit ones), its scales
(float32, per channel or per tensor) and its per-time-bin activation ranges; everything else of the network (biases,
norms, embeddings) is stored as float32.  ``config.json`` is the model's own checkpoint config (architecture,
process, prediction, ...) plus ``quantization`` (the settings, the bin edges, the packed tensors' sha256).
``load_packed`` rebuilds the same dequantised weights, so outputs are bit-identical to the model that was saved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..adapters.denoiser import Denoiser, Model, base_model
from ..hub.checkpoint import model_time_fn
from ..processes import process_from_config
from ..util.files import json_dump_atomic, save_safetensors, sha256_file
from .formats import get_format
from .quantize import QuantizedNet, QuantLayer, TimeBins, _replace

Tensor = torch.Tensor
PACKED = "quantized.safetensors"
CONFIG = "config.json"
FORMAT = "diffsolve-quantized"


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Codes (0 .. 2^bits - 1) as a flat uint8 tensor: one per byte (8 bits) or two per byte (4 bits, low first)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: Tensor, bits: int, shape: torch.Size) -> Tensor:
    n = math.prod(shape)
    if bits == 8:
        flat = packed.reshape(-1)
    else:
        flat = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if flat.numel() < n:
        raise ValueError(f"packed codes hold {flat.numel()} values, the layer needs {n}")
    return flat[:n].to(torch.int16).reshape(shape)


def _qnet_of(model: Union[Model, QuantizedNet]) -> QuantizedNet:
    if isinstance(model, QuantizedNet):
        return model
    den = base_model(model)
    net = getattr(den, "net", None)
    if not isinstance(net, QuantizedNet):
        raise TypeError("save_packed needs a model quantised with backend='fake' (its network is a QuantizedNet)")
    return net


def save_packed(model: Model, path: Union[str, Path], config: Optional[Dict[str, Any]] = None) -> Path:
    """Write a packed checkpoint of a fake-quantised model (``quantize(..., backend='fake')``); returns the folder."""
    qnet = _qnet_of(model)
    den = base_model(model)
    cfg = dict(config if config is not None else getattr(den, "config", {}) or {})
    for key in ("architecture", "process", "prediction"):
        if key not in cfg:
            raise ValueError(f"the model's config has no {key!r}: save_packed needs a model loaded with ds.load "
                             "(or pass config=)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, Tensor] = {}
    layers = qnet.quant_layers()
    meta_layers: Dict[str, Any] = {}
    for name, layer in layers.items():
        bits = layer.wfmt.bits
        tensors[f"{name}.codes"] = pack_codes(layer.codes, bits)
        tensors[f"{name}.scale"] = layer.scale.float().contiguous()
        tensors[f"{name}.act_lo"] = layer.act_lo.float()
        tensors[f"{name}.act_hi"] = layer.act_hi.float()
        meta_layers[name] = {"shape": list(layer.codes.shape), "bits": bits,
                             "activations": layer.afmt.name if layer.afmt is not None else None}
    q_params = {f"{n}.weight" for n in layers}
    for k, v in qnet.net.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in layers and leaf != "bias":
            continue  # codes, scales and ranges are stored above
        if k in q_params:
            continue
        tensors[f"float.{k}"] = v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
    tensors["bin_edges"] = qnet.time_bins.edges.float().contiguous()
    wpath = path / PACKED
    save_safetensors(tensors, wpath)
    cfg = {k: v for k, v in cfg.items() if k not in ("weights", "format", "format_version")}
    out = {"format": FORMAT, "format_version": 1, **cfg,
           "quantization": {**qnet.spec, "layers": meta_layers, "file": PACKED, "sha256": sha256_file(wpath)}}
    json_dump_atomic(out, path / CONFIG)
    return path


def load_packed(path: Union[str, Path]) -> Denoiser:
    """A ``ds.Denoiser`` over the quantised network of a packed checkpoint (clear ``ValueError`` for a missing,
    corrupt or mismatched file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models import build_model

    path = Path(path)
    cpath = path / CONFIG
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cpath}: missing or not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{cpath}: not a packed quantised checkpoint (format {cfg.get('format')!r})")
    q = cfg.get("quantization") or {}
    wpath = path / q.get("file", PACKED)
    if not wpath.exists():
        raise ValueError(f"{wpath}: missing packed weights")
    if q.get("sha256") and sha256_file(wpath) != q["sha256"]:
        raise ValueError(f"{wpath}: checksum mismatch: the packed file is corrupt, truncated or from another model")
    try:
        t = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{wpath}: corrupt packed safetensors file ({e})") from None
    try:
        net = build_model(cfg["architecture"]).float().eval()
        bins = TimeBins(t["bin_edges"])
        wfmt = get_format(q["weights"])
        for name, meta in q["layers"].items():
            layer = net.get_submodule(name)
            afmt = get_format(meta["activations"]) if meta["activations"] else None
            ql = QuantLayer(layer, wfmt, q["granularity"], afmt, bins, scale=t[f"{name}.scale"])
            ql.set_codes(unpack_codes(t[f"{name}.codes"], meta["bits"], torch.Size(meta["shape"])))
            ql.act_lo.copy_(t[f"{name}.act_lo"])
            ql.act_hi.copy_(t[f"{name}.act_hi"])
            ql.w_float = ql.weight.clone()
            _replace(net, name, ql)
        sd = {k[len("float."):]: v for k, v in t.items() if k.startswith("float.")}
        missing, unexpected = net.load_state_dict(sd, strict=False)
        missing = [k for k in missing if k.rpartition(".")[0] not in q["layers"]]
        if missing or unexpected:
            raise ValueError(f"tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{wpath} does not match the quantisation in {cpath}: {e}") from None
    spec = {k: v for k, v in q.items() if k not in ("layers", "file", "sha256")}
    qnet = QuantizedNet(net.requires_grad_(False), bins, spec)
    proc = process_from_config(cfg["process"])
    kw: Dict[str, Any] = {}
    if cfg["prediction"] != "edm":
        kw["model_time"] = model_time_fn(cfg.get("model_time", "process"), proc)
    if "sigma_data" in cfg:
        kw["sigma_data"] = cfg["sigma_data"]
    shape = cfg.get("sample_shape")
    return Denoiser(qnet, proc, prediction=cfg["prediction"], config=cfg,
                    sample_shape=tuple(shape) if shape else None, **kw)


def packed_bytes(path: Union[str, Path]) -> int:
    return (Path(path) / PACKED).stat().st_size


__all__ = ["save_packed", "load_packed", "pack_codes", "unpack_codes", "packed_bytes"]
