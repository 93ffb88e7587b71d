"""The phases of a training run, on one shared ``TrainingRun``.

``setup`` (data, process, network, EMA, optimiser, noise generator, data order) -> ``resume`` (from a
checkpoint, if asked) -> ``prepare`` (DDP, compile, autocast) -> ``run_steps`` (the optimisation loop, with
logging, checkpoints and sample grids) -> ``export`` (the last checkpoint and the final EMA model).

Class-conditional runs (``cfg.num_classes = K > 0``) also hold the labels of the data (``TrainingRun.labels``,
indexed by the same data order as the images); each step replaces a label by the null label K with
probability ``cfg.label_dropout`` and calls the network with ``class_labels=``.  The model config records
``num_classes`` and ``null_label``, so a sampler guides with
``ds.ClassifierFreeGuidance(den, w, {"class_labels": torch.tensor([cfg["null_label"]])})``.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..adapters.denoiser import Denoiser
from ..adapters.parameterisation import Parameterisation
from ..hub.checkpoint import CONFIG, WEIGHTS, model_time_fn, save_model
from ..processes import EDM, NoiseProcess
from .config import TrainConfig
from .objectives import (
    default_time_scale,
    drop_labels,
    make_process,
    resolved_model_time,
    sample_times,
    training_pair,
)

Tensor = torch.Tensor
STATE_FILE = "trainer_state.pt"
ONLINE_FILE = "online.safetensors"


# ----------------------------------------------------------------------------------------
# schedules, data order, devices, RNG state, checkpoint folders
# ----------------------------------------------------------------------------------------
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
    return {"keys": torch.from_numpy(keys.astype(np.int64)),  # type: ignore[attr-defined]
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


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
# the shared state
# ----------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """The state the phases of one run share (built by ``setup``; ``prepare`` fills in the rest)."""

    cfg: TrainConfig
    dist: _Dist
    out: Path
    data: Tensor                      # [N, C, H, W] (an MLP's vectors: [N, d]) on the device
    sample_shape: List[int]
    dataset: str                      # what the model config records: cfg.dataset, or "in-memory"
    proc: NoiseProcess
    model_time: str                   # 'process' | 'log_sigma'
    net: Any                          # the online network (UNet or MLP)
    ema: Any                          # its EMA
    opt: Any                          # the optimiser (accelerate's wrapper after ``prepare``)
    gen: torch.Generator              # training times and noise
    order: DataOrder
    n_params: int
    net_train: Any = None             # ``net`` as trained (DDP-wrapped under accelerate); set by ``prepare``
    forward: Optional[Callable[..., Tensor]] = None  # net_train, compiled if asked
    autocast: Callable[[], ContextManager[Any]] = nullcontext
    params: List[torch.nn.Parameter] = field(default_factory=list)  # net_train's, for gradient clipping
    labels: Optional[Tensor] = None   # int64 [N] on the device, aligned with ``data``; None when unconditional

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def param(self) -> Parameterisation:
        return self.cfg.parameterisation


# ----------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------
def _labels_for(cfg: TrainConfig, n: int, data_given: bool, labels: Optional[Tensor]) -> Optional[Tensor]:
    """The class labels (int64 [N], CPU) of a run's data: ``labels`` (for in-memory data) or the dataset's own;
    None for an unconditional run."""
    from ..util.datasets import load_labels

    k = cfg.num_classes
    if k == 0:
        if labels is not None:
            raise ValueError("labels were given but num_classes=0; set num_classes to train a class-conditional "
                             "model")
        return None
    if labels is not None:
        y = torch.as_tensor(labels)[: cfg.limit]
    elif data_given:
        raise ValueError(f"num_classes={k} with in-memory data needs its labels (train(cfg, data, labels=...))")
    else:
        y = load_labels(cfg.dataset, limit=cfg.limit)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"labels must be an integer tensor [N], got {y.dtype} {tuple(y.shape)}")
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} images")
    y = y.long()
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels span [{int(y.min())}, {int(y.max())}], outside 0..{k - 1} (num_classes={k})")
    missing = sorted(set(range(k)) - set(y.unique().tolist()))
    if missing:
        warnings.warn(f"classes {missing[:10]}{' ...' if len(missing) > 10 else ''} have no training images"
                      + (f" (limit={cfg.limit} keeps only the first images)" if cfg.limit else ""), stacklevel=3)
    return y


def setup(cfg: TrainConfig, data: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> TrainingRun:
    """Devices, the output folder (with ``train_config.json``), data (and, for a class-conditional run, its
    labels: ``labels`` for in-memory ``data``, else the dataset's), process, network, EMA, optimiser, noise
    generator and data order; seeds torch and numpy from ``cfg.seed``."""
    from ..models import UNet, UNetConfig, build_model, count_parameters
    from ..util.datasets import load_dataset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = _Dist(cfg)
    dev = dist.device
    out = Path(cfg.out_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    x_all = (load_dataset(cfg.dataset, limit=cfg.limit) if data is None else data[: cfg.limit]).float()
    kind = cfg.model.get("type", "UNet")
    if kind == "UNet" and x_all.dim() != 4:
        raise ValueError(f"training data for a UNet must be [N, C, H, W], got {tuple(x_all.shape)} (vector data: "
                         "use the MLP, model type 'MLP' / --arch mlp)")
    if x_all.dim() < 2:
        raise ValueError(f"training data must be [N, ...], got {tuple(x_all.shape)}")
    sample_shape = list(x_all.shape[1:])
    y_all = _labels_for(cfg, x_all.shape[0], data is not None, labels)
    x_all = x_all.to(dev)
    proc = make_process(cfg)
    mt = resolved_model_time(cfg, proc)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2**32))
    if kind == "MLP":
        if cfg.num_classes:
            raise ValueError("the MLP is unconditional: num_classes must be 0")
        net = build_model({"time_scale": default_time_scale(proc, mt), **cfg.model,
                           "in_features": int(np.prod(sample_shape))}).to(dev)
    else:
        mcfg = {"time_scale": default_time_scale(proc, mt), **cfg.model, "in_channels": sample_shape[0]}
        if cfg.num_classes:
            mcfg["num_classes"] = cfg.num_classes
        net = UNet(UNetConfig.from_dict(mcfg)).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + dist.rank)
    order = DataOrder(x_all.shape[0], cfg.batch_size, cfg.seed, dist.rank, dist.world)
    return TrainingRun(cfg=cfg, dist=dist, out=out, data=x_all, sample_shape=sample_shape,
                       dataset=cfg.dataset if data is None else "in-memory", proc=proc, model_time=mt, net=net,
                       ema=ema, opt=opt, gen=gen, order=order, n_params=count_parameters(net),
                       labels=None if y_all is None else y_all.to(dev))


def model_config(run: TrainingRun, step: int) -> Dict[str, Any]:
    """The ``config.json`` of the model at ``step`` (what ``ds.load`` reads)."""
    from ..models import architecture

    cfg, proc = run.cfg, run.proc
    c = {"architecture": architecture(run.net), "process": proc.config(), "prediction": cfg.objective,
         "model_time": run.model_time, "sample_shape": run.sample_shape, "data_range": [-1.0, 1.0],
         "dataset": run.dataset, "training_steps": step,
         "parameters": run.n_params,
         "training": {k: v for k, v in cfg.to_dict().items()
                      if k in ("objective", "loss_weighting", "t_sampling", "batch_size", "lr", "lr_schedule",
                               "warmup_steps", "ema_decay", "ema_warmup", "grad_clip", "seed", "bf16",
                               "num_classes", "label_dropout")}}
    if run.param.preconditioned or isinstance(proc, EDM):
        c["sigma_data"] = float(getattr(proc, "sigma_data", 0.5))
    if cfg.num_classes:  # class-conditional: labels 0..K-1 and the null label K, passed as class_labels=
        c["num_classes"] = cfg.num_classes
        c["null_label"] = cfg.null_label
    return c


def resume(run: TrainingRun) -> int:
    """Load the checkpoint ``cfg.resume`` names (model, EMA, optimiser, RNG states) into ``run``; the step
    to continue from (0 without one)."""
    from safetensors.torch import load_file

    cfg, dist, dev = run.cfg, run.dist, run.device
    resume_from = None
    if cfg.resume == "auto":
        resume_from = latest_checkpoint(run.out)
    elif cfg.resume:
        resume_from = _checkpoint_dir(Path(cfg.resume))
    if resume_from is None:
        return 0
    saved = json.loads((resume_from / CONFIG).read_text())
    now = model_config(run, 0)
    for key in ("architecture", "process", "prediction", "sample_shape"):
        if saved.get(key) != now.get(key):
            raise ValueError(f"cannot resume from {resume_from}: its {key} {saved.get(key)!r} differs from "
                             f"this run's {now.get(key)!r}")
    try:
        run.net.load_state_dict(load_file(str(resume_from / ONLINE_FILE), device=str(dev)))
        run.ema.load_state_dict(load_file(str(resume_from / WEIGHTS), device=str(dev)))
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot resume from {resume_from}: unreadable checkpoint ({e})") from e
    run.opt.load_state_dict(state["optimizer"])
    start = int(state["step"])
    torch.set_rng_state(state["torch_rng"])
    _set_numpy_state(state["numpy_rng"])
    rank_file = resume_from / f"rng_rank{dist.rank}.pt"
    if dist.rank > 0 and rank_file.exists():
        state = {**state, **torch.load(rank_file, map_location="cpu", weights_only=True)}
    run.gen.set_state(state["noise_rng"])
    if dev.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], dev)
    if dist.main:
        print(f"resumed from {resume_from} at step {start}", file=sys.stderr)
    return start


def prepare(run: TrainingRun) -> None:
    """Wrap network and optimiser for DDP (under accelerate), compile the forward pass, set up autocast."""
    cfg, dev = run.cfg, run.device
    run.net_train, run.opt = run.dist.prepare(run.net, run.opt)
    run.forward = torch.compile(run.net_train, dynamic=False) if cfg.compile else run.net_train
    if cfg.bf16:
        run.autocast = lambda: torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    run.params = list(run.net_train.parameters())


def save_checkpoint(run: TrainingRun, step: int) -> None:
    """``checkpoints/step_XXXXXXX``: EMA model + config, online weights, trainer state; written under a
    temporary name, then renamed; only the newest ``keep_checkpoints`` are kept."""
    from safetensors.torch import save_file

    cfg, dist, dev = run.cfg, run.dist, run.device
    ckpt_root = run.ckpt_root
    dist.barrier()
    tmp = ckpt_root / f".tmp_step_{step:07d}"
    final = ckpt_root / f"step_{step:07d}"
    if dist.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        save_model(tmp, run.ema, model_config(run, step))
        save_file({k: v.detach().cpu().contiguous() for k, v in dist.unwrap(run.net_train).state_dict().items()},
                  str(tmp / ONLINE_FILE))
    dist.barrier()
    rng = {"noise_rng": run.gen.get_state(),
           "cuda_rng": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None}
    if dist.rank > 0:
        torch.save(rng, tmp / f"rng_rank{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        state = {"format_version": 1, "step": step, "optimizer": run.opt.state_dict(),
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


def sample_grid(run: TrainingRun, step: int) -> None:
    """``samples/step_XXXXXXX.png``: the EMA model's samples (dpm++2m, fixed noise); main process only.
    A class-conditional model samples labels 0, 1, ..., K-1, 0, ... (unguided), one class per column."""
    cfg = run.cfg
    if not run.dist.main or cfg.sample_every < 0 or cfg.num_samples < 1:
        return
    from ..sampling import sample
    from ..util.images import save_grid, save_scatter

    proc = run.proc
    den = Denoiser(run.ema, proc, prediction=cfg.objective,
                   model_time=None if run.param.preconditioned else model_time_fn(run.model_time, proc),
                   sigma_data=getattr(proc, "sigma_data", 0.5))
    noise = torch.randn(cfg.num_samples, *run.sample_shape, generator=torch.Generator().manual_seed(12345))
    kw: Dict[str, Any] = {}
    nrow = None
    if run.labels is not None:
        k = cfg.num_classes
        kw["model_kwargs"] = {"class_labels": (torch.arange(cfg.num_samples) % k).to(run.device)}
        nrow = k if k <= 32 else None
    with torch.no_grad():
        x = sample(den, noise.to(run.device), solver="dpm++2m", nfe=max(cfg.sample_nfe, 2), **kw)
    path = run.out / "samples" / f"step_{step:07d}.png"
    if len(run.sample_shape) == 1 and run.sample_shape[0] == 2:  # a 2-D toy: a scatter plot
        save_scatter(x.float(), run.data[:2048], path)
    elif len(run.sample_shape) == 3:
        save_grid(x.float(), path, nrow=nrow)


def train_step(run: TrainingRun, step: int) -> Tuple[Tensor, Tensor, float]:
    """One optimiser step at ``step`` (learning rate, batch, times, noise, labels with label dropout, loss,
    clipping); (loss, gradient norm, learning rate)."""
    cfg, dev, opt = run.cfg, run.device, run.opt
    lr = lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = lr
    idx = run.order.indices(step).to(dev)
    x0 = run.data[idx]
    t = sample_times(cfg, run.proc, x0.shape[0], run.gen)
    eps = torch.randn(x0.shape, generator=run.gen).to(dev)
    xin, tin, target, w = training_pair(cfg, run.proc, run.model_time, x0, eps, t)
    kw: Dict[str, Tensor] = {}
    if run.labels is not None:
        kw["class_labels"] = drop_labels(run.labels[idx], cfg.label_dropout, cfg.num_classes, run.gen)
    with run.autocast():
        pred = run.forward(xin, tin, **kw)  # type: ignore[misc]
    per = (pred.float() - target).square().flatten(1).mean(1)
    loss = (w * per).mean()
    opt.zero_grad(set_to_none=True)
    run.dist.backward(loss)
    if cfg.grad_clip > 0:
        gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
    else:
        gnorm = torch.zeros((), device=dev)
    opt.step()
    return loss, gnorm, lr


def ema_update(run: TrainingRun, step: int) -> float:
    """EMA <- lerp(EMA, online, 1 - decay) (buffers copied); the decay used."""
    d = ema_decay_at(run.cfg, step)
    online = run.dist.unwrap(run.net_train)
    with torch.no_grad():
        for pe, p in zip(run.ema.parameters(), online.parameters()):
            pe.lerp_(p.detach(), 1 - d)
        for be, b in zip(run.ema.buffers(), online.buffers()):
            be.copy_(b)
    return d


class _Log:
    """Running means of loss and gradient norm, written to ``log.jsonl`` (and the tqdm bar) every
    ``log_every`` steps."""

    def __init__(self, run: TrainingRun, start: int):
        cfg, dev = run.cfg, run.device
        self.cfg, self.main, self.path = cfg, run.dist.main, run.out / "log.jsonl"
        self.bar = None
        if self.main and cfg.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="it", dynamic_ncols=True)
        self.loss_sum, self.gnorm_sum, self.n = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
        self.t_start = time.time()

    def add(self, step: int, loss: Tensor, gnorm: Tensor, lr: float, decay: float) -> None:
        """Account for the step that has just made ``step`` steps; log when it is time."""
        self.loss_sum += loss.detach()
        self.gnorm_sum += gnorm.detach().float()
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        if step % max(self.cfg.log_every, 1) == 0 or step == self.cfg.steps:
            mean_loss = float(self.loss_sum) / self.n
            rec = {"step": step, "loss": mean_loss, "grad_norm": float(self.gnorm_sum) / self.n, "lr": lr,
                   "ema_decay": decay, "elapsed_s": round(time.time() - self.t_start, 2)}
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss is not finite at step {step}")
            self.loss_sum.zero_()
            self.gnorm_sum.zero_()
            self.n = 0
            if self.main:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_steps(run: TrainingRun, start: int) -> int:
    """Train from ``start`` to ``cfg.steps`` with logging, periodic checkpoints and sample grids; the step
    reached.  Ctrl-C saves a checkpoint (when a step was made) before re-raising."""
    cfg = run.cfg
    log = _Log(run, start)
    step = start
    run.net_train.train()
    try:
        while step < cfg.steps:
            loss, gnorm, lr = train_step(run, step)
            decay = ema_update(run, step)
            step += 1
            log.add(step, loss, gnorm, lr, decay)
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint(run, step)
            if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
                sample_grid(run, step)
    except KeyboardInterrupt:
        if step > start:
            save_checkpoint(run, step)
            print(f"\ninterrupted: checkpoint saved at step {step}; resume with resume='auto'", file=sys.stderr)
        raise
    finally:
        log.close()
    return step


def export(run: TrainingRun, step: int) -> Path:
    """The last checkpoint, ``model/`` (the EMA model in ``cfg.export_dtype``) and a final sample grid."""
    save_checkpoint(run, step)
    final = run.out / "model"
    if run.dist.main:
        save_model(final, run.ema, model_config(run, step), dtype=run.cfg.export_dtype)
        sample_grid(run, step)
    run.dist.barrier()
    return final
