"""``distill``: a few-step student from a frozen teacher, resumable, within a stated budget."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from ..adapters.denoiser import Denoiser
from .consistency import Consistency
from .mmd import MMD
from .reflow import Reflow
from .run import DistillConfig, DistillRun, Method, run_loop

#: method name -> class (a new method is one file and one line here)
METHODS: Dict[str, Callable[..., Method]] = {"reflow": Reflow, "mmd": MMD, "consistency": Consistency}


def distill(teacher: Union[Denoiser, str], method: str = "reflow", nfe: int = 2,
            budget_minutes: Optional[float] = None, out_dir: str = "runs/distill", steps: int = 1000,
            batch_size: int = 32, lr: float = 1e-4, seed: int = 0, checkpoint_every: int = 50,
            progress: bool = True, threads: Optional[int] = None, student: Optional[nn.Module] = None,
            features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **options: Any) -> Path:
    """Distil ``teacher`` into a student sampled in ``nfe`` evaluations; returns the student's checkpoint folder.

    ``method``: 'reflow' (teacher-ODE pairs, a 1-2 step student; SlimFlow's annealing and a smaller student as
    options), 'mmd' (fine-tuning through a fixed ``nfe``-step sampler with an MMD loss in a feature network),
    'consistency' (LCM-style consistency distillation, optionally a LoRA adapter).  Method options go in
    ``**options`` (see each method's class).  Running it again with the same ``out_dir`` resumes from the latest
    checkpoint and ends with the same weights as an uninterrupted run.  ``budget_minutes`` caps the job's process
    CPU time.  The student is a normal checkpoint (``ds.load``); its config's ``distillation.sampler`` holds the
    arguments to sample it with (``ds.sample(student, noise, **sampler)``) and the CPU and wall minutes spent.
    """
    if isinstance(teacher, (str, Path)):
        from ..hub import load
        teacher = load(teacher)
    if not isinstance(teacher, Denoiser):
        raise TypeError(f"teacher must be a ds.Denoiser or a checkpoint name, got {type(teacher).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {sorted(METHODS)}")
    if threads:
        torch.set_num_threads(int(threads))
    cfg = DistillConfig(method=method, nfe=nfe, out_dir=str(out_dir), steps=steps, batch_size=batch_size, lr=lr,
                        seed=seed, budget_minutes=budget_minutes, checkpoint_every=checkpoint_every,
                        progress=progress, threads=threads, options=dict(options))
    kw: Dict[str, Any] = {}
    if student is not None:
        if method != "reflow":
            raise ValueError("a custom student network is supported by method='reflow' only")
        kw["student"] = student
    if features is not None:
        if method != "mmd":
            raise ValueError("features= is an option of method='mmd'")
        kw["features"] = features
    m = METHODS[method](cfg, **kw)
    if isinstance(teacher.net, nn.Module):
        teacher.net.requires_grad_(False)
    return run_loop(DistillRun(teacher, cfg, m))
