"""Number formats for weights and activations, simulated exactly in float32 ("fake quantisation").

A format maps a real value v with a scale s to a representable value s * q(v / s):
  * ``int8`` / ``int4``: q = clamp(round(v / s), -2^(b-1), 2^(b-1) - 1) (symmetric, round half to even);
  * ``fp8_e4m3`` / ``fp8_e5m2``: the OCP FP8 formats (torch.float8_e4m3fn / float8_e5m2; max 448 / 57344);
  * ``fp4_e2m1``: the OCP MX FP4 element, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
Each has a sorted table of representable (unscaled) values, ``grid``, so that learned rounding can choose
between the neighbours below and above any value for every format alike (Nagel et al. 2020, AdaRound,
arXiv:2004.10568; Chen et al. 2024, low-bit FP for diffusion, arXiv:2408.06995).  ``encode`` gives the integer
code (the index into ``grid``) that packed checkpoints store; ``decode`` maps codes back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Format:
    """A quantisation format: name, bits per value, 'int' or 'float', the largest magnitude ``qmax``."""

    name: str
    bits: int
    kind: str
    qmax: float
    torch_dtype: Optional[torch.dtype] = None

    @property
    def grid(self) -> Tensor:
        """Every representable unscaled value, sorted ascending (float32)."""
        return _grid(self.name)

    def quantize(self, v: Tensor, scale: Tensor) -> Tensor:
        """The nearest representable value s * q(v / s) (float32; ``scale`` broadcasts against ``v``)."""
        u = v / scale
        if self.kind == "int":
            q = torch.clamp(torch.round(u), -self.qmax - 1, self.qmax)
        elif self.torch_dtype is not None:
            q = u.clamp(-self.qmax, self.qmax).to(self.torch_dtype).to(torch.float32)
        else:
            q = self.grid[self.encode_unscaled(u)]
        return q * scale

    def encode_unscaled(self, u: Tensor) -> Tensor:
        """The index into ``grid`` of the value nearest to u (ties to the even code, like the casts)."""
        g = self.grid.to(u.device)
        u = u.clamp(float(g[0]), float(g[-1]))
        hi = torch.searchsorted(g, u.contiguous()).clamp(1, g.numel() - 1)
        lo = hi - 1
        d_lo, d_hi = u - g[lo], g[hi] - u
        take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
        return torch.where(take_hi, hi, lo)

    def encode(self, v: Tensor, scale: Tensor) -> Tensor:
        """Codes (int64 indices into ``grid``) of the nearest representable values of v / scale."""
        u = v / scale
        if self.kind == "int":
            return (torch.clamp(torch.round(u), -self.qmax - 1, self.qmax) + self.qmax + 1).long()
        if self.torch_dtype is not None:
            return self.encode_unscaled(u.clamp(-self.qmax, self.qmax).to(self.torch_dtype).to(torch.float32))
        return self.encode_unscaled(u)

    def decode(self, codes: Tensor, scale: Tensor) -> Tensor:
        return self.grid.to(scale.device)[codes.long()] * scale


FORMATS: Dict[str, Format] = {
    "int8": Format("int8", 8, "int", 127.0),
    "int4": Format("int4", 4, "int", 7.0),
    "fp8_e4m3": Format("fp8_e4m3", 8, "float", 448.0, torch.float8_e4m3fn),
    "fp8_e5m2": Format("fp8_e5m2", 8, "float", 57344.0, torch.float8_e5m2),
    "fp4_e2m1": Format("fp4_e2m1", 4, "float", 6.0),
}
_ALIASES = {"fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "fp4": "fp4_e2m1", "e2m1": "fp4_e2m1"}


def get_format(name: str) -> Format:
    """The format of a name or alias (fp8 = fp8_e4m3, fp4 = fp4_e2m1); a clear ValueError otherwise."""
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        raise ValueError(f"unknown number format {name!r}; choose one of {sorted(FORMATS)} "
                         f"(aliases: {', '.join(f'{a} -> {b}' for a, b in _ALIASES.items())})")
    return FORMATS[key]


@lru_cache(maxsize=None)
def _grid(name: str) -> Tensor:
    if name == "int8":
        return torch.arange(-128, 128, dtype=torch.float32)
    if name == "int4":
        return torch.arange(-8, 8, dtype=torch.float32)
    if name == "fp4_e2m1":
        pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        return torch.cat([-pos.flip(0)[:-1], pos])  # 15 values: -6 .. 6 (one zero)
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[name]
    bits = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).to(torch.float32)
    vals = torch.unique(bits[torch.isfinite(bits)])  # sorted; -0 and +0 merge
    return vals
