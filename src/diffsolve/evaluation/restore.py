"""Restore one degraded image with a frozen model as the prior: posterior samples, their mean and spread.

    r = ds.restore(ds.load("mnist-flow"), "digit.png", "box:14", sigma_y=0.05, samples=8, out="out/restore")

The image (a PNG, a ``.npy`` array, a numpy array or a tensor) is the clean truth by default: it is measured here,
y = A x + sigma_y n, and the samples are scored against it (``measured=True``: the input is the measurement).
``operator`` is an ``Operator`` or a spec (``OPERATORS``: ``box:S``, ``random:P[:SEED]``, ``sr:F``,
``blur:SIGMA[:SIZE]``, ``cs:R``, ``denoise``).  With ``out`` the function writes samples.npy [K, C, H, W],
mean.npy, std.npy, y.npy, restore.png (truth, measurement, samples, mean, spread), samples.png and info.json.
``diffsolve restore`` is this function behind a command line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .. import inverse
from ..adapters.denoiser import Model
from ..inverse.operators import Operator
from ..util import seeding
from ..util.files import json_dump_atomic
from ..util.jsonable import jsonable
from .image_quality import posterior_std, psnr, restoration_metrics

Tensor = torch.Tensor

#: operator specs ``NAME:ARG`` -> (argument, what it builds)
OPERATORS = {
    "box": ("S", "inpainting: hide the central S x S box (Mask.box)"),
    "random": ("P[:SEED]", "inpainting: hide a random fraction P of the pixels (Mask.random, mask seed 0)"),
    "sr": ("F", "super-resolution: mean over F x F blocks (AvgPool)"),
    "blur": ("SIGMA[:SIZE]", "Gaussian blur of std SIGMA, SIZE x SIZE kernel, default 7 (GaussianBlur)"),
    "cs": ("R", "compressed sensing: round(R d) Gaussian measurements (Dense.gaussian, seed 0)"),
    "denoise": ("", "denoising: A = I (Identity)"),
}
#: methods that do not restore one image with one prior (an exact-posterior oracle, a two-prior separation, a
#: volume solver, an encoder)
EXCLUDED = ("oracle", "joint", "mbir", "dpm-encoder")
#: the default prior and method of ``diffsolve restore`` (a model trained without the held-out MNIST images)
DEFAULT_MODEL, DEFAULT_METHOD = "mnist-flow", "repaint"
#: the measurement noise of seed s comes from ``manual_seed(MEASUREMENT_SEED + s)``, above every sample seed's
#: noise and solver streams
MEASUREMENT_SEED = 2**63


def parse_operator_spec(spec: str) -> Tuple[str, List[float]]:
    """``"box:14"`` -> ("box", [14.0]); clear errors for unknown names and malformed arguments."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in OPERATORS:
        known = ", ".join(f"{k}:{v[0]}" if v[0] else k for k, v in OPERATORS.items())
        raise ValueError(f"unknown operator {spec!r}; known: {known}")
    parts = rest.split(":") if rest else []
    want = OPERATORS[name][0]
    required = 0 if not want else 1
    optional = want.count("[")
    if not required <= len(parts) <= required + optional:
        raise ValueError(f"operator {name} takes {name}:{want}" if want else f"operator {name} takes no argument")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"operator {spec!r}: {name}:{want} needs numbers") from None
    if not all(np.isfinite(vals)):
        raise ValueError(f"operator {spec!r}: arguments must be finite")
    if name == "random" and not 0 < vals[0] < 1:
        raise ValueError(f"operator {spec!r}: the missing fraction must be in (0, 1)")
    if name == "sr" and vals[0] < 2:
        raise ValueError(f"operator {spec!r}: the factor must be >= 2")
    if name == "cs" and not 0 < vals[0] <= 1:
        raise ValueError(f"operator {spec!r}: the ratio must be in (0, 1]")
    return name, vals


def _int_arg(v: float, what: str, spec: str) -> int:
    if v != int(v):
        raise ValueError(f"operator {spec!r}: {what} must be an integer, got {v:g}")
    return int(v)


def build_operator(spec: str, shape: Tuple[int, ...]) -> Operator:
    """The operator of a spec (``OPERATORS``) for images ``shape`` [C, H, W]."""
    name, vals = parse_operator_spec(spec)
    C, H, W = shape
    try:
        if name == "box":
            return inverse.Mask.box(shape, _int_arg(vals[0], "the box size", spec))
        if name == "random":
            seed = _int_arg(vals[1], "the mask seed", spec) if len(vals) > 1 else 0
            return inverse.Mask.random(shape, vals[0], seed=seed)
        if name == "sr":
            return inverse.AvgPool(shape, _int_arg(vals[0], "the factor", spec))
        if name == "blur":
            size = _int_arg(vals[1], "the kernel size", spec) if len(vals) > 1 else 7
            return inverse.GaussianBlur(shape, sigma=vals[0], size=size)
        if name == "cs":
            return inverse.Dense.gaussian(max(1, round(vals[0] * C * H * W)), shape, seed=0)
        return inverse.Identity(shape)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith("operator ") else f"operator {spec!r}: {msg}") from None


def to_unit(a: np.ndarray, what: str) -> np.ndarray:
    """Image values -> float64 in [-1, 1]: uint8 0..255, uint16 0..65535; floats in [0, 1] (x 2 - 1) or [-1, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 127.5 - 1.0
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 32767.5 - 1.0
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what}: unsupported dtype {a.dtype} (give uint8 or float values)")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: the image has NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return a * 2 - 1
    if lo >= -1 and hi <= 1:
        return a
    raise ValueError(f"{what}: values span [{lo:.4g}, {hi:.4g}]; expected uint8, [0, 1] or [-1, 1]")


def read_array(path: Union[str, os.PathLike]) -> np.ndarray:
    """The raw array of an image file (grayscale; [H, W]) or of a .npy file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                if img.mode in ("I;16", "I;16B", "I;16L"):
                    return np.asarray(img).astype(np.uint16)
                if img.mode in ("RGB", "RGBA"):
                    rgb = np.asarray(img.convert("RGB"))
                    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
                        raise ValueError(f"{path}: a colour image; the model takes grayscale images")
                    return rgb[..., 0].copy()
                return np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    raise ValueError(f"{path}: give a .png image or a .npy array")


def as_image(a: np.ndarray, shape: Tuple[int, ...], what: str) -> Tensor:
    """``a`` as one image [1, *shape] in [-1, 1]: [*shape], [H, W] (one channel), [H, W, C] or [1, *shape]."""
    C, H, W = shape
    arr = a
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2 and C == 1:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] == C and arr.shape[0] != C:
        arr = arr.transpose(2, 0, 1)
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{what}: the image is {'x'.join(map(str, a.shape))}, the model/measurement takes "
                         f"{'x'.join(map(str, shape))} (nothing is resized)")
    return torch.from_numpy(np.ascontiguousarray(to_unit(arr, what)))[None]


def measurement_from_input(op: Operator, a: np.ndarray, what: str) -> Tensor:
    """y [1, *out_shape] from an input that is already in measurement space (a masked image for masks)."""
    if isinstance(op, inverse.Mask):
        return op(as_image(a, op.in_shape, what))
    if len(op.out_shape) == 3:
        return as_image(a, op.out_shape, what)
    v = np.asarray(a, dtype=np.float64).reshape(-1) if np.issubdtype(a.dtype, np.number) else None
    if v is None or v.size != op.out_dim:
        raise ValueError(f"{what}: the measurement must be {op.out_dim} numbers, got shape {list(a.shape)}")
    if not np.isfinite(v).all():
        raise ValueError(f"{what}: the measurement has NaN or infinite values")
    return torch.from_numpy(v)[None]


def visualise_measurement(op: Operator, y: Tensor) -> Tuple[Tensor, str]:
    """The measurement as an image of the data shape: masks with hidden pixels grey, others A^+ y."""
    if isinstance(op, inverse.Mask):
        return op.adjoint(y).masked_fill(~op.mask[None], 0.0), "y (grey: hidden)"
    if tuple(op.out_shape) == tuple(op.in_shape):
        return y.reshape((1,) + op.in_shape), "y"
    return op.pinv(y), "A+ y"


@dataclass
class Restoration:
    """The result of ``restore``: ``samples`` [K, C, H, W], their ``mean`` and per-pixel ``std``, the measurement
    ``y``, the ``truth`` when known, the method's cost (``info``), ``metrics`` and the ``files`` written."""

    samples: Tensor
    mean: Tensor
    std: Tensor
    y: Tensor
    truth: Optional[Tensor]
    operator: Operator
    info: inverse.InverseInfo
    metrics: Dict[str, Any]
    files: Dict[str, str] = field(default_factory=dict)


def _input_array(image: Any, what: str) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        return read_array(image)
    if isinstance(image, Tensor):
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    raise TypeError(f"{what}: give a file path, a numpy array or a tensor, got {type(image).__name__}")


def restore(model: Model, image: Any, operator: Union[str, Operator] = "box:14", sigma_y: float = 0.05,
            method: str = DEFAULT_METHOD, nfe: int = 100, samples: int = 8, seed: int = 0, measured: bool = False,
            solver: str = "dpm++2m", out: Optional[Union[str, os.PathLike]] = None, progress: bool = False,
            source: Optional[str] = None, **options: Any) -> Restoration:
    """K = ``samples`` posterior samples of a degraded image under ``model`` (see the module docstring).

    ``nfe`` is the budget per sample in NFE-equivalents (a VJP counts 2); ``options`` go to the method.  Bad input
    (a wrong image size or range, an unknown operator or method, sigma_y < 0, K < 2) raises ValueError."""
    if not (isinstance(sigma_y, (int, float)) and np.isfinite(sigma_y) and sigma_y >= 0):
        raise ValueError(f"sigma_y must be a finite number >= 0, got {sigma_y!r}")
    if int(samples) != samples or samples < 2:
        raise ValueError(f"samples must be an integer >= 2 (a spread and a coverage need two), got {samples}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if method not in inverse.methods() or method in EXCLUDED:
        known = ", ".join(m for m in inverse.methods() if m not in EXCLUDED)
        raise ValueError(f"unknown inverse method {method!r} for restoring an image; known: {known}")
    shape = tuple(int(s) for s in (getattr(model, "sample_shape", None) or ()))
    if len(shape) != 3:
        raise ValueError(f"restore needs an image model [C, H, W]; the model records sample shape {list(shape)}")
    op = build_operator(operator, shape) if isinstance(operator, str) else operator
    if not isinstance(op, Operator) or op.in_shape != shape:
        raise ValueError(f"the operator must act on the model's images {list(shape)}")
    what = source or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    raw = _input_array(image, what)
    truth: Optional[Tensor] = None
    if measured:
        y = measurement_from_input(op, raw, what)
    else:  # measured here: y = A x + sigma_y n, n from its own generator (no sample stream's)
        truth = as_image(raw, shape, what)
        g = torch.Generator().manual_seed(MEASUREMENT_SEED + int(seed))
        clean = op(truth)
        y = clean + sigma_y * torch.randn(clean.shape, generator=g, dtype=torch.float64)

    seeds = seeding.run_seeds(seed, samples)
    x, info = inverse.sample(model, op, y, float(sigma_y), method=method, nfe=nfe, n=samples, seeds=seeds,
                             solver=solver, progress=progress, **options)
    x = x.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{method} diverged (non-finite samples); raise nfe, change sigma_y or the method")
    mean, std = x.mean(0), posterior_std(x)
    metrics = restoration_metrics(x, truth, op, y, float(sigma_y) if sigma_y > 0 else None,
                                  lenet=shape == (1, 28, 28))
    vis, vis_label = visualise_measurement(op, y)
    if truth is not None:
        metrics["psnr_measurement_image"] = float(psnr(vis.clamp(-1, 1), truth)[0])
    result = Restoration(x, mean, std, y, truth, op, info, metrics)
    if out is not None:
        result.files = _write(result, Path(out), vis, vis_label, {
            "input": what, "input_is": "measurement" if measured else "truth", "nfe_budget": nfe,
            "seed": seed, "sample_seeds": [seeds[0], seeds[-1]],
            "operator": {"spec": operator if isinstance(operator, str) else type(op).__name__,
                         "class": type(op).__name__, "in_shape": list(op.in_shape), "out_shape": list(op.out_shape),
                         "measurements": op.out_dim}})
    return result


def _write(r: Restoration, out: Path, vis: Tensor, vis_label: str, meta: Dict[str, Any]) -> Dict[str, str]:
    from ..util.images import save_grid, save_labelled_grids

    out.mkdir(parents=True, exist_ok=True)
    files = {k: str(out / f"{k}.npy") for k in ("samples", "mean", "std", "y")}
    for name, v in (("samples", r.samples), ("mean", r.mean), ("std", r.std), ("y", r.y[0])):
        np.save(files[name], v.detach().cpu().numpy())
    k = int(r.samples.shape[0])
    smax = float(r.std.max())
    panels: List[Tensor] = [] if r.truth is None else [r.truth]
    labels: List[str] = [] if r.truth is None else ["truth"]
    panels += [vis.clamp(-1, 1), r.samples.clamp(-1, 1), r.mean[None].clamp(-1, 1),
               (r.std / max(smax, 1e-12) * 2 - 1)[None]]
    labels += [vis_label, f"{k} samples", "mean", f"std (white {smax:.2f})"]
    files["png"] = str(save_labelled_grids(panels, labels, out / "restore.png", nrow=None, scale=4))
    files["samples_png"] = str(save_grid(r.samples.clamp(-1, 1), out / "samples.png", nrow=min(k, 8), scale=3))
    files["info"] = str(out / "info.json")
    info = r.info
    json_dump_atomic(jsonable({
        **meta, "method": info.method, "solver": info.solver, "nfe": info.nfe, "vjps": info.vjps,
        "nfe_equivalents": info.nfe_equivalents, "seconds": round(info.seconds, 3), "sigma_y": info.sigma_y,
        "samples": k, "options": info.options, "metrics": r.metrics, "files": files}), out / "info.json")
    return files
