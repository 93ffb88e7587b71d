"""The default sampler: what ``ds.sample(model, noise, nfe=k)`` runs when no solver is given.

``default_sampler(nfe, process, parameterisation)`` -> ``DefaultSampler(solver, options, spacing, final)``,
a pure function of the NFE budget, the kind of process (``process_kind``) and the parameterisation; nothing
else of the model is read.

| NFE | solver | options | final | spacing: `discrete` | spacing: `VPDiscrete`, `VPContinuous` | spacing: `RectifiedFlow`, `AffineInterpolant` | spacing: `VE`, `EDM` | spacing: `other` |
|---|---|---|---|---|---|---|---|---|
| 1-10 | `unipc-bh1` | order=3 | `t_min` | `linspace` | `uniform` | `uniform` | `karras` | `logsnr` |
| >= 11 | `unipc-bh1` | order=3 | `t_min` | power 1.5 | power 1.5 | `uniform` | `karras` | `logsnr` |

* Up to 10 NFE on a DDPM-style discrete schedule the choice is diffusers' ``UniPCMultistepScheduler(
  solver_type="bh1", solver_order=3, timestep_spacing="linspace", final_sigmas_type="sigma_min")``, the best
  peer configuration on the shipped MNIST model, run by our UniPC (the same grid and updates).
* From 11 NFE, ``power 1.5`` is ``PowerSpacing(1.5)``: t = t_min + (t_max - t_min) u^1.5 for u evenly spaced
  from 1 to 0 (p = 1 is uniform in t, diffusers' 'linspace' before its rounding to integer timesteps; p = 2 is
  DDIM's 'quadratic'): more of the steps near the data.  Its times are fractional on a discrete schedule
  (``VPDiscrete`` interpolates it).
* Every choice ends at t_min (``final='t_min'``, no jump to clean data from a noisy point) and spends exactly
  ``nfe`` network evaluations (UniPC's corrector reuses the next step's evaluation).

Where it comes from (``benchmarks/default_rule.py``, ``docs/default_rule.md``): per NFE band, the candidate
with the smallest worst-case RMSE ratio to the best diffusers / k-diffusion configuration over the selection
problems, the exact 64-dim Gaussian mixture and the shipped MNIST model (DDPM linear betas, epsilon
prediction); the 3072-dim mixture is held out and only reported.  Measured: the ``discrete`` kind with an
epsilon network.  Not measured, for want of a model: the continuous kinds (their grids are the analogous
ones: the same power of t for the continuous VP, whose t is the DDPM timestep index / 1000 for linear betas;
uniform t for flows, as flow matching samples; EDM's Karras schedule for VE and EDM) and the other
parameterisations, which get the same choice (with an exact network every parameterisation gives the same
ODE; what a parameterisation changes is a learned network's error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from ..adapters.parameterisation import canonical
from ..processes import NoiseProcess

__all__ = ["DefaultSampler", "PowerSpacing", "default_sampler", "process_kind", "model_parameterisation",
           "rule_table", "band_label", "AUTO", "LEGACY_SOLVER", "LEGACY_SPACING", "LEGACY_FINAL", "RULE",
           "SPACING_BY_KIND"]

#: the defaults before the rule (``ds.sample`` with an explicit solver or grid still fills these in)
LEGACY_SOLVER, LEGACY_SPACING, LEGACY_FINAL = "dpm++2m", "logsnr", "denoise"
#: the value of ``DiffsolveScheduler``'s solver / spacing / final that means "follow the rule"
AUTO = "auto"


@dataclass(frozen=True)
class PowerSpacing:
    """Spacing ``(process, n) -> t``: t = t_min + (t_max - t_min) u^p, u = linspace(1, 0, n)."""

    p: float

    def __call__(self, process: NoiseProcess, n: int) -> torch.Tensor:
        u = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
        t = process.t_min + (process.t_max - process.t_min) * u ** self.p
        t[0], t[-1] = process.t_max, process.t_min
        return t

    def __str__(self) -> str:
        return f"power-{self.p:g}"


Spacing = Union[str, Callable[[NoiseProcess, int], torch.Tensor]]


class DefaultSampler(NamedTuple):
    """One choice of the rule: run ``ds.sample(..., solver, spacing=spacing, final=final, **options)``."""

    solver: str
    options: Dict[str, Any]
    spacing: Spacing
    final: str


#: (largest NFE of the band or None for no end, solver, options, final, exponent p of the spacing)
RULE: Tuple[Tuple[Optional[int], str, Tuple[Tuple[str, Any], ...], str, float], ...] = (
    (10, "unipc-bh1", (("order", 3),), "t_min", 1.0),
    (None, "unipc-bh1", (("order", 3),), "t_min", 1.5),
)

#: process kind -> spacing: "index" is diffusers' 'linspace' for p = 1 and ``PowerSpacing(p)`` otherwise,
#: "power" is 'uniform' for p = 1 and ``PowerSpacing(p)`` otherwise (p: the band's exponent); else a name
SPACING_BY_KIND: Dict[str, str] = {
    "discrete": "index",  # DDPM-style VPDiscrete (measured)
    "VPDiscrete": "power",  # a VPDiscrete without its timestep index (e.g. inside Shifted): the same times
    "VPContinuous": "power",  # t in [t_min, 1]: the continuous counterpart of the DDPM timestep index
    "RectifiedFlow": "uniform",  # flow matching's convention, uniform in t
    "AffineInterpolant": "uniform",
    "VE": "karras",  # EDM's rho = 7 schedule, its recommendation for VE and EDM models
    "EDM": "karras",
    "other": "logsnr",  # an unknown process: the grid that does not depend on how its time is parameterised
}

_CLASSES = ("VPDiscrete", "VPContinuous", "RectifiedFlow", "AffineInterpolant", "VE", "EDM")


def process_kind(process: Union[NoiseProcess, str]) -> str:
    """The part of a process the rule reads: 'discrete' when it has training timesteps (``num_train_timesteps``),
    else its class (a ``Shifted`` process by its base), or 'other'.  A class name ('VPDiscrete', 'EDM', ... as
    in ``diffsolve.processes.PROCESSES``) stands for a process of that class as constructed there."""
    if isinstance(process, str):
        if process == "VPDiscrete":
            return "discrete"
        return process if process in _CLASSES else "other"
    if getattr(process, "num_train_timesteps", None) is not None:
        return "discrete"
    base: Any = process
    while isinstance(getattr(base, "base", None), NoiseProcess):  # Shifted: its base process
        base = base.base
    name = type(base).__name__
    return name if name in _CLASSES else "other"


def _band(nfe: int):
    for band in RULE:
        if band[0] is None or nfe <= band[0]:
            return band
    raise AssertionError("the last band of RULE has no upper end")  # pragma: no cover


def default_sampler(nfe: int, process: Union[NoiseProcess, str],
                    parameterisation: Optional[str] = None) -> DefaultSampler:
    """The default (solver, options, spacing, final) for a budget of ``nfe`` network evaluations.

    ``process``: the model's process (or its class name); ``parameterisation``: the model's prediction
    ('epsilon', 'x0', 'v', ... or an alias; ``None``: unknown).  The table is in the module docstring.
    """
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    if nfe < 1:
        raise ValueError(f"the default sampler needs nfe >= 1, got {nfe}")
    if parameterisation is not None:
        canonical(parameterisation)  # an unknown name is an error; every known one gets the same choice
    _, solver, options, final, p = _band(nfe)
    name = SPACING_BY_KIND[process_kind(process)]
    spacing: Spacing = name
    if name in ("index", "power"):
        spacing = PowerSpacing(p) if p != 1.0 else ("linspace" if name == "index" else "uniform")
        n_train = getattr(process, "num_train_timesteps", None)
        if spacing == "linspace" and n_train is not None and n_train < nfe + 1:  # fewer timesteps than points
            spacing = "uniform"
    return DefaultSampler(solver, dict(options), spacing, final)


def band_label(nfe: int) -> str:
    """The NFE band of ``RULE`` that holds ``nfe``, as the table writes it ('1-10', '>= 16', 'any')."""
    lo = 1
    for top, *_ in RULE:
        if top is None:
            return "any" if lo == 1 else f">= {lo}"
        if nfe <= top:
            return f"{lo}-{top}" if top > lo else f"{lo}"
        lo = top + 1
    raise AssertionError("the last band of RULE has no upper end")  # pragma: no cover


def _cell(name: str, p: float) -> str:
    if name in ("index", "power"):
        return f"power {p:g}" if p != 1.0 else ("`linspace`" if name == "index" else "`uniform`")
    return f"`{name}`"


def rule_table() -> str:
    """The rule as the Markdown table of the module docstring and ``docs/default_rule.md`` (spacing columns:
    the process kinds that share one)."""
    groups: Dict[str, list] = {}
    for kind, name in SPACING_BY_KIND.items():
        groups.setdefault(name, []).append(kind)
    head = "| NFE | solver | options | final | " + " | ".join(
        "spacing: " + ", ".join(f"`{k}`" for k in kinds) for kinds in groups.values()) + " |"
    rows = [head, "|" + "---|" * (4 + len(groups))]
    lo = 1
    for top, solver, options, final, p in RULE:
        opts = ", ".join(f"{k}={v}" for k, v in options) or "-"
        cells = [_cell(name, p) for name in groups]
        rows.append(f"| {band_label(lo)} | `{solver}` | {opts} | `{final}` | " + " | ".join(cells) + " |")
        lo = (top or lo) + 1
    return "\n".join(rows)


def model_parameterisation(model: Any) -> Optional[str]:
    """The prediction of a model (its own, a wrapper's inner model's, or its identity's), None if unknown."""
    m = model
    for _ in range(16):
        pred = getattr(m, "prediction", None)
        if isinstance(pred, str):
            return pred
        m = getattr(m, "inner", None)
        if m is None:
            break
    try:
        pred = model.identity().get("prediction")
    except Exception:
        return None
    return pred if isinstance(pred, str) else None
