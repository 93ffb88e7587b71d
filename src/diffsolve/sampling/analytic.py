"""Analytic early-step skipping: the closed-form probability-flow ODE of Gaussian data (Wang & Vastola 2023, "Diffusion
models generate images like painters", arXiv:2303.02490; "The hidden linear structure in score-based models",
arXiv:2311.10892).

For data N(mu, Sigma), Sigma = sum_k lam_k u_k u_k^T, the ODE of any Gaussian process is linear: in the VE view
x~ = x/alpha, s = sigma/alpha, the component of x~ - mu along u_k scales by sqrt((lam_k + s_e^2) / (lam_k + s_s^2))
from s_s to s_e.  Early in sampling (s >> the data's spread) a trained model's ODE follows its data's Gaussian one, so
``ds.sample(..., start=GaussianStart.from_data(x), skip=0.25)`` replaces the first quarter of the log-SNR range by this
jump (no network evaluation) and the solver's whole budget goes to the rest.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..processes import NoiseProcess
from ..processes.base import Restricted

Tensor = torch.Tensor
DT = torch.float64


class GaussianStart:
    """N(mean, U diag(variances) U^T + iso (I - U U^T)): ``mean`` [*shape], ``basis`` U [d, r] orthonormal,
    ``variances`` [r] >= 0, ``iso`` >= 0 the variance off span(U) (a full eigenbasis: r = d, iso unused)."""

    def __init__(self, mean: Tensor, basis: Tensor, variances: Tensor, iso: float = 0.0):
        self.mean = torch.as_tensor(mean, dtype=DT)
        self.basis = torch.as_tensor(basis, dtype=DT)
        self.variances = torch.as_tensor(variances, dtype=DT).flatten()
        d = self.mean.numel()
        if self.basis.dim() != 2 or self.basis.shape[0] != d or self.variances.numel() != self.basis.shape[1]:
            raise ValueError(f"basis must be [d, r] = [{d}, r] with r variances; got {tuple(self.basis.shape)} and "
                             f"{self.variances.numel()}")
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.variances).all()):
            raise ValueError("mean and covariance must be finite")
        if (self.variances < 0).any() or iso < 0:
            raise ValueError("variances must be >= 0")
        self.iso = float(iso)

    @classmethod
    def from_moments(cls, mean: Tensor, cov: Tensor) -> "GaussianStart":
        """From a mean [*shape] and a covariance [d, d] (symmetric PSD, eigendecomposed here)."""
        cov = torch.as_tensor(cov, dtype=DT)
        e, U = torch.linalg.eigh(0.5 * (cov + cov.T))
        if float(e.min()) < -1e-8 * max(float(e.abs().max()), 1e-300):
            raise ValueError("the covariance is not positive semi-definite")
        return cls(mean, U, e.clamp_min(0.0))

    @classmethod
    def from_data(cls, x: Tensor) -> "GaussianStart":
        """The Gaussian of samples or data ``x`` [n, *shape] (their mean and covariance, n >= 2)."""
        x = torch.as_tensor(x, dtype=DT)
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError("from_data needs [n, *shape] with n >= 2")
        flat = x.reshape(x.shape[0], -1)
        c = flat - flat.mean(0)
        return cls.from_moments(flat.mean(0).reshape(x.shape[1:]), c.T @ c / (x.shape[0] - 1))

    @property
    def shape(self) -> Sequence[int]:
        return tuple(self.mean.shape)

    def solve(self, process: NoiseProcess, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact ODE solution at ``t_to`` through x at ``t_from`` for this Gaussian (x [B, *shape])."""
        if not getattr(process, "gaussian", True):
            raise ValueError(f"the analytic Gaussian start needs Gaussian marginals; {process!r} has none")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"the start's data shape is {self.shape}, the batch's {tuple(x.shape[1:])}")
        ts, te = torch.tensor(float(t_from), dtype=DT), torch.tensor(float(t_to), dtype=DT)
        a_s, a_e = process.alpha(ts), process.alpha(te)
        s2, e2 = process.sigma_ve(ts) ** 2, process.sigma_ve(te) ** 2
        r = x.to(DT).reshape(x.shape[0], -1) / a_s - self.mean.reshape(1, -1)
        proj = r @ self.basis
        along = torch.sqrt((self.variances + e2) / (self.variances + s2))
        out = (along * proj) @ self.basis.T
        if self.basis.shape[1] < self.basis.shape[0]:
            out = out + torch.sqrt((self.iso + e2) / (self.iso + s2)) * (r - proj @ self.basis.T)
        out = a_e * (self.mean.reshape(1, -1) + out)
        return out.reshape(x.shape).to(x.dtype)

    def switch_time(self, process: NoiseProcess, skip: float) -> float:
        """The process time where a fraction ``skip`` of the log-SNR range [lambda(t_max), lambda(t_min)] is behind."""
        if not 0 <= skip < 1:
            raise ValueError(f"skip must lie in [0, 1) (the skipped fraction of the log-SNR range), got {skip!r}")
        lo, hi = process.lam_range
        if skip == 0:
            return float(process.t_max)
        return float(process.t_of_lam(torch.tensor(lo + skip * (hi - lo), dtype=DT)))


def skipped_fraction(process: NoiseProcess, t_switch: float) -> float:
    """The fraction of the log-SNR range [lambda(t_max), lambda(t_min)] above ``t_switch``."""
    lo, hi = process.lam_range
    return (float(process.lam(torch.tensor(float(t_switch), dtype=DT))) - lo) / (hi - lo)


def truncated_times(process: NoiseProcess, t: Tensor, t_switch: float) -> Tensor:
    """The times ``t`` (from t_max) laid on [t_switch, ...] instead, keeping their relative spacing in log-SNR (a
    grid for the part of the trajectory after an analytic start)."""
    t = torch.as_tensor(t, dtype=DT)
    lam = process.lam(t)
    lo, end = float(process.lam(t[:1])[0]), float(lam[-1])
    new_lo = float(process.lam(torch.tensor(float(t_switch), dtype=DT)))
    out = process.t_of_lam(new_lo + (lam - lo) * (end - new_lo) / (end - lo))
    out[0], out[-1] = float(t_switch), t[-1]
    return out


def restricted(process: NoiseProcess, t_switch: Optional[float]) -> NoiseProcess:
    """``process`` on [t_min, t_switch] (for laying a spacing there), or itself."""
    return process if t_switch is None or t_switch >= process.t_max else Restricted(process, t_switch)


#: diffusers' index spacings round to the training timesteps 0..N-1; on part of the range they are laid as the
#: uniform spacing they round
INDEX_SPACINGS = ("linspace", "leading", "trailing")


def spacing_after_start(spacing: Any) -> Any:
    """The spacing to lay on [t_min, t_switch]: an index spacing becomes 'uniform' (it cannot be truncated)."""
    return "uniform" if isinstance(spacing, str) and spacing in INDEX_SPACINGS else spacing
