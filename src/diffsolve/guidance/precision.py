"""Precision-weighted guidance (CogDPM, Chen et al. 2024, arXiv:2405.02384) as a wrapper of any guided model.

Predictive coding weighs a prediction error by its precision.  CogDPM estimates, per pixel, how predictable the
sample is from the diffusion model's own hierarchy of predictions: where the x0 predictions made along the
trajectory keep changing, the data are unpredictable (low precision); there it puts more of the guidance.  Here,
with x0_hat^(1..k) the model's (unguided) x0 predictions at the last k evaluations of a run and

    u = Var_window[x0_hat] + floor       (per pixel; the inverse precision),
    w = u^p / mean_pixels(u^p)           (per sample: the guidance's total strength is kept),

the guided prediction x0_g of the wrapped model becomes x0_hat + w * (x0_g - x0_hat).  Before the window has two
predictions w = 1 (the wrapped model unchanged); ``power`` p = 0 is the wrapped model exactly.  The paper's
guidance is classifier-free; the wrapper takes any guided model whose ``inner`` is the base model (measurement
guidance of ``diffsolve.inverse``, classifier guidance, or classifier-free guidance, whose unconditional half is
the base prediction), and costs no extra network evaluation: the base prediction is recorded as it is made.

The exact form of the paper's precision estimate and weighting could not be read here (its text was not
available offline); the rule above follows its description: the variance of the x0 predictions along the
sampling hierarchy, inverted, weighting the guidance per pixel.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, Mapping, Optional, Union, cast

import torch

from ..adapters.denoiser import Model, ModelWrapper, Prediction

Tensor = torch.Tensor


class _Recorder(ModelWrapper):
    """The base model, remembering its last prediction."""

    def __init__(self, inner: Model):
        super().__init__(inner)
        self.last: Optional[Prediction] = None

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        self.last = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        return self.last


class PrecisionWeighted(ModelWrapper):
    """``guided`` (a wrapper whose ``inner`` is the base model) with its guidance weighted per pixel by the
    inverse precision of the base model's recent x0 predictions (see the module docstring)."""

    def __init__(self, guided: ModelWrapper, window: int = 3, power: float = 1.0, floor: float = 1e-4):
        if not isinstance(guided, ModelWrapper):
            raise TypeError("precision weighting wraps a guided model (a ModelWrapper around the base model)")
        if int(window) != window or window < 2:
            raise ValueError(f"the precision window needs >= 2 predictions, got {window}")
        if power < 0 or not floor > 0:
            raise ValueError("precision weighting needs power >= 0 and floor > 0")
        super().__init__(cast(Model, guided))
        self.recorder = _Recorder(guided.inner)
        guided.inner = cast(Model, self.recorder)
        self.window, self.power, self.floor = int(window), float(power), float(floor)
        self.history: Deque[Tensor] = deque(maxlen=self.window)
        self._last_t: Optional[float] = None

    def describe(self) -> Dict[str, Any]:
        return {"kind": "precision-weighted", "window": self.window, "power": self.power}

    @property
    def vjps(self) -> int:
        return int(getattr(self.inner, "vjps", 0))

    def weights(self) -> Optional[Tensor]:
        """The current per-pixel weights [B, ...] (mean 1 per sample), or None before two predictions."""
        if len(self.history) < 2 or self.power == 0:
            return None
        u = torch.stack(list(self.history)).var(0, correction=1) + self.floor
        w = u**self.power
        return w / w.flatten(1).mean(1).reshape((-1,) + (1,) * (w.dim() - 1))

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        tv = float(torch.as_tensor(t, dtype=torch.float64).flatten()[0])
        if self._last_t is None or tv > self._last_t or (self.history and self.history[-1].shape != x.shape):
            self.history.clear()  # a new run
        self._last_t = tv
        out = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        base = self.recorder.last
        if base is None:
            raise RuntimeError("the guided model did not evaluate its base model")
        x0_base = base.x0.detach()
        b = x.shape[0]
        if x0_base.shape[0] == 2 * b:  # classifier-free guidance: the unconditional half is the base
            x0_base = x0_base[b:]
        self.history.append(x0_base.to(x.dtype))
        w = self.weights()
        if w is None:
            return out
        x0 = x0_base.to(out.x0.dtype) + w.to(out.x0.dtype) * (out.x0.detach() - x0_base.to(out.x0.dtype))
        return Prediction(x, out.alpha, out.sigma, x0=x0)
