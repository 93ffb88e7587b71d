"""Derivatives of a model's predictions, written once: JVP (forward mode), VJP (reverse mode) and
Hutchinson's trace estimator, plus the gradient policy.

Gradient policy: ``ds.sample`` runs without building graphs unless asked (``grad=True``).  A method that needs
gradients through the network (guidance, posterior sampling, likelihood) calls these helpers, which enable
grad locally (``torch.enable_grad``), so they work inside a no-grad sampling run and on every model kind,
diffusers-loaded ones included.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import torch

from .denoiser import Model

Tensor = torch.Tensor


def prediction_fn(model: Model, t: Any, kwargs: Optional[Mapping[str, Any]] = None,
                  output: str = "x0") -> Callable[[Tensor], Tensor]:
    """x -> the model's ``output`` ('x0' or 'eps') at time ``t``: a plain function to differentiate."""
    if output not in ("x0", "eps"):
        raise ValueError(f"output must be 'x0' or 'eps', got {output!r}")
    kw = dict(kwargs or {})
    return lambda x: getattr(model.evaluate(x, t, kw), output)


def jvp(fn: Callable[..., Tensor], primals: Tuple[Tensor, ...], tangents: Tuple[Tensor, ...]) -> Tuple[Tensor, Tensor]:
    """(fn(*primals), J tangents) in forward mode (``torch.func.jvp``)."""
    out, jv = torch.func.jvp(fn, primals, tangents)[:2]
    return out, jv


def vjp(fn: Callable[[Tensor], Tensor], x: Tensor, cotangent: Optional[Tensor] = None,
        create_graph: bool = False) -> Tuple[Tensor, Tensor]:
    """(fn(x), cotangent^T J) in reverse mode, with grad enabled locally.  ``cotangent=None`` needs a scalar fn."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        ct = torch.ones_like(y) if cotangent is None else cotangent
        (g,) = torch.autograd.grad(y, xg, ct, create_graph=create_graph, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    return (y if create_graph else y.detach()), g


def grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """d fn(x).sum() / dx (per-sample gradients when fn is a per-sample loss)."""
    return vjp(lambda z: fn(z).sum(), x)[1]


def rademacher(shape: Tuple[int, ...], generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float64, device: Any = None) -> Tensor:
    return (torch.randint(0, 2, shape, generator=generator).to(dtype=dtype, device=device) * 2 - 1)


def hutchinson_trace(fn: Callable[[Tensor], Tensor], x: Tensor, probes: int = 1,
                     generator: Optional[torch.Generator] = None, mode: str = "jvp") -> Tuple[Tensor, Tensor]:
    """Per-sample (mean, standard error) of tr(d fn / dx) from ``probes`` Rademacher vectors v: v . (J v).

    ``mode='jvp'`` uses forward mode (one JVP a probe), ``'vjp'`` reverse mode (one VJP a probe)."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    est = []
    for _ in range(probes):
        v = rademacher(tuple(x.shape), generator, x.dtype, x.device)
        if mode == "jvp":
            _, jv = jvp(fn, (x,), (v,))
        elif mode == "vjp":
            _, jv = vjp(fn, x, v)
        else:
            raise ValueError(f"mode must be 'jvp' or 'vjp', got {mode!r}")
        est.append((v * jv).flatten(1).sum(1))
    e = torch.stack(est)
    se = e.std(0, unbiased=True) / probes**0.5 if probes > 1 else torch.full_like(e[0], float("nan"))
    return e.mean(0), se


def exact_trace(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Per-sample tr(d fn / dx) by one JVP per dimension (small dimensions)."""
    flat = x.flatten(1)
    d = flat.shape[1]
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(d):
        e = torch.zeros_like(flat)
        e[:, j] = 1
        _, jv = jvp(fn, (x,), (e.reshape(x.shape),))
        tr = tr + jv.flatten(1)[:, j]
    return tr
