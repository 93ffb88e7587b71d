"""``load``: one entry point for models by name, checkpoint folder or diffusers folder."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from ..adapters.denoiser import Denoiser
from ..integrations.diffusers import load_diffusers
from ..processes import process_from_config
from .checkpoint import CONFIG, PathLike, is_diffusers_folder, load_network, model_time_fn, resolve


def load(path: PathLike, device: Optional[Union[str, torch.device]] = None,
         dtype: Optional[torch.dtype] = torch.float32, **denoiser_kwargs: Any) -> Denoiser:
    """Load a checkpoint folder (or a diffusers model folder, or a built-in name like 'mnist') as a
    ready ``ds.Denoiser``.

    The returned denoiser carries ``.config`` (the checkpoint's config.json) and ``.sample_shape``
    ([C, H, W], so ``torch.randn(n, *den.sample_shape)`` is valid noise).  ``dtype`` is what the
    network runs in (weights stored in float16 are upcast; ``None`` keeps the stored dtype).
    Extra keyword arguments go to ``ds.Denoiser``.  Bad, corrupt or mismatched files raise ``ValueError``.
    """
    p = resolve(path)
    if is_diffusers_folder(p):
        kw = dict(denoiser_kwargs)
        if device is not None:
            kw["device"] = device
        return load_diffusers(p, **kw)
    net, cfg = load_network(p, device=device, dtype=dtype)
    try:
        proc = process_from_config(cfg["process"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p / CONFIG}: bad 'process' ({e})") from e
    kw = dict(denoiser_kwargs)
    if cfg["prediction"] != "edm":
        kw.setdefault("model_time", model_time_fn(cfg.get("model_time", "process"), proc))
    if "sigma_data" in cfg:
        kw.setdefault("sigma_data", cfg["sigma_data"])
    shape = cfg.get("sample_shape")
    kw.setdefault("sample_shape", tuple(int(s) for s in shape) if shape else None)
    return Denoiser(net, proc, prediction=cfg["prediction"], config=cfg, **kw)


def load_noise_classifier(path: PathLike):
    """The noise-level classifier (Denoising MCMC) stored in a checkpoint folder or next to a shipped model
    (``load_noise_classifier("mnist")``): a ``models.NoiseLevelClassifier``."""
    from ..models.noise_level import CONFIG as NL_CONFIG
    from ..models.noise_level import NoiseLevelClassifier

    p = resolve(path)
    if not (p / NL_CONFIG).exists():
        raise ValueError(f"{p}: no noise-level classifier there ({NL_CONFIG}); train one with "
                         "diffsolve train --noise-classifier MODEL --out FOLDER")
    return NoiseLevelClassifier.load(p)
