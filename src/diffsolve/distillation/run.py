"""The resumable loop every distillation method runs on.

A method (``Method``: reflow, MMD, consistency) supplies ``prepare`` (resumable set-up work such as the teacher's
ODE pairs), ``loss(run, step)`` and ``after_step`` (an EMA target).  The loop owns the student, the optimiser, one
``torch.Generator`` for every random draw of the losses, the progress bar, the budget and the checkpoints.

A checkpoint (``out/checkpoints/step_XXXXXXX``) holds the student's weights (safetensors), the method's extra
tensors (an EMA target), and ``state.pt`` (step, optimiser, the generator's and torch's RNG states, the CPU and wall
seconds spent; read back with ``torch.load(weights_only=True)``).  It is written under a temporary name and renamed,
so a kill never leaves half a checkpoint, and a resumed run takes the same random draws as an uninterrupted one:
it ends with the same weights.  ``budget_minutes`` caps the process CPU time of the whole job (set-up included,
summed over resumes); when it runs out the run checkpoints, exports and says so in the student's config.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..adapters.denoiser import Denoiser
from ..hub.checkpoint import save_model
from ..util.files import save_safetensors

Tensor = torch.Tensor
STUDENT_FILE = "student.safetensors"
EXTRA_FILE = "extra.safetensors"
STATE_FILE = "state.pt"


@dataclass
class DistillConfig:
    """What a distillation run needs besides the teacher (JSON-able; stored as ``distill_config.json``)."""

    method: str
    nfe: int
    out_dir: str
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    budget_minutes: Optional[float] = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    grad_clip: float = 1.0
    threads: Optional[int] = None
    progress: bool = True
    options: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.nfe < 1:
            raise ValueError(f"nfe must be >= 1, got {self.nfe}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"budget_minutes must be > 0 (or None), got {self.budget_minutes}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Method:
    """A distillation method: the hooks the loop calls (see the module doc)."""

    name = "method"

    def student(self, teacher: Denoiser, cfg: DistillConfig) -> nn.Module:
        """The network to train (default: a copy of the teacher's)."""
        return copy.deepcopy(teacher.net).float().requires_grad_(True).train()

    def prepare(self, run: "DistillRun") -> None:
        """Set-up work before the first step (may be resumable on its own)."""

    def loss(self, run: "DistillRun", step: int) -> Tensor:
        raise NotImplementedError

    def after_step(self, run: "DistillRun", step: int) -> None:
        """After each optimiser step (an EMA target update)."""

    def extra_state(self) -> Dict[str, Tensor]:
        """Tensors to checkpoint besides the student (an EMA target)."""
        return {}

    def load_extra_state(self, tensors: Dict[str, Tensor]) -> None:
        pass

    def sampler(self, cfg: DistillConfig) -> Dict[str, Any]:
        """How to sample the student: ``ds.sample(student, noise, **sampler)`` (stored in its config)."""
        return {"nfe": cfg.nfe}

    def export_network(self, run: "DistillRun") -> nn.Module:
        """The plain network to save as the student model."""
        return run.net


class DistillRun:
    """The state one run's loop and its method share."""

    def __init__(self, teacher: Denoiser, cfg: DistillConfig, method: Method):
        self.teacher, self.cfg, self.method = teacher, cfg, method
        self.out = Path(cfg.out_dir)
        self.net = method.student(teacher, cfg)
        self.student = Denoiser(self.net, teacher.process, prediction=teacher.prediction,
                                model_time=teacher.model_time, sigma_data=teacher.sigma_data,
                                sample_shape=teacher.sample_shape, check_finite=False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.gen = torch.Generator().manual_seed(int(cfg.seed) * 7919 + 17)
        self.cpu_s = 0.0   # process CPU seconds spent on this job (set-up + steps, all sessions)
        self.wall_s = 0.0
        self.stopped_by_budget = False
        self._t_cpu, self._t_wall = time.process_time(), time.time()

    # -- accounting -------------------------------------------------------------------------
    def tick(self) -> None:
        """Move the CPU and wall seconds since the last tick into the totals."""
        c, w = time.process_time(), time.time()
        self.cpu_s += c - self._t_cpu
        self.wall_s += w - self._t_wall
        self._t_cpu, self._t_wall = c, w

    def over_budget(self) -> bool:
        self.tick()
        b = self.cfg.budget_minutes
        return b is not None and self.cpu_s >= 60.0 * b

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> None:
        self.tick()
        root = self.ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        tmp, final = root / f".tmp_step_{step:07d}", root / f"step_{step:07d}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_safetensors({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, tmp / STUDENT_FILE)
        extra = self.method.extra_state()
        if extra:
            save_safetensors({k: v.detach().cpu() for k, v in extra.items()}, tmp / EXTRA_FILE)
        torch.save({"format_version": 1, "step": step, "optimizer": self.opt.state_dict(),
                    "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                    "cpu_s": self.cpu_s, "wall_s": self.wall_s}, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.cfg.keep_checkpoints > 0:
            done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists())
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)

    def latest_checkpoint(self) -> Optional[Path]:
        if not self.ckpt_root.is_dir():
            return None
        done = sorted(p for p in self.ckpt_root.glob("step_*") if (p / STATE_FILE).exists())
        return done[-1] if done else None

    def resume(self) -> int:
        """Load the latest checkpoint in the output folder; the step to continue from (0 without one)."""
        from safetensors.torch import load_file

        ck = self.latest_checkpoint()
        if ck is None:
            return 0
        try:
            self.net.load_state_dict(load_file(str(ck / STUDENT_FILE)))
            if (ck / EXTRA_FILE).exists():
                self.method.load_extra_state(load_file(str(ck / EXTRA_FILE)))
            state = torch.load(ck / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot resume from {ck}: unreadable checkpoint ({e})") from e
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.cpu_s, self.wall_s = float(state["cpu_s"]), float(state["wall_s"])
        self._t_cpu, self._t_wall = time.process_time(), time.time()
        return int(state["step"])

    # -- export ------------------------------------------------------------------------------------
    def export(self, step: int) -> Path:
        """``out/model``: the student as a normal checkpoint (``ds.load``), its sampler and budget in the config."""
        self.tick()
        teacher_cfg = dict(self.teacher.config or {})
        net = self.method.export_network(self)
        cfg = {k: v for k, v in teacher_cfg.items() if k not in ("weights", "architecture", "parameters",
                                                                 "training", "training_steps")}
        cfg.setdefault("process", self.teacher.process.config())
        cfg.setdefault("prediction", self.teacher.prediction)
        if self.teacher.sample_shape is not None:
            cfg["sample_shape"] = list(self.teacher.sample_shape)
        cfg["parameters"] = sum(p.numel() for p in net.parameters())
        cfg["distillation"] = {
            "method": self.method.name, "nfe": self.cfg.nfe, "steps": step, "sampler": self.method.sampler(self.cfg),
            "teacher": teacher_cfg.get("dataset", "?") + f" ({teacher_cfg.get('weights', {}).get('sha256', '?')[:12]})",
            "cpu_minutes": round(self.cpu_s / 60, 2), "wall_minutes": round(self.wall_s / 60, 2),
            "threads": torch.get_num_threads(), "stopped_by_budget": self.stopped_by_budget,
            "config": self.cfg.to_dict()}
        return save_model(self.out / "model", net.eval(), cfg)


def run_loop(run: DistillRun) -> Path:
    """Resume, prepare, train to ``steps`` (or the budget) with checkpoints and a progress bar, export."""
    cfg = run.cfg
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "distill_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    start = run.resume()
    run.method.prepare(run)
    step = start
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"distill {run.method.name}", unit="it", dynamic_ncols=True)
    log = open(run.out / "log.jsonl", "a")
    try:
        run.net.train()
        while step < cfg.steps:
            if run.over_budget():
                run.stopped_by_budget = True
                break
            loss = run.method.loss(run, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"distillation loss is not finite at step {step}")
            run.opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
            run.opt.step()
            run.method.after_step(run, step)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4g}", cpu_min=f"{run.cpu_s / 60:.1f}")
            log.write(json.dumps({"step": step, "loss": value, "cpu_s": round(run.cpu_s, 1),
                                  "wall_s": round(run.wall_s, 1)}) + "\n")
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                run.save_checkpoint(step)
    except KeyboardInterrupt:
        if step > start:
            run.save_checkpoint(step)
            print(f"\ninterrupted: checkpoint saved at step {step}; run again to resume", file=sys.stderr)
        raise
    finally:
        log.close()
        if bar is not None:
            bar.close()
    run.save_checkpoint(step)
    run.net.eval()
    return run.export(step)
