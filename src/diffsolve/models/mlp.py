"""A time-conditioned MLP for flat data (the exact Gaussian-mixture references, 2-D toys): ``net(x, t)`` with x
[B, D] (or [B, *shape], flattened and restored) and t [B]; sinusoidal time embedding added to every hidden layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .unet import config_from_dict, timestep_embedding

Tensor = torch.Tensor


@dataclass
class MLPConfig:
    dim: int = 64
    hidden: int = 256
    layers: int = 3
    time_scale: float = 1.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MLPConfig":
        return config_from_dict(cls, d, "MLP")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        if config.dim < 1 or config.hidden < 1 or config.layers < 1:
            raise ValueError("MLP needs dim, hidden and layers >= 1")
        self.config = c = config
        self.inp = nn.Linear(c.dim, c.hidden)
        self.temb = nn.Linear(c.hidden, c.hidden)
        self.hidden = nn.ModuleList([nn.Linear(c.hidden, c.hidden) for _ in range(c.layers)])
        self.out = nn.Linear(c.hidden, c.dim)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1))
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(shape[0])
        e = self.temb(timestep_embedding(t.float() * self.config.time_scale, self.config.hidden).to(h.dtype))
        for layer in self.hidden:
            h = h + layer(F.silu(h + e))
        return self.out(F.silu(h)).reshape(shape)
