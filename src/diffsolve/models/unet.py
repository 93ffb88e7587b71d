"""A small, clean UNet for diffusion / flow models (DDPM-style; Ho et al. 2020).

Sinusoidal time embedding + MLP, residual blocks (GroupNorm, SiLU, FiLM time conditioning),
optional multi-head self-attention at the lowest resolution, skip connections between the
down and up paths.  Built from a plain ``UNetConfig`` (a dataclass that round-trips through
JSON), called as ``net(x, t)`` with ``x`` [B, C, H, W] and ``t`` a float tensor [B] (the
model time handed over by ``ds.Denoiser``).  Any H, W work: the input is zero-padded up to a
multiple of 2**(levels - 1) and the output cropped back, so the output shape equals the input's.

Class conditioning (for classifier-free guidance, Ho & Salimans 2022): with ``num_classes = K > 0``
a learned label embedding (K + 1 rows; row K is the null label) is added to the time embedding,
and the network is called as ``net(x, t, class_labels=y)`` with ``y`` a LongTensor [B] in 0..K
(no ``class_labels``: the null label, i.e. the unconditional model).  The unconditional branch of
``ds.ClassifierFreeGuidance`` is ``{"class_labels": torch.tensor([K])}``.  With ``num_classes = 0``
(the default) the network, its parameters, state dict and serialised config are exactly those of
an unconditional UNet.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class UNetConfig:
    """Architecture of ``UNet``; ``asdict(cfg)`` / ``UNetConfig.from_dict(d)`` round-trip through JSON.

    Attributes:
        in_channels / out_channels: image channels (out defaults to in).
        base_channels: width of the first level (must be divisible by ``groups``).
        channel_mult: width multiplier per resolution level; ``len - 1`` downsamplings.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention: self-attention after the blocks at the lowest resolution and in the middle.
        attention_heads: heads of that attention.
        groups: GroupNorm groups.
        dropout: dropout inside the residual blocks.
        time_scale: the time input is multiplied by this before the sinusoidal embedding (the
            embedding resolves ~1e-3 .. 1e3, so continuous times in [0, 1] want ~1000).
        time_embed_dim: width of the time embedding MLP (default 4 * base_channels).
        num_classes: 0 (unconditional) or the number K of class labels; label K is the null label.
            Left out of ``to_dict`` when 0, so unconditional configs serialise as they always have.
    """

    in_channels: int = 1
    out_channels: Optional[int] = None
    base_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention: bool = True
    attention_heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    time_scale: float = 1.0
    time_embed_dim: Optional[int] = None
    num_classes: int = 0

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes or self.num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {self.num_classes!r}")
        self.num_classes = int(self.num_classes)
        if self.in_channels < 1 or (self.out_channels is not None and self.out_channels < 1):
            raise ValueError("in_channels and out_channels must be >= 1")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError("channel_mult needs at least one positive multiplier")
        if self.base_channels < 1 or self.num_res_blocks < 1 or self.groups < 1:
            raise ValueError("base_channels, num_res_blocks and groups must be >= 1")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"every level width (base_channels * mult = {self.base_channels * m}) must be "
                                 f"divisible by groups={self.groups}")
        top = self.base_channels * self.channel_mult[-1]
        if self.attention and top % self.attention_heads:
            raise ValueError(f"lowest-resolution width {top} must be divisible by attention_heads="
                             f"{self.attention_heads}")

    @property
    def out_ch(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def temb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels

    @property
    def null_label(self) -> Optional[int]:
        """The label index of the unconditional branch (``num_classes``); None for an unconditional UNet."""
        return self.num_classes if self.num_classes > 0 else None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        if not self.num_classes:
            del d["num_classes"]  # unconditional: the dict of every config written before the field existed
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        return config_from_dict(cls, d, "UNet")


def config_from_dict(cls: Any, d: Mapping[str, Any], what: str) -> Any:
    """A config dataclass from its dict (a 'type' key is ignored); unknown keys are a clear error."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known - {"type"})
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: v for k, v in d.items() if k in known})


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B, dim] of t [B] (frequencies 1 .. 1/max_period), computed in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)  # FiLM: scale and shift
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FeatureCache:
    """Deep features kept between calls (feature reuse across adjacent sampling steps: A-SDM's feature
    inheritance, arXiv:2406.00210; DeepCache, arXiv:2312.00858).  With ``depth`` d, a full call stores the input of
    the d shallowest up levels; a call with ``reuse = True`` computes only the d shallowest down levels (their skip
    connections) and those up levels, starting from the stored feature."""

    def __init__(self, depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self.feature: Optional[Tensor] = None
        self.reuse = False


class UNet(nn.Module):
    """``UNet(UNetConfig(...))`` or ``UNet(base_channels=..., ...)``; ``forward(x, t) -> same shape as x``
    (``forward(x, t, class_labels=y)`` when ``num_classes > 0``)."""

    label_emb: Optional[nn.Embedding]

    def __init__(self, config: Optional[UNetConfig] = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif isinstance(config, Mapping):
            config = UNetConfig.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = cfg = config
        ch0, temb, g = cfg.base_channels, cfg.temb_dim, cfg.groups
        self.time_mlp = nn.Sequential(nn.Linear(ch0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)

        levels = len(cfg.channel_mult)
        self.down = nn.ModuleList()
        skips: List[int] = [ch0]
        ch = ch0
        for i, m in enumerate(cfg.channel_mult):
            level = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.append(ResBlock(ch, ch0 * m, temb, g, cfg.dropout))
                ch = ch0 * m
                if cfg.attention and i == levels - 1:
                    level.append(Attention(ch, cfg.attention_heads, g))
                skips.append(ch)
            if i < levels - 1:
                level.append(Downsample(ch))
                skips.append(ch)
            self.down.append(level)

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, g, cfg.dropout)])
        if cfg.attention:
            self.mid.append(Attention(ch, cfg.attention_heads, g))
        self.mid.append(ResBlock(ch, ch, temb, g, cfg.dropout))

        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.channel_mult))):
            level = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.append(ResBlock(ch + skips.pop(), ch0 * m, temb, g, cfg.dropout))
                ch = ch0 * m
                if cfg.attention and i == levels - 1:
                    level.append(Attention(ch, cfg.attention_heads, g))
            if i > 0:
                level.append(Upsample(ch))
            self.up.append(level)
        self.norm_out = nn.GroupNorm(g, ch)
        self.conv_out = _zero(nn.Conv2d(ch, cfg.out_ch, 3, padding=1))
        self._factor = 2 ** (levels - 1)
        # created last, so that the other layers draw the same initial weights as without conditioning
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes > 0 else None

    def _labels(self, class_labels: Any, b: int, device: torch.device) -> Tensor:
        """``class_labels`` as a LongTensor [B] on ``device`` (None: the null label; one label: broadcast)."""
        k = self.config.num_classes
        if class_labels is None:
            return torch.full((b,), k, dtype=torch.long, device=device)
        y = torch.as_tensor(class_labels, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"class_labels must be an integer tensor (LongTensor [B]), got dtype {y.dtype}")
        if y.numel() == 1:
            y = y.reshape(1).expand(b)
        elif y.dim() != 1 or y.shape[0] != b:
            raise ValueError(f"class_labels must have shape [B] = [{b}] (or hold one label), got {tuple(y.shape)}")
        if not torch.compiler.is_compiling() and bool(((y < 0) | (y > k)).any()):
            raise ValueError(f"class_labels must lie in 0..{k} ({k} = the null label), got values in "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y.long()

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None,
                cache: Optional[FeatureCache] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        b, _, h, w = x.shape
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t.reshape(b)
        emb = timestep_embedding(t.float() * self.config.time_scale, self.config.base_channels)
        temb = self.time_mlp(emb.to(self.conv_in.weight.dtype))
        if self.label_emb is not None:
            temb = temb + self.label_emb(self._labels(class_labels, b, x.device))
        elif class_labels is not None:
            raise ValueError("this UNet is unconditional (num_classes=0): it takes no class_labels")
        f = self._factor
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))

        levels = len(self.down)
        depth = cache.depth if cache is not None else levels
        if cache is not None and depth >= levels:
            raise ValueError(f"feature reuse depth must be below the number of levels ({levels}), got {depth}")
        reuse = cache is not None and cache.reuse and cache.feature is not None \
            and cache.feature.shape[0] == x.shape[0]
        hs = [self.conv_in(x)]
        for li, level in enumerate(self.down):
            if reuse and li >= depth:
                break
            for layer in cast(nn.ModuleList, level):
                if isinstance(layer, ResBlock):
                    hs.append(layer(hs[-1], temb))
                elif isinstance(layer, Attention):
                    hs[-1] = layer(hs[-1])
                else:
                    hs.append(layer(hs[-1]))
        if reuse:
            assert cache is not None and cache.feature is not None
            hs.pop()  # the last downsampling feeds only the deeper, reused levels
            hcur, up = cache.feature, list(self.up)[levels - depth:]
        else:
            hcur, up = hs[-1], list(self.up)
            for layer in self.mid:
                hcur = layer(hcur, temb) if isinstance(layer, ResBlock) else layer(hcur)
        for ui, level in enumerate(up):
            if cache is not None and not reuse and ui == levels - depth:
                cache.feature = hcur
            for layer in cast(nn.ModuleList, level):
                if isinstance(layer, ResBlock):
                    hcur = layer(torch.cat([hcur, hs.pop()], dim=1), temb)
                else:
                    hcur = layer(hcur)
        out = self.conv_out(F.silu(self.norm_out(hcur)))
        return out[:, :, :h, :w] if (ph or pw) else out


def architecture(net: UNet) -> Dict[str, Any]:
    """The JSON architecture dict of a ``UNet`` (inverse of ``build_model``)."""
    return {"type": "UNet", **net.config.to_dict()}


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
