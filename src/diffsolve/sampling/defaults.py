"""The default sampler: what ``ds.sample(model, noise, nfe=k)`` runs when no solver is given.

``default_sampler(nfe, process, parameterisation)`` -> ``DefaultSampler(solver, options, spacing, final)``,
a pure function of the NFE budget, the kind of process (``process_kind``) and, where it changes the choice, the
parameterisation; nothing else of the model is read.

| process kinds | NFE | solver | options | spacing | final |
|---|---|---|---|---|---|
| `discrete` | 1-10 | `unipc-bh2` | order=3 | `linspace` | `t_min` |
| `discrete` | >= 11 | `unipc-bh2` | order=3 | power 1.5 | `t_min` |
| `discrete`, guided (scale > 1) | 1-10 | `unipc-bh2` | order=2 | `linspace` | `t_min` |
| `discrete`, guided (scale > 1) | >= 11 | `unipc-bh2` | order=3 | power 1.5 | `t_min` |
| `VPDiscrete`, `VPContinuous` | 1-10 | `unipc-bh2` | order=3 | `uniform` | `t_min` |
| `VPDiscrete`, `VPContinuous` | >= 11 | `unipc-bh2` | order=3 | power 1.5 | `t_min` |
| `RectifiedFlow`, `AffineInterpolant` | any | `unipc-bh2` | order=3 | `uniform` | `t_min` |
| `VE`, `EDM`, `PFGMpp` | 1-8 | `unipc-bh2` | order=2 | `karras` rho 5 | `t_min` |
| `VE`, `EDM`, `PFGMpp` | >= 9 | `unipc-bh2` | order=2 | `karras` rho 7 | `t_min` |
| `other` | any | `unipc-bh1` | order=3 | `logsnr` | `t_min` |

* ``discrete`` (a DDPM-style schedule with training timesteps), up to 10 NFE: diffusers' ``UniPCMultistepScheduler(
  solver_type="bh2", solver_order=3, timestep_spacing="linspace", final_sigmas_type="sigma_min")``, the best peer
  configuration on the MNIST model (against its converged reference) and on the digits-v model (v, cosine schedule),
  run by our UniPC (the same grid and updates: a tie there); bh1, the former choice, is 1.03-1.08x the best peer
  on MNIST and 1.03-2.3x on digits-v.  From 11 NFE,
  ``power 1.5`` is ``PowerSpacing(1.5)``: t = t_min + (t_max - t_min) u^1.5 for u evenly spaced from 1 to 0
  (p = 1 is uniform in t, diffusers' 'linspace' before its rounding to integer timesteps; p = 2 is DDIM's
  'quadratic'): more of the steps near the data.  Its times are fractional on a discrete schedule
  (``VPDiscrete`` interpolates it).
* Under classifier-free guidance (a model whose identity has ``guidance_scale`` > 1, e.g. ``ClassifierFreeGuidance``)
  on a discrete schedule, up to 10 NFE: UniPC-bh2 order 2 on ``linspace`` (diffusers' ``UniPCMultistepScheduler(
  solver_order=2)``, the best peer on mnist-cfg at w = 3, where bh1 order 3 was 1.3-1.4x it at NFE 5-6; DPM-Solver++
  recommends second order for guided sampling as well).  From 11 NFE the unguided choice.  ``DiffsolveScheduler``
  cannot see a pipeline's guidance (diffusers applies it outside the scheduler) and uses the unguided choice.
* ``VE``, ``EDM``, ``PFGMpp`` (PFGM++ runs on EDM's sigma grid): UniPC-bh2 order 2 on EDM's Karras schedule, with
  rho = 5 up to 8 NFE (fewer of the few steps spent at large sigma: 0.74-0.95x the best peer on digits-edm at NFE
  5-8, where rho 7 was 0.82-1.05x) and rho = 7 from 9 NFE.  Third order on that schedule is unstable below ~10 NFE
  on a trained EDM network (its first steps are huge in sigma).
* ``RectifiedFlow``, ``AffineInterpolant``: UniPC-bh2 order 3 uniform in t, stopping at t_min (the best candidate at
  NFE 5, 8 and 15 on the flow-matching MNIST model, 0.97-0.99x the best peer there, which is diffusers' UniPC bh2
  order 3 on flow sigmas; the log-SNR, Karras and power grids were 1.3-2.6x worse).
* Every choice ends at t_min (``final='t_min'``, no jump to clean data from a noisy point) and spends exactly
  ``nfe`` network evaluations (UniPC's corrector reuses the next step's evaluation).

Where it comes from (``benchmarks/default_rule.py``, ``benchmarks/real_models.py``, ``docs/default_rule.md``,
``docs/real_models.md``): per kind and NFE band, the candidate with the smallest worst-case RMSE ratio to the best
diffusers / k-diffusion configuration on the models it was chosen on; the other models only report it.  Every
parameterisation gets the same choice (with an exact network every parameterisation gives the same ODE; what a
parameterisation changes is a learned network's error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from ..adapters.parameterisation import canonical
from ..processes import NoiseProcess

__all__ = ["DefaultSampler", "KarrasSpacing", "PowerSpacing", "default_sampler", "process_kind", "model_parameterisation",
           "rule_table", "band_label", "model_guidance", "AUTO", "LEGACY_SOLVER", "LEGACY_SPACING", "LEGACY_FINAL", "RULES",
           "GROUP_OF_KIND"]

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


@dataclass(frozen=True)
class KarrasSpacing:
    """Spacing ``(process, n) -> t``: EDM's rho-schedule in sigma/alpha with exponent ``rho`` (``karras`` is rho 7)."""

    rho: float

    def __call__(self, process: NoiseProcess, n: int) -> torch.Tensor:
        from ..grids.spacings import karras

        return karras(process, n, rho=self.rho)

    def __str__(self) -> str:
        return f"karras-rho{self.rho:g}"


Spacing = Union[str, Callable[[NoiseProcess, int], torch.Tensor]]


class DefaultSampler(NamedTuple):
    """One choice of the rule: run ``ds.sample(..., solver, spacing=spacing, final=final, **options)``."""

    solver: str
    options: Dict[str, Any]
    spacing: Spacing
    final: str


#: one band of a rule: (largest NFE of the band or None for no end, solver, options, final, spacing, exponent p).
#: spacing "index" is diffusers' 'linspace' for p = 1 and ``PowerSpacing(p)`` otherwise; "power" is 'uniform' for
#: p = 1 and ``PowerSpacing(p)`` otherwise; "karras" is EDM's schedule with rho = p (``KarrasSpacing(p)``, 'karras'
#: for p = 7); any other value is a spacing name
Band = Tuple[Optional[int], str, Tuple[Tuple[str, Any], ...], str, str, float]

#: the rule of each group of process kinds, band by band
RULES: Dict[str, Tuple[Band, ...]] = {
    "discrete": ((10, "unipc-bh2", (("order", 3),), "t_min", "index", 1.0),
                 (None, "unipc-bh2", (("order", 3),), "t_min", "index", 1.5)),
    "discrete-guided": ((10, "unipc-bh2", (("order", 2),), "t_min", "index", 1.0),
                        (None, "unipc-bh2", (("order", 3),), "t_min", "index", 1.5)),
    "vp": ((10, "unipc-bh2", (("order", 3),), "t_min", "power", 1.0),
           (None, "unipc-bh2", (("order", 3),), "t_min", "power", 1.5)),
    "flow": ((None, "unipc-bh2", (("order", 3),), "t_min", "uniform", 1.0),),
    "edm": ((8, "unipc-bh2", (("order", 2),), "t_min", "karras", 5.0),
            (None, "unipc-bh2", (("order", 2),), "t_min", "karras", 7.0)),
    "other": ((None, "unipc-bh1", (("order", 3),), "t_min", "logsnr", 1.0),),
}

#: process kind -> its group in ``RULES``
GROUP_OF_KIND: Dict[str, str] = {
    "discrete": "discrete",  # DDPM-style VPDiscrete (measured)
    "VPDiscrete": "vp",  # a VPDiscrete without its timestep index (e.g. inside Shifted): the same times
    "VPContinuous": "vp",  # t in [t_min, 1]: the continuous counterpart of the DDPM timestep index
    "RectifiedFlow": "flow",
    "AffineInterpolant": "flow",
    "VE": "edm",
    "EDM": "edm",
    "PFGMpp": "edm",  # PFGM++ runs on EDM's sigma grid by construction (r = sigma sqrt(D))
    "other": "other",  # an unknown process: the grid that does not depend on how its time is parameterised
}
#: (process kind, parameterisation) -> its group where the parameterisation changes the choice (none measured: the
#: v-prediction digits-v model and the epsilon MNIST models want the same choice)
GROUP_OF_KIND_AND_PREDICTION: Dict[Tuple[str, str], str] = {}
#: group -> its group under classifier-free guidance (scale > 1), where the guidance changes the choice: a guided
#: network is rougher, and second order holds up better at few steps (measured on mnist-cfg at w = 3, where UniPC-bh1
#: order 3 was 1.3-1.4x the best peer at NFE 5-6; DPM-Solver++ recommends its 2M for guided sampling too)
GUIDED_GROUP: Dict[str, str] = {"discrete": "discrete-guided"}

_CLASSES = ("VPDiscrete", "VPContinuous", "RectifiedFlow", "AffineInterpolant", "VE", "EDM", "PFGMpp")


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


def _band(nfe: int, group: str) -> Band:
    for band in RULES[group]:
        if band[0] is None or nfe <= band[0]:
            return band
    raise AssertionError("the last band of a rule has no upper end")  # pragma: no cover


def default_sampler(nfe: int, process: Union[NoiseProcess, str],
                    parameterisation: Optional[str] = None, guidance: Optional[float] = None) -> DefaultSampler:
    """The default (solver, options, spacing, final) for a budget of ``nfe`` network evaluations.

    ``process``: the model's process (or its class name); ``parameterisation``: the model's prediction
    ('epsilon', 'x0', 'v', ... or an alias; ``None``: unknown); ``guidance``: the classifier-free guidance
    scale of a guided model (``model_guidance``; ``None`` or <= 1: unguided).  The table is in the module
    docstring.
    """
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    if nfe < 1:
        raise ValueError(f"the default sampler needs nfe >= 1, got {nfe}")
    kind = process_kind(process)
    group = GROUP_OF_KIND[kind]
    if parameterisation is not None:  # an unknown name is an error
        group = GROUP_OF_KIND_AND_PREDICTION.get((kind, canonical(parameterisation)), group)
    if guidance is not None and float(guidance) > 1.0:
        group = GUIDED_GROUP.get(group, group)
    _, solver, options, final, name, p = _band(nfe, group)
    spacing: Spacing = name
    if name in ("index", "power"):
        spacing = PowerSpacing(p) if p != 1.0 else ("linspace" if name == "index" else "uniform")
        n_train = getattr(process, "num_train_timesteps", None)
        if spacing == "linspace" and n_train is not None and n_train < nfe + 1:  # fewer timesteps than points
            spacing = "uniform"
    elif name == "karras" and p != 7.0:
        spacing = KarrasSpacing(p)
    return DefaultSampler(solver, dict(options), spacing, final)


def band_label(nfe: int, group: str = "discrete") -> str:
    """The NFE band of ``RULES[group]`` that holds ``nfe``, as the table writes it ('1-10', '>= 11', 'any')."""
    lo = 1
    for top, *_ in RULES[group]:
        if top is None:
            return "any" if lo == 1 else f">= {lo}"
        if nfe <= top:
            return f"{lo}-{top}" if top > lo else f"{lo}"
        lo = top + 1
    raise AssertionError("the last band of a rule has no upper end")  # pragma: no cover


def _cell(name: str, p: float) -> str:
    if name in ("index", "power"):
        return f"power {p:g}" if p != 1.0 else ("`linspace`" if name == "index" else "`uniform`")
    if name == "karras":
        return f"`karras` rho {p:g}"
    return f"`{name}`"


def rule_table() -> str:
    """The rule as the Markdown table of the module docstring and ``docs/default_rule.md``: one row per group of
    process kinds and NFE band."""
    rows = ["| process kinds | NFE | solver | options | spacing | final |", "|---|---|---|---|---|---|"]
    for group, bands in RULES.items():
        kinds = ", ".join(f"`{k}`" for k, g in GROUP_OF_KIND.items() if g == group) or ", ".join(
            f"`{k}` (prediction `{pred}`)" for (k, pred), g in GROUP_OF_KIND_AND_PREDICTION.items() if g == group) \
            or ", ".join(f"`{k}`, guided (scale > 1)" for k, g0 in GROUP_OF_KIND.items() for g1, g in GUIDED_GROUP.items()
                         if g == group and g0 == g1)
        lo = 1
        for top, solver, options, final, name, p in bands:
            opts = ", ".join(f"{k}={v}" for k, v in options) or "-"
            rows.append(f"| {kinds} | {band_label(lo, group)} | `{solver}` | {opts} | {_cell(name, p)} | `{final}` |")
            lo = (top or lo) + 1
    return "\n".join(rows)


def model_guidance(model: Any) -> Optional[float]:
    """The classifier-free guidance scale of a model (its identity's ``guidance_scale``), None if unguided."""
    try:
        g = model.identity().get("guidance_scale")
    except Exception:
        return None
    return float(g) if isinstance(g, (int, float)) else None


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
