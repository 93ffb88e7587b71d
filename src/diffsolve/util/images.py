"""Image grids as PNG (Pillow only; no torchvision)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

Tensor = torch.Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (clipped)."""
    x = x.detach().to("cpu", torch.float64).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_array(x: Tensor, nrow: Optional[int] = None, pad: int = 2, scale: int = 1, fill: int = 255) -> np.ndarray:
    """Tile a batch [B, C, H, W] in [-1, 1] into one uint8 image [H', W', C]."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    nrow = nrow or int(math.ceil(math.sqrt(b)))
    rows = int(math.ceil(b / nrow))
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))


def save_grid(x: Tensor, path: Union[str, os.PathLike], nrow: Optional[int] = None, scale: int = 2) -> Path:
    """Write a batch [B, C, H, W] in [-1, 1] as a PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(grid_array(x, nrow, scale=scale)).save(path)
    return path


def save_labelled_grids(batches: Sequence[Tensor], labels: Sequence[str], path: Union[str, os.PathLike],
                        nrow: Optional[int] = None, scale: int = 2, gap: int = 16) -> Path:
    """Several grids side by side, each with a text label above it, as one RGB PNG."""
    from PIL import Image, ImageDraw

    grids = [grid_array(b, nrow, scale=scale) for b in batches]
    grids = [np.repeat(g, 3, axis=-1) if g.shape[-1] == 1 else g for g in grids]
    head = 22
    width = sum(g.shape[1] for g in grids) + gap * (len(grids) + 1)
    height = max(g.shape[0] for g in grids) + head + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xpos = gap
    for g, label in zip(grids, labels):
        canvas.paste(Image.fromarray(np.ascontiguousarray(g)), (xpos, head))
        draw.text((xpos, 5), label, fill=(0, 0, 0))
        xpos += g.shape[1] + gap
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def save_scatter(x: Tensor, data: Optional[Tensor], path: Union[str, os.PathLike]) -> Path:
    """Write 2-D samples [B, 2] (red) over data points [N, 2] (grey) as a PNG scatter plot (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    if data is not None:
        d = data.detach().cpu().double().numpy()
        ax.scatter(d[:, 0], d[:, 1], s=2, c="0.7", lw=0)
    s = x.detach().cpu().double().numpy()
    ax.scatter(s[:, 0], s[:, 1], s=4, c="C3", lw=0)
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
