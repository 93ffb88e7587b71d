"""Oracle guidance: the model's prior prediction plus the *exact* likelihood term of a Gaussian-mixture problem,

    x0 = x0_hat(x_t) + gamma_t grad_{x_t} log p_t(y | x_t)   (``ExactPosterior.guidance``),

so that with the exact prior model the wrapper is the exact posterior denoiser, and with a learned model the
remaining error is the model's, not the guidance approximation's.  No VJPs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from ...adapters.denoiser import Model, ModelWrapper, Prediction
from ..exact import ExactPosterior
from ..guided import gamma

Tensor = torch.Tensor


class Oracle(ModelWrapper):
    name = "oracle"
    needs_gradients = False

    def __init__(self, model: Model, posterior: ExactPosterior):
        super().__init__(model)
        if not isinstance(posterior, ExactPosterior):
            raise TypeError("oracle guidance needs the ExactPosterior of the problem (prior=... in inverse.sample)")
        self.posterior = posterior
        self.vjps = 0

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        pred = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        g = self.posterior.guidance(x.to(torch.float64), self.process, t).to(x.dtype)
        return Prediction(x, pred.alpha, pred.sigma, x0=pred.x0 + gamma(pred.alpha, pred.sigma) * g)
