"""Train a diffusion / flow model with diffsolve's own UNet: ``train(TrainConfig(...)) -> model folder``.

Objectives (what the network outputs): ``epsilon``, ``x0``, ``v`` (Salimans & Ho 2022), ``velocity``
(flow matching, dx/dt) and ``edm`` (EDM preconditioning, Karras et al. 2022), on any process of the
core (VPDiscrete, VPContinuous, VE, EDM, RectifiedFlow).  Training times are drawn uniformly over the
process range (integer timesteps for VPDiscrete) or log-normally in sigma/alpha (EDM's choice; the
default for EDM and VE).  ``loss_weighting='edm'`` weights every objective so that the loss equals
EDM's lambda(sigma) * ||x0_hat - x0||^2.

Class-conditional models for classifier-free guidance (Ho & Salimans 2022): ``num_classes = K`` trains on
the dataset's labels (``diffsolve.util.datasets.load_labels``: 'digits', 'mnist'; or ``train(cfg, data,
labels)``), replacing each by the null label K with probability ``label_dropout`` (default 0.1), so one
network learns both the conditional and the unconditional model.  Sample the result with
``ds.ClassifierFreeGuidance(ds.load(path), w, {"class_labels": torch.tensor([K])})`` and
``model_kwargs={"class_labels": y}``; the model config records ``num_classes`` and ``null_label``.

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

Modules: ``config`` (``TrainConfig``, the objectives), ``objectives`` (process, training times, the
regression pair), ``loop`` (the phases ``setup -> resume -> prepare -> run_steps -> export`` on a shared
``TrainingRun``); this one runs them (``train``) and holds the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import OBJECTIVES, TrainConfig, objective_parameterisation
from .loop import (
    ONLINE_FILE,
    STATE_FILE,
    DataOrder,
    TrainingRun,
    ema_decay_at,
    export,
    latest_checkpoint,
    lr_at,
    model_config,
    prepare,
    resume,
    run_steps,
    sample_grid,
    save_checkpoint,
    setup,
)
from .objectives import (
    default_time_scale,
    drop_labels,
    edm_loss_weight,
    make_process,
    resolved_model_time,
    sample_times,
    training_pair,
)

__all__ = ["TrainConfig", "OBJECTIVES", "objective_parameterisation", "train", "read_log", "training_pair",
           "build_parser", "config_from_args", "main", "make_process", "resolved_model_time", "default_time_scale",
           "sample_times", "edm_loss_weight", "lr_at", "ema_decay_at", "DataOrder", "latest_checkpoint",
           "STATE_FILE", "ONLINE_FILE", "TrainingRun", "setup", "model_config", "resume", "prepare",
           "save_checkpoint", "sample_grid", "run_steps", "export", "drop_labels"]

Tensor = torch.Tensor


def train(config: TrainConfig, data: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Path:
    """Train (or resume) a model; returns the folder of the final EMA model (``ds.load``-able).

    ``data`` (float [N, C, H, W] in [-1, 1]) overrides ``config.dataset`` for in-memory data; ``labels``
    (int [N] in 0..num_classes-1) are its class labels for a class-conditional run (``num_classes > 0``).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(dict(config))
    run = setup(cfg, data, labels)
    start = resume(run)
    prepare(run)
    step = run_steps(run, start)
    return export(run, step)


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
    p.add_argument("--dataset", help=f"digits | mnist | gaussian25 | a folder of images | a .npy file "
                                     f"(default {d.dataset})")
    p.add_argument("--out", dest="out_dir", help=f"output folder (default {d.out_dir})")
    p.add_argument("--process", help="VPDiscrete | VPContinuous | VE | EDM | RectifiedFlow")
    p.add_argument("--process-kwargs", type=json.loads, help='JSON, e.g. \'{"schedule": "cosine"}\'')
    p.add_argument("--objective", help=f"{' | '.join(OBJECTIVES)} (default {d.objective})")
    p.add_argument("--loss-weighting", choices=["none", "edm"])
    p.add_argument("--t-sampling", choices=["auto", "uniform", "lognormal"])
    p.add_argument("--model-time", choices=["auto", "process", "log_sigma"])
    p.add_argument("--arch", choices=["unet", "mlp"], help="network: the image UNet (default) or the MLP of vector "
                                                          "data such as the 2-D toy 'gaussian25'")
    p.add_argument("--hidden", type=int, help="MLP width (default 128)")
    p.add_argument("--layers", type=int, help="MLP residual blocks (default 3)")
    p.add_argument("--channels", type=int, help="UNet base channels (default 32)")
    p.add_argument("--channel-mult", help="comma-separated per-level multipliers (default 1,2,2)")
    p.add_argument("--res-blocks", type=int, help="residual blocks per level (default 2)")
    p.add_argument("--attention", action=argparse.BooleanOptionalAction, default=None,
                   help="self-attention at the lowest resolution (default on)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--num-classes", type=int,
                   help="class-conditional on the dataset's labels 0..K-1 (digits, mnist: 10); 0: unconditional "
                        f"(default {d.num_classes})")
    p.add_argument("--label-dropout", type=float,
                   help=f"probability of training with the null label, for classifier-free guidance "
                        f"(default {d.label_dropout})")
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
    p.add_argument("--noise-classifier", metavar="MODEL",
                   help="instead of a UNet, train the noise-level classifier of Denoising MCMC on MODEL's data "
                        "(a shipped name or checkpoint folder), over its process's noise levels")
    p.add_argument("--levels", type=int, default=64, help="noise levels of --noise-classifier (default 64)")
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
    if getattr(args, "arch", None):
        model["type"] = {"unet": "UNet", "mlp": "MLP"}[args.arch]
    for arg, key in (("hidden", "hidden"), ("layers", "layers")):
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
    if args.noise_classifier:
        return _noise_classifier(args)
    try:
        cfg = config_from_args(args)
        make_process(cfg)  # a bad process or process kwargs (e.g. PFGM++'s D <= 0) is an error before training
    except (ValueError, OSError) as e:
        print(f"diffsolve train: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    path = train(cfg)
    print(f"model written to {path} ({time.time() - t0:.0f} s); load it with diffsolve.load({str(path)!r})")
    return 0


def _noise_classifier(args: argparse.Namespace) -> int:
    from .noise_level import train_noise_classifier

    kw = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "dataset", "checkpoint_every", "threads")
          if getattr(args, k) is not None}
    t0 = time.time()
    try:
        path = train_noise_classifier(args.noise_classifier, args.out_dir or "runs/noise_level", levels=args.levels,
                                      resume=bool(args.resume), progress=args.progress is not False, **kw)
    except (ValueError, OSError) as e:
        print(f"diffsolve train: error: {e}", file=sys.stderr)
        return 2
    print(f"noise-level classifier written to {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
