"""Classifier guidance (Dhariwal & Nichol 2021, arXiv:2105.05233) as a model wrapper.

Guidance adds w grad_{x_t} log p(c | x_t) to the score; by Tweedie's formula that moves the x0 prediction by
gamma_t w grad log p(c | x_t), gamma_t = sigma_t^2 / alpha_t.  Two classifiers are supported:

* ``noisy=True``: a classifier of noisy states, ``classifier(x_t, t) -> logits`` (trained on x_t);
* ``noisy=False`` (default): a classifier of clean data evaluated at the model's x0 prediction,
  log p(c | x_t) ~ log p_phi(c | x0_hat(x_t)); its gradient flows through the network (one VJP per evaluation).

``labels`` are the wanted classes ([B] LongTensor, or one int for every sample).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from ..adapters.denoiser import Model, ModelWrapper, Prediction

Tensor = torch.Tensor


class ClassifierGuidance(ModelWrapper):
    def __init__(self, model: Model, classifier: Callable[..., Tensor], labels: Union[int, Tensor], scale: float = 1.0,
                 noisy: bool = False):
        super().__init__(model)
        if not callable(classifier):
            raise TypeError("classifier must be callable: classifier(x) -> logits (or classifier(x_t, t) when noisy)")
        self.classifier, self.scale, self.noisy = classifier, float(scale), bool(noisy)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.vjps = 0

    def describe(self) -> Dict[str, Any]:
        return {"kind": "classifier", "scale": self.scale, "noisy": self.noisy}

    def _dtype(self, v: Tensor) -> torch.dtype:
        """The classifier's parameter dtype when it is a module (float32 networks get float32 input), else v's."""
        if isinstance(self.classifier, torch.nn.Module):
            p = next(iter(self.classifier.parameters()), None)
            if p is not None:
                return p.dtype
        return v.dtype

    def _labels(self, b: int) -> Tensor:
        lab = self.labels
        if lab.dim() == 0:
            return lab.expand(b)
        if lab.shape != (b,):
            raise ValueError(f"classifier guidance: {lab.numel()} labels for a batch of {b}")
        return lab

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        kwargs = kwargs if kwargs is not None else {}
        if self.scale == 0.0:
            return self.inner.evaluate(x, t, kwargs, coeffs)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pred = self.inner.evaluate(xg if not self.noisy else x, t, kwargs, coeffs)
            inp = xg if self.noisy else pred.x0
            if not self.noisy and not inp.requires_grad:
                raise TypeError("classifier guidance on x0 needs gradients through the model (its x0 has no graph)")
            inp = inp.to(self._dtype(inp))
            logits = self.classifier(inp, t) if self.noisy else self.classifier(inp)
            logp = torch.log_softmax(logits.double(), -1).gather(1, self._labels(x.shape[0])[:, None].to(logits.device))
            (g,) = torch.autograd.grad(logp.sum(), xg)
        self.vjps += 1
        a, s = pred.alpha, pred.sigma
        a = a.detach() if isinstance(a, Tensor) else a
        s = s.detach() if isinstance(s, Tensor) else s
        return Prediction(x, a, s, x0=pred.x0.detach() + self.scale * (s**2 / a) * g.to(x.dtype))
