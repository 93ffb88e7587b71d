"""LoRA adapters on any network through ``peft`` (Hu et al. 2021, LoRA, arXiv:2106.09685; LCM-LoRA,
arXiv:2311.05556): add, train, merge, save and load the adapter alone.

``add_lora(net, rank)`` injects rank-r adapters W + (alpha / r) B A into every Conv2d and Linear (or ``targets``),
with B = 0 so the network is unchanged until trained; only the adapters require gradients.  ``merge_lora`` folds
them into the weights and returns the plain network (same class, same parameters as before).  ``save_adapter``
writes only the adapter tensors (safetensors, with the rank / alpha / targets in its metadata); ``load_adapter``
adds matching adapters to a network and loads them.  ``finetune_lora`` trains an adapter on data with the
denoising loss of the model's own parameterisation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..adapters.denoiser import Denoiser
from ..util.files import save_safetensors

Tensor = torch.Tensor


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ValueError(f"LoRA needs peft (pip install peft): {e}") from None
    return peft


def lora_targets(net: nn.Module) -> List[str]:
    """Names of every Conv2d and Linear layer of ``net``."""
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def add_lora(net: nn.Module, rank: int = 8, alpha: Optional[float] = None,
             targets: Optional[Sequence[str]] = None, dropout: float = 0.0) -> nn.Module:
    """Inject LoRA adapters into ``net`` in place (returned); base weights are frozen, adapters trainable."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    names = list(targets) if targets is not None else lora_targets(net)
    if not names:
        raise ValueError("no Conv2d or Linear layers to adapt")
    cfg = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                          target_modules=names, lora_dropout=dropout, bias="none")
    net.requires_grad_(False)
    net = peft.inject_adapter_in_model(cfg, net)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    net._lora_meta = {"rank": int(rank), "alpha": float(cfg.lora_alpha), "targets": names}  # type: ignore[assignment]
    return net


def _lora_layers(net: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [(n, m) for n, m in net.named_modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base layers back (in place; returned)."""
    _peft()
    for name, layer in _lora_layers(net):
        layer.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, layer.get_base_layer())
    if hasattr(net, "_lora_meta"):
        del net._lora_meta
    return net


def adapter_state(net: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if "lora_" in k}


def save_adapter(net: nn.Module, path: Union[str, Path]) -> Path:
    """Write only the adapter tensors of ``net`` to ``path`` (a .safetensors file)."""
    meta = getattr(net, "_lora_meta", None)
    state = adapter_state(net)
    if meta is None or not state:
        raise ValueError("this network has no LoRA adapters (use add_lora first)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, metadata={"lora": json.dumps(meta)})
    return path


def load_adapter(net: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Add the adapters saved in ``path`` to ``net`` (in place) and load their weights."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["lora"])
        state = load_file(str(path))
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise ValueError(f"{path}: not a LoRA adapter file ({e})") from None
    net = add_lora(net, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"])
    own = adapter_state(net)
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        raise ValueError(f"{path}: the adapter does not fit this network")
    net.load_state_dict(state, strict=False)
    return net


def finetune_lora(den: Denoiser, data: Tensor, steps: int = 200, batch_size: int = 32, lr: float = 1e-3,
                  rank: int = 8, seed: int = 0, progress: bool = False) -> nn.Module:
    """Train a rank-``rank`` adapter on ``den``'s network (a copy) with the denoising loss ||x0_hat - x0||^2
    weighted by (alpha / sigma)^2 (i.e. the model's epsilon loss), on images ``data`` [N, ...]; returns the
    adapted copy (merge it with ``merge_lora``)."""
    import copy

    from ..adapters.denoiser import Denoiser as _D

    net = add_lora(copy.deepcopy(den.net).float(), rank=rank)
    student = _D(net, den.process, prediction=den.prediction, model_time=den.model_time, sigma_data=den.sigma_data)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    proc = den.process
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="LoRA", unit="it")
    for _ in it:
        x0 = data[torch.randint(0, data.shape[0], (batch_size,), generator=g)].float()
        t = proc.t_min + (proc.t_max - proc.t_min) * torch.rand(batch_size, generator=g, dtype=torch.float64)
        shp = (-1,) + (1,) * (x0.dim() - 1)
        a, s = proc.alpha(t).reshape(shp).float(), proc.sigma(t).reshape(shp).float()
        eps = torch.randn(x0.shape, generator=g)
        pred = student.evaluate(a * x0 + s * eps, t, {})
        loss = (pred.eps - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net
