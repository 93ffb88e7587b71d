"""A small time-conditioned MLP for low-dimensional data (2-D toys): ``net(x, t)`` with ``x`` [B, *shape].

The input is flattened, lifted to ``hidden`` features and passed through ``layers`` residual blocks; every block
adds a projection of the sinusoidal time embedding (the 'temporal layers' of the toy denoisers of Aithal et al.
2024, arXiv 2406.09358).  The output has the input's shape.  ``MLPConfig`` round-trips through JSON like
``UNetConfig``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .unet import config_from_dict, timestep_embedding

Tensor = torch.Tensor


@dataclass
class MLPConfig:
    """Architecture of ``MLP``.

    Attributes:
        in_features: numbers in one sample (the product of the sample shape).
        hidden: width of the hidden layers.
        layers: residual blocks.
        time_scale: the time input is multiplied by this before the sinusoidal embedding.
        time_embed_dim: width of the sinusoidal embedding (default ``hidden``).
    """

    in_features: int = 2
    hidden: int = 128
    layers: int = 3
    time_scale: float = 1.0
    time_embed_dim: Optional[int] = None

    def __post_init__(self):
        if self.in_features < 1 or self.hidden < 1 or self.layers < 1:
            raise ValueError("in_features, hidden and layers must be >= 1")

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or self.hidden

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MLPConfig":
        return config_from_dict(cls, d, "MLP")


class _Block(nn.Module):
    def __init__(self, width: int, temb: int):
        super().__init__()
        self.time = nn.Linear(temb, width)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return h + self.net(h + self.time(temb))


class MLP(nn.Module):
    """``MLP(MLPConfig(...))`` or ``MLP(in_features=2, ...)``; ``forward(x, t)`` -> same shape as x."""

    def __init__(self, config: Optional[MLPConfig] = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = MLPConfig(**kwargs)
        elif isinstance(config, Mapping):
            config = MLPConfig.from_dict({**config, **kwargs})
        self.config = cfg = config
        self.time_mlp = nn.Sequential(nn.Linear(cfg.temb_dim, cfg.temb_dim), nn.SiLU())
        self.inp = nn.Linear(cfg.in_features, cfg.hidden)
        self.blocks = nn.ModuleList([_Block(cfg.hidden, cfg.temb_dim) for _ in range(cfg.layers)])
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, cfg.in_features))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        if math.prod(x.shape[1:]) != self.config.in_features:
            raise ValueError(f"MLP expects samples of {self.config.in_features} numbers, got shape {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t.reshape(b)
        emb = timestep_embedding(t.float() * self.config.time_scale, self.config.temb_dim)
        temb = self.time_mlp(emb.to(self.inp.weight.dtype))
        h = self.inp(x.reshape(b, -1))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h).reshape(x.shape)
