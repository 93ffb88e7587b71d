"""One benchmark run = one configuration, scored against the exact answer for where it actually stopped.

* ``CountingNet`` wraps the network: it counts the calls (NFE is what the network saw, never a
  library's step count), times them (wall and CPU), and keeps the last call (input, time, output) so
  that the x0 prediction of the last call can be compared with the run's result.
* ``detect_endpoint`` decides from the run itself where it stopped: it reads the last noise level the
  run reports (``sigmas[-1]``, the DDIM final alpha, our grid's last point); above 0, the run stopped
  there; at 0, the run ended with a jump to clean data if its output equals the x0 prediction of its
  last network call, and otherwise integrated to sigma = 0 (LMS, PLMS to alpha = 1).
* ``Problem`` holds one model, one batch of noise and the reference: the exact Gaussian mixture
  (``ExactReference``: the probability-flow ODE solved to rtol 1e-10, denoised exactly for jumps) or,
  for any other model, a high-NFE solution of the same model (``ModelReference``).
* ``run_ours`` / ``run_peer_config`` run one configuration and return a row with every number and the
  exact configuration.  ``parity`` runs matched pairs (ours and a peer on the same times with the same
  order rule) and ``overhead`` times solver overhead per NFE ours vs the peers for the same algorithm.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..adapters.denoiser import ModelWrapper, with_network
from ..evaluation.teacher import ExactTeacher, ModelTeacher, fine_grid
from ..util.jsonable import jsonable
from . import library as ds
from . import peers as P

Tensor = torch.Tensor
DT = torch.float64
JUMP_TOL = 1e-4  # relative distance to the last x0 prediction below which a run "ended with a jump"
PARITY_FLOAT32 = 1e-4  # parity tolerance against diffusers (float32 schedule and some float32 state, amplified)
PARITY_FLOAT64 = 1e-9  # parity tolerance against k-diffusion (fully float64 here)


# ----------------------------------------------------------------------------------------
# the wrapped network
# ----------------------------------------------------------------------------------------
class CountingNet:
    """``net(x, t, **kw)`` that counts and times its calls and remembers the last one.

    ``record=True`` also keeps a copy of the last input/output (to compute the last x0 prediction
    after the run) and the time of every call; the copying time is kept apart (``book``) so that it
    is neither network time nor solver overhead.
    """

    def __init__(self, net: Callable, record: bool = True):
        self.net, self.record = net, record
        self.reset()

    def reset(self) -> None:
        self.calls, self.time, self.cpu, self.book = 0, 0.0, 0.0, 0.0
        self.last: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        self.times: List[float] = []

    def __call__(self, x: Tensor, t: Tensor, **kwargs) -> Tensor:
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.net(x, t, **kwargs)
        t1 = time.perf_counter()
        self.time += t1 - t0
        self.cpu += time.process_time() - c0
        self.calls += 1
        if self.record:
            tt = torch.as_tensor(t, dtype=DT).reshape(-1)
            self.last = (x.detach().clone(), tt.clone(), out.detach().clone())
            self.times.append(float(tt[0]))
            self.book += time.perf_counter() - t1
        return out


def x0_of_call(process, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x0 prediction (float64) of an epsilon call at VP state x and process times t [B]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    a = process.alpha(t).reshape(shape)
    s = process.sigma(t).reshape(shape)
    return (x.to(DT) - s * eps.to(DT)) / a


# ----------------------------------------------------------------------------------------
# where a run stopped
# ----------------------------------------------------------------------------------------
@dataclass
class Endpoint:
    kind: str  # 'jump' (to clean data), 'stop' (at time t), 'sigma0' (integrated to sigma = 0)
    t: Optional[float] = None
    sigma: float = 0.0  # sigma / alpha where it stopped
    jump_distance: float = float("nan")  # ||out - x0(last call)|| / ||x0(last call)||

    @property
    def label(self) -> str:
        if self.kind == "jump":
            return "jump"
        if self.kind == "sigma0":
            return "sigma=0"
        return f"t={self.t:g}"

    @property
    def key(self) -> Tuple:
        return (self.kind, None if self.t is None else round(self.t, 6))


def snap_time(process, t: float) -> float:
    """Snap a time read back from float32 sigmas to the integer timestep (discrete processes) or to the
    ends of the process range, when it is within float32 round-off of it."""
    if getattr(process, "num_train_timesteps", None) is not None and abs(t - round(t)) < 1e-3:
        return float(round(t))
    for end in (process.t_min, process.t_max):
        if abs(t - end) <= 1e-6 * max(1.0, abs(end)):
            return float(end)
    return t


def detect_endpoint(process, out: Tensor, view: str, last_sigma: float, net: CountingNet,
                    x0_last: Optional[Tensor] = None) -> Tuple[Endpoint, Tensor]:
    """Where the run stopped, and its output as a VP state there (float64).

    ``last_sigma`` (sigma / alpha of the last point, read off the run) > 0: the run stopped at the process
    time with that noise level.  = 0: it reached clean data, by the jump when the output equals the x0
    prediction of the last network call (to JUMP_TOL relative), else by integrating to sigma = 0.
    ``x0_last``: that prediction when the model recorded it (``LastCall``); else it is read off the last call
    of an epsilon network ``net``.
    """
    if x0_last is None:
        if net.last is None:
            raise RuntimeError("the run made no network call")
        x, t, eps = net.last
        x0_last = x0_of_call(process, x, t, eps)
    x0 = x0_last.to(DT)
    o = out.to(DT)
    dist = float((o - x0).norm() / x0.norm().clamp_min(1e-30))
    if last_sigma <= 0.0:  # reached clean data: by the jump, or by integrating there (LMS, PLMS)
        return Endpoint("jump" if dist <= JUMP_TOL else "sigma0", None, 0.0, dist), o
    # stopped at a noise level > 0 (its output may still lie within JUMP_TOL of the last x0 prediction
    # when the last step lands near it; ``jump_distance`` records that)
    tt = float(process.t_of_sigma_ve(torch.tensor(float(last_sigma), dtype=DT)))
    tt = snap_time(process, tt)
    if view == "ve":
        o = o * float(process.alpha(torch.tensor(tt, dtype=DT)))
    return Endpoint("stop", tt, float(last_sigma), dist), o


# ----------------------------------------------------------------------------------------
# references: the exact answer for each endpoint
# ----------------------------------------------------------------------------------------
class ExactReference:
    """Exact targets of the Gaussian-mixture model (``ExactTeacher``): the probability-flow ODE from x_T at t_max
    (adaptive DOP853, rtol 1e-10) to wherever a run stops; its exact posterior mean at t_min for runs that end
    with the jump (the NFE -> infinity limit of every such sampler); and the ODE continued to
    sigma / alpha = 1e-6 for runs that integrate to sigma = 0.  Cached per endpoint."""

    exact = True
    SIGMA0 = 1e-6

    def __init__(self, ref: ds.GaussianMixture, process, x_T: Tensor, rtol: float = 1e-10):
        self.teacher = ExactTeacher(ref, process, rtol, threads=None)
        self.ref, self.process, self.x_T, self.rtol = ref, process, x_T.to(DT), rtol
        t0 = time.perf_counter()
        self.targets = self.teacher.targets(self.x_T)
        self.seconds = time.perf_counter() - t0
        self._cache: Dict[Tuple, Tensor] = {("jump", None): self.targets.denoised,
                                            ("stop", round(process.t_min, 6)): self.targets.at_t_min}
        self._lp: Dict[Tuple, Tensor] = {}

    def error_bar(self, n: int = 4) -> float:
        """max |difference| of the t_min target to a solve at rtol/2 (first n samples)."""
        return self.teacher.error_bar(self.x_T[:n])

    def target(self, ep: Endpoint) -> Tensor:
        key = ep.key
        if key not in self._cache:
            t0 = time.perf_counter()
            if ep.kind == "sigma0":
                self._cache[key] = self.teacher.beyond_t_min(self.targets.at_t_min, self.SIGMA0)
            else:
                self._cache[key] = self.teacher.state_at(self.x_T, ep.t)
            self.seconds += time.perf_counter() - t0
        return self._cache[key]

    def log_prob(self, x: Tensor, ep: Endpoint) -> Tensor:
        """log-density of states at the endpoint: the data mixture (clean), or the exact marginal at t."""
        return self.teacher.log_prob(x, None if ep.kind in ("jump", "sigma0") else ep.t)

    def score(self, x: Tensor, ep: Endpoint) -> Dict[str, float]:
        target = self.target(ep)
        out = _errors(x, target)
        if ep.key not in self._lp:
            self._lp[ep.key] = self.log_prob(target, ep)
        d = x[0].numel()
        diff = (self._lp[ep.key] - self.log_prob(x, ep)) / d
        out["llgap"] = float(diff.mean())
        out["llgap_se"] = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else float("nan")
        return out


class ModelReference:
    """For a model without an exact answer (``ModelTeacher``): a high-NFE solution of the same model (``solver``
    on a ``spacing`` grid with ``nfe`` evaluations) to wherever a run stops; runs that jump are compared with
    the model's own x0 prediction at the t_min state.  No likelihood metric; for MNIST-shaped images
    (1 x 28 x 28) also the image metric FD-LeNet (``diffsolve.metrics``) of every run."""

    exact = False

    def __init__(self, den, x_T: Tensor, nfe: int = 200, solver: str = "dpm++3m", spacing: str = "logsnr"):
        self.teacher = ModelTeacher(den, solver, nfe, spacing)
        self.den, self.x_T, self.nfe, self.solver, self.spacing = den, x_T, nfe, solver, spacing
        self.process = den.process
        self.image_metric = None
        if tuple(x_T.shape[1:]) == (1, 28, 28) and x_T.shape[0] >= 2:
            from ..evaluation.metrics import default_metric
            self.image_metric = default_metric()
        t0 = time.perf_counter()
        tg = self.teacher.targets(x_T)
        self._cache: Dict[Tuple, Tensor] = {("stop", round(self.process.t_min, 6)): tg.at_t_min,
                                            ("jump", None): tg.denoised}
        self.seconds = time.perf_counter() - t0

    def error_bar(self, n: int = 4) -> float:
        return self.teacher.error_bar(self.x_T[:n], self._cache[("stop", round(self.process.t_min, 6))][:n])

    def target(self, ep: Endpoint) -> Tensor:
        key = ep.key
        if ep.kind == "sigma0":  # the model is not defined below t_min: its x0 prediction there
            key = ("jump", None)
        if key not in self._cache:
            self._cache[key] = self.teacher.state_at(self.x_T, float(ep.t))
        return self._cache[key]

    def score(self, x: Tensor, ep: Endpoint) -> Dict[str, float]:
        out = _errors(x, self.target(ep))
        out["llgap"] = out["llgap_se"] = float("nan")
        if self.image_metric is not None:
            out["fd_lenet"] = self.image_metric.score(x.float().clamp(-1, 1)).fd_lenet
        return out


def _errors(x: Tensor, target: Tensor) -> Dict[str, float]:
    per = (x.to(DT) - target).pow(2).reshape(x.shape[0], -1).mean(1)
    return {"rmse": float(per.mean().sqrt()), "rmse_median": float(per.sqrt().median())}


# ----------------------------------------------------------------------------------------
# a problem: model + noise + reference
# ----------------------------------------------------------------------------------------
class LastCall(ModelWrapper):
    """A model that remembers the x0 prediction of its last evaluation (for the endpoint detection of runs on
    any parameterisation); its identity is the inner model's, so tuned profiles still match."""

    def __init__(self, inner):
        super().__init__(inner)
        self.last_x0: Optional[Tensor] = None

    def identity(self) -> Dict[str, Any]:
        return self.inner.identity()

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        pred = self.inner.evaluate(x, t, kwargs, coeffs)
        self.last_x0 = pred.x0.detach()
        return pred


@dataclass
class Problem:
    name: str
    dim: int
    batch: int
    den: ds.Denoiser  # adapter around ``net`` (the counting wrapper)
    net: CountingNet
    peer_net: Callable  # eps(x_vp, t [B]) through ``net``
    noise: Tensor
    reference: Any
    shape: Tuple[int, ...]
    seeds: List[int] = field(default_factory=list)
    recorder: Optional[LastCall] = None  # model problems: every call goes through it

    @property
    def process(self):
        return self.den.process

    @property
    def family(self) -> Optional[str]:
        """The peers' family of this model (``peers.peer_family``)."""
        return P.peer_family(self.process)

    @property
    def peers_ok(self) -> Optional[str]:
        """None if the peers can run this model, else why not."""
        if self.family is None:
            return (f"the peers' samplers need a discrete VP (DDPM), rectified-flow or EDM process, the model's is "
                    f"{type(self.process).__name__}")
        return None

    def reset(self) -> None:
        self.net.reset()
        if self.recorder is not None:
            self.recorder.last_x0 = None

    def last_x0(self) -> Optional[Tensor]:
        """The x0 prediction of the last call when the model recorded it (else None: read off the network)."""
        if self.recorder is None:
            return None
        if self.recorder.last_x0 is None:
            raise RuntimeError("the run made no network call")
        return self.recorder.last_x0


def exact_problem(dim: int, batch: int, seed: int = 0, process=None, mixture_seed: int = 0) -> Problem:
    """The exact Gaussian-mixture reference ``GaussianMixture.random(dim, seed=0)`` on DDPM linear (1000)."""
    proc = process or ds.VPDiscrete.linear(1000)
    ref = ds.GaussianMixture.random(dim=dim, seed=mixture_seed)
    net = CountingNet(ref.network(proc, "epsilon"))
    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=DT)
    reference = ExactReference(ref, proc, noise)
    return Problem(f"mixture-{dim}", dim, batch, den, net, net, noise, reference, (dim,),
                   [seed * 1_000_003 + i for i in range(batch)])


def model_problem(den, batch: int, seed: int = 0, shape: Optional[Sequence[int]] = None,
                  ref_nfe: int = 500, name: str = "model", ref_solver: str = "dpm++3m",
                  ref_spacing: str = "auto") -> Problem:
    """Any model with a ``ds.Denoiser`` at its base (guidance wrappers included): the reference is a high-NFE
    solution of the same model (``ref_solver`` with ``ref_nfe`` NFE on ``ref_spacing``; 'auto': ``fine_grid``)."""
    if ref_spacing == "auto":
        ref_spacing = fine_grid(den.process)
    shape = tuple(shape or getattr(den, "sample_shape", None) or ())
    if not shape:
        raise ValueError("the model's data shape is unknown: pass shape= (--shape C,H,W) or set den.sample_shape")
    made: List[CountingNet] = []
    den2 = with_network(den, lambda f: made.append(CountingNet(f)) or made[-1])
    net = made[0]
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    net.record = False
    rec = LastCall(den2)
    reference = ModelReference(rec, noise, nfe=ref_nfe, solver=ref_solver, spacing=ref_spacing)
    net.record = True
    dim = int(torch.tensor(shape).prod())
    return Problem(name, dim, batch, rec, net, P.PeerModel(rec), noise, reference, shape,
                   [seed * 1_000_003 + i for i in range(batch)], recorder=rec)


# ----------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------
ROW_FIELDS = ("problem", "dim", "batch", "library", "family", "variant", "algorithm", "stochastic", "nfe_budget",
              "steps", "nfe_used", "endpoint", "t_stop", "jump_distance", "rmse", "rmse_median", "llgap",
              "llgap_se", "fd_lenet", "wall", "net_time", "overhead_per_nfe", "dtype", "config", "error")


def _row(pb: Problem, library: str, family: str, variant: str, algorithm: str, budget, config: dict,
         dtype: torch.dtype, stochastic: bool = False) -> Dict[str, Any]:
    r = {k: "" for k in ROW_FIELDS}
    r.update(problem=pb.name, dim=pb.dim, batch=pb.batch, library=library, family=family, variant=variant,
             algorithm=algorithm, stochastic=int(stochastic), nfe_budget=budget, config=config,
             dtype=str(dtype).replace("torch.", ""))
    return r


def _finish(pb: Problem, row: dict, out: Tensor, view: str, last_sigma: float, wall: float, steps) -> dict:
    net = pb.net
    row.update(steps=steps, nfe_used=net.calls, wall=wall - net.book, net_time=net.time)
    row["overhead_per_nfe"] = (row["wall"] - net.time) / max(net.calls, 1)
    if not torch.isfinite(out).all():
        row["error"] = "non-finite output (NaN/inf)"
        return row
    ep, x = detect_endpoint(pb.process, out, view, last_sigma, net, pb.last_x0())
    row.update(endpoint=ep.label, t_stop="" if ep.t is None else ep.t, jump_distance=ep.jump_distance)
    row.update(pb.reference.score(x, ep))
    if row["stochastic"]:  # a sample of an SDE is not an approximation of the ODE solution: likelihood only
        row["rmse"] = row["rmse_median"] = ""
    return row


def run_ours(pb: Problem, solver: str, nfe: int, spacing: str, final: str, dtype: torch.dtype = DT,
             **options) -> Dict[str, Any]:
    """One run of a diffsolve solver (``ds.sample``) at an NFE budget."""
    info = ds.get_solver(solver)
    variant = f"{spacing}/{final}" + "".join(f",{k}={v}" for k, v in options.items())
    config = {"solver": info.name, "nfe": nfe, "spacing": spacing, "final": final,
              "dtype": str(dtype).replace("torch.", ""), **options}
    row = _row(pb, "diffsolve", info.name, variant, info.name, nfe, config, dtype, info.stochastic)
    return _run_sample(pb, row, info.name, nfe, spacing=spacing, final=final, dtype=dtype,
                       seeds=pb.seeds if info.stochastic else None, **options)


#: the family name of runs made with the default rule (``run_default``)
DEFAULT = "default rule"


def run_default(pb: Problem, nfe: int, dtype: torch.dtype = DT) -> Dict[str, Any]:
    """One run of ``ds.sample(model, noise, nfe=nfe)`` with no other option: the library's default rule
    (``diffsolve.sampling.defaults.default_sampler``)."""
    from ..sampling.defaults import default_sampler, model_guidance, model_parameterisation

    rule = default_sampler(nfe, pb.process, model_parameterisation(pb.den), model_guidance(pb.den))
    opts = "".join(f",{k}={v}" for k, v in rule.options.items())
    variant = f"{rule.spacing}/{rule.final}{opts}"
    config = {"solver": rule.solver, "options": dict(rule.options), "spacing": str(rule.spacing),
              "final": rule.final, "nfe": nfe, "dtype": str(dtype).replace("torch.", "")}
    row = _row(pb, "diffsolve", DEFAULT, variant, rule.solver, nfe, config, dtype)
    return _run_sample(pb, row, None, nfe, dtype=dtype)


#: the family name of runs made with a tuned profile (``run_profile``)
TUNED = "tuned profile"


def run_profile(pb: Problem, profile, nfe: int, dtype: torch.dtype = DT) -> Dict[str, Any]:
    """One run with a tuned profile's entry for ``nfe`` (``ds.sample(..., profile=...)``).  The caller has
    checked that the profile belongs to ``pb``'s model (``profile.check``)."""
    e = profile.entry(nfe)
    config = {"profile": profile.path or "(in memory)", "nfe": nfe, "solver": e.solver, "final": e.final,
              "t": list(e.t), "options": dict(e.options), "dtype": str(dtype).replace("torch.", "")}
    row = _row(pb, "diffsolve", TUNED, e.describe(), e.solver, nfe, config, dtype)
    return _run_sample(pb, row, e.solver, nfe, dtype=dtype, profile=profile)


def _run_sample(pb: Problem, row: Dict[str, Any], solver: str, nfe: int, **kwargs) -> Dict[str, Any]:
    pb.reset()
    t0 = time.perf_counter()
    try:
        x, si = ds.sample(pb.den, pb.noise, solver, nfe=nfe, return_info=True, **kwargs)
    except Exception as e:  # recorded, never fatal
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        return row
    wall = time.perf_counter() - t0
    g = si.grid
    last = 0.0 if g.clean_end else float(g.sigma[-1] / g.alpha[-1])
    row = _finish(pb, row, x, "vp", last, wall, si.steps)
    checks = int(getattr(si, "check_calls", 0) or 0)  # a profile's one-time identity probe of the model
    if checks and isinstance(row["nfe_used"], int):
        row["nfe_used"] -= checks
    if row["nfe_used"] != si.nfe and not row["error"]:
        row["error"] = f"NFE mismatch: counted {row['nfe_used']}, sample() reports {si.nfe}"
    if not row["error"] and (row["endpoint"] == "jump") != bool(g.clean_end):
        row["error"] = f"endpoint detection disagrees with the grid (clean_end={g.clean_end}, detected {row['endpoint']})"
    return row


def run_peer_config(pb: Problem, cfg: P.PeerConfig, budget: Optional[int], dtype: torch.dtype = torch.float32,
                    tolerance: Optional[float] = None) -> Dict[str, Any]:
    """One run of a peer configuration at an NFE budget (adaptive: at a tolerance; budget filled in after)."""
    config = cfg.describe()
    variant = cfg.variant if tolerance is None else f"{cfg.variant}={tolerance:g}"
    row = _row(pb, cfg.library, cfg.family, variant, cfg.algorithm, budget if budget is not None else "", config, dtype)
    try:
        steps = 0 if cfg.adaptive else P.plan_steps(cfg, pb.process, budget)
        if steps is None:
            row["error"] = f"no step count fits an NFE budget of {budget}"
            return row
        config["steps"] = steps
        config.update(peer_setup(cfg, pb.process))
        if tolerance is not None:
            config["options"] = {**config["options"], "rtol": tolerance}
        pb.reset()
        t0 = time.perf_counter()
        out = P.run_peer(cfg, pb.peer_net, pb.process, pb.noise, steps, dtype, tolerance=tolerance)
        wall = time.perf_counter() - t0
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        return row
    row = _finish(pb, row, out.x, out.view, out.last_sigma, wall, out.steps)
    if budget is not None and not row["error"] and row["nfe_used"] > budget:
        row["error"] = f"used {row['nfe_used']} NFE, over the budget of {budget}"
    return row


def peer_setup(cfg: P.PeerConfig, process) -> Dict[str, Any]:
    """What else fixes a peer run: the diffusers constructor call, or k-diffusion's sigma range and start."""
    if cfg.library == "diffusers":
        ctor = {**P.constructor_options(cfg, process), **cfg.describe()["options"]}
        if "trained_betas" in ctor:
            ctor["trained_betas"] = "1 - alphas_cumprod[t] / alphas_cumprod[t-1] of the model's process"
        return {"constructor": ctor,
                "loop": "set_timesteps(steps); x = noise * init_noise_sigma (1 without one); per timestep: "
                        "scale_model_input, net, step"}
    tm, tM = torch.tensor(process.t_min, dtype=DT), torch.tensor(process.t_max, dtype=DT)
    return {"sigma_min": float(process.sigma_ve(tm)), "sigma_max": float(process.sigma_ve(tM)),
            "start": "x_T / alpha(t_max)", "denoiser": "t = t_of_sigma_ve(sigma), the model's x0 at alpha(t) x"}


def assign_budget(row: dict, budgets: Sequence[int]) -> None:
    """Adaptive runs: the smallest budget that covers the NFE they used ('' if none does)."""
    if row.get("error") or row.get("nfe_used") in ("", None):
        return
    fit = [b for b in sorted(budgets) if b >= int(row["nfe_used"])]
    row["nfe_budget"] = fit[0] if fit else ""
    if not fit:
        row["error"] = f"used {row['nfe_used']} NFE, more than every budget"


# ----------------------------------------------------------------------------------------
# parity: the same algorithm, configuration and times -> the same result
# ----------------------------------------------------------------------------------------
@dataclass
class ParityPair:
    cfg: P.PeerConfig
    solver: str
    options: Callable[[int], Dict[str, Any]]  # peer steps -> our solver options
    grid: str = "calls"  # how our grid is read off the peer run: 'calls' | 'distinct' | 'dpm_fast'
    note: str = ""


def _dpm_lof(n: int) -> Dict[str, Any]:
    return {"lower_order_final": n < 15}


def parity_pairs(quick: bool = False) -> List[ParityPair]:
    """Every algorithm we share with a peer, in the peer configurations whose times are exact integers
    (diffusers) or any grid (k-diffusion, which we drive through our own time map)."""
    D, K = "diffusers", "k-diffusion"
    pairs: List[ParityPair] = []

    def d(family, kind, variant, opts, solver, options, algorithm, grid="calls", note=""):
        pairs.append(ParityPair(P.PeerConfig(D, family, variant, kind, opts, algorithm), solver, options, grid, note))

    def k(family, kind, variant, opts, solver, options, grid="calls"):
        pairs.append(ParityPair(P.PeerConfig(K, family, variant, kind, opts, solver), solver, options, grid))

    no_lof = lambda n: {"lower_order_final": False}  # noqa: E731
    d("DDIM", "DDIMScheduler", "leading/alpha1", {"clip_sample": False, "set_alpha_to_one": True}, "ddim",
      lambda n: {}, "ddim")
    d("DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler", "linspace/zero",
      {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}, "dpm++2m", _dpm_lof,
      "dpm++2m")
    k("dpmpp_2m", "sample_dpmpp_2m", "karras/zero", {"grid": "karras"}, "dpm++2m", no_lof)
    if quick:
        return pairs
    d("DDIM", "DDIMScheduler", "trailing/alpha0", {"clip_sample": False, "set_alpha_to_one": False,
                                                   "timestep_spacing": "trailing"}, "ddim", lambda n: {}, "ddim",
      note="the last call (t = 0 -> alphas_cumprod[0]) changes nothing; ours skips it")
    d("DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler", "linspace/sigma_min",
      {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "sigma_min"}, "dpm++2m", _dpm_lof,
      "dpm++2m")
    for f in ("zero", "sigma_min"):
        d("DPMSolverMultistep dpmsolver++ 3M", "DPMSolverMultistepScheduler", f"linspace/{f}",
          {"algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": f}, "dpm++3m",
          lambda n: {**_dpm_lof(n), "taylor3": False}, "dpm++3m")
    for order in (2, 3):
        d(f"DPMSolverMultistep dpmsolver {order}M", "DPMSolverMultistepScheduler", "linspace/sigma_min",
          {"algorithm_type": "dpmsolver", "solver_order": order, "final_sigmas_type": "sigma_min"},
          f"dpm-solver-{order}m", (lambda n: {**_dpm_lof(n), "taylor3": False}) if order == 3 else _dpm_lof,
          f"dpm-solver-{order}m")
    for variant, order, f in (("bh2", 2, "zero"), ("bh2", 2, "sigma_min"), ("bh2", 3, "zero"),
                              ("bh2", 3, "sigma_min"), ("bh1", 2, "sigma_min"), ("bh1", 3, "sigma_min")):
        d(f"UniPC {variant} order {order}", "UniPCMultistepScheduler", f"linspace/{f}",
          {"solver_type": variant, "solver_order": order, "final_sigmas_type": f}, f"unipc-{variant}",
          (lambda o: (lambda n: {"order": o, "lower_order_final": True}))(order), f"unipc-{variant}")
    for order in (2, 3):
        d(f"DEIS order {order}", "DEISMultistepScheduler", "linspace", {"solver_order": order}, "deis",
          (lambda o: (lambda n: {"order": o, "lower_order_final": n < 15}))(order), "deis")
    d("PNDM", "PNDMScheduler", "plms/leading/alpha0", {"skip_prk_steps": True}, "pndm", lambda n: {}, "pndm",
      grid="distinct", note="the last call (t = 0 -> alphas_cumprod[0]) changes nothing; ours skips it")
    d("Euler", "EulerDiscreteScheduler", "trailing/zero", {"timestep_spacing": "trailing"}, "euler", lambda n: {},
      "euler")
    d("Heun", "HeunDiscreteScheduler", "trailing", {"timestep_spacing": "trailing"}, "heun", lambda n: {}, "heun",
      grid="distinct")
    for g in P.K_GRIDS:
        k("euler", "sample_euler", f"{g}/zero", {"grid": g}, "euler", lambda n: {})
        k("heun", "sample_heun", f"{g}/zero", {"grid": g}, "heun", lambda n: {}, grid="distinct")
        if g != "karras":
            k("dpmpp_2m", "sample_dpmpp_2m", f"{g}/zero", {"grid": g}, "dpm++2m", no_lof)
        k("dpmpp_3m_sde (eta=0)", "sample_dpmpp_3m_sde", f"{g}/zero", {"grid": g, "eta": 0.0}, "dpm++3m",
          lambda n: {"lower_order_final": False, "taylor3": False, "taylor2": True})
    k("dpm_fast", "sample_dpm_fast", "logsnr/sigma_min", {}, "dpm-solver-3", lambda n: {}, grid="dpm_fast")
    for p in pairs:
        if p.cfg.kind == "sample_dpmpp_3m_sde":
            p.note = ("k-diffusion's second (warm-up) step weights D1 by h^2 phi_2 (Taylor), diffusers' and our "
                      "default by h phi_1 / 2 (midpoint): paired with taylor2=True")
        if p.cfg.library == "diffusers" and p.cfg.kind in P._VE_SCHEDULERS:
            p.note = "started from x_T * sqrt(sigma_0^2 + 1), not x_T * init_noise_sigma (= sigma_0)"
    return pairs


def _dpm_fast_orders(nfe: int) -> List[int]:
    """k-diffusion's DPMSolver.dpm_solver_fast order list."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def run_parity(pb: Problem, pair: ParityPair, steps: int) -> Dict[str, Any]:
    """|ours - peer| / |peer| for one matched pair (both in float64 state; diffusers keeps its schedule
    in float32 and DPMSolverMultistep casts the state to float32 inside ``step``)."""
    proc = pb.process
    x_T = pb.noise
    pb.net.reset()
    row = {"library": pair.cfg.library, "family": pair.cfg.family, "variant": pair.cfg.variant,
           "ours": pair.solver, "steps": steps, "rel_diff": float("nan"), "nfe_peer": "", "nfe_ours": "",
           "endpoint": "", "note": pair.note, "rel_diff_float64_schedule": float("nan"), "error": ""}
    try:
        out = P.run_peer(pair.cfg, pb.peer_net, proc, x_T, steps, DT, exact_start=True)
        calls = list(pb.net.times)
        row["nfe_peer"] = pb.net.calls
        ep, theirs = detect_endpoint(proc, out.x, out.view, out.last_sigma, pb.net)
        row["endpoint"] = ep.label
        opts = dict(pair.options(steps))
        if pair.grid == "dpm_fast":  # k-diffusion's outer grid: uniform in -log sigma, orders 3..3,(2,)1
            tm, tM = torch.tensor(proc.t_min, dtype=DT), torch.tensor(proc.t_max, dtype=DT)
            lo, hi = -math.log(float(proc.sigma_ve(tM))), -math.log(float(proc.sigma_ve(tm)))
            m = steps // 3 + 1
            lam = torch.linspace(lo, hi, m + 1, dtype=DT)
            grid = ds.explicit(proc, lambdas=lam, final="t_min")
            opts["orders"] = _dpm_fast_orders(steps)
        else:
            times = calls if pair.grid == "calls" else [t for i, t in enumerate(calls) if i == 0 or t != calls[i - 1]]
            times = [snap_time(proc, t) for t in times]
            if ep.kind == "jump":
                grid = ds.explicit(proc, t=times, final="denoise")
            else:
                if ep.kind != "stop":
                    raise RuntimeError(f"no matched grid for endpoint {ep.label}")
                if abs(times[-1] - ep.t) > 1e-9:
                    times = times + [ep.t]
                grid = ds.explicit(proc, t=times, final="t_min")
        pb.net.reset()
        ours = ds.sample(pb.den, x_T, pair.solver, grid=grid, nfe=None, **opts)
        row["nfe_ours"] = pb.net.calls
        row["rel_diff"] = float((ours - theirs).norm() / theirs.norm())
        if pair.cfg.library == "diffusers" and row["rel_diff"] > PARITY_FLOAT32:
            # diagnostic: the same peer run with its float32 schedule tensors swapped for float64 ones;
            # if that closes the gap, the difference is diffusers' float32 rounding (amplified), not the algorithm
            out64 = P.run_peer(pair.cfg, pb.peer_net, proc, x_T, steps, DT, exact_start=True, float64_schedule=True)
            _, theirs64 = detect_endpoint(proc, out64.x, out64.view, out64.last_sigma, pb.net)
            row["rel_diff_float64_schedule"] = float((ours - theirs64).norm() / theirs64.norm())
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
    return row


# ----------------------------------------------------------------------------------------
# solver overhead per NFE: ours vs the peers for the same algorithm
# ----------------------------------------------------------------------------------------
OVERHEAD_ALGORITHMS = {  # algorithm -> (our solver, its options, peer configs: (library, kind, options, variant))
    "ddim": ("ddim", {}, [("diffusers", "DDIM", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "trailing/alpha1")]),
    "euler": ("euler", {}, [("diffusers", "Euler", "EulerDiscreteScheduler", {}, "linspace/zero"),
                            ("k-diffusion", "euler", "sample_euler", {"grid": "karras"}, "karras/zero")]),
    "heun": ("heun", {}, [("diffusers", "Heun", "HeunDiscreteScheduler", {}, "linspace"),
                          ("k-diffusion", "heun", "sample_heun", {"grid": "karras"}, "karras/zero")]),
    "dpm++2m": ("dpm++2m", {}, [("diffusers", "DPMSolverMultistep dpmsolver++ 2M", "DPMSolverMultistepScheduler",
                                 {"algorithm_type": "dpmsolver++", "solver_order": 2}, "linspace/zero"),
                                ("k-diffusion", "dpmpp_2m", "sample_dpmpp_2m", {"grid": "karras"}, "karras/zero")]),
    "dpm++3m": ("dpm++3m", {}, [("diffusers", "DPMSolverMultistep dpmsolver++ 3M", "DPMSolverMultistepScheduler",
                                 {"algorithm_type": "dpmsolver++", "solver_order": 3}, "linspace/zero"),
                                ("k-diffusion", "dpmpp_3m_sde (eta=0)", "sample_dpmpp_3m_sde",
                                 {"grid": "karras", "eta": 0.0}, "karras/zero")]),
    "dpm-solver-2m": ("dpm-solver-2m", {}, [("diffusers", "DPMSolverMultistep dpmsolver 2M",
                                             "DPMSolverMultistepScheduler",
                                             {"algorithm_type": "dpmsolver", "solver_order": 2,
                                              "final_sigmas_type": "sigma_min"}, "linspace/sigma_min")]),
    "dpm-solver-3m": ("dpm-solver-3m", {}, [("diffusers", "DPMSolverMultistep dpmsolver 3M",
                                             "DPMSolverMultistepScheduler",
                                             {"algorithm_type": "dpmsolver", "solver_order": 3,
                                              "final_sigmas_type": "sigma_min"}, "linspace/sigma_min")]),
    "unipc-bh2": ("unipc-bh2", {}, [("diffusers", "UniPC bh2 order 2", "UniPCMultistepScheduler",
                                     {"solver_type": "bh2", "solver_order": 2}, "linspace/zero")]),
    "unipc-bh1": ("unipc-bh1", {}, [("diffusers", "UniPC bh1 order 2", "UniPCMultistepScheduler",
                                     {"solver_type": "bh1", "solver_order": 2, "final_sigmas_type": "sigma_min"},
                                     "linspace/sigma_min")]),
    "dpm-solver-3": ("dpm-solver-3", {}, [("k-diffusion", "dpm_fast", "sample_dpm_fast", {}, "logsnr/sigma_min")]),
    "deis": ("deis", {}, [("diffusers", "DEIS order 3", "DEISMultistepScheduler", {"solver_order": 3}, "linspace")]),
    "pndm": ("pndm", {}, [("diffusers", "PNDM", "PNDMScheduler", {"skip_prk_steps": True}, "plms/leading/alpha0")]),
}


def _gaussian_eps(process, var: float = 0.25) -> Callable:
    """A cheap exact network (isotropic Gaussian data N(0, var I)): eps = sigma x / (alpha^2 var + sigma^2)."""
    def net(x: Tensor, t: Tensor, **_):
        t = torch.as_tensor(t, dtype=DT)
        a, s = process.alpha(t), process.sigma(t)
        c = (s / (a * a * var + s * s)).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return x * c
    return net


def overhead(dim: int = 3072, batch: int = 128, nfe: int = 20, repeats: int = 5, seed: int = 0,
             algorithms: Optional[Sequence[str]] = None, libraries: Optional[Sequence[str]] = None,
             process=None, progress=None) -> List[Dict[str, Any]]:
    """Solver overhead per NFE = (wall - network time) / NFE, ours (float64 and float32 state) and each
    peer of the same algorithm (float32 state, as a pipeline runs), one thread, median over ``repeats``
    round-robin rounds.  The network is a cheap exact Gaussian denoiser: overhead does not depend on it,
    and a cheap one keeps the measurement short and its subtraction precise."""
    proc = process or ds.VPDiscrete.linear(1000)
    libs = set(libraries) if libraries is not None else {"diffusers", "k-diffusion"}
    net = CountingNet(_gaussian_eps(proc), record=False)
    # the network runs in float32 in every entry, as a real model does and as the peers feed it: a float64
    # state pays its casts to and from the network dtype as overhead, a float32 state does not
    den = ds.Denoiser(net, proc, "epsilon", dtype=torch.float32)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    entries: List[Dict[str, Any]] = []
    seeds = list(range(batch))
    for algo in algorithms or OVERHEAD_ALGORITHMS:
        # an algorithm we share with a peer, or any of our solvers (then without peers)
        solver, opts, peer_list = OVERHEAD_ALGORITHMS.get(algo, (algo, {}, []))
        if ds.get_solver(solver).stochastic:
            opts = {**opts, "seeds": seeds}
        for dtype in (DT, torch.float32):
            entries.append({"algorithm": algo, "library": "diffsolve", "family": solver,
                            "variant": f"logsnr/denoise, {str(dtype).replace('torch.', '')}", "dtype": dtype,
                            "run": (lambda s=solver, o=opts, dt=dtype:
                                    ds.sample(den, noise, s, nfe=nfe, spacing="logsnr", final="denoise", dtype=dt, **o))})
        for lib, family, kind, popts, variant in peer_list:
            if lib not in libs:
                continue
            cfg = P.PeerConfig(lib, family, variant, kind, popts, algo)
            try:
                steps = P.plan_steps(cfg, proc, nfe)
            except Exception:
                steps = None
            if steps is None:
                continue
            entries.append({"algorithm": algo, "library": lib, "family": family, "variant": f"{variant}, float32",
                            "dtype": torch.float32,
                            "run": (lambda c=cfg, n=steps: P.run_peer(c, net, proc, noise, n, torch.float32))})
    for e in entries:  # warm-up (lazy imports, allocator)
        try:
            e["run"]()
        except Exception as ex:
            e["error"] = f"{type(ex).__name__}: {ex}"[:200]
    samples: Dict[int, List[Tuple[float, float, float]]] = {i: [] for i in range(len(entries))}
    for _ in range(repeats):
        for i, e in enumerate(entries):
            if e.get("error"):
                continue
            net.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            e["run"]()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            samples[i].append(((wall - net.time) / net.calls, (cpu - net.cpu) / net.calls, net.calls))
            if progress is not None:
                progress.update(1)
    out = []
    for i, e in enumerate(entries):
        s = samples[i]
        w = [v[0] for v in s]
        out.append({"algorithm": e["algorithm"], "library": e["library"], "family": e["family"],
                    "variant": e["variant"], "dtype": str(e["dtype"]).replace("torch.", ""),
                    "nfe_used": int(s[0][2]) if s else "", "dim": dim, "batch": batch,
                    "overhead_per_nfe": statistics.median(w) if w else float("nan"),
                    "min": min(w) if w else float("nan"), "spread": (max(w) - min(w)) if w else float("nan"),
                    "cpu_per_nfe": statistics.median([v[1] for v in s]) if s else float("nan"),
                    "error": e.get("error", "")})
    return out


to_jsonable = jsonable  # (the bench files use this name)
