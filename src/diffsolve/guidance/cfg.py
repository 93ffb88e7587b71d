"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper.

    D_w(x, t) = D_u(x, t) + w (D_c(x, t) - D_u(x, t))

for x0 and eps alike (both are affine in the network output at fixed x and t, so mixing predictions equals
mixing raw outputs).  Both branches go through the inner model in one batched call.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..adapters.denoiser import Model, ModelWrapper, Prediction

Tensor = torch.Tensor


def _mix(u: Tensor, c: Tensor, w: float) -> Tensor:
    return torch.add(u, c - u, alpha=w)


class ClassifierFreeGuidance(ModelWrapper):
    """``model`` guided with weight ``scale`` (1 = the conditional model alone) against the unconditional
    branch given by ``uncond_kwargs`` (e.g. the null label; a batch-1 value is broadcast)."""

    def __init__(self, model: Model, scale: float, uncond_kwargs: Mapping[str, Any]):
        super().__init__(model)
        if uncond_kwargs is None:
            raise ValueError("classifier-free guidance needs uncond_kwargs (the unconditional inputs)")
        self.scale = float(scale)
        self.uncond_kwargs = dict(uncond_kwargs)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "cfg", "scale": self.scale}

    def identity(self) -> Dict[str, Any]:
        ident = super().identity()
        ident["guidance_scale"] = float(ident.get("guidance_scale", 1.0)) * self.scale
        return ident

    def _both(self, kwargs: Mapping[str, Any], b: int) -> Dict[str, Any]:
        kw: Dict[str, Any] = {}
        for k in set(kwargs) | set(self.uncond_kwargs):
            c, u = kwargs.get(k), self.uncond_kwargs.get(k)
            if not (isinstance(c, Tensor) and isinstance(u, Tensor)):
                raise ValueError(f"guidance needs tensor conditional and unconditional values for {k!r}")
            kw[k] = torch.cat([c, u.expand_as(c) if u.shape[0] == 1 < c.shape[0] else u])
        return kw

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        kwargs = kwargs if kwargs is not None else {}
        if self.scale == 1.0:
            return self.inner.evaluate(x, t, kwargs, coeffs)
        b = x.shape[0]
        tt = torch.as_tensor(t, dtype=torch.float64)
        t2 = torch.cat([tt, tt]) if tt.dim() else tt
        both = self.inner.evaluate(torch.cat([x, x]), t2, self._both(kwargs, b), coeffs)
        a, s = both.alpha, both.sigma
        if isinstance(a, Tensor) and a.dim():
            a, s = a[:b], s[:b]
        if both.native == "eps":
            e = both.eps
            return Prediction(x, a, s, eps=_mix(e[b:], e[:b], self.scale))
        x0 = both.x0
        return Prediction(x, a, s, x0=_mix(x0[b:], x0[:b], self.scale))
