"""The shared part of posterior-guidance wrappers: a model whose x0 prediction is corrected towards a measurement.

By Tweedie's formula E[x0 | x_t, y] = E[x0 | x_t] + gamma_t grad_{x_t} log p_t(y | x_t), gamma_t = sigma_t^2 / alpha_t;
each method approximates the likelihood term differently.  A wrapper returns the corrected x0 (its eps follows
from x = alpha x0 + sigma eps), so it reaches every solver of the library, and it counts its vector-Jacobian
products (``vjps``, per sample) next to the inner model's evaluations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch

from ..adapters.denoiser import Model, ModelWrapper, Prediction
from .exact import check_measurement
from .operators import Operator

Tensor = torch.Tensor
DT = torch.float64


@dataclass
class Tape:
    """One evaluation with its graph: the state ``xg`` (requires grad), the prediction, x0 and A(x0)."""

    xg: Tensor
    pred: Prediction
    x0: Tensor
    y_hat: Tensor

    def vjp(self, out: Tensor, wrt: Tensor, v: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(out, wrt, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(wrt) if g is None else g


class Guided(ModelWrapper):
    """Base of the measurement-guided models: ``correction(tape, t)`` returns the x0 correction."""

    name = "guided"
    needs_gradients = True

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float):
        super().__init__(model)
        self.op, self.y, self.sigma_y = op, check_measurement(op, y, sigma_y, batch=True), float(sigma_y)
        self.vjps = 0

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.name, "sigma_y": self.sigma_y, "operator": type(self.op).__name__}

    def _residual(self, y_hat: Tensor) -> Tensor:
        return self.y.to(y_hat.dtype) - y_hat

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        kwargs = kwargs if kwargs is not None else {}
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pred = self.inner.evaluate(xg, t, kwargs, coeffs)
            x0 = pred.x0
            if not x0.requires_grad:
                raise TypeError(f"{self.name} needs gradients through the model, but its x0 prediction has no "
                                "graph (a model wrapped in no_grad, or a non-differentiable network)")
            tape = Tape(xg, pred, x0, self.op.forward(x0))
            dx0 = self.correction(tape, pred.alpha, pred.sigma)
        return Prediction(x, _detach(pred.alpha), _detach(pred.sigma), x0=(x0 + dx0).detach())

    def correction(self, tape: Tape, alpha: Any, sigma: Any) -> Tensor:
        raise NotImplementedError

    def count(self, n: int = 1) -> None:
        self.vjps += n


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, Tensor) else v


def gamma(alpha: Any, sigma: Any) -> Any:
    """gamma_t = sigma_t^2 / alpha_t (Tweedie: Cov[x0 | x_t] = gamma_t J_t)."""
    return _detach(sigma) ** 2 / _detach(alpha)


def flat_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner products [B, 1...] of two batches."""
    return (a * b).flatten(1).sum(1).reshape((-1,) + (1,) * (a.dim() - 1))


def conjugate_gradient(apply: Callable[[Tensor], Tensor], b: Tensor, iterations: int,
                       on_iteration: Optional[Callable[[], None]] = None) -> Tensor:
    """Per-sample conjugate gradients for apply(x) = b (apply symmetric positive definite), from x = 0."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = flat_dot(r, r)
    for _ in range(iterations):
        Ap = apply(p)
        if on_iteration is not None:
            on_iteration()
        pAp = flat_dot(p, Ap)
        a = torch.where(pAp > 0, rr / pAp.clamp_min(1e-300), torch.zeros_like(rr))
        x = x + a * p
        r = r - a * Ap
        rr_new = flat_dot(r, r)
        p = r + torch.where(rr > 0, rr_new / rr.clamp_min(1e-300), torch.zeros_like(rr)) * p
        rr = rr_new
    return x


Pair = Tuple[Tensor, Tensor]


def step_guided_loop(model: Model, noise: Tensor, grid: Any, rng: Any, eta: float, name: str,
                     gradient: Callable[[Tensor, Tensor], Tensor],
                     correct: Callable[[Tensor, Tensor, float, float], Tensor]) -> Tuple[Tensor, int]:
    """The loop of the step-level guidance methods (published DPS, PiGDM): at each grid point one evaluation with
    a graph, ``g = gradient(x_t, x0_hat)`` (one VJP), a DDIM step with tau = eta (1 - (a_t s_s / (a_s s_t))^2)
    (eta = 1: DDPM's ancestral step), then ``x_s = correct(x_s, g, a_s, a_t)``; the x0 prediction at the last
    point (t_min) is the result.  Returns (samples, evaluations)."""
    import math

    x = model.process.prior_from_noise(noise.to(DT))
    n_pts = grid.t.numel()
    if grid.is_clean(n_pts - 1):
        raise ValueError(f"{name} runs on a grid that ends at t_min (final='t_min')")
    for i in range(n_pts):
        a_t, s_t = float(grid.alpha[i]), float(grid.sigma[i])
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            x0 = model.evaluate(xg, float(grid.t[i]), {}, (a_t, s_t)).x0
            if not x0.requires_grad:
                raise TypeError(f"{name} needs gradients through the model, but its x0 prediction has no graph")
            g = gradient(xg, x0)
        x0 = x0.detach()
        if i == n_pts - 1:
            return x0, n_pts
        a_s, s_s = float(grid.alpha[i + 1]), float(grid.sigma[i + 1])
        tau = min(max(eta * (1 - (a_t * s_s / (a_s * s_t)) ** 2), 0.0), 1.0)
        x = a_s * x0 + s_s * math.sqrt(1 - tau) * (x - a_t * x0) / s_t + s_s * math.sqrt(tau) * rng.like(x)
        x = correct(x, g, a_s, a_t)
    return x, n_pts
