"""Consistency distillation with skipping steps (Song et al. 2023, arXiv:2303.01469; LCM, Luo et al. 2023,
arXiv:2310.04378; LCM-LoRA, arXiv:2311.05556).

On the discrete grid T_k = skip (k + 1) - 1 (k = 0 .. N-1; diffusers' LCM uses skip 20 on 1000 steps) a data point
is noised to x_hi at T_k, one teacher DDIM step takes it to x_lo at T_{k-1} (T_{-1} = t_min), and the student's clean
estimate at (x_hi, T_k) regresses onto the target network's clean estimate at (x_lo, T_{k-1}).  The target is an EMA
of the student (decay ``ema``).  The consistency function is the denoiser's x0 prediction, which is the identity up to
sigma(t_min) at the boundary.  ``lora=r`` trains a rank-r LoRA adapter (``diffsolve.compression.lora``) instead of all
weights, and the export merges it.  Sampled by the consistency multistep solver (denoise, re-noise).

This is a long job: the method's published budgets are GPU-days; here it is a resumable run whose budget is stated.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..adapters.denoiser import Denoiser
from .run import DistillConfig, DistillRun, Method

Tensor = torch.Tensor


class Consistency(Method):
    """Options: skip (20), ema (0.95), data ('mnist'), lora (0: train all weights; r > 0: a rank-r adapter),
    spacing ('trailing': the sampler's grid), huber (0: squared error; c > 0: pseudo-Huber with constant c)."""

    name = "consistency"

    def __init__(self, cfg: DistillConfig):
        o = dict(cfg.options)
        self.skip = int(o.pop("skip", 20))
        self.ema = float(o.pop("ema", 0.95))
        self.data_name = o.pop("data", "mnist")
        self.lora = int(o.pop("lora", 0))
        self.spacing = o.pop("spacing", "trailing")
        self.huber = float(o.pop("huber", 0.0))
        if o:
            raise ValueError(f"unknown consistency option(s) {sorted(o)}")
        if self.skip < 1 or not 0 <= self.ema < 1:
            raise ValueError("consistency needs skip >= 1 and 0 <= ema < 1")
        self.target: Optional[nn.Module] = None
        self.target_den: Optional[Denoiser] = None
        self.data: Optional[Tensor] = None

    def student(self, teacher: Denoiser, cfg: DistillConfig) -> nn.Module:
        net = super().student(teacher, cfg)
        if self.lora:
            from ..compression.lora import add_lora
            net = add_lora(net, rank=self.lora)
        self.target = copy.deepcopy(net).requires_grad_(False).eval()
        return net

    def sampler(self, cfg: DistillConfig) -> Dict[str, Any]:
        return {"solver": "consistency", "nfe": cfg.nfe, "spacing": self.spacing}

    def prepare(self, run: DistillRun) -> None:
        from ..util.datasets import load_dataset
        self.data = load_dataset(self.data_name).float()
        assert self.target is not None
        t = run.teacher
        self.target_den = Denoiser(self.target, t.process, prediction=t.prediction, model_time=t.model_time,
                                   sigma_data=t.sigma_data, check_finite=False)

    def extra_state(self) -> Dict[str, Tensor]:
        assert self.target is not None
        return dict(self.target.state_dict())

    def load_extra_state(self, tensors: Dict[str, Tensor]) -> None:
        assert self.target is not None
        self.target.load_state_dict(tensors)

    def loss(self, run: DistillRun, step: int) -> Tensor:
        assert self.data is not None and self.target_den is not None
        g, b, proc = run.gen, run.cfg.batch_size, run.teacher.process
        x0 = self.data[torch.randint(0, self.data.shape[0], (b,), generator=g)]
        eps = torch.randn(x0.shape, generator=g)
        n = int(round((proc.t_max - proc.t_min + 1) / self.skip))
        k = torch.randint(0, max(n, 1), (b,), generator=g)
        t_hi = (proc.t_min + self.skip * (k + 1) - 1).clamp(max=proc.t_max).to(torch.float64)
        t_lo = (t_hi - self.skip).clamp(min=proc.t_min)
        shp = (-1,) + (1,) * (x0.dim() - 1)
        a_hi, s_hi = proc.alpha(t_hi).reshape(shp).float(), proc.sigma(t_hi).reshape(shp).float()
        a_lo, s_lo = proc.alpha(t_lo).reshape(shp).float(), proc.sigma(t_lo).reshape(shp).float()
        x_hi = a_hi * x0 + s_hi * eps
        with torch.no_grad():
            p = run.teacher.evaluate(x_hi, t_hi, {})
            x_lo = a_lo * p.x0 + s_lo * p.eps  # one DDIM step of the teacher
            target = self.target_den.evaluate(x_lo, t_lo, {}).x0
        pred = run.student.evaluate(x_hi, t_hi, {}).x0
        d2 = (pred - target).square().flatten(1).mean(1)
        if self.huber > 0:
            return (torch.sqrt(d2 + self.huber**2) - self.huber).mean()
        return d2.mean()

    def after_step(self, run: DistillRun, step: int) -> None:
        assert self.target is not None
        with torch.no_grad():
            for pt, ps in zip(self.target.parameters(), run.net.parameters()):
                if ps.requires_grad:
                    pt.lerp_(ps.detach(), 1 - self.ema)

    def export_network(self, run: DistillRun) -> nn.Module:
        if self.lora:
            from ..compression.lora import merge_lora
            return merge_lora(copy.deepcopy(run.net))
        return run.net
