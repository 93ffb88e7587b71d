"""Train a diffusion / flow model with diffsolve's own UNet: ``train(TrainConfig(...)) -> model folder``.

Objectives (what the network outputs): ``epsilon``, ``x0``, ``v`` (Salimans & Ho 2022), ``velocity``
(flow matching, dx/dt) and ``edm`` (EDM preconditioning, Karras et al. 2022), on any process of the
core (VPDiscrete, VPContinuous, VE, EDM, RectifiedFlow).  Training times are drawn uniformly over the
process range (integer timesteps for VPDiscrete) or log-normally in sigma/alpha (EDM's choice; the
default for EDM and VE).  ``loss_weighting='edm'`` weights every objective so that the loss equals
EDM's lambda(sigma) * ||x0_hat - x0||^2.

AdamW with linear warm-up (constant or cosine after), gradient clipping, EMA with a warm-up
(decay_k = min(ema_decay, (1 + k) / (10 + k)), so short runs do not lag), optional bf16 autocast
and ``torch.compile(dynamic=False)``, a tqdm bar with loss and it/s, periodic sample grids (PNG,
dpm++2m), and checkpoints every N steps that resume exactly: model, EMA, optimiser, step,
torch/numpy RNG state and the data order (a pure function of seed and step).

Layout of ``out_dir``::

    train_config.json   log.jsonl   samples/step_XXXXXXX.png
    checkpoints/step_XXXXXXX/{model.safetensors (EMA), config.json, online.safetensors, trainer_state.pt}
    model/{model.safetensors, config.json}       <- the final EMA model, ``ds.load(out_dir + "/model")``

Multi-GPU: if ``accelerate`` is installed and the script runs under ``accelerate launch`` (WORLD_SIZE > 1),
training is data-parallel (DDP) with the same code; the global batch is split across processes:

    accelerate launch -m diffsolve.training --dataset mnist --steps 20000 --out runs/mnist
    (or, once wired up: accelerate launch -m diffsolve.cli train ...)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapters.denoiser import Denoiser, outputs_from
from ..adapters.parameterisation import edm_coefficients
from ..hub.checkpoint import CONFIG, WEIGHTS, model_time_fn, save_model
from ..processes import EDM, VE, NoiseProcess, VPDiscrete, process_from_config

Tensor = torch.Tensor
OBJECTIVES = ("epsilon", "x0", "v", "velocity", "edm")
_OBJ_ALIASES = {"eps": "epsilon", "noise": "epsilon", "v_prediction": "v", "flow": "velocity",
                "flow_matching": "velocity", "sample": "x0"}
STATE_FILE = "trainer_state.pt"
ONLINE_FILE = "online.safetensors"


@dataclass
class TrainConfig:
    """Everything a training run needs (JSON-serialisable; see ``diffsolve.training`` module doc)."""

    dataset: str = "digits"                 # 'digits', 'mnist', a folder of images or a .npy file
    out_dir: str = "runs/diffsolve"
    process: str = "VPDiscrete"             # VPDiscrete | VPContinuous | VE | EDM | RectifiedFlow
    process_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {"schedule": "cosine"} (VPDiscrete:
    #                                         default linear betas, 1000 steps), {"sigma_data": 0.5} (EDM)
    objective: str = "epsilon"              # epsilon | x0 | v | velocity | edm
    loss_weighting: str = "none"            # none | edm
    t_sampling: str = "auto"                # auto | uniform | lognormal (auto: lognormal for EDM/VE)
    lognormal_mean: float = -1.2            # EDM's P_mean / P_std for log(sigma/alpha)
    lognormal_std: float = 1.2
    model_time: str = "auto"                # auto | process | log_sigma (auto: log_sigma for EDM/VE/edm)
    model: Dict[str, Any] = field(default_factory=dict)  # UNetConfig fields (in_channels is set from data)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: str = "constant"           # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1               # cosine floor, as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0                  # 0 disables
    ema_decay: float = 0.999
    ema_warmup: bool = True                 # decay_k = min(ema_decay, (1 + k) / (10 + k))
    seed: int = 0
    bf16: bool = False                      # bfloat16 autocast for the forward pass
    compile: bool = False                   # torch.compile(dynamic=False)
    device: str = "auto"                    # auto | cpu | cuda | cuda:1 | mps
    threads: Optional[int] = None           # torch.set_num_threads
    limit: Optional[int] = None             # use only the first `limit` images
    checkpoint_every: int = 500             # 0: only at the end
    keep_checkpoints: int = 2               # older step_* folders are removed (0 keeps all)
    sample_every: int = 0                   # 0: one grid at the end; <0: never
    sample_nfe: int = 20
    num_samples: int = 64
    log_every: int = 50
    resume: Optional[str] = None            # None | 'auto' (latest in out_dir) | a checkpoint folder
    progress: bool = True
    export_dtype: str = "float32"           # dtype of the final model/model.safetensors
    accelerate: str = "auto"                # auto (use it under `accelerate launch`) | never

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        self.objective = _OBJ_ALIASES.get(self.objective, self.objective)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.loss_weighting not in ("none", "edm"):
            raise ValueError("loss_weighting must be 'none' or 'edm'")
        if self.t_sampling not in ("auto", "uniform", "lognormal"):
            raise ValueError("t_sampling must be 'auto', 'uniform' or 'lognormal'")
        if self.model_time not in ("auto", "process", "log_sigma"):
            raise ValueError("model_time must be 'auto', 'process' or 'log_sigma'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError("lr_schedule must be 'constant' or 'cosine'")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("ema_decay must lie in [0, 1)")
        if self.accelerate not in ("auto", "never"):
            raise ValueError("accelerate must be 'auto' or 'never'")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError("export_dtype must be float32, float16 or bfloat16")

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------
def make_process(cfg: TrainConfig) -> NoiseProcess:
    try:
        return process_from_config({"type": cfg.process, **cfg.process_kwargs})
    except TypeError as e:
        raise ValueError(f"bad process_kwargs for {cfg.process}: {e}") from e


def resolved_model_time(cfg: TrainConfig, proc: NoiseProcess) -> str:
    if cfg.model_time != "auto":
        return cfg.model_time
    return "log_sigma" if cfg.objective == "edm" or isinstance(proc, (EDM, VE)) else "process"


def default_time_scale(proc: NoiseProcess, model_time: str) -> float:
    """Scale the network's time input to ~[0, 1000] for the sinusoidal embedding."""
    if model_time == "log_sigma":
        return 250.0
    if isinstance(proc, VPDiscrete):
        return 1.0  # timestep indices 0..N-1, the DDPM convention
    return 1000.0 / max(abs(proc.t_max), 1e-12)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        u = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


class DataOrder:
    """Batch indices as a pure function of (seed, step): epoch e is randperm(N) seeded by (seed, e).

    With ``world`` processes, rank r takes every world-th index of the global batch."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.rank, self.world = n, batch, seed, rank, world
        self._cache: Dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def indices(self, step: int) -> Tensor:
        pos = step * self.batch + torch.arange(self.batch)
        pos = pos[self.rank::self.world]
        epoch, within = pos // self.n, pos % self.n
        out = torch.empty_like(pos)
        for e in epoch.unique().tolist():
            m = epoch == e
            out[m] = self._perm(int(e))[within[m]]
        return out


def sample_times(cfg: TrainConfig, proc: NoiseProcess, b: int, gen: torch.Generator) -> Tensor:
    """Training times [B] (float64, CPU)."""
    mode = cfg.t_sampling
    if mode == "auto":
        mode = "lognormal" if isinstance(proc, (EDM, VE)) else "uniform"
    if mode == "lognormal":
        log_s = cfg.lognormal_mean + cfg.lognormal_std * torch.randn(b, generator=gen, dtype=torch.float64)
        t = proc.t_of_lam(-log_s)
        return t.clamp(proc.t_min, proc.t_max)
    if isinstance(proc, VPDiscrete):
        return torch.randint(0, proc.num_train_timesteps, (b,), generator=gen).to(torch.float64)
    u = torch.rand(b, generator=gen, dtype=torch.float64)
    return proc.t_min + (proc.t_max - proc.t_min) * u


def _bshape(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def training_pair(cfg: TrainConfig, proc: NoiseProcess, model_time: str, x0: Tensor, eps: Tensor,
                  t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(network input, network time, regression target, per-sample weight) for x0, noise eps at times t."""
    dev, dt, nd = x0.device, x0.dtype, x0.dim()
    t4 = _bshape(t, nd)
    a64, s64 = proc.alpha(t4), proc.sigma(t4)
    a, s = a64.to(dev, dt), s64.to(dev, dt)
    xt = a * x0 + s * eps
    sve = (s64 / a64).flatten()
    sd = float(getattr(proc, "sigma_data", 0.5))
    weight = torch.ones_like(sve)
    if cfg.objective == "edm":
        c = edm_coefficients(_bshape(sve, nd), sd)
        x_tilde = xt / a
        xin = x_tilde * c["c_in"].to(dev, dt)
        target = (x0 - c["c_skip"].to(dev, dt) * x_tilde) / c["c_out"].to(dev, dt)
        tin = torch.log(sve) / 4  # c_noise; loss weight lambda * c_out^2 = 1
    else:
        xin = xt
        tin = torch.as_tensor(model_time_fn(model_time, proc)(t), dtype=torch.float64)
        target = outputs_from(x0, eps, proc, t4, cfg.objective)
        if cfg.loss_weighting == "edm":
            # x0_hat - x0 = c * (out - target); EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
            a1, s1 = a64.flatten(), s64.flatten()
            if cfg.objective == "epsilon":
                c = sve
            elif cfg.objective == "x0":
                c = torch.ones_like(sve)
            elif cfg.objective == "v":
                c = s1 / (a1 * a1 + s1 * s1)
            else:
                det = a1 * proc.d_sigma(t) - s1 * proc.d_alpha(t)
                c = s1 / det
            weight = (sve**2 + sd**2) / (sve * sd) ** 2 * c**2
    return xin, tin.to(dev, torch.float32), target, weight.to(dev, torch.float32)


class _Dist:
    """Single process, or DDP through accelerate when launched with `accelerate launch`."""

    def __init__(self, cfg: TrainConfig):
        self.acc = None
        if cfg.accelerate == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import Accelerator
            except ImportError as e:
                raise ImportError("WORLD_SIZE > 1 but accelerate is not installed: pip install accelerate") from e
            self.acc = Accelerator(mixed_precision="no")
        if self.acc is not None:
            self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        else:
            self.device = _pick_device(cfg.device)
            self.rank, self.world = 0, 1
        self.main = self.rank == 0

    def prepare(self, net, opt):
        return self.acc.prepare(net, opt) if self.acc else (net, opt)

    def unwrap(self, net):
        return self.acc.unwrap_model(net) if self.acc else net

    def backward(self, loss):
        if self.acc:
            self.acc.backward(loss)
        else:
            loss.backward()

    def barrier(self):
        if self.acc:
            self.acc.wait_for_everyone()


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _numpy_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _set_numpy_state(d: Dict[str, Any]) -> None:
    np.random.set_state(("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"],
                         d["cached_gaussian"]))


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint folder, given it or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path}: not a training checkpoint (no {STATE_FILE}) and no checkpoints/step_* inside")
    return latest


# ----------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------
def train(config: TrainConfig, data: Optional[Tensor] = None) -> Path:
    """Train (or resume) a model; returns the folder of the final EMA model (``ds.load``-able).

    ``data`` (float [N, C, H, W] in [-1, 1]) overrides ``config.dataset`` for in-memory data.
    """
    from safetensors.torch import load_file, save_file

    from ..models import UNet, UNetConfig, architecture, count_parameters
    from ..util.datasets import load_dataset

    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _Dist(cfg)
    dev = dist.device
    out = Path(cfg.out_dir)
    ckpt_root = out / "checkpoints"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # data, process, network -----------------------------------------------------------
    x_all = (load_dataset(cfg.dataset, limit=cfg.limit) if data is None else data[: cfg.limit]).float()
    if x_all.dim() != 4:
        raise ValueError(f"training data must be [N, C, H, W], got {tuple(x_all.shape)}")
    sample_shape = list(x_all.shape[1:])
    x_all = x_all.to(dev)
    proc = make_process(cfg)
    mt = resolved_model_time(cfg, proc)
    mcfg = {"time_scale": default_time_scale(proc, mt), **cfg.model, "in_channels": sample_shape[0]}
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    net = UNet(UNetConfig.from_dict(mcfg)).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank)
    order = DataOrder(x_all.shape[0], cfg.batch_size, cfg.seed, dist.rank, dist.world)
    n_params = count_parameters(net)

    def model_config(step: int) -> Dict[str, Any]:
        c = {"architecture": architecture(net), "process": proc.config(), "prediction": cfg.objective,
             "model_time": mt, "sample_shape": sample_shape, "data_range": [-1.0, 1.0],
             "dataset": cfg.dataset if data is None else "in-memory", "training_steps": step,
             "parameters": n_params,
             "training": {k: v for k, v in cfg.to_dict().items()
                          if k in ("objective", "loss_weighting", "t_sampling", "batch_size", "lr", "lr_schedule",
                                   "warmup_steps", "ema_decay", "ema_warmup", "grad_clip", "seed", "bf16")}}
        if cfg.objective == "edm" or isinstance(proc, EDM):
            c["sigma_data"] = float(getattr(proc, "sigma_data", 0.5))
        return c

    # resume -----------------------------------------------------------------------------
    start = 0
    resume_from = None
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(out)
    elif cfg.resume:
        resume_from = _checkpoint_dir(Path(cfg.resume))
    if resume_from is not None:
        saved = json.loads((resume_from / CONFIG).read_text())
        now = model_config(0)
        for key in ("architecture", "process", "prediction", "sample_shape"):
            if saved.get(key) != now.get(key):
                raise ValueError(f"cannot resume from {resume_from}: its {key} {saved.get(key)!r} differs from "
                                 f"this run's {now.get(key)!r}")
        try:
            net.load_state_dict(load_file(str(resume_from / ONLINE_FILE), device=str(dev)))
            ema.load_state_dict(load_file(str(resume_from / WEIGHTS), device=str(dev)))
            state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot resume from {resume_from}: unreadable checkpoint ({e})") from e
        opt.load_state_dict(state["optimizer"])
        start = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        _set_numpy_state(state["numpy_rng"])
        rank_file = resume_from / f"rng_rank{dist.rank}.pt"
        if dist.rank > 0 and rank_file.exists():
            state = {**state, **torch.load(rank_file, map_location="cpu", weights_only=True)}
        gen.set_state(state["noise_rng"])
        if dev.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], dev)
        if dist.main:
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr)

    net_train, opt = dist.prepare(net, opt)
    fwd = torch.compile(net_train, dynamic=False) if cfg.compile else net_train
    autocast = (lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)) if cfg.bf16 else nullcontext

    def save_checkpoint(step: int) -> None:
        dist.barrier()
        tmp = ckpt_root / f".tmp_step_{step:07d}"
        final = ckpt_root / f"step_{step:07d}"
        if dist.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            save_model(tmp, ema, model_config(step))
            save_file({k: v.detach().cpu().contiguous() for k, v in dist.unwrap(net_train).state_dict().items()},
                      str(tmp / ONLINE_FILE))
        dist.barrier()
        rng = {"noise_rng": gen.get_state(),
               "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
        if dist.rank > 0:
            torch.save(rng, tmp / f"rng_rank{dist.rank}.pt")
        dist.barrier()
        if dist.main:
            state = {"format_version": 1, "step": step, "optimizer": opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "numpy_rng": _numpy_state(), **rng}
            torch.save(state, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            if cfg.keep_checkpoints > 0:
                done = sorted(p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).exists())
                for old in done[: -cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        dist.barrier()

    def sample_grid(step: int) -> None:
        if not dist.main or cfg.sample_every < 0 or cfg.num_samples < 1:
            return
        from ..sampling import sample
        from ..util.images import save_grid

        den = Denoiser(ema, proc, prediction=cfg.objective,
                       model_time=None if cfg.objective == "edm" else model_time_fn(mt, proc),
                       sigma_data=getattr(proc, "sigma_data", 0.5))
        noise = torch.randn(cfg.num_samples, *sample_shape, generator=torch.Generator().manual_seed(12345))
        with torch.no_grad():
            x = sample(den, noise.to(dev), solver="dpm++2m", nfe=max(cfg.sample_nfe, 2))
        save_grid(x.float(), out / "samples" / f"step_{step:07d}.png")

    # loop -------------------------------------------------------------------------------
    bar = None
    if dist.main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="it", dynamic_ncols=True)
    log_path = out / "log.jsonl"
    loss_sum, gnorm_sum, n_acc = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
    t_start = time.time()
    step = start
    params = list(net_train.parameters())
    net_train.train()
    try:
        while step < cfg.steps:
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            x0 = x_all[order.indices(step).to(dev)]
            t = sample_times(cfg, proc, x0.shape[0], gen)
            eps = torch.randn(x0.shape, generator=gen).to(dev)
            xin, tin, target, w = training_pair(cfg, proc, mt, x0, eps, t)
            with autocast():
                pred = fwd(xin, tin)
            per = (pred.float() - target).square().flatten(1).mean(1)
            loss = (w * per).mean()
            opt.zero_grad(set_to_none=True)
            dist.backward(loss)
            if cfg.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.zeros((), device=dev)
            opt.step()
            with torch.no_grad():
                d = ema_decay_at(cfg, step)
                for pe, p in zip(ema.parameters(), dist.unwrap(net_train).parameters()):
                    pe.lerp_(p.detach(), 1 - d)
                for be, b in zip(ema.buffers(), dist.unwrap(net_train).buffers()):
                    be.copy_(b)
            step += 1
            loss_sum += loss.detach()
            gnorm_sum += gnorm.detach().float()
            n_acc += 1
            if bar is not None:
                bar.update(1)
            if step % max(cfg.log_every, 1) == 0 or step == cfg.steps:
                mean_loss = float(loss_sum) / n_acc
                rec = {"step": step, "loss": mean_loss, "grad_norm": float(gnorm_sum) / n_acc, "lr": lr,
                       "ema_decay": d, "elapsed_s": round(time.time() - t_start, 2)}
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss is not finite at step {step}")
                loss_sum.zero_(); gnorm_sum.zero_(); n_acc = 0
                if dist.main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(step)
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
                sample_grid(step)
    except KeyboardInterrupt:
        if step > start:
            save_checkpoint(step)
            print(f"\ninterrupted: checkpoint saved at step {step}; resume with resume='auto'", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()

    save_checkpoint(step)
    final = out / "model"
    if dist.main:
        save_model(final, ema, model_config(step), dtype=cfg.export_dtype)
        sample_grid(step)
    dist.barrier()
    return final


def read_log(out_dir) -> List[Dict[str, Any]]:
    """The records of ``out_dir/log.jsonl`` (step, loss, grad_norm, lr, ema_decay, elapsed_s)."""
    p = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


# ----------------------------------------------------------------------------------------
# command line: `python -m diffsolve.training ...` (and `diffsolve train ...` once wired in the CLI)
# ----------------------------------------------------------------------------------------
def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="diffsolve train", description="Train a diffusion/flow UNet.")
    d = TrainConfig()
    p.add_argument("--config", help="a JSON file of TrainConfig fields (command-line flags override it)")
    p.add_argument("--dataset", help=f"digits | mnist | a folder of images | a .npy file (default {d.dataset})")
    p.add_argument("--out", dest="out_dir", help=f"output folder (default {d.out_dir})")
    p.add_argument("--process", help="VPDiscrete | VPContinuous | VE | EDM | RectifiedFlow")
    p.add_argument("--process-kwargs", type=json.loads, help='JSON, e.g. \'{"schedule": "cosine"}\'')
    p.add_argument("--objective", help=f"{' | '.join(OBJECTIVES)} (default {d.objective})")
    p.add_argument("--loss-weighting", choices=["none", "edm"])
    p.add_argument("--t-sampling", choices=["auto", "uniform", "lognormal"])
    p.add_argument("--model-time", choices=["auto", "process", "log_sigma"])
    p.add_argument("--channels", type=int, help="UNet base channels (default 32)")
    p.add_argument("--channel-mult", help="comma-separated per-level multipliers (default 1,2,2)")
    p.add_argument("--res-blocks", type=int, help="residual blocks per level (default 2)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="self-attention at the lowest resolution (default on)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--sample-nfe", type=int)
    p.add_argument("--num-samples", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--resume", nargs="?", const="auto",
                   help="resume: bare flag = latest checkpoint in --out, or a checkpoint/run folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--export-dtype", choices=["float32", "float16", "bfloat16"])
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base: Dict[str, Any] = {}
    if getattr(args, "config", None):
        base = json.loads(Path(args.config).read_text())
    names = {f.name for f in fields(TrainConfig)}
    for k, v in vars(args).items():
        if k in names and v is not None:
            base[k] = v
    model = dict(base.get("model", {}))
    for arg, key in (("channels", "base_channels"), ("res_blocks", "num_res_blocks"), ("attention", "attention"),
                     ("dropout", "dropout")):
        v = getattr(args, arg, None)
        if v is not None:
            model[key] = v
    if getattr(args, "channel_mult", None):
        model["channel_mult"] = [int(m) for m in args.channel_mult.split(",")]
    base["model"] = model
    return TrainConfig.from_dict(base)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``diffsolve train`` entry point; prints the final model folder."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, OSError) as e:
        print(f"diffsolve train: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    path = train(cfg)
    print(f"model written to {path} ({time.time() - t0:.0f} s); load it with diffsolve.load({str(path)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
