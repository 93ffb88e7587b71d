"""``build_model``: a network from its JSON architecture dict ({'type': 'UNet' | 'MLP', ...config fields})."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

ARCHITECTURES = {"UNet": (UNet, UNetConfig), "MLP": (MLP, MLPConfig)}


def build_model(arch: Mapping[str, Any]) -> nn.Module:
    """Build a network from its JSON architecture dict ({'type': 'UNet' | 'MLP', ...config fields})."""
    arch = dict(arch)
    kind = arch.pop("type", "UNet")
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown architecture type {kind!r} (known: {', '.join(map(repr, ARCHITECTURES))})")
    net_cls, cfg_cls = ARCHITECTURES[kind]
    return net_cls(cfg_cls.from_dict(arch))
