"""Noise processes x_t = alpha(t) x0 + b(t) y + sigma(t) eps (see ``base`` for the contract).

Discrete and continuous VP (``vp``), VE and EDM (``ve``), rectified flow and affine interpolants
(``interpolants``), PFGM++ (``pfgm``), ``Shifted`` for a known per-sample offset and the conditional affine
processes built on it (``conditional``: IR-SDE mean reverting, RDDM, ResShift).  ``PRESETS`` are the named
processes of the command line.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from .base import DT, NoiseProcess, Shifted, as_t
from .conditional import RDDM, MeanReverting, ResShift, Tabulated
from .interpolants import AffineInterpolant, RectifiedFlow
from .pfgm import PFGMpp
from .ve import EDM, VE
from .vp import VPContinuous, VPDiscrete

__all__ = ["NoiseProcess", "Shifted", "VPDiscrete", "VPContinuous", "VE", "EDM", "RectifiedFlow",
           "AffineInterpolant", "PFGMpp", "Tabulated", "MeanReverting", "RDDM", "ResShift", "PROCESSES",
           "OTHER_PROCESSES", "PRESETS", "process_from_config", "as_t", "DT"]

#: the processes with Gaussian marginals and no conditioning, by ``config()['type']``
PROCESSES = {"VPDiscrete": VPDiscrete, "VPContinuous": VPContinuous, "VE": VE, "EDM": EDM,
             "RectifiedFlow": RectifiedFlow}
#: the others, by ``config()['type']``: PFGM++'s heavy-tailed kernel and the conditional affine processes
#: x_t = a x0 + b y + c eps (their standard frame ``Tabulated``)
OTHER_PROCESSES = {"PFGMpp": PFGMpp, "Tabulated": Tabulated, "MeanReverting": MeanReverting, "RDDM": RDDM,
                   "ResShift": ResShift}


def process_from_config(cfg: dict) -> NoiseProcess:
    """Rebuild a process from ``config()`` (VPDiscrete needs ``alphas_cumprod`` or ``betas``)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "VPDiscrete":
        if "alphas_cumprod" in cfg:
            return VPDiscrete(cfg["alphas_cumprod"])
        if "betas" in cfg:
            return VPDiscrete.from_betas(cfg["betas"])
        sched = cfg.pop("schedule", "linear")
        n = cfg.pop("num_train_timesteps", 1000)
        if sched not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(f"unknown VPDiscrete schedule {sched!r}; use linear, scaled_linear or cosine")
        return getattr(VPDiscrete, sched)(n, **cfg)
    if kind == "VPContinuous":
        return VPContinuous(**cfg)
    if kind == "RDDM" and "alpha_schedule" in cfg:
        return RDDM.from_schedules(**cfg)
    known = {**PROCESSES, **OTHER_PROCESSES}
    if kind in known:
        return known[kind](**cfg)
    raise ValueError(f"unknown process type {kind!r}; known: {sorted(known)}")



#: the named processes of the command line: name -> (description, constructor)
PRESETS: Dict[str, Tuple[str, Callable[[], NoiseProcess]]] = {
    "vp-linear": ("DDPM linear betas, 1000 discrete steps", lambda: VPDiscrete.linear(1000)),
    "vp-cosine": ("improved-DDPM cosine, 1000 discrete steps", lambda: VPDiscrete.cosine(1000)),
    "vp-continuous": ("continuous VP SDE, linear beta", lambda: VPContinuous.linear()),
    "ve": ("variance exploding, sigma in [0.01, 50]", lambda: VE()),
    "edm": ("EDM, sigma in [0.002, 80]", lambda: EDM()),
    "flow": ("rectified flow, x_t = (1 - t) x0 + t eps", lambda: RectifiedFlow()),
}
