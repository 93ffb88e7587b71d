"""What a training step regresses: the process, training times, and (input, time, target, weight) per objective;
for class-conditional runs, the labels with label dropout (the null label trains the unconditional branch).

The target and the loss weight come from the parameterisation table: ``from_x0_eps`` gives the target,
``x0_gain`` (|d x0 / d output|) the EDM loss weight, and ``preconditioned`` selects EDM's network input.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..adapters.denoiser import outputs_from
from ..adapters.parameterisation import Coeffs, Parameterisation, edm_coefficients
from ..hub.checkpoint import model_time_fn
from ..processes import EDM, VE, NoiseProcess, VPDiscrete, process_from_config
from .config import TrainConfig

Tensor = torch.Tensor


def make_process(cfg: TrainConfig) -> NoiseProcess:
    try:
        return process_from_config({"type": cfg.process, **cfg.process_kwargs})
    except TypeError as e:
        raise ValueError(f"bad process_kwargs for {cfg.process}: {e}") from e


def resolved_model_time(cfg: TrainConfig, proc: NoiseProcess) -> str:
    if cfg.model_time != "auto":
        return cfg.model_time
    return "log_sigma" if cfg.parameterisation.preconditioned or isinstance(proc, (EDM, VE)) else "process"


def default_time_scale(proc: NoiseProcess, model_time: str) -> float:
    """Scale the network's time input to ~[0, 1000] for the sinusoidal embedding."""
    if model_time == "log_sigma":
        return 250.0
    if isinstance(proc, VPDiscrete):
        return 1.0  # timestep indices 0..N-1, the DDPM convention
    return 1000.0 / max(abs(proc.t_max), 1e-12)


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


def edm_loss_weight(param: Parameterisation, proc: NoiseProcess, t: Tensor, alpha: Tensor, sigma: Tensor,
                    sigma_ve: Tensor, sigma_data: float) -> Tensor:
    """Per-sample weight [B] that turns ||out - target||^2 into EDM's lambda(sigma) ||x0_hat - x0||^2.

    x0_hat - x0 = x0_gain * (out - target), and lambda(s) = (s^2 + sd^2) / (s sd)^2 with s = sigma/alpha;
    ``alpha``, ``sigma``, ``sigma_ve`` are [B] float64 at the times ``t``."""
    d_alpha, d_sigma = (proc.d_alpha(t), proc.d_sigma(t)) if param.needs_rates else (None, None)
    gain = param.x0_gain(Coeffs(alpha, sigma, d_alpha, d_sigma, sigma_data))
    return (sigma_ve**2 + sigma_data**2) / (sigma_ve * sigma_data) ** 2 * gain**2


def training_pair(cfg: TrainConfig, proc: NoiseProcess, model_time: str, x0: Tensor, eps: Tensor,
                  t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(network input, network time, regression target, per-sample weight) for x0, noise eps at times t (standard
    normal; the process's ``perturbation`` maps it to its kernel's, e.g. PFGM++'s heavy-tailed one)."""
    param = cfg.parameterisation
    eps = proc.perturbation(eps)
    dev, dt, nd = x0.device, x0.dtype, x0.dim()
    t4 = _bshape(t, nd)
    a64, s64 = proc.alpha(t4), proc.sigma(t4)
    a, s = a64.to(dev, dt), s64.to(dev, dt)
    xt = a * x0 + s * eps
    sve = (s64 / a64).flatten()
    sd = float(getattr(proc, "sigma_data", 0.5))
    weight = torch.ones_like(sve)
    if param.preconditioned:
        c = edm_coefficients(_bshape(sve, nd), sd)
        x_tilde = xt / a
        xin = x_tilde * c["c_in"].to(dev, dt)
        target = (x0 - c["c_skip"].to(dev, dt) * x_tilde) / c["c_out"].to(dev, dt)
        tin = torch.log(sve) / 4  # c_noise; loss weight lambda * c_out^2 = 1
    else:
        xin = xt
        tin = torch.as_tensor(model_time_fn(model_time, proc)(t), dtype=torch.float64)
        target = outputs_from(x0, eps, proc, t4, param.name)
        if cfg.loss_weighting == "edm":
            weight = edm_loss_weight(param, proc, t, a64.flatten(), s64.flatten(), sve, sd)
    return xin, tin.to(dev, torch.float32), target, weight.to(dev, torch.float32)


def drop_labels(labels: Tensor, p: float, null_label: int, gen: torch.Generator) -> Tensor:
    """``labels`` [B] with each entry replaced by ``null_label`` with probability ``p`` (independently; the
    draws come from ``gen``, on the CPU, so a run's labels are reproducible and resume exactly)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=gen, dtype=torch.float64) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_label), labels)
