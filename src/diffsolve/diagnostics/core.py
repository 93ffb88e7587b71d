"""What every diagnostic shares: input checks, the model's denoiser in the VE view, and traces of its Jacobian.

The VE view (x~ = x / alpha, noise level s = sigma / alpha, as in ``reference.gmm``) makes every diagnostic
process-independent: the model's denoiser there is D(x~, s) = x0-prediction at x = alpha x~ and the time t with
sigma_ve(t) = s, and the score of the noisy data is (D - x~) / s^2.  Jacobians are taken with respect to x~
by reverse mode, batched by repeating each sample once per tangent (``rows_jacobian_t``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..adapters.denoiser import Model, NonFiniteError
from ..adapters.derivatives import rademacher
from ..processes import NoiseProcess

Tensor = torch.Tensor
DT = torch.float64
#: below this many numbers per sample the divergence is exact by default ('auto'), above it Hutchinson's
EXACT_DIM = 256


class DiagnosticError(ValueError):
    """Bad input to a diagnostic (shapes, NaN, a model that cannot give the gradients a diagnostic needs)."""


def check_model(model: Any) -> Model:
    if not isinstance(model, Model):
        raise DiagnosticError("model must provide the diffsolve model protocol (process, evaluate, identity); wrap "
                              "your network: ds.Denoiser(net, process, ...)")
    if model.process.offset_key is not None:
        raise DiagnosticError("diagnostics need a process without an offset (x_t = alpha x0 + sigma eps)")
    return model


def check_data(model: Model, x: Any, what: str = "x") -> Tensor:
    """``x`` as a float64 batch [B, *sample_shape]; clear errors for non-tensors, empty batches, a shape the model
    does not take and NaN / inf."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DiagnosticError(f"{what} must be a tensor [batch, *sample_shape] with batch >= 1, got {got}")
    if x.is_complex() or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int64, torch.int32)):
        raise DiagnosticError(f"{what} must hold real numbers, got dtype {x.dtype}")
    shape = getattr(model, "sample_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise DiagnosticError(f"{what} has samples of shape {tuple(x.shape[1:])}; the model takes {tuple(shape)}")
    x = x.to(DT)
    if not torch.isfinite(x).all():
        raise DiagnosticError(f"{what} contains NaN or inf")
    return x


def ve_time(process: NoiseProcess, sigma: Union[float, Tensor]) -> Tensor:
    """Process time(s) of VE noise level(s) ``sigma`` (> 0), inside [t_min, t_max]."""
    s = torch.as_tensor(sigma, dtype=DT)
    t = process.t_of_sigma_ve(s)
    return t.clamp(process.t_min, process.t_max)


def sigma_of(process: NoiseProcess, t: Union[float, Tensor]) -> Tensor:
    return process.sigma_ve(torch.as_tensor(t, dtype=DT))


def resolve_noise_level(process: NoiseProcess, t: Optional[float], sigma: Optional[float],
                        default_sigma: float) -> Tuple[float, float]:
    """(t, sigma_ve) from either one (``default_sigma`` when neither is given), checked against the process range."""
    if t is not None and sigma is not None:
        raise DiagnosticError("give the noise level as t= or as sigma=, not both")
    if t is None:
        s = default_sigma if sigma is None else float(sigma)
        if not s > 0:
            raise DiagnosticError(f"sigma must be > 0, got {s}")
        lo, hi = float(sigma_of(process, process.t_min)), float(sigma_of(process, process.t_max))
        if not lo * (1 - 1e-2) <= s <= hi * (1 + 1e-2):
            raise DiagnosticError(f"sigma={s:g} lies outside the process's range [{lo:.4g}, {hi:.4g}] (sigma / alpha)")
        t = float(ve_time(process, min(max(s, lo), hi)))  # within 1% of an end: that end
    t = float(t)
    if not process.t_min <= t <= process.t_max:
        raise DiagnosticError(f"t={t:g} lies outside the process's range [{process.t_min:g}, {process.t_max:g}]")
    return t, float(sigma_of(process, t))


def select_kwargs(kwargs: Mapping[str, Any], batch: int, idx: Optional[Tensor] = None, repeat: int = 1) -> Dict[str, Any]:
    """Per-sample model inputs for rows ``idx`` of a batch of ``batch``, each repeated ``repeat`` times
    (tangent-major: the copies of row i are rows i, m + i, 2m + i, ...); other inputs pass unchanged."""
    out: Dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            v = v[idx] if idx is not None else v
            if repeat > 1:
                v = v.repeat(repeat, *([1] * (v.dim() - 1)))
        out[k] = v
    return out


def ve_denoiser(model: Model, kwargs: Mapping[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
    """(x~ [m, *S], s [m] or scalar) -> D(x~, s): the model's x0 prediction at x = alpha x~, sigma_ve(t) = s."""
    proc = model.process

    def fn(x: Tensor, s: Tensor) -> Tensor:
        s = torch.as_tensor(s, dtype=DT)
        t = ve_time(proc, s)
        a = proc.alpha(t).to(x)
        if t.dim():
            a = a.reshape((-1,) + (1,) * (x.dim() - 1))
        try:
            return model.evaluate(a * x, t, kwargs).x0
        except NonFiniteError as e:
            raise DiagnosticError(f"the model gave a non-finite prediction: {e}") from None
        except RuntimeError as e:
            if "grad" in str(e) or "derivative" in str(e):
                raise
            raise DiagnosticError(f"the model cannot evaluate inputs of shape {tuple(x.shape[1:])} ({e})") from None

    return fn


NO_GRAD = ("{what} needs the model's derivatives, but its prediction does not depend differentiably on its input "
           "(a network run under torch.no_grad, a detached output, or a model computed outside torch)")


def probes_for(seeds: Sequence[int], k: int, shape: Sequence[int], salt: int = 0) -> Tensor:
    """Rademacher probes [k, B, *shape] (float64): sample i's from its own generator (seed ``seeds[i]``), so an
    estimate does not depend on the batch it is computed in."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 1_000_003 + 7919 * salt + 17)
        out.append(rademacher((k, *shape), g))
    return torch.stack(out, 1)


def rows_jacobian_t(fn: Callable[[Tensor], Tensor], x: Tensor, cotangents: Tensor, max_rows: int = 4096,
                    what: str = "this diagnostic") -> Tuple[Tensor, Tensor]:
    """(fn(x) [B, *S], J^T c for every cotangent c [k, B, *S] -> [k, B, *S]) by reverse mode (one VJP per cotangent,
    stacked into batches of at most ``max_rows`` rows: each sample repeated once per cotangent).  ``fn`` maps rows
    to rows independently (row i of the output depends on row i of the input only)."""
    b = x.shape[0]
    k = cotangents.shape[0]
    per = max(1, max_rows // b)
    value: Optional[Tensor] = None
    parts = []
    for j0 in range(0, k, per):
        cj = cotangents[j0:j0 + per].to(x)
        m = cj.shape[0]
        with torch.enable_grad():
            xs = x.detach().repeat(m, *([1] * (x.dim() - 1))).requires_grad_(True)
            out = fn(xs)
            if not (isinstance(out, Tensor) and out.requires_grad):
                raise DiagnosticError(NO_GRAD.format(what=what))
            (g,) = torch.autograd.grad(out, xs, cj.reshape(m * b, *x.shape[1:]), allow_unused=True)
        if g is None:
            raise DiagnosticError(NO_GRAD.format(what=what))
        if value is None:
            value = out[:b].detach()
        parts.append(g.reshape(m, b, *x.shape[1:]))
    assert value is not None
    return value, torch.cat(parts, 0)


def unit_tangents(x: Tensor) -> Tensor:
    """The d standard basis vectors of one sample's space, for every sample: [d, B, *S]."""
    b, d = x.shape[0], math.prod(x.shape[1:])
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return eye[:, None, :].expand(d, b, d).reshape(d, b, *x.shape[1:])


def gaussians_for(seeds: Sequence[int], k: int, shape: Sequence[int], salt: int = 0) -> Tensor:
    """Standard normal numbers [k, B, *shape] (float64), sample i's from its own generator (seed ``seeds[i]``)."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) * 1_000_003 + 7919 * salt + 29)
        out.append(torch.randn((k, *shape), generator=g, dtype=DT))
    return torch.stack(out, 1)


def value_and_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: Optional[Tensor] = None,
                    max_rows: int = 4096, what: str = "this diagnostic") -> Tuple[Tensor, Tensor]:
    """(fn(x), traces): with ``probes`` [k, B, *S] Hutchinson's v^T J v per probe [B, k]; without, the exact
    tr(J) [B, 1] from the d rows of J.  Reverse mode (``rows_jacobian_t``): on CPU a VJP costs 1.4x a forward pass
    here, forward mode 3-4x."""
    b = x.shape[0]
    d = math.prod(x.shape[1:])
    tangents = unit_tangents(x) if probes is None else probes.to(x)
    value, g = rows_jacobian_t(fn, x, tangents, max_rows, what)
    quad = (g.reshape(-1, b, d) * tangents.reshape(-1, b, d)).sum(-1).T  # [B, k]: c^T J c
    return value, (quad.sum(1, keepdim=True) if probes is None else quad)


def divergence_mode(divergence: str, dim: int) -> str:
    if divergence == "auto":
        return "exact" if dim <= EXACT_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise DiagnosticError(f"divergence must be 'auto', 'exact' or 'hutchinson', got {divergence!r}")
    return divergence


def sample_seeds(n: int, seed: int, seeds: Optional[Sequence[int]] = None) -> Sequence[int]:
    if seeds is not None:
        if len(seeds) != n:
            raise DiagnosticError(f"{len(seeds)} seeds for a batch of {n}")
        return [int(s) for s in seeds]
    return [int(seed) * 100_003 + i for i in range(n)]


def batches(n: int, batch_size: Optional[int]):
    """Index ranges of the batches of a run (``batch_size=None``: one batch)."""
    step = n if not batch_size else int(batch_size)
    if step < 1:
        raise DiagnosticError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, n, step):
        yield slice(i, min(n, i + step))
