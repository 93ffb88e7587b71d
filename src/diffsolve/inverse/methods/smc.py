"""Sequential Monte Carlo in the operator's spectral basis: the engine of MCGdiff and AFDPS, and the resampling
shared by every particle method (TDS too).

With A = U diag(s) V^T (r singular values > 0), the VE view x~ = x / alpha at noise level S_t = sigma_t / alpha_t
and the observed coordinates x_bar = V^T x~, the measurement reads y_bar_i = x_bar0_i + rho_i n_i with
y_bar = diag(1/s) U^T y and rho_i = sigma_y / s_i.  A method of this family is a *twist schedule*: per grid point k
and observed coordinate i, a Gaussian potential g_k,i(x_bar_i) = N(x_bar_i; y_bar_i, w_k,i) (w = inf: none), one of
which, at the coordinate's *pin* k_i, is *final*: it stays in the target, which is then

    p(x_{0:K}) prod_i N(y_bar_i; x_bar_{k_i}, i, w_{k_i, i}),   with S_{k_i}^2 + w_{k_i, i} = rho_i^2,

i.e. the measurement re-written as an observation of the state at t_{k_i} (x~_t = x~0 + S_t eps): its x0-marginal
is p(x0 | y) exactly, up to the prior's reverse kernels.  The other potentials are twists (look-aheads) that
cancel.  Every step t_k -> t_{k+1} is one network evaluation per particle:

* prior kernel (DDIM with ``eta``; eta = 1 is DDPM): x~' ~ N(m, v I), m = x0_hat + sqrt(S'^2 - v) eps_hat,
  v = eta^2 S'^2 (1 - S'^2 / S^2);
* fully adapted proposal: the observed coordinates of x~' drawn from N(m_i, v) N(y_bar_i; ., w_{k+1, i}) exactly
  (Kalman gain v / (v + w));
* weight (it depends on x~ only, so resampling comes first):
  log w += sum_i log N(y_bar_i; m_i, v + w_{k+1, i}) - sum_{i twisted at k} log N(y_bar_i; x_bar_i, w_{k, i});
* systematic (or multinomial) resampling when the effective sample size falls below ``ess`` x N, and once at the
  end.  The start draws the potentials of k = 0 exactly from N(0, S_0^2 I) x g_0.

No VJP.  ``oversample`` = N / n particles per output sample (a step costs N evaluations, so n outputs at
``oversample`` o cost o network calls per sample and step; the budget counts them).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from ...adapters.denoiser import Model
from ...grids import TimeGrid
from ...solvers.state import Noise
from ..exact import check_measurement
from ..operators import Operator

Tensor = torch.Tensor
DT = torch.float64
LOG2PI = math.log(2 * math.pi)


def systematic_resample(logw: Tensor, u: float, n: Optional[int] = None) -> Tensor:
    """``n`` (default: as many as weights) indices of a systematic resampling of the normalised weights exp(logw),
    offset u in [0, 1)."""
    w = torch.softmax(logw, 0)
    n = w.numel() if n is None else int(n)
    c = torch.cumsum(w, 0)
    c[-1] = 1.0
    pos = (torch.arange(n, dtype=DT) + u) / n
    return torch.searchsorted(c, pos).clamp_max(w.numel() - 1)


def ess(logw: Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2."""
    w = torch.softmax(logw, 0)
    return float(1.0 / (w * w).sum())


def resample(logw: Tensor, generator: torch.Generator, n: Optional[int] = None, scheme: str = "systematic") -> Tensor:
    """Ancestor indices by ``scheme`` ('systematic' or 'multinomial'); non-finite log-weights count as zero."""
    if not torch.isfinite(logw).any():
        raise ValueError("every particle has zero weight (the measurement is far from the prior)")
    logw = torch.where(torch.isfinite(logw), logw, torch.full_like(logw, -math.inf))
    n = logw.numel() if n is None else int(n)
    if scheme == "multinomial":
        return torch.multinomial(torch.softmax(logw, 0), n, replacement=True, generator=generator)
    return systematic_resample(logw, float(torch.rand((), generator=generator, dtype=DT)), n)


def spectral_basis(op: Operator, method: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(U [m, r], s [r], V [d, r]) of a linear operator, or a clear error when it has none."""
    if not op.linear:
        raise TypeError(f"{method} needs a linear operator with an SVD (A = U diag(s) V^T); "
                        f"{type(op).__name__} is non-linear")
    try:
        U, S, V = op.svd()
    except (NotImplementedError, TypeError, RuntimeError) as e:
        raise TypeError(f"{method} needs the operator's SVD (A = U diag(s) V^T), and {type(op).__name__} gives "
                        f"none: {e}") from e
    if S.numel() == 0:
        raise ValueError(f"{method}: the operator observes nothing (no singular value > 0)")
    return U.to(DT), S.to(DT), V.to(DT)


def _log_normal(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """sum over the last axis of log N(x; mean, var) (var broadcast; entries with var = inf contribute 0)."""
    fin = torch.isfinite(var)
    v = torch.where(fin, var, torch.ones_like(var))
    lp = -0.5 * ((x - mean) ** 2 / v + torch.log(v) + LOG2PI)
    return torch.where(fin, lp, torch.zeros_like(lp)).sum(-1)


class SpectralSMC:
    """The engine; subclasses give the twist schedule (``schedule``) and may move grid points (``adapt_grid``)."""

    name = "spectral-smc"

    def __init__(self, model: Model, op: Operator, y: Tensor, sigma_y: float, eta: float = 1.0, ess: float = 0.5,
                 oversample: int = 1, resampling: str = "systematic", analytic: bool = True, start: int = 0):
        self.model, self.op, self.sigma_y = model, op, float(sigma_y)
        self.y = check_measurement(op, y, sigma_y)
        if not 0 <= eta <= 1:
            raise ValueError(f"{self.name}: eta must lie in [0, 1], got {eta}")
        if not 0 < ess <= 1:
            raise ValueError(f"{self.name}: the ess threshold must lie in (0, 1], got {ess}")
        if int(oversample) < 1:
            raise ValueError(f"{self.name}: oversample must be an integer >= 1, got {oversample}")
        if resampling not in ("systematic", "multinomial"):
            raise ValueError(f"{self.name}: resampling must be 'systematic' or 'multinomial', got {resampling!r}")
        U, s, self.V = spectral_basis(op, self.name)
        self.s = s
        self.y_bar = (self.y.reshape(-1) @ U) / s  # [r]
        self.rho2 = (self.sigma_y / s) ** 2  # [r]: the measurement noise of each observed coordinate
        self.eta, self.ess, self.oversample, self.resampling = float(eta), float(ess), int(oversample), resampling
        self.analytic = bool(analytic)
        if int(start) < 0:
            raise ValueError(f"{self.name}: start (quadrature nodes of the start's weight) must be >= 0, got {start}")
        self.start = int(start)
        self.nfe = self.vjps = self.resamplings = 0
        self.trace: List[Tuple[float, float]] = []  # (S_k, effective sample size before the step's resampling)

    # -- to be given by a method ------------------------------------------------------------------------------
    def adapt_grid(self, grid: TimeGrid, n: int) -> TimeGrid:
        """The grid the method runs on, for ``n`` output samples (the number of points must not grow)."""
        return grid

    def schedule(self, S: Tensor) -> Tuple[Tensor, Tensor]:
        """(w [K, r], final [K, r]): twist variances per grid point (VE noise levels ``S``, decreasing) and
        observed coordinate (inf: no potential), and which of them are final (one per coordinate, with
        S_k^2 + w = rho^2)."""
        raise NotImplementedError

    def denoised_twist(self, xb: Tensor, x0b: Tensor, logw: Tensor, k: int, S: Tensor) -> Optional[Tensor]:
        """log G_k per particle from the observed coordinates of the state ``xb`` and of its x0 prediction ``x0b``
        ([N, r]) at grid point k (``logw``: the particles' weights so far), when
        the method's twist uses the denoiser; then ``schedule`` gives the proposal's surrogate potentials only (no
        final ones) and G_{K-1} is the measurement's likelihood.  None: the twist is the schedule's."""
        return None

    def prepare(self, x: Tensor, grid: TimeGrid) -> None:
        """Called once with the start particles (a method may estimate what its twist needs)."""

    def overhead(self, n: int) -> int:
        """Network evaluations per output sample spent outside the grid (the grid loses as many points)."""
        return self.start * self.oversample

    def _start_weight(self, x: Tensor, grid: TimeGrid) -> Tensor:
        """log p_T(x~) - log q(x~) + const for the start q = N(0, I / alpha_T^2) (VE view): the model's score
        difference (x0_hat(x~) - x~) / S^2 + alpha^2 x~ integrated along the ray u x~, u in [0, 1], by
        ``start``-point Gauss-Legendre quadrature (one evaluation per node)."""
        u, wq = np.polynomial.legendre.leggauss(self.start)
        S0, a0 = float(grid.sigma[0] / grid.alpha[0]), float(grid.alpha[0])
        acc = torch.zeros(x.shape[0], dtype=DT)
        for node, weight in zip((u + 1) / 2, wq / 2):
            acc = acc + float(weight) * (x * self._x0(float(node) * x, grid, 0)).sum(1)
        return acc / S0**2 - 0.5 * (x * x).sum(1) * (1 / S0**2 - a0**2)

    # -- the engine --------------------------------------------------------------------------------------------
    def _x0(self, xt: Tensor, grid: TimeGrid, k: int) -> Tensor:
        a, sg = float(grid.alpha[k]), float(grid.sigma[k])
        with torch.no_grad():
            x0 = self.model.evaluate((a * xt).reshape((-1,) + self.op.in_shape), float(grid.t[k]), {}, (a, sg)).x0
        self.nfe += self.oversample  # per output sample
        return x0.reshape(xt.shape).to(DT)

    def _resample(self, logw: Tensor, generator: torch.Generator, n: Optional[int] = None) -> Tensor:
        self.resamplings += 1
        return resample(logw, generator, n, self.resampling)

    def _maybe_resample(self, logw: Tensor, S: float, generator: torch.Generator,
                        *rows: Tensor) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        e = ess(logw)
        self.trace.append((S, e))
        if e >= self.ess * logw.numel():
            return logw, rows
        idx = self._resample(logw, generator)
        return torch.zeros_like(logw), tuple(r[idx] for r in rows)

    def run(self, noise: Tensor, grid: TimeGrid, rng: Noise, generator: torch.Generator) -> Tensor:
        """n samples from standard normal ``noise`` [n, ...] on ``grid`` (ending at t_min, one evaluation per point;
        the result is the x0 prediction of the last point after the final resampling).  The particles share
        ``generator`` (they interact); ``rng`` is unused."""
        n = noise.shape[0]
        grid = thin_grid(self.adapt_grid(grid, n), self.model.process, math.ceil(self.overhead(n) / self.oversample))
        K = grid.t.numel()
        if grid.is_clean(K - 1) or K < 2:
            raise ValueError(f"{self.name} runs on a grid of >= 2 points that ends at t_min (final='t_min')")
        S = grid.sigma / grid.alpha
        w, final = self.schedule(S)
        yb, V = self.y_bar, self.V
        N = n * self.oversample
        z0 = noise.reshape(n, -1).to(DT)
        if N > n:
            z0 = torch.cat([z0, torch.randn(N - n, z0.shape[1], generator=generator, dtype=DT)])
        S0 = float(S[0])
        x = self.model.process.prior_from_noise(z0) / float(grid.alpha[0])  # x~ ~ N(0, S_0^2 I)
        xb = x @ V
        w0 = w[0]
        fin0 = torch.isfinite(w0)
        if fin0.any():  # exact draw from N(0, S_0^2) x g_0 on the observed coordinates
            gain = S0**2 / (S0**2 + w0[fin0])
            new = gain * yb[fin0] + (1 - gain).sqrt() * xb[:, fin0]
            x = x + (new - xb[:, fin0]) @ V[:, fin0].T
        logw = self._start_weight(x, grid) if self.start else torch.zeros(N, dtype=DT)
        self.prepare(x, grid)
        for k in range(K):
            x0 = self._x0(x, grid, k)
            G = self.denoised_twist(x @ V, x0 @ V, logw, k, S)
            St = float(S[k])
            if G is not None:  # the weight of the move into k (of the start at k = 0): G_k / h_k at the new
                logw = logw + G - _log_normal(x @ V, yb, w[k])  # particles; resampled on it
                if k == K - 1:
                    break
                logw, (x, x0, G) = self._maybe_resample(logw, St, generator, x, x0, G)
            if k == K - 1:
                break
            Ss = float(S[k + 1])
            v = self.eta**2 * Ss**2 * max(1.0 - (Ss / St) ** 2, 0.0)
            c = math.sqrt(max(Ss**2 - v, 0.0)) / St
            m = x0 + c * (x - x0)
            if self.analytic:  # the kernel's variance with the x0 uncertainty: + (1 - c)^2 E Var[x0 | x_t]
                eps2 = (((x - x0) / St) ** 2).mean(1)
                r2 = St**2 * max(1.0 - float((torch.softmax(logw, 0) * eps2).sum()), 0.0)
                v = v + (1 - c) ** 2 * r2
            mb, xb = m @ V, x @ V
            wn, wc = w[k + 1], torch.where(final[k], torch.full_like(w[k], math.inf), w[k])
            logw = logw + _log_normal(mb, yb, v + wn) - (_log_normal(xb, yb, wc) if G is None else G)
            if G is None:  # fully adapted: the weight depends on x alone, resample before the move
                logw, (m, mb) = self._maybe_resample(logw, St, generator, m, mb)
            z = torch.randn(m.shape, generator=generator, dtype=DT)
            x = m + math.sqrt(v) * z
            act = torch.isfinite(wn)
            if act.any():  # the observed coordinates from the exact Gaussian product (same noise)
                gain = v / (v + wn[act]) if v > 0 else torch.zeros_like(wn[act])
                new = mb[:, act] + gain * (yb[act] - mb[:, act]) + (v * (1 - gain)).sqrt() * (z @ V[:, act])
                x = x + (new - x @ V[:, act]) @ V[:, act].T
        idx = self._resample(logw, generator, n)
        return x0[idx].reshape(noise.shape)


def pin_points(S: Tensor, rho2: Tensor) -> Tensor:
    """Per observed coordinate, the grid index k_i of its pin: the largest S_k <= rho_i (0 when rho_i >= S_0,
    the last point when rho_i is below every S_k)."""
    below = S[None, :] <= rho2.sqrt()[:, None] * (1 + 1e-12)  # [r, K]
    first = torch.where(below.any(1), below.float().argmax(1), torch.full_like(rho2, S.numel() - 1).long())
    return torch.where(rho2.sqrt() >= S[0], torch.zeros_like(first), first)


def final_variance(S: Tensor, rho2: Tensor, pins: Tensor, floor: float) -> Tensor:
    """w at the pin: rho^2 - S_pin^2 (the rest of the measurement noise), at least ``floor`` x rho^2."""
    return torch.maximum(rho2 - S[pins] ** 2, floor * rho2).clamp_min(1e-300)


def snap_grid(grid: TimeGrid, process, targets: List[float]) -> TimeGrid:
    """``grid`` with the interior points nearest (in log S) to the VE levels ``targets`` moved onto them, as many
    as fit (at most half of the interior points); the number of points is unchanged."""
    S = (grid.sigma / grid.alpha).clone()
    K = S.numel()
    inner = list(range(1, K - 1))
    todo = sorted({float(v) for v in targets if float(S[-1]) < v < float(S[0])}, reverse=True)
    if not todo or len(todo) > len(inner) // 2:
        return grid
    logS = torch.log(S)
    used: set = set()
    for v in todo:
        free = [j for j in inner if j not in used]
        if not free:
            break
        j = min(free, key=lambda i: abs(float(logS[i]) - math.log(v)))
        used.add(j)
        S[j] = v
    S, _ = torch.sort(S, descending=True)
    if not torch.all(S[1:] < S[:-1]):
        return grid
    t = process.t_of_sigma_ve(S)
    t[0], t[-1] = grid.t[0], grid.t[-1]
    return TimeGrid.from_times(process, t, False)


def thin_grid(grid: TimeGrid, process, drop: int) -> TimeGrid:
    """``grid`` without ``drop`` of its interior points (evenly spread), for evaluations spent elsewhere."""
    K = grid.t.numel()
    if drop <= 0:
        return grid
    if K - drop < 2:
        raise ValueError("the budget leaves fewer than 2 grid points")
    out = torch.linspace(1, K - 2, drop + 2, dtype=DT)[1:-1].round().long().tolist() if K > 2 else []
    keep = [i for i in range(K) if i not in set(out)]
    while len(keep) > K - drop:  # rounding collisions
        keep.pop(len(keep) // 2)
    return TimeGrid.from_times(process, grid.t[keep], False)

