"""Train the noise-level classifier of Denoising MCMC on a model's data: ``diffsolve train --noise-classifier mnist``.

K noise levels, geometric over the model's VE range (clipped to [0.01, 80]); each step draws a level per image
uniformly, perturbs the image at it (x~ = x0 + sigma perturbation(z), the process's kernel), and takes a cross-entropy
step (AdamW, cosine learning rate).  The classifier is written next to nothing else: ``out/noise_level.*``; a
checkpoint of the weights every ``checkpoint_every`` steps (atomic), and ``resume=True`` continues from it.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..hub.checkpoint import read_config, resolve
from ..models.noise_level import CONFIG, NoiseLevelClassifier, NoiseLevelNet
from ..processes import process_from_config
from ..util.datasets import load_dataset

DT = torch.float64


def noise_levels(process, k: int, lo: float = 0.01, hi: float = 80.0) -> torch.Tensor:
    """``k`` geometric levels over the process's VE range [sigma(t_min)/alpha, sigma(t_max)/alpha], clipped to
    [lo, hi]."""
    s_min = max(float(process.sigma_ve(torch.tensor(process.t_min, dtype=DT))), lo)
    s_max = min(float(process.sigma_ve(torch.tensor(process.t_max, dtype=DT))), hi)
    return torch.logspace(math.log10(s_min), math.log10(s_max), k, dtype=DT)


def train_noise_classifier(model: str, out: str, levels: int = 64, steps: int = 3000, batch_size: int = 128,
                           lr: float = 2e-3, seed: int = 0, dataset: Optional[str] = None, checkpoint_every: int = 500,
                           resume: bool = False, progress: bool = True, threads: Optional[int] = None) -> Path:
    """Train a ``NoiseLevelClassifier`` on the data of ``model`` (a shipped name or a checkpoint folder: its
    config's dataset, unless ``dataset`` is given) over ``levels`` levels of its process; returns the folder."""
    if threads:
        torch.set_num_threads(threads)
    cfg = read_config(resolve(model))
    proc = process_from_config(cfg["process"])
    data = load_dataset(dataset or cfg["dataset"]).float()
    sig = noise_levels(proc, levels)
    outp = Path(out)
    ckpt = outp / "checkpoint"
    g = torch.Generator().manual_seed(seed)
    net = NoiseLevelNet(data.shape[1], levels)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start = 0
    if resume and (ckpt / CONFIG).exists():
        old = NoiseLevelClassifier.load(ckpt)
        net.load_state_dict(old.net.state_dict())
        start = int(old.meta.get("training_steps", 0))
        g.manual_seed(seed + 1_000_003 * start)  # a fresh, reproducible stream from the resumed step
    net.train().requires_grad_(True)
    meta = {"for_model": str(model), "dataset": dataset or cfg["dataset"], "process": proc.config(),
            "training": {"levels": levels, "batch_size": batch_size, "lr": lr, "seed": seed, "steps": steps}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc="noise-level classifier", unit="step")
    t0, loss_avg, acc = time.time(), 0.0, 0.0
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        k = torch.randint(0, levels, (batch_size,), generator=g)
        z = torch.randn(data[idx].shape, generator=g, dtype=DT)
        x = data[idx].to(DT) + sig[k].reshape(-1, 1, 1, 1) * proc.perturbation(z)
        logits = net(x.float())
        loss = torch.nn.functional.cross_entropy(logits, k)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lv = float(loss.detach())
        loss_avg = 0.98 * loss_avg + 0.02 * lv if step > start else lv
        acc = 0.98 * acc + 0.02 * float((logits.argmax(1) - k).abs().le(1).float().mean())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}", within1=f"{acc:.2f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            snap = copy.deepcopy(net)
            NoiseLevelClassifier(snap, sig, data.shape[1:], {**meta, "training_steps": step + 1}).save(ckpt)
    if bar is not None:
        bar.close()
    clf = NoiseLevelClassifier(net, sig, data.shape[1:], {**meta, "training_steps": steps, "final_loss": loss_avg,
                                                         "within_one_level": acc,
                                                         "seconds": round(time.time() - t0, 1)})
    clf.save(outp)
    return outp
