"""A 2-D prior per slice with total variation across slices, for 3-D volumes (DiffusionMBIR, Chung et al. 2023,
"Solving 3D inverse problems using pre-trained 2D diffusion models", arXiv:2211.10655).

A volume X [D, *slice] (D slices along the first axis) gets the prior of a frozen 2-D model applied to each slice
independently (``Volume``: the slices are one batch of the model), and the slices are coupled only through the
data term and a total-variation penalty along the slice axis, D_z X = X[1:] - X[:-1].  At every evaluation the
model's x0 prediction X0 (all slices) is replaced by

    X* = argmin_X  ||y - A X||^2 / (2 sigma_y^2) + lam ||X - X0||^2 / (2 s_t^2) + tv ||D_z X||_1

(s_t = sigma_t / alpha_t; with tv = 0 this is DiffPIR's prox on the volume).  Multiplied by sigma_y^2 it is
||y - A X||^2 / 2 + (rho_t / 2) ||X - X0||^2 + tv sigma_y^2 ||D_z X||_1 with rho_t = lam sigma_y^2 / s_t^2, which
``tv_prox`` solves by ADMM on Z = D_z X (mu the penalty):

    X <- (A^T A + rho_t I + mu D_z^T D_z)^{-1} (A^T y + rho_t X0 + mu D_z^T (Z - U))    (conjugate gradients),
    Z <- soft(D_z X + U, tv sigma_y^2 / mu),   U <- U + D_z X - Z.

The paper runs one ADMM iteration per predictor-corrector step with Z, U kept across steps; here ``iterations``
ADMM iterations run from Z = D_z X0, U = 0 at each evaluation, so the result is a function of X0 and usable as an
x0 correction under any solver.  No VJP; one network evaluation per step for the whole volume (D slices).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union, cast

import torch

from ...adapters.denoiser import Model, ModelWrapper, Prediction
from ..exact import check_measurement
from ..guided import conjugate_gradient
from ..operators import Operator

Tensor = torch.Tensor
DT = torch.float64


class Volume(ModelWrapper):
    """A 2-D model as a prior of volumes [B, D, *slice]: every slice denoised independently (one batch of B D)."""

    def __init__(self, inner: Model, depth: int):
        super().__init__(inner)
        if int(depth) != depth or depth < 1:
            raise ValueError(f"a volume needs depth >= 1 slices, got {depth}")
        self.depth = int(depth)
        shape = getattr(inner, "sample_shape", None)
        self.slice_shape = tuple(shape) if shape else None
        self.sample_shape = (self.depth,) + self.slice_shape if self.slice_shape else None

    def describe(self) -> Dict[str, Any]:
        return {"kind": "volume", "depth": self.depth}

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        b, d = x.shape[0], self.depth
        if x.dim() < 2 or x.shape[1] != d:
            raise ValueError(f"volume: expected {d} slices on axis 1, got {list(x.shape)}")
        tt = torch.as_tensor(t, dtype=DT)
        per_sample = tt.dim() > 0
        if per_sample:  # one time per volume -> one per slice
            tt, coeffs = tt.repeat_interleave(d), None
        pred = self.inner.evaluate(x.reshape((b * d,) + tuple(x.shape[2:])), tt, kwargs or {}, coeffs)

        def per_volume(v: Any) -> Any:  # a per-slice coefficient [B D, 1, ...] -> [B, 1, ...]
            if not isinstance(v, Tensor) or v.dim() == 0 or not per_sample:
                return v
            return v.reshape(b, d)[:, :1].reshape((b,) + (1,) * (x.dim() - 1))

        return Prediction(x, per_volume(pred.alpha), per_volume(pred.sigma), x0=pred.x0.reshape(x.shape))


def as_volume(model: Model, op: Operator) -> Model:
    """``model`` as a volume prior when ``op`` acts on volumes of its slices (one more leading axis)."""
    shape = getattr(model, "sample_shape", None)
    if isinstance(model, Volume) or not shape or tuple(op.in_shape[1:]) != tuple(shape):
        return model
    return cast(Model, Volume(model, op.in_shape[0]))


def diff_z(x: Tensor) -> Tensor:
    """D_z x: differences of consecutive slices, [B, D - 1, ...]."""
    return x[:, 1:] - x[:, :-1]


def diff_z_adjoint(v: Tensor) -> Tensor:
    """D_z^T v for v [B, D - 1, ...] -> [B, D, ...]."""
    zero = torch.zeros_like(v[:, :1])
    return torch.cat([zero, v], 1) - torch.cat([v, zero], 1)


def soft(v: Tensor, k: float) -> Tensor:
    """Soft thresholding sign(v) max(|v| - k, 0)."""
    return torch.sign(v) * (v.abs() - k).clamp_min(0.0)


def tv_prox(op: Operator, y: Tensor, x0: Tensor, rho: Union[float, Tensor], tv: float, iterations: int = 30,
            cg_iterations: int = 5, mu: Optional[float] = None) -> Tensor:
    """argmin_X ||y - A X||^2 / 2 + rho ||X - x0||^2 / 2 + tv ||D_z X||_1 by ADMM (see the module docstring);
    x0 [B, D, ...] volumes, rho a number or one per volume.  tv = 0: the exact quadratic prox ``op.prox``."""
    b = x0.shape[0]
    yb = y.expand((b,) + op.out_shape).to(x0.dtype)
    r = torch.as_tensor(rho, dtype=x0.dtype)
    r = r.reshape((-1,) + (1,) * (x0.dim() - 1)) if r.dim() else r
    if tv == 0 or x0.shape[1] < 2:
        return op.prox(x0, yb, rho)
    m = float(mu) if mu is not None else max(float(torch.as_tensor(rho).max()), 1.0)
    rhs0 = op.adjoint(yb) + r * x0
    x, z = x0.clone(), diff_z(x0)
    u = torch.zeros_like(z)
    for _ in range(iterations):
        def normal(v: Tensor) -> Tensor:
            return op.adjoint(op.forward(v)) + r * v + m * diff_z_adjoint(diff_z(v))

        rhs = rhs0 + m * diff_z_adjoint(z - u)
        x = x + conjugate_gradient(normal, rhs - normal(x), cg_iterations)  # warm start at the last x
        dx = diff_z(x)
        z = soft(dx + u, tv / m)
        u = u + dx - z
    return x


class SliceTV(ModelWrapper):
    """The volume model with its x0 prediction replaced by the TV-regularised data-consistent volume."""

    name = "mbir"
    needs_gradients = False

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, lam: float = 1.0, tv: float = 0.02,
                 iterations: int = 10, sigma_floor: float = 1e-3):
        model = as_volume(model, op)
        super().__init__(model)
        if not op.linear:
            raise TypeError("the slice-wise TV solver needs a linear operator (its adjoint)")
        if len(op.in_shape) < 2:
            raise ValueError(f"the slice-wise TV solver acts on volumes [D, ...], the operator on {list(op.in_shape)}")
        if not lam > 0 or tv < 0 or int(iterations) < 1:
            raise ValueError("mbir needs lam > 0, tv >= 0 and iterations >= 1")
        self.op, self.y, self.sigma_y = op, check_measurement(op, y, sigma_y, batch=True), float(sigma_y)
        self.lam, self.tv, self.iterations, self.floor = float(lam), float(tv), int(iterations), float(sigma_floor)
        self.vjps = 0

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.name, "lam": self.lam, "tv": self.tv, "sigma_y": self.sigma_y}

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        pred = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        a = torch.as_tensor(pred.alpha, dtype=DT)
        s = torch.as_tensor(pred.sigma, dtype=DT)
        sy = max(self.sigma_y, self.floor)
        rho = (self.lam * sy**2 / (s / a) ** 2).flatten()
        rho_v = rho if rho.numel() > 1 else float(rho)
        # the data term is divided by sigma_y^2 relative to DiffPIR's scaling: rho and tv are per unit of it
        x0 = tv_prox(self.op, self.y, pred.x0.detach(), rho_v, self.tv * sy**2, self.iterations)
        return Prediction(x, pred.alpha, pred.sigma, x0=x0.to(x.dtype))
