"""A noise-level classifier for Denoising MCMC (Kim & Ye 2022, arXiv:2209.14593): logits over K noise levels of a
noisy image x~ = x0 + sigma eps (VE view), i.e. log p(sigma_k | x~) up to a constant for a uniform level prior.

The network sees the image divided by its RMS (its texture) and the log RMS (its scale) as a separate feature, so one
small CNN covers noise levels over several decades.  Files: ``noise_level.safetensors`` + ``noise_level.json`` (the
levels, the data shape, what it was trained on) in a folder, written atomically; nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..util.files import json_dump_atomic, save_safetensors, sha256_file

Tensor = torch.Tensor
WEIGHTS, CONFIG, FORMAT = "noise_level.safetensors", "noise_level.json", "diffsolve-noise-level"


class NoiseLevelNet(nn.Module):
    """Strided 3x3 convolutions (GroupNorm, SiLU), global average pooling, and a linear head on [features, log RMS]."""

    def __init__(self, in_channels: int, num_levels: int, channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate(channels):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c + 1, num_levels)
        self.in_channels, self.num_levels, self.channels = in_channels, num_levels, tuple(int(w) for w in channels)

    def forward(self, x: Tensor) -> Tensor:
        rms = x.flatten(1).pow(2).mean(1).clamp_min(1e-20).sqrt()
        h = self.body(x / rms.reshape((-1,) + (1,) * (x.dim() - 1))).mean((2, 3))
        return self.head(torch.cat([h, rms.log()[:, None]], 1))


class NoiseLevelClassifier:
    """``net`` with its noise levels ``sigmas`` [K] (VE view, increasing) and data ``shape``: ``logits(x~)`` [B, K]
    (float64) for the Denoising-MCMC sigma step."""

    def __init__(self, net: NoiseLevelNet, sigmas: Tensor, shape: Sequence[int], meta: Optional[Dict[str, Any]] = None):
        self.net = net.eval().requires_grad_(False)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        self.shape, self.meta = tuple(int(s) for s in shape), dict(meta or {})
        if self.sigmas.numel() != net.num_levels:
            raise ValueError(f"{self.sigmas.numel()} noise levels for a network of {net.num_levels} outputs")

    def logits(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"the classifier reads samples shaped {self.shape}, got {tuple(x.shape[1:])}")
        p = next(self.net.parameters())
        with torch.no_grad():
            return self.net(x.to(device=p.device, dtype=p.dtype)).to(torch.float64).cpu()

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().cpu().float() for k, v in self.net.state_dict().items()}, out / WEIGHTS)
        json_dump_atomic({"format": FORMAT, "in_channels": self.net.in_channels, "channels": list(self.net.channels),
                          "sigmas": [float(s) for s in self.sigmas], "shape": list(self.shape), **self.meta,
                          "sha256": sha256_file(out / WEIGHTS)}, out / CONFIG)
        return out

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "NoiseLevelClassifier":
        """Read a saved classifier; a missing, corrupt or mismatched file is a ValueError naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        cpath, wpath = folder / CONFIG, folder / WEIGHTS
        try:
            cfg = json.loads(cpath.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{cpath}: not a readable noise-level classifier config ({e})") from e
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise ValueError(f"{cpath}: not a diffsolve noise-level classifier (format {FORMAT!r})")
        if not wpath.exists() or sha256_file(wpath) != cfg.get("sha256"):
            raise ValueError(f"{wpath}: missing, or its checksum does not match {cpath}")
        try:
            sd = load_file(str(wpath))
            net = NoiseLevelNet(int(cfg["in_channels"]), len(cfg["sigmas"]), cfg["channels"])
            net.load_state_dict(sd)
        except (SafetensorError, KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"{wpath}: does not fit the classifier described in {cpath} ({e})") from e
        meta = {k: v for k, v in cfg.items() if k not in ("format", "in_channels", "channels", "sigmas", "shape",
                                                          "sha256")}
        return cls(net, torch.tensor(cfg["sigmas"]), cfg["shape"], meta)
