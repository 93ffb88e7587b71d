"""MMD fine-tuning through a fixed few-step sampler (Aiello, Valsesia, Magli 2023, MMD-DDM, arXiv:2301.07969).

The teacher's own weights are fine-tuned so that the samples of a fixed ``nfe``-step sampler match the data in the
features phi of a feature network: the loss is the unbiased estimate of MMD^2 between generated and real features
with the polynomial kernel k(a, b) = (a.b / d + 1)^3 (the KID kernel) on features standardised by the real
data's mean and standard deviation, back-propagated through every step of the
sampler (``ds.sample(..., grad=True)``).  The feature network used here must not be the one that judges the result:
score the student with an independently trained classifier.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ..sampling import sample
from .run import DistillConfig, DistillRun, Method

Tensor = torch.Tensor


def mmd2_unbiased(x: Tensor, y: Tensor, degree: int = 3) -> Tensor:
    """Unbiased MMD^2 between samples x [n, d] and y [m, d] with k(a, b) = (a.b / d + 1)^degree."""
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    if n < 2 or m < 2:
        raise ValueError("MMD needs at least 2 samples on each side")
    kxx = (x @ x.T / d + 1) ** degree
    kyy = (y @ y.T / d + 1) ** degree
    kxy = (x @ y.T / d + 1) ** degree
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return sxx + syy - 2 * kxy.mean()


class MMD(Method):
    """Options: solver / spacing / final (the fixed sampler; None: the default rule at ``nfe``), data ('mnist'),
    real_batch (256), degree (3).  ``features``: a callable images -> [n, d] (default: the LeNet shipped with the
    MNIST model)."""

    name = "mmd"

    def __init__(self, cfg: DistillConfig, features: Optional[Callable[[Tensor], Tensor]] = None):
        o = dict(cfg.options)
        self.sampler_kw = {k: o.pop(k) for k in ("solver", "spacing", "final") if o.get(k) is not None}
        for k in ("solver", "spacing", "final"):
            o.pop(k, None)
        self.data_name = o.pop("data", "mnist")
        self.real_batch = int(o.pop("real_batch", 256))
        self.degree = int(o.pop("degree", 3))
        if o:
            raise ValueError(f"unknown mmd option(s) {sorted(o)}")
        self.features = features
        self.real: Optional[Tensor] = None

    def sampler(self, cfg: DistillConfig) -> Dict[str, Any]:
        return {"nfe": cfg.nfe, **self.sampler_kw}

    def prepare(self, run: DistillRun) -> None:
        if self.features is None:
            from ..evaluation.metrics import default_metric
            net = default_metric().net.requires_grad_(False)
            self.features = net.features
        from ..util.datasets import load_dataset
        data = load_dataset(self.data_name).float()
        with torch.no_grad():
            real = torch.cat([self.features(data[i:i + 500]) for i in range(0, data.shape[0], 500)])
        # features standardised by the real data's statistics, so the kernel's scale does not depend on the net
        self.mu, self.sd = real.mean(0), real.std(0).clamp_min(1e-6)
        self.real = (real - self.mu) / self.sd

    def loss(self, run: DistillRun, step: int) -> Tensor:
        assert self.real is not None and self.features is not None and run.teacher.sample_shape is not None
        g, b = run.gen, run.cfg.batch_size
        z = torch.randn((b, *run.teacher.sample_shape), generator=g, dtype=torch.float64)
        x = sample(run.student, z, nfe=run.cfg.nfe, grad=True, **self.sampler_kw)
        fake = (self.features(x.float()) - self.mu) / self.sd
        real = self.real[torch.randint(0, self.real.shape[0], (self.real_batch,), generator=g)]
        return mmd2_unbiased(fake, real, self.degree)
