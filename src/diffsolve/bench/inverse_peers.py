"""The peers of ``diffsolve bench --inverse``, each on the same frozen model, operator, measurement, start noise and
budget as ours:

* azula's DPS, PiGDM, MMPS, TMPD, DiffPIR and TDS, run through azula's own code (github.com/probabilists/azula,
  installed with ``pip install --no-deps azula``): our model wrapped as an azula ``Denoiser`` whose schedule is our
  process, azula's samplers on their own uniform time grid from t_max to t_min.  Network calls and VJPs are counted
  on the wrapper (a VJP is a backward pass through its output), not assumed;
* MCGdiff as published (Cardoso et al. 2023, arXiv:2308.07983), written from the official particle filter's
  equations (github.com/gabrielvc/mcg_diff, ``particle_filter.mcg_diff``): there is no installable package.  VP
  processes with a discrete schedule (``VPDiscrete``) only, as the official code.

DDRM and DAPS need no peer code: ``ds.inverse``'s are the papers' equations (DAPS with its Langevin loop replaced by
the exact Gaussian conditional it targets, the peer's best case).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..adapters.denoiser import Model
from ..inverse.operators import Operator

Tensor = torch.Tensor
DT = torch.float64
VJP_COST = 2.0


def azula_available() -> bool:
    try:
        import azula  # noqa: F401
    except ImportError:
        return False
    return True


class Counter:
    """Network calls and VJPs of one peer run (each counts once per batch call: per sample)."""

    def __init__(self) -> None:
        self.nfe = self.vjps = 0


class _CountVJP(torch.autograd.Function):
    """The identity, counting the backward passes (VJPs) through the network's output."""

    @staticmethod
    def forward(ctx, x, counter):  # type: ignore[override]
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        ctx.counter.vjps += 1
        return g, None


def azula_denoiser(model: Model, counter: Optional[Counter] = None):
    """``model`` as an azula ``Denoiser`` (mean = our x0 prediction; schedule = our process's alpha, sigma)."""
    from azula.denoise import Denoiser, DiracPosterior
    from azula.noise import Schedule

    process = model.process

    class _Schedule(Schedule):
        def __call__(self, t):
            t = torch.as_tensor(t, dtype=DT)
            return process.alpha(t), process.sigma(t)

    class _Denoiser(Denoiser):
        def __init__(self):
            super().__init__()
            self.schedule = _Schedule()

        def forward(self, x_t, t, **kwargs):
            x0 = model.evaluate(x_t, torch.as_tensor(t, dtype=DT), kwargs).x0
            if counter is not None:
                counter.nfe += 1
                if x0.requires_grad:
                    x0 = _CountVJP.apply(x0, counter)
            return DiracPosterior(mean=x0)

    return _Denoiser()


# --------------------------------------------------------------------------------------------------------------
# azula runs


def _azula_run(name: str, model: Model, op: Operator, y: Tensor, sigma_y: float, x_T: Tensor, nfe: float,
               seed: int, opts: Dict[str, Any]) -> Tuple[Tensor, Counter]:
    with warnings.catch_warnings():  # azula scripts helpers with torch.jit, which torch 2.13 deprecates
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        return _azula_sample(name, model, op, y, sigma_y, x_T, nfe, seed, opts)


def _azula_sample(name: str, model: Model, op: Operator, y: Tensor, sigma_y: float, x_T: Tensor, nfe: float,
                  seed: int, opts: Dict[str, Any]) -> Tuple[Tensor, Counter]:
    from azula.guidance import DiffPIRDenoiser, DPSSampler, MMPSDenoiser, PGDMSampler, TDSSampler, TMPDenoiser
    from azula.linalg.covariance import IsotropicCovariance
    from azula.sample import DDIMSampler

    count = Counter()
    den = azula_denoiser(model, count)
    p = model.process
    yv = y.reshape(op.out_shape).to(DT)
    A = op.forward
    grid: Dict[str, Any] = {"start": p.t_max, "stop": p.t_min, "silent": True, "dtype": DT}
    iters = int(opts.get("iterations", 1))
    per_step = {"dps": 3, "pigdm": 3, "tds": 3, "tmpd": 5, "diffpir": 1, "mmps": 1 + VJP_COST * (iters + 1)}[name]
    steps = int(nfe // per_step)
    if steps < 1:
        raise ValueError(f"a budget of {nfe} NFE-equivalents does not fit one step of azula's {name}")
    grid["steps"] = steps
    eta = float(opts.get("eta", 0.0))
    if name == "dps":
        sampler = DPSSampler(den, yv, A, zeta=float(opts["zeta"]), **grid)
    elif name == "pigdm":
        def pinv(v: Tensor) -> Tensor:  # azula applies it to y alone and to a batch
            return op.pinv(v.reshape((-1,) + op.out_shape))

        sampler = PGDMSampler(den, yv, A, pinv, eta=eta, **grid)
    elif name == "tds":
        def twist(x_hat: Tensor, s: Tensor) -> Tensor:  # the TDS paper's twist N(y; A x0_hat, (sigma_y^2 + S^2) I)
            var = sigma_y**2 + s**2
            r = yv - A(x_hat)
            return -0.5 * (r * r).flatten(1).sum(1) / var - 0.5 * r[0].numel() * torch.log(2 * math.pi * var)

        sampler = TDSSampler(den, twist, **grid)
    else:
        if name == "mmps":
            guided = MMPSDenoiser(den, yv, A, IsotropicCovariance(torch.tensor(sigma_y**2, dtype=DT)),
                                  iterations=iters)
        elif name == "tmpd":
            guided = TMPDenoiser(den, yv, A, sigma_y**2)
        else:
            guided = DiffPIRDenoiser(den, yv, A, sigma_y**2, lmbda=float(opts.get("lmbda", 10.0)))
        sampler = DDIMSampler(guided, eta=eta, **grid)
    torch.manual_seed(seed)  # azula draws from the global generator
    x = sampler(x_T.to(DT))
    return x.detach(), count


AZULA = ("dps", "pigdm", "mmps", "tmpd", "diffpir", "tds")


# --------------------------------------------------------------------------------------------------------------
# MCGdiff as published


def paper_timesteps(alphas_cumprod: Tensor, s: Tensor, n: int, var: float) -> List[int]:
    """The official singular-value-adapted time steps (``get_optimal_timesteps_from_singular_values``): equal drops
    of sqrt(alphas_cumprod) from index 0 down to where it falls below 1e-2, plus the indices tau_i where the
    diffusion noise equals the measurement noise of coordinate i (var * ac = (1 - ac) s_i^2), then a linear ramp
    of indices to the last one; about ``n`` indices, increasing."""
    ac = alphas_cumprod
    N = ac.numel()
    dist = (var * ac[None] - (1 - ac)[None] * s[:, None] ** 2).abs()
    opt = sorted({int(i) for i in dist.argmin(1).tolist()} - {0})
    sq = ac.sqrt()
    below = torch.nonzero(sq < 1e-2)
    end = int(below[0]) if below.numel() else N - 1
    inc = float(sq[0] - sq[end]) / max(n - 1 - len(opt), 1)
    ts, last = [0], float(sq[0])
    for i in range(1, end):
        if last - float(sq[i]) >= inc or i in opt:
            ts.append(i)
            last = float(sq[i])
    rest = max(n - len(ts) + 1, 2)
    ts += [int(v) for v in torch.ceil(torch.linspace(ts[-1], N - 1, rest, dtype=DT)).tolist()[1:]]
    return sorted(set(ts))


def mcgdiff_paper(model: Model, op: Operator, y: Tensor, sigma_y: float, x_T: Tensor, nfe: float,
                  generator: torch.Generator, eta: float = 0.85, kappa: float = 1e-4,
                  particles: int = 1000) -> Tuple[Tensor, Counter]:
    """MCGdiff with the official filter's update, resampling and weights, ``particles`` per filter (the rows of
    ``x_T`` are split into filters of that size); each filter ends with one multinomial draw per particle from its
    final weights.  Returns the samples [n, d] (at the grid's last time, as the official code)."""
    p = model.process
    ac_all = getattr(p, "alphas_cumprod", None)
    if ac_all is None or abs(float(p.t_max) - (ac_all.numel() - 1)) > 0:
        raise TypeError("the published MCGdiff runs on a discrete VP schedule (VPDiscrete)")
    U, s, V = (v.to(DT) for v in op.svd())
    ybar = y.reshape(-1).to(DT) @ U  # U^T y
    var = float(sigma_y) ** 2
    ts = paper_timesteps(ac_all, s, int(nfe) + 1, var)
    tt = torch.tensor(ts, dtype=torch.long)
    ac = ac_all[tt]
    dist = (var * ac[None] - (1 - ac)[None] * s[:, None] ** 2).abs() * (var > 0)
    tau_idx = dist.argmin(1)  # per observed coordinate: its index on the grid
    ac_tau = ac[tau_idx]
    y_res = ac_tau.sqrt() * ybar / s  # the rescaled observation: a draw of the coordinate at tau
    count = Counter()
    out = []
    for start in range(0, x_T.shape[0], particles):
        x = x_T[start:start + particles].reshape(-1, op.in_dim).to(DT).clone()
        N = x.shape[0]
        k_min = int(tau_idx.min())

        def pot(xb: Tensor, k: int, extra: Tensor | float = 0.0) -> Tensor:
            """log of the bridge potential of the coordinates active at grid index k (k >= tau)."""
            act = k >= tau_idx
            r = ac[k] / ac_tau[act]
            sd2 = extra + 1 - (1 - kappa) * r
            return -0.5 * ((xb[:, act] - y_res[act] * r.sqrt()) ** 2 / sd2).sum(1)

        for k in range(len(ts) - 1, k_min, -1):  # filtering: t = ts[k] -> t_prev = ts[k - 1]
            a_t, a_p = ac[k], ac[k - 1]
            x0 = _x0(model, x, float(ts[k]), op, count)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            noise = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
            mean = (a_p / a_t).sqrt() * x + ((1 - a_p - noise**2).sqrt() - (a_p / a_t).sqrt() * (1 - a_t).sqrt()) * eps
            xb, mb = x @ V, mean @ V
            logw = pot(mb, k - 1, noise**2) - pot(xb, k)
            anc = torch.multinomial(torch.softmax(logw, 0), N, replacement=True, generator=generator)
            z = torch.randn(x.shape, generator=generator, dtype=DT)
            new = mean[anc] + noise * z
            act = (k - 1) >= tau_idx
            if act.any():
                r = a_p / ac_tau[act]
                bridge = 1 - (1 - kappa) * r
                gain = noise**2 / (noise**2 + bridge).clamp_min(1e-10)
                obs = gain * y_res[act] * r.sqrt() + (1 - gain) * mb[anc][:, act] + (bridge * gain).sqrt() * (z @ V[:, act])
                new = new + (obs - new @ V[:, act]) @ V[:, act].T
            x = new
        logw = -pot(x @ V, k_min)
        if k_min > 0:  # below the first tau: the unconditional DDIM, then the likelihood of the clean particles
            for k in range(k_min, 0, -1):
                a_t, a_p = ac[k], ac[k - 1]
                x0 = _x0(model, x, float(ts[k]), op, count)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                noise = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
                x = ((a_p / a_t).sqrt() * x + ((1 - a_p - noise**2).sqrt() - (a_p / a_t).sqrt() * (1 - a_t).sqrt())
                     * eps + noise * torch.randn(x.shape, generator=generator, dtype=DT))
            logw = logw - 0.5 * ((s * (x @ V) - ybar) ** 2).sum(1) / max(var, 1e-300)
        pick = torch.multinomial(torch.softmax(logw, 0), N, replacement=True, generator=generator)
        out.append(x[pick])
    count.nfe //= math.ceil(x_T.shape[0] / particles)  # every filter evaluates each of its particles once a step
    return torch.cat(out).reshape(x_T.shape), count


def _x0(model: Model, x: Tensor, t: float, op: Operator, count: Counter) -> Tensor:
    count.nfe += 1
    with torch.no_grad():
        x0 = model.evaluate(x.reshape((-1,) + op.in_shape), torch.tensor(t, dtype=DT), {}).x0
    return x0.reshape(x.shape).to(DT)


PeerRunner = Callable[..., Tuple[Tensor, Counter]]
