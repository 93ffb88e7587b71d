"""Log-likelihood of data under a frozen model's probability-flow ODE, in nats and bits per dimension.

The model defines a continuous normalising flow (Song et al. 2021, arXiv 2011.13456; Chen et al. 2018): in the VE
view, x~ = x / alpha at noise level s = sigma / alpha, the probability-flow ODE in u = log s is

    dx~/du = x~ - D(x~, s),        d(log p)/du = -div = -(d - tr dD/dx~),

so   log p_start(x) = log p_end(x~_end) + int_{u_start}^{u_end} (d - tr dD/dx~) du,

integrated from the data (t_start, default the process's t_min) to t_max, where the prior (the process's
N(0, prior_scale^2 I) in x) gives log p_end.  The trace is exact (one tangent per dimension, small d) or Hutchinson's
estimate (Hutchinson 1989) with ``probes`` Rademacher vectors per sample, fixed along the path and seeded per sample;
each probe's integral is kept, so the estimate comes with its standard error.  The integrator is our batched
Dormand-Prince 5(4) (``diagnostics.ode``) with a step size per sample, or ``steps=N`` fixed steps for a budget that is
the same for every sample (distributed evaluation cannot hang on one slow rank, k-diffusion issue #79).

Bits per dimension of 8-bit data (``bits_per_dim``): a discrete image k in {0..255}^d with cells of width
Delta = (hi - lo) / 256 in the model's data units [lo, hi] has log P(k) >= E_q[log p(x) - log q(x)] for any density
q inside its cell (the variational-dequantisation bound, Ho et al. 2019, arXiv 1902.00275):

* ``uniform``: q uniform, log q = -d log Delta, so bpd = -log p / (d ln 2) - log2 Delta; the offset -log2 Delta is
  7 for data in [-1, 1] and 8 for [0, 1] (score_sde_pytorch's ``7 - inverse_scaler(-1)``);
* ``truncnorm``: q = N(cell centre, s_q^2 I) truncated to the cell (|z| <= tau = Delta / (2 s_q)), and the ODE starts
  where sigma / alpha = s_q, so the model sees data noised as in training (training-free truncated-normal
  dequantisation, Zheng et al. 2023, i-DODE, arXiv 2305.03935);
* ``none``: the density at the grid points themselves, reported with the same offset (not a bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..adapters.denoiser import Model
from .core import (
    DT,
    DiagnosticError,
    batches,
    check_data,
    check_model,
    divergence_mode,
    probes_for,
    sample_seeds,
    select_kwargs,
    sigma_of,
    value_and_trace,
    ve_denoiser,
    ve_time,
)
from .ode import integrate

Tensor = torch.Tensor
LN2 = math.log(2.0)
DEQUANTIZATIONS = ("uniform", "truncnorm", "none")


@dataclass
class Likelihood:
    """Per-sample results (tensors [B]) of ``log_likelihood`` / ``bits_per_dim``.

    ``log_prob``: nats, of the (dequantised) data in the model's units, or with ``bits_per_dim`` the lower bound on
    log P of the 8-bit image (dequantisation term included); ``stderr``: its Hutchinson standard error (0 when
    exact); ``bpd``: bits per dimension (with the 8-bit offset for ``bits_per_dim``); ``nfe``: drift evaluations
    per sample, each costing ``passes_per_eval`` network passes (one forward-mode pass per tangent)."""

    log_prob: Tensor
    stderr: Tensor
    bpd: Tensor
    nfe: Tensor
    prior_log_prob: Tensor
    delta_log_prob: Tensor
    latent: Tensor
    dim: int
    passes_per_eval: int
    divergence: str
    probes: int
    t_start: float
    t_end: float
    dequantization: str = "continuous"
    offset_bits: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def nll(self) -> Tensor:
        return -self.log_prob

    @property
    def bpd_stderr(self) -> Tensor:
        return self.stderr / (self.dim * LN2)

    def summary(self) -> Dict[str, Any]:
        """Means over the batch (and their standard errors over samples) as a JSON-able dict."""
        n = self.bpd.numel()
        sd = float(self.bpd.std()) / math.sqrt(n) if n > 1 else float("nan")
        return {"samples": n, "dim": self.dim, "nll_nats": float(self.nll.mean()),
                "nll_nats_per_dim": float(self.nll.mean()) / self.dim, "bpd": float(self.bpd.mean()),
                "bpd_se_over_samples": sd, "bpd_hutchinson_se": float(self.bpd_stderr.mean()),
                "nfe_mean": float(self.nfe.double().mean()), "nfe_max": int(self.nfe.max()),
                "network_passes_per_eval": self.passes_per_eval, "divergence": self.divergence,
                "probes": self.probes, "t_start": self.t_start, "t_end": self.t_end,
                "dequantization": self.dequantization, "offset_bits": self.offset_bits, **self.extra}


def gaussian_prior_log_prob(model: Model, x: Tensor, t: float) -> Tensor:
    """log N(x; 0, prior_scale^2 I) per sample: the process's prior, the density assumed at t_end."""
    d = x[0].numel()
    v = float(model.process.prior_scale) ** 2
    return -0.5 * (x.flatten(1).pow(2).sum(1) / v + d * math.log(2 * math.pi * v))


def log_likelihood(model: Model, x: Tensor, divergence: str = "auto", probes: int = 1, seed: int = 0,
                   seeds: Optional[Sequence[int]] = None, rtol: float = 1e-5, atol: float = 1e-5,
                   steps: Optional[int] = None, t_start: Optional[float] = None, t_end: Optional[float] = None,
                   prior_log_prob: Optional[Callable[[Tensor, float], Tensor]] = None,
                   model_kwargs: Optional[Mapping[str, Any]] = None, batch_size: Optional[int] = None,
                   progress: bool = False, max_rows: int = 4096) -> Likelihood:
    """log p(x) [B] in nats under the model's probability-flow ODE (see the module doc).

    Args:
        model: a ``ds.Model`` (its prediction must be differentiable in its input).
        x: data [B, *sample_shape] in the model's units (continuous; see ``bits_per_dim`` for 8-bit data).
        divergence: 'exact', 'hutchinson' or 'auto' (exact up to 256 numbers per sample).
        probes: Hutchinson probes per sample (>= 2 for a standard error).
        seed / seeds: per-sample seeds of the probes (``seeds``: one per sample; default ``seed``-derived).
        rtol / atol: local error tolerances of the adaptive solve; ``steps``: N fixed steps instead (6N + 1 NFE).
        t_start / t_end: where the data sit and where the prior is assumed (default t_min / t_max).
        prior_log_prob: ``(x_end, t_end) -> [B]`` log-density of the marginal at t_end in process units (default the
            Gaussian prior ``gaussian_prior_log_prob``).
        model_kwargs: network inputs (a tensor with one row per sample is split with the batch).
        batch_size: samples integrated together (None: all).
        progress: a progress bar over the u-range.
    """
    model = check_model(model)
    x = check_data(model, x)
    proc = model.process
    b = x.shape[0]
    d = x[0].numel()
    mode = divergence_mode(divergence, d)
    if mode == "hutchinson" and (not isinstance(probes, int) or probes < 1):
        raise DiagnosticError(f"probes must be an integer >= 1, got {probes!r}")
    k = 1 if mode == "exact" else probes
    ts = proc.t_min if t_start is None else float(t_start)
    te = proc.t_max if t_end is None else float(t_end)
    if not proc.t_min <= ts < te <= proc.t_max:
        raise DiagnosticError(f"need t_min <= t_start < t_end <= t_max, got t_start={ts:g}, t_end={te:g} for "
                              f"[{proc.t_min:g}, {proc.t_max:g}]")
    s0, s1 = float(sigma_of(proc, ts)), float(sigma_of(proc, te))
    a_end = float(proc.alpha(torch.tensor(te, dtype=DT)))
    kwargs = dict(model_kwargs or {})
    sseeds = sample_seeds(b, seed, seeds)
    den = ve_denoiser(model, kwargs)
    prior = prior_log_prob or (lambda z, t: gaussian_prior_log_prob(model, z, t))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=100.0, desc="likelihood", unit="%", leave=False,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}]")
    outs = []
    try:
        for sl in batches(b, batch_size):
            outs.append(_solve(model, den, x[sl], kwargs, b, torch.arange(sl.start, sl.stop), mode, k,
                               sseeds[sl], s0, s1, rtol, atol, steps, max_rows, bar))
    finally:
        if bar is not None:
            bar.close()
    x_end = torch.cat([o[0] for o in outs])
    per_probe = torch.cat([o[1] for o in outs])  # [B, k]
    nfe = torch.cat([o[2] for o in outs])
    x_proc = a_end * x_end
    lp_prior = prior(x_proc, te).to(DT) + d * math.log(a_end)  # density of x~ = x / alpha
    delta = per_probe.mean(1)
    se = per_probe.std(1) / math.sqrt(k) if k > 1 else torch.zeros(b, dtype=DT)
    if mode == "hutchinson" and k == 1:
        se = torch.full((b,), float("nan"), dtype=DT)
    logp = lp_prior + delta
    return Likelihood(log_prob=logp, stderr=se, bpd=-logp / (d * LN2), nfe=nfe, prior_log_prob=lp_prior,
                      delta_log_prob=delta, latent=x_proc, dim=d, passes_per_eval=(d if mode == "exact" else k),
                      divergence=mode, probes=0 if mode == "exact" else k, t_start=ts, t_end=te)


def _solve(model: Model, den, x: Tensor, kwargs: Dict[str, Any], batch: int, rows: Tensor, mode: str, k: int,
           seeds: Sequence[int], s0: float, s1: float, rtol: float, atol: float, steps: Optional[int],
           max_rows: int, bar) -> Tuple[Tensor, Tensor, Tensor]:
    m = x.shape[0]
    shape = tuple(x.shape[1:])
    d = x[0].numel()
    probes = probes_for(seeds, k, shape) if mode == "hutchinson" else None

    def rhs(u: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        xs = y[:, :d].reshape(-1, *shape)
        s = torch.exp(u)
        n = xs.shape[0]
        kw_rows = rows[idx]

        def fn(z: Tensor) -> Tensor:
            reps = z.shape[0] // n
            kw = select_kwargs(kwargs, batch, kw_rows, reps)
            return ve_denoiser(model, kw)(z, s.repeat(reps))

        pr = probes[:, idx] if probes is not None else None
        dval, tr = value_and_trace(fn, xs, pr, max_rows, "the likelihood")
        dx = (xs - dval).reshape(n, d)
        return torch.cat([dx, d - tr], 1)

    y0 = torch.cat([x.reshape(m, d), torch.zeros(m, k, dtype=DT)], 1)
    y1, nfe = integrate(rhs, math.log(s0), math.log(s1), y0, rtol=rtol, atol=atol, steps=steps, split=d,
                        progress=bar)
    return y1[:, :d].reshape(m, *shape), y1[:, d:], nfe


def flow(model: Model, x: Tensor, sigma_from: float, sigma_to: float, rtol: float = 1e-6, atol: float = 1e-6,
         steps: Optional[int] = None, model_kwargs: Optional[Mapping[str, Any]] = None) -> Tensor:
    """The probability-flow ODE in the VE view: x~ at noise level ``sigma_from`` -> x~ at ``sigma_to`` (either
    direction), by the same integrator as the likelihood (no divergence)."""
    kwargs = dict(model_kwargs or {})
    b, shape = x.shape[0], tuple(x.shape[1:])
    d = x[0].numel()
    rows = torch.arange(b)

    def rhs(u: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        xs = y.reshape(-1, *shape)
        return (xs - ve_denoiser(model, select_kwargs(kwargs, b, rows[idx]))(xs, torch.exp(u))).reshape(-1, d)

    y, _ = integrate(rhs, math.log(sigma_from), math.log(sigma_to), x.reshape(b, d).to(DT), rtol=rtol, atol=atol,
                     steps=steps)
    return y.reshape(b, *shape)


# ----------------------------------------------------------------------------------------
# 8-bit data: dequantisation and bits per dimension
# ----------------------------------------------------------------------------------------
def offset_bits(data_range: Tuple[float, float] = (-1.0, 1.0), bits: int = 8) -> float:
    """-log2 of the cell width: what bits/dim of the continuous density gain to become bits/dim of the
    ``bits``-bit image (7 for [-1, 1], 8 for [0, 1], 0 for [0, 255] at 8 bits)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise DiagnosticError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
    return bits - math.log2(hi - lo)


def quantize(x: Tensor, data_range: Tuple[float, float] = (-1.0, 1.0), bits: int = 8, tol: float = 1e-3) -> Tensor:
    """The integer levels k in 0..2^bits - 1 of data on the grid lo + (hi - lo) k / (2^bits - 1) (how the data sets map
    bytes to [-1, 1]); integer tensors are taken as levels.  Data off that grid or out of range are refused."""
    levels = 2**bits - 1
    if not x.is_floating_point():
        k = x.to(torch.int64)
        if int(k.min()) < 0 or int(k.max()) > levels:
            raise DiagnosticError(f"integer data must lie in 0..{levels}, got [{int(k.min())}, {int(k.max())}]")
        return k
    lo, hi = float(data_range[0]), float(data_range[1])
    if not torch.isfinite(x).all():
        raise DiagnosticError("x contains NaN or inf")
    v = (x.to(DT) - lo) / (hi - lo) * levels
    k = v.round()
    off = float((v - k).abs().max())
    if float(v.min()) < -tol or float(v.max()) > levels + tol or off > tol:
        raise DiagnosticError(f"x is not {bits}-bit data in {tuple(data_range)} (values off the grid by up to "
                              f"{off:.3g} levels); pass data_range= or dequantization='none' for continuous data")
    return k.clamp(0, levels).to(torch.int64)


def dequantize(k: Tensor, kind: str, seeds: Sequence[int], data_range: Tuple[float, float] = (-1.0, 1.0),
               bits: int = 8, sigma: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """(x [B, *S] in data units, log q(x) [B]) of the levels ``k``: 'uniform' in each cell, 'truncnorm' N(centre,
    sigma^2) truncated to the cell, 'none' the grid points (with the uniform log q = -d log Delta, so that
    -(log p - log q) / (d ln 2) is bits/dim of the grid-point density plus the 8-bit offset)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    cells = 2**bits
    width = (hi - lo) / cells
    d = k[0].numel()
    if kind == "none":  # the grid points, scored as if uniformly dequantised (a density, not a bound)
        return lo + (hi - lo) * k.to(DT) / (cells - 1), torch.full((k.shape[0],), -d * math.log(width), dtype=DT)
    gens = [torch.Generator().manual_seed(int(s) * 1_000_003 + 424_242) for s in seeds]
    if kind == "uniform":
        u = torch.stack([torch.rand(tuple(k.shape[1:]), generator=g, dtype=DT) for g in gens])
        return lo + width * (k.to(DT) + u), torch.full((k.shape[0],), -d * math.log(width), dtype=DT)
    if kind == "truncnorm":
        if sigma is None or not sigma > 0:
            raise DiagnosticError(f"truncnorm dequantisation needs sigma > 0, got {sigma}")
        tau = width / (2 * sigma)
        z = torch.stack([_truncated_normal(tuple(k.shape[1:]), tau, g) for g in gens])
        log_z = math.log(math.erf(tau / math.sqrt(2)))
        logq = (-0.5 * z.flatten(1).pow(2).sum(1) - d * (0.5 * math.log(2 * math.pi) + math.log(sigma) + log_z))
        return lo + width * (k.to(DT) + 0.5) + sigma * z, logq
    raise DiagnosticError(f"unknown dequantization {kind!r}; use one of {DEQUANTIZATIONS}")


def _truncated_normal(shape: Tuple[int, ...], tau: float, g: torch.Generator) -> Tensor:
    """Standard normal numbers conditioned on |z| <= tau, by inverting the CDF."""
    lo = 0.5 * (1 + math.erf(-tau / math.sqrt(2)))
    u = lo + (1 - 2 * lo) * torch.rand(shape, generator=g, dtype=DT)
    z = math.sqrt(2) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-16, 1 - 1e-16))
    return z.clamp(-tau, tau)


def bits_per_dim(model: Model, x: Tensor, dequantization: str = "uniform", data_range: Tuple[float, float] = (-1.0, 1.0),
                 bits: int = 8, tau: float = 3.0, repeats: int = 1, seed: int = 0, **kwargs: Any) -> Likelihood:
    """Bits per dimension of ``bits``-bit data ``x`` (levels as integers, or floats on the data sets' grid in
    ``data_range``) under the model's probability-flow ODE, with ``dequantization`` 'uniform', 'truncnorm' (cell
    half-width / ``tau`` standard deviations, the ODE starting at that noise level; never below the process's
    t_min) or 'none'; averaged over ``repeats`` dequantisation draws.  ``kwargs`` go to ``log_likelihood``."""
    model = check_model(model)
    if dequantization not in DEQUANTIZATIONS:
        raise DiagnosticError(f"unknown dequantization {dequantization!r}; use one of {DEQUANTIZATIONS}")
    if not isinstance(repeats, int) or repeats < 1:
        raise DiagnosticError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise DiagnosticError("x must be a tensor [batch, *sample_shape]")
    k = quantize(x, data_range, bits)
    proc = model.process
    offset = offset_bits(data_range, bits)
    width = (float(data_range[1]) - float(data_range[0])) / 2**bits
    sigma_q = None
    if dequantization == "truncnorm":
        if not tau > 0:
            raise DiagnosticError(f"tau must be > 0, got {tau}")
        s_min = float(sigma_of(proc, proc.t_min))
        sigma_q = max(width / (2 * tau), s_min)
        kwargs.setdefault("t_start", float(ve_time(proc, sigma_q)) if sigma_q > s_min else proc.t_min)
    runs = []
    for r in range(repeats):
        seeds = sample_seeds(k.shape[0], seed * 7_919 + r, None)
        xd, logq = dequantize(k, dequantization, seeds, data_range, bits, sigma_q)
        ll = log_likelihood(model, xd.to(DT), seed=seed + 31 * r, **kwargs)
        runs.append((ll, logq))
    d = runs[0][0].dim
    bound = torch.stack([ll.log_prob - logq for ll, logq in runs]).mean(0)  # log P(k) >= E[log p - log q]
    first = runs[0][0]
    stderr = torch.stack([ll.stderr for ll, _ in runs]).pow(2).mean(0).sqrt() / math.sqrt(repeats)
    extra = {"repeats": repeats, "data_range": list(map(float, data_range)), "bits": bits}
    if sigma_q is not None:
        extra.update({"truncnorm_sigma": sigma_q, "truncnorm_tau": width / (2 * sigma_q)})
    return Likelihood(log_prob=bound, stderr=stderr, bpd=-bound / (d * LN2),
                      nfe=torch.stack([ll.nfe for ll, _ in runs]).sum(0), prior_log_prob=first.prior_log_prob,
                      delta_log_prob=first.delta_log_prob, latent=first.latent, dim=d,
                      passes_per_eval=first.passes_per_eval, divergence=first.divergence, probes=first.probes,
                      t_start=first.t_start, t_end=first.t_end, dequantization=dequantization, offset_bits=offset,
                      extra=extra)
