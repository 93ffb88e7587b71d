"""Model checkpoints: safetensors weights + a JSON config -> a ready ``ds.Denoiser``.

A checkpoint is a folder with
  * ``model.safetensors``: the network's weights (for trained models: the EMA weights);
  * ``config.json``: ``{"format": "diffsolve", "architecture": {...}, "process": {...},
    "prediction": ..., "model_time": ..., "sample_shape": [C, H, W], "dataset": ...,
    "training_steps": ..., "weights": {"file", "sha256", "dtype"}}``.
Nothing is unpickled: weights are safetensors and the config is JSON.  ``load`` also accepts
a diffusers model folder (``scheduler_config.json`` + a UNet ``config.json`` with ``_class_name``;
handled by ``diffsolve.integrations.diffusers.load_diffusers``) and the names of the models
shipped with the package (``ds.load("mnist")``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from ..adapters.parameterisation import canonical, edm_noise_time
from ..processes import NoiseProcess
from ..util.files import json_dump_atomic, save_safetensors, sha256_file

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "diffsolve"
FORMAT_VERSION = 1
MODEL_TIMES = ("process", "log_sigma")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: models shipped inside the package: ``ds.load(name)``
BUILTIN_MODELS = {"mnist": ASSETS / "mnist", "mnist-flow": ASSETS / "mnist_flow", "mnist-cfg": ASSETS / "mnist_cfg",
                  "digits-edm": ASSETS / "digits_edm", "digits-v": ASSETS / "digits_v",
                  "digits-pfgmpp": ASSETS / "digits_pfgmpp",
                  "mnist-mmd4": ASSETS / "mnist_mmd4", "gaussian25": ASSETS / "gaussian25"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


# ----------------------------------------------------------------------------------------
# helpers shared with training
# ----------------------------------------------------------------------------------------
def model_time_fn(name: str, process: NoiseProcess) -> Callable[[Tensor], Tensor]:
    """Map process time to the network's time input: 'process' (``process.model_time``, e.g. the
    DDPM timestep index) or 'log_sigma' (log(sigma/alpha) / 4, EDM's c_noise)."""
    if name == "process":
        return process.model_time
    if name == "log_sigma":
        return lambda t: edm_noise_time(process.sigma_ve(t))
    raise ValueError(f"unknown model_time {name!r}; use one of {MODEL_TIMES}")


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------
def save_model(path: PathLike, net: torch.nn.Module, config: Mapping[str, Any],
               dtype: Optional[Union[str, torch.dtype]] = None) -> Path:
    """Write ``model.safetensors`` (``net``'s state dict, optionally cast to ``dtype``) and ``config.json``.

    ``config`` needs 'process' (a dict or a NoiseProcess) and 'prediction'; 'architecture' defaults
    to the net's own (``diffsolve.models.UNet``).  Other keys (sample_shape, dataset, training_steps,
    ...) are stored as given.  Returns the folder.
    """

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if "architecture" not in cfg:
        net_cfg = getattr(net, "config", None)
        if net_cfg is None or not hasattr(net_cfg, "to_dict"):
            raise ValueError("config has no 'architecture' and the network does not describe itself "
                             "(use diffsolve.models.UNet or pass config['architecture'])")
        cfg["architecture"] = {"type": type(net).__name__, **net_cfg.to_dict()}
    if isinstance(cfg.get("process"), NoiseProcess):
        cfg["process"] = cfg["process"].config()
    for key in ("process", "prediction"):
        if key not in cfg:
            raise ValueError(f"config needs {key!r}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    tensors = {}
    for k, v in net.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    wpath = path / WEIGHTS
    save_safetensors(tensors, wpath)  # package data must be world-readable
    stored = {str(v.dtype).replace("torch.", "") for v in tensors.values() if v.is_floating_point()}
    cfg = {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: v for k, v in cfg.items() if k != "weights"}}
    cfg["weights"] = {"file": WEIGHTS, "sha256": sha256_file(wpath),
                      "dtype": stored.pop() if len(stored) == 1 else sorted(stored)}
    json_dump_atomic(cfg, path / CONFIG)
    return path


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------
def resolve(path: PathLike) -> Path:
    """A checkpoint folder from a folder, one of its files, or a built-in model name."""
    p = Path(path).expanduser()
    if p.exists():
        return p.parent if p.is_file() else p
    if str(path) in BUILTIN_MODELS:
        b = BUILTIN_MODELS[str(path)]
        if not (b / CONFIG).exists():
            raise ValueError(f"the built-in model {str(path)!r} is missing from this installation ({b}); "
                             "reinstall diffsolve or train one with diffsolve.training")
        return b
    raise ValueError(f"{p}: no such checkpoint folder (nor a built-in model: {sorted(BUILTIN_MODELS)})")


def is_diffusers_folder(p: Path) -> bool:
    """A diffusers pipeline or model folder (scheduler_config.json + a config.json with _class_name)."""
    if (p / "model_index.json").exists():
        return True
    sched = (p / "scheduler_config.json").exists() or (p / "scheduler" / "scheduler_config.json").exists()
    for cfg in (p / CONFIG, p / "unet" / CONFIG):
        if sched and cfg.exists():
            try:
                if "_class_name" in json.loads(cfg.read_text()):
                    return True
            except (ValueError, OSError):
                pass
    return False


def read_config(path: PathLike) -> Dict[str, Any]:
    """Read and validate a diffsolve ``config.json`` (clear ``ValueError`` naming the file otherwise)."""
    p = resolve(path)
    cpath = p / CONFIG
    if not cpath.exists():
        raise ValueError(f"{cpath}: missing (a diffsolve checkpoint needs {CONFIG} next to {WEIGHTS})")
    try:
        cfg = json.loads(cpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cpath}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cpath}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cpath}: not a diffsolve checkpoint config (format={cfg.get('format')!r}, "
                         f"expected {FORMAT!r})")
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise ValueError(f"{cpath}: format_version {cfg['format_version']} is newer than this diffsolve "
                         f"understands ({FORMAT_VERSION}); upgrade diffsolve")
    for key in ("architecture", "process", "prediction"):
        if key not in cfg:
            raise ValueError(f"{cpath}: missing required key {key!r}")
    try:
        canonical(cfg["prediction"])
    except ValueError:
        raise ValueError(f"{cpath}: unknown prediction {cfg['prediction']!r}") from None
    if cfg.get("model_time", "process") not in MODEL_TIMES:
        raise ValueError(f"{cpath}: unknown model_time {cfg.get('model_time')!r}; use one of {MODEL_TIMES}")
    return cfg


def _read_weights(wpath: Path, expected_sha: Optional[str]) -> Dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not wpath.exists():
        raise ValueError(f"{wpath}: missing weights file")
    if expected_sha is not None:
        got = sha256_file(wpath)
        if got != expected_sha:
            raise ValueError(f"{wpath}: checksum mismatch (sha256 {got[:12]}..., config.json expects "
                             f"{expected_sha[:12]}...): the file is corrupt, truncated or from another model")
    try:
        return load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{wpath}: corrupt or truncated safetensors file ({e})") from e


def load_network(path: PathLike, device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = torch.float32) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Build the network of a diffsolve checkpoint and load its weights; returns (net in eval mode, config)."""
    from ..models import build_model

    p = resolve(path)
    cfg = read_config(p)
    try:
        net = build_model(cfg["architecture"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p / CONFIG}: bad 'architecture' ({e})") from e
    wfile = cfg.get("weights", {}).get("file", WEIGHTS)
    wpath = p / wfile
    sd = _read_weights(wpath, cfg.get("weights", {}).get("sha256"))
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. " + "; ".join(shapes[:3]))
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{wpath} does not match the architecture in {p / CONFIG}: " + "; ".join(parts))
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{wpath}: non-finite values in {bad[:3]}")
    target = dtype or next(iter(sd.values())).dtype
    net.load_state_dict({k: v.to(target) if v.is_floating_point() else v for k, v in sd.items()})
    net = net.to(dtype=target)
    if device is not None:
        net = net.to(device)
    return net.eval().requires_grad_(False), cfg
