"""Networks from their JSON architecture dicts and back (checkpoints, training)."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from torch import nn

from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

#: architecture ``type`` -> (network class, config class)
ARCHITECTURES = {"UNet": (UNet, UNetConfig), "MLP": (MLP, MLPConfig)}


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """Build a network from its JSON architecture dict ({'type': 'UNet' | 'MLP', ...config fields})."""
    arch = dict(arch)
    kind = arch.pop("type", "UNet")
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture type {kind!r} (known: {', '.join(map(repr, ARCHITECTURES))})")
    net_cls, cfg_cls = ARCHITECTURES[kind]
    return net_cls(cfg_cls.from_dict(arch))


def architecture(net: nn.Module) -> Dict[str, Any]:
    """The JSON architecture dict of a ``UNet`` or ``MLP`` (inverse of ``build_model``)."""
    config: Any = net.config
    return {"type": type(net).__name__, **config.to_dict()}
