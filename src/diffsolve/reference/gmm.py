"""Exact reference: a mixture of low-rank-plus-isotropic Gaussians (MoLRG).

  x0 ~ sum_k pi_k N(mu_k, U_k diag(s_k^2) U_k^T + delta^2 I),   U_k: d x r orthonormal

(the data model of "Diffusion models learn low-dimensional distributions via subspace
clustering", Wang et al. 2024).  Under any affine process the noisy marginal is again such a
mixture, so the posterior mean E[x0 | x_t] (the ideal denoiser), eps, the score and the
log-density are available in closed form; the Woodbury identity keeps everything O(K d r).

Everything is computed in the 'VE view' x~ = x/alpha, s = sigma/alpha: the posterior depends on
(x~, s) only, and the probability-flow ODE reads dx~/d(log s) = x~ - E[x0 | x~, s], which is
integrated here with an adaptive 8th-order Runge-Kutta (DOP853) to rtol <= 1e-10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters.denoiser import Denoiser, outputs_from
from ..processes import NoiseProcess
from ..sampling.analytic import GaussianStart

Tensor = torch.Tensor
DT = torch.float64


class ClosedFormPrior:
    """A prior whose noisy marginals are closed form in the VE view (x~ = x / alpha, s = sigma / alpha): a subclass
    gives ``denoise_ve`` (E[x0 | x~]), ``log_prob_ve`` (log p of the data convolved with N(0, s^2 I)), ``sample``,
    ``shape`` and ``dim``; this base derives the exact (x0, eps) of any process, the score, the exact model, the
    clean log-density and the probability-flow ODE solved to rtol 1e-10."""

    shape: Tuple[int, ...]
    dim: int

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1).to(DT)

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        raise NotImplementedError

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x0: Tensor) -> Tensor:
        """Exact log-density of clean data."""
        return self.log_prob_ve(x0, 0.0)

    def check_process(self, process: NoiseProcess) -> None:
        """A clear error when this reference has no closed form under ``process``'s kernel (default: Gaussian
        kernels only; ``PointCloud`` also has PFGM++'s)."""
        if not getattr(process, "gaussian", True):
            raise ValueError(f"{type(self).__name__} is closed form under Gaussian kernels only, not under "
                             f"{process!r} (for PFGM++ use reference.PointCloud.for_process)")

    @staticmethod
    def offset_term(process: NoiseProcess, t: Union[float, Tensor], y: Optional[Tensor], like: Tensor) -> Tensor:
        """b(t) y for a process with an offset (``Shifted``; y is required there), else 0 (shaped like ``like``)."""
        if process.offset_key is None:
            return torch.zeros_like(like)
        if y is None:
            raise ValueError(f"the process {process!r} has an offset: pass its conditioning y")
        t = torch.as_tensor(t, dtype=DT)
        b = process.offset(t)
        b = b.reshape((-1,) + (1,) * (like.dim() - 1)) if t.dim() else b
        return b.to(like) * y.to(like)

    def posterior(self, x: Tensor, process: NoiseProcess, t: Union[float, Tensor],
                  y: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Exact (x0, eps) predictions at x_t = alpha x0 + b(t) y + sigma eps (b = 0 unless the process is
        ``Shifted``, whose conditioning ``y`` is then required)."""
        self.check_process(process)
        t = torch.as_tensor(t, dtype=DT)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = process.alpha(t), process.sigma(t)
        if t.dim():
            a, s = a.reshape(shape), s.reshape(shape)
        x = x.to(DT) - self.offset_term(process, t, y, x.to(DT))
        sv = (s / a).flatten() if t.dim() else s / a
        x0 = self.denoise_ve(x / a, sv)
        return x0, (x - a * x0) / s

    def score(self, x: Tensor, process: NoiseProcess, t, y: Optional[Tensor] = None) -> Tensor:
        x0, eps = self.posterior(x, process, t, y)
        return -eps / process.sigma(torch.as_tensor(t, dtype=DT))

    def noise_level_logits(self, x: Tensor, sigmas: Tensor, log_prior: Optional[Tensor] = None) -> Tensor:
        """log p(sigma_k | x~) up to a constant [B, K] for VE-view states x~ and noise levels ``sigmas`` [K]:
        log p_{sigma_k}(x~) + log prior_k (uniform prior by default); Denoising MCMC's exact sigma step."""
        sig = torch.as_tensor(sigmas, dtype=DT).flatten()
        out = torch.stack([self.log_prob_ve(x, float(s)) for s in sig], -1)
        return out if log_prior is None else out + torch.as_tensor(log_prior, dtype=DT)[None]

    def network(self, process: NoiseProcess, prediction: str = "x0",
                sigma_data: Optional[float] = None) -> Callable[[Tensor, Tensor], Tensor]:
        """A 'network' net(x, t) that outputs the exact ``prediction`` (t: process time, shape [B]).

        A preconditioned prediction ('edm') sees what an EDM network sees, as ``Denoiser`` feeds it: the input
        c_in x~ and the time c_noise = log(sigma/alpha) / 4 (``sigma_data``: the process's, else 0.5).  For a
        ``Shifted`` process the network reads its conditioning from the keyword ``process.offset_key``."""
        from ..adapters.parameterisation import edm_coefficients, get_parameterisation

        pre = get_parameterisation(prediction).preconditioned
        sd = float(sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5))

        def net(x: Tensor, t: Tensor, **kw: object) -> Tensor:
            t = torch.as_tensor(t, dtype=DT)
            shape = (-1,) + (1,) * (x.dim() - 1)
            xs = x.to(DT)
            if pre:  # undo the preconditioning: x = alpha x~, x~ = input / c_in
                s_ve = torch.exp(4 * t)
                t = process.t_of_sigma_ve(s_ve)
                xs = xs / edm_coefficients(s_ve, sd)["c_in"].reshape(shape) * process.alpha(t).reshape(shape)
            y = kw.get(process.offset_key) if process.offset_key is not None else None
            x0, eps = self.posterior(xs, process, t, y)  # type: ignore[arg-type]
            return outputs_from(x0, eps, process, t.reshape(shape), prediction, sigma_data=sd,
                                y=y).to(x.dtype)  # type: ignore[arg-type]

        return net

    def denoiser(self, process: NoiseProcess, prediction: str = "x0") -> Denoiser:
        """The exact model wrapped as a ``Denoiser`` (float64)."""
        return Denoiser(self.network(process, prediction), process, prediction, dtype=DT)

    # ------------------------------------------------------------------------------
    def ode_solve_ve(self, x_start: Tensor, sigma_start: float, sigma_end: float, rtol: float = 1e-10,
                     atol: float = 1e-12) -> Tensor:
        """Probability-flow ODE from x~ at sigma_start to sigma_end (both > 0), adaptive DOP853."""
        from scipy.integrate import solve_ivp

        shape = x_start.shape
        y0 = x_start.reshape(-1).to(DT).numpy().copy()

        def rhs(u, y):
            xt = torch.from_numpy(y).reshape(shape)
            return (xt - self.denoise_ve(xt, math.exp(u))).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(sigma_start), math.log(sigma_end)), y0, method="DOP853",
                        rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)

    def ode_solution(self, process: NoiseProcess, x_start: Tensor, t_start: float, t_end: float,
                     rtol: float = 1e-10, check: bool = False, y: Optional[Tensor] = None):
        """Exact x at ``t_end`` on the probability-flow ODE through x_start at ``t_start``.

        With ``check=True`` also returns the max abs difference to a solve at rtol/2 (an error bar).  For a
        ``Shifted`` process (conditioning ``y``) the solve runs in the standard frame x - b(t) y and returns x.
        """
        self.check_process(process)
        ts, te = torch.tensor(float(t_start), dtype=DT), torch.tensor(float(t_end), dtype=DT)
        a_s, a_e = float(process.alpha(ts)), float(process.alpha(te))
        z = (x_start.to(DT) - self.offset_term(process, ts, y, x_start.to(DT))) / a_s
        s_s, s_e = float(process.sigma_ve(ts)), float(process.sigma_ve(te))
        end = self.offset_term(process, te, y, z)
        out = self.ode_solve_ve(z, s_s, s_e, rtol) * a_e + end
        if not check:
            return out
        out2 = self.ode_solve_ve(z, s_s, s_e, rtol / 2) * a_e + end
        return out, float((out2 - out).abs().max())



class GaussianMixture(ClosedFormPrior):
    """MoLRG reference distribution with closed-form denoiser (all float64).

    Args:
        means: [K, d] component means.
        bases: [K, d, r] orthonormal columns (the low-rank subspaces).
        scales: [K, r] standard deviations along the subspace directions.
        delta: isotropic standard deviation (> 0, keeps the density finite).
        weights: [K] mixture weights (normalised here).
        shape: the data shape (prod(shape) = d); samples are returned as [n, *shape].
    """

    def __init__(self, means: Tensor, bases: Tensor, scales: Tensor, delta: float,
                 weights: Optional[Tensor] = None, shape: Optional[Sequence[int]] = None):
        self.means = torch.as_tensor(means, dtype=DT)
        self.bases = torch.as_tensor(bases, dtype=DT)
        self.scales = torch.as_tensor(scales, dtype=DT)
        K, d = self.means.shape
        if self.bases.shape[:2] != (K, d) or self.scales.shape != (K, self.bases.shape[2]):
            raise ValueError("means [K,d], bases [K,d,r] and scales [K,r] do not match")
        if delta <= 0:
            raise ValueError("delta must be > 0")
        w = torch.ones(K, dtype=DT) if weights is None else torch.as_tensor(weights, dtype=DT)
        self.log_weights = torch.log(w / w.sum())
        self.delta = float(delta)
        self.shape = tuple(shape) if shape is not None else (d,)
        if int(np.prod(self.shape)) != d:
            raise ValueError(f"shape {self.shape} does not have {d} elements")
        self.dim, self.n_components, self.rank = d, K, self.bases.shape[2]

    @classmethod
    def random(cls, dim: int = 64, n_components: int = 4, rank: Optional[int] = None, delta: float = 0.1,
               mean_std: float = 0.3, component_std: float = 0.4, seed: int = 0,
               shape: Optional[Sequence[int]] = None) -> "GaussianMixture":
        """A random MoLRG whose coordinates have roughly unit-interval spread (images in [-1, 1])."""
        g = torch.Generator().manual_seed(seed)
        r = rank if rank is not None else max(1, min(8, dim // 2))
        means = mean_std * torch.randn(n_components, dim, generator=g, dtype=DT)
        bases = torch.linalg.qr(torch.randn(n_components, dim, r, generator=g, dtype=DT))[0]
        s = component_std * math.sqrt(dim / r)
        scales = s * (0.5 + torch.rand(n_components, r, generator=g, dtype=DT))
        weights = 0.5 + torch.rand(n_components, generator=g, dtype=DT)
        return cls(means, bases, scales, delta, weights, shape)

    @classmethod
    def toy2d(cls, n_components: int = 8, radius: float = 2.0, std: float = 0.25, delta: float = 0.05) -> "GaussianMixture":
        """Elongated Gaussians on a ring: a 2-D picture-friendly reference."""
        ang = torch.arange(n_components, dtype=DT) * 2 * math.pi / n_components
        means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        tang = torch.stack([-torch.sin(ang), torch.cos(ang)], 1)[:, :, None]
        return cls(means, tang, torch.full((n_components, 1), std, dtype=DT), delta)

    # ------------------------------------------------------------------------------
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.rank, generator=generator, dtype=DT) * self.scales[k]
        iso = self.delta * torch.randn(n, self.dim, generator=generator, dtype=DT)
        x = self.means[k] + torch.einsum("ndr,nr->nd", self.bases[k], z) + iso
        return x.reshape(n, *self.shape)

    def _components(self, xf: Tensor, s2: Tensor):
        """Per-component log N(x~; mu_k, Sigma_k + s2 I) and E[x0 | x~, k] (xf: [B, d], s2 scalar or [B])."""
        s2 = torch.as_tensor(s2, dtype=DT).reshape(-1, 1, 1) if torch.as_tensor(s2).dim() else torch.as_tensor(s2, dtype=DT)
        c = self.delta**2 + s2  # isotropic variance
        r = xf[:, None, :] - self.means[None]  # [B, K, d]
        proj = torch.einsum("bkd,kdr->bkr", r, self.bases)  # [B, K, r]
        lam2 = self.scales[None] ** 2  # [1, K, r]
        a = lam2 / (c + lam2)
        sq = (r * r).sum(-1) - (a * proj * proj).sum(-1)  # [B, K]
        c1 = c.reshape(-1, 1) if isinstance(c, Tensor) and c.dim() else c
        maha = sq / c1
        logdet = self.dim * torch.log(torch.as_tensor(c1, dtype=DT)) + torch.log1p(lam2 / c).sum(-1)
        logp = -0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))
        v = (r - torch.einsum("kdr,bkr->bkd", self.bases, a * proj)) / c  # C^{-1} r
        coef = lam2 * proj * (1 - a) / c  # s^2 U^T v
        mean = self.means[None] + torch.einsum("kdr,bkr->bkd", self.bases, coef) + self.delta**2 * v
        return logp, mean

    def log_prob_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        """log p(x~) of the data convolved with N(0, sigma_ve^2 I)."""
        logp, _ = self._components(self._flat(x), torch.as_tensor(sigma_ve, dtype=DT) ** 2)
        return torch.logsumexp(logp + self.log_weights, -1)

    def denoise_ve(self, x: Tensor, sigma_ve: Union[float, Tensor]) -> Tensor:
        """E[x0 | x~ = x0 + sigma_ve * eps] in closed form; x [B, *shape]."""
        xf = self._flat(x)
        logp, mean = self._components(xf, torch.as_tensor(sigma_ve, dtype=DT) ** 2)
        w = torch.softmax(logp + self.log_weights, -1)
        return torch.einsum("bk,bkd->bd", w, mean).reshape(x.shape)

    def gaussian_ode_solution(self, process: NoiseProcess, x_start: Tensor, t_start: float, t_end: float) -> Tensor:
        """Closed-form ODE solution for a single Gaussian (K = 1): along each principal direction
        x~ - mu scales by sqrt((v + s_end^2) / (v + s_start^2)), v the data variance there (``GaussianStart``)."""
        if self.n_components != 1:
            raise ValueError("the closed-form ODE solution needs a single Gaussian (n_components=1)")
        g = GaussianStart(self.means[0].reshape(self.shape), self.bases[0], self.scales[0] ** 2 + self.delta**2,
                          iso=self.delta**2)
        return g.solve(process, x_start.to(DT), t_start, t_end)


@dataclass
class ExactTargets:
    """Where a sampler can stop, and the exact answer for each: the ODE state at t_min, and that
    state denoised by the exact posterior mean (the NFE -> inf limit of a final jump to clean data)."""

    t_min: float
    at_t_min: Tensor
    denoised: Tensor

    def for_grid(self, clean_end: bool) -> Tensor:
        return self.denoised if clean_end else self.at_t_min


def exact_targets(ref: ClosedFormPrior, process: NoiseProcess, x_start: Tensor, t_start: Optional[float] = None,
                  t_end: Optional[float] = None, rtol: float = 1e-10, y: Optional[Tensor] = None) -> ExactTargets:
    """The exact ODE state at ``t_end`` (t_min) from ``x_start`` at ``t_start`` (t_max) and its posterior mean (for a
    ``Shifted`` process, x_start and the state at t_end include the offset b(t) y)."""
    t_start = process.t_max if t_start is None else t_start
    t_end = process.t_min if t_end is None else t_end
    x_end = ref.ode_solution(process, x_start, t_start, t_end, rtol, y=y)
    x0, _ = ref.posterior(x_end, process, t_end, y)
    return ExactTargets(t_end, x_end, x0)
