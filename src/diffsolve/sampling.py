"""``sample``: one entry point that puts process, adapter, time grid and solver together."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from .denoiser import Denoiser
from .solvers import get_solver
from .solvers.core import Evaluator, Noise, SamplingError, generators_from_seeds
from .timesteps import FINALS, TimeGrid, explicit, make_grid

Tensor = torch.Tensor


@dataclass
class SampleInfo:
    """What a sampling run did: the solver, the NFE it actually used and the grid it stepped on."""

    solver: str
    nfe: int
    steps: int
    grid: TimeGrid
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def ends_clean(self) -> bool:
        return self.grid.clean_end


def sample(den: Denoiser, noise: Tensor, solver: str = "dpm++2m", nfe: Optional[int] = None,
           spacing: Union[str, Callable] = "logsnr", grid: Optional[Union[TimeGrid, Sequence[float], Tensor]] = None,
           final: str = "denoise", seeds: Optional[Sequence[int]] = None,
           generators: Optional[Sequence[torch.Generator]] = None, model_kwargs: Optional[Dict[str, Any]] = None,
           callback: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = False,
           return_info: bool = False, scale_noise: bool = True, dtype: Optional[torch.dtype] = None,
           profile: Any = None, **options: Any):
    """Sample from a frozen model in at most ``nfe`` network evaluations.

    Args:
        den: the model adapter (``ds.Denoiser``).
        noise: standard normal noise [B, ...]; it is scaled by ``process.prior_scale`` to give x at
            the grid's first time (pass ``scale_noise=False`` if it already is x_T).
        solver: a name from ``ds.solvers()``.
        nfe: budget of network evaluations (the solver picks the largest grid that fits); 10 when
            neither ``nfe`` nor ``grid`` is given.  With an explicit ``grid`` it is an upper bound only.
        spacing: time-step spacing name (``ds.timesteps.SPACINGS``) or a callable ``(process, n) -> t``.
        grid: an explicit ``TimeGrid`` (``ds.timesteps.explicit``) or a sequence of process times.
        final: 'denoise' (last step jumps to clean data with the denoiser) or 't_min' (stop there).
        seeds / generators: per-sample randomness for stochastic solvers (batch-size independent).
        model_kwargs: extra keyword arguments for the network (labels, embeddings).
        callback: called after every step with {'i', 'x', 't', 'denoised'}.
        progress: show a progress bar over network evaluations.
        return_info: also return a ``SampleInfo`` (NFE used, grid, options).
        dtype: dtype of the solver state (default float64; float32 on MPS). float32 roughly halves the
            solver's own cost per step at ~1e-7 relative accuracy.
        profile: a tuned profile (``ds.tune`` / ``ds.Profile``, or its path): its entry for ``nfe``
            sets solver, grid, last step and options (``solver``, ``spacing``, ``final`` are ignored; ``grid``
            must be None).  A profile made for another model, process, guidance scale or data shape is refused.
        **options: solver options (e.g. ``order=3``, ``eta=0.5``, ``lower_order_final=False``).
    Returns:
        the sample (float64 on CPU/CUDA), or ``(sample, info)`` with ``return_info=True``.
    """
    if profile is not None:
        if not isinstance(noise, Tensor) or noise.dim() < 1:
            raise ValueError("noise must be a tensor of shape [batch, ...] with batch >= 1")
        from .tuning import profile_settings
        solver, grid, options = profile_settings(profile, den, noise, nfe, grid, options)
        final = "denoise" if grid.clean_end else "t_min"
    info = get_solver(solver)
    if not isinstance(den, Denoiser):
        raise TypeError("den must be a diffsolve.Denoiser (wrap your network: ds.Denoiser(net, process, ...))")
    if not isinstance(noise, Tensor) or noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError("noise must be a tensor of shape [batch, ...] with batch >= 1")
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or inf")
    if final not in FINALS:
        raise ValueError(f"unknown final={final!r}; use one of {FINALS}")
    if nfe is not None and (not isinstance(nfe, int) or isinstance(nfe, bool)):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    proc = den.process
    extra: Dict[str, Any] = {}
    if grid is None:
        nfe = 10 if nfe is None else nfe
        clean = final == "denoise"
        need = info.min_nfe(clean)
        if nfe < need:
            raise ValueError(f"solver {info.name!r} needs nfe >= {need} (final={final!r}), got {nfe}")
        steps, extra = info.plan(nfe, clean)
        n_points = steps if clean else steps + 1
        tgrid = make_grid(proc, n_points, spacing, final)
        cost = sum(extra["orders"]) if extra else info.cost(tgrid.steps, clean)
    else:
        tgrid = grid if isinstance(grid, TimeGrid) else explicit(proc, t=grid, final=final)
        if tgrid.steps < 1:
            raise ValueError("an explicit grid needs at least two points (or one point and final='denoise')")
        if info.singlestep_order:  # full-order steps on the given grid, the jump to clean is order 1
            extra = {"orders": [1 if tgrid.is_clean(i + 1) else info.singlestep_order for i in range(tgrid.steps)]}
        cost = sum(extra["orders"]) if extra else info.cost(tgrid.steps, tgrid.clean_end)
        if nfe is not None and cost > nfe:
            raise ValueError(f"the grid needs {cost} NFE with solver {info.name!r}, more than nfe={nfe}")

    opts = {**info.defaults, **extra, **options}
    accepted = inspect.signature(info.fn).parameters
    unknown = [k for k in opts if k not in accepted]
    if unknown:
        valid = [k for k in accepted if k not in ("ev", "x", "grid", "noise", "orders")]
        raise ValueError(f"solver {info.name!r} has no option(s) {unknown}; it takes {valid}")
    if seeds is not None:
        if len(seeds) != noise.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {noise.shape[0]}")
        generators = generators_from_seeds(seeds, device=noise.device)
    rng = Noise(generators)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cost, desc=info.name, unit="nfe", leave=False)
    ev = Evaluator(den, model_kwargs, callback, bar)
    sd = dtype or (torch.float32 if noise.device.type == "mps" else torch.float64)
    if sd not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {sd}")
    x = noise.to(sd) * (proc.prior_scale if scale_noise else 1.0)
    try:
        out = info.fn(ev, x, tgrid, rng, **opts)
    finally:
        if bar is not None:
            bar.close()
    if not torch.isfinite(out).all():
        raise SamplingError(f"solver {info.name!r} produced a non-finite sample")
    if return_info:
        opts.pop("orders", None)
        return out, SampleInfo(info.name, ev.nfe, tgrid.steps, tgrid, opts)
    return out

