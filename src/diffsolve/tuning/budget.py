"""The search of one NFE budget (``BudgetSearch``): candidates, their scores against the teacher's targets, and
the phases that narrow them to one profile entry.  ``tuning.search.tune`` runs one per budget."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapters.denoiser import Model as Denoiser
from ..evaluation.teacher import Trajectory
from ..grids import SPACINGS, explicit, from_unit, make_grid, validate_times
from ..sampling import sample
from ..solvers.dpm_v3_stats import Statistics
from .evolution import evolve_points, free_points, grid_times
from .fitted import MUS, fit_solver, linear_coefficients, linear_solver
from .grid_search import steps_for_nfe
from .profile import DT, Entry

Tensor = torch.Tensor
#: candidates every budget screens even past its deadline (the default, then the peer-equivalents first): a budget
#: whose share of the time was eaten by the earlier ones still compares the default with the peers' configurations
MIN_SCREEN = 12
NAMED_SPACINGS = ("logsnr", "uniform", "quadratic", "karras", "five-step")


# ----------------------------------------------------------------------------------------
# the peers' configurations that our solvers compute (docs/tuner_space.md)
# ----------------------------------------------------------------------------------------
#: the peers' grids, in screening order: diffusers' index spacings (``timestep_spacing``), Karras sigmas and
#: uniform log-SNR (diffusers' ``use_lu_lambdas`` / ``use_exponential_sigmas``, k-diffusion's exponential sigmas)
PEER_SPACINGS = ("linspace", "trailing", "karras", "logsnr", "leading")
INDEX_SPACINGS = ("linspace", "leading", "trailing")  # discrete processes only


@dataclass(frozen=True)
class PeerEquivalent:
    """A peer sampler (a family of ``diffsolve.bench.peers``) that our ``solver`` with ``options`` computes
    (the bench's parity pairs match them), on the peer's grids ``spacings`` with the last-step rules ``finals``
    ('t_min': the peer's ``final_sigmas_type='sigma_min'``, 'denoise': its ``'zero'``, the jump to clean data).

    ``lof_below_15``: the peer lowers the order of its final steps only below 15 steps (diffusers'
    DPMSolverMultistep); ``logsnr_name``: what the peer calls its uniform log-SNR grid."""

    peer: str
    solver: str
    options: Dict[str, Any] = field(default_factory=dict)
    spacings: Tuple[str, ...] = PEER_SPACINGS
    finals: Tuple[str, ...] = ("t_min", "denoise")
    lof_below_15: bool = False
    logsnr_name: str = "lu"

    def variant(self, spacing: str, final: str) -> str:
        """The peer's name of the configuration (as the bench's rows name it)."""
        g = self.logsnr_name if spacing == "logsnr" else spacing
        return f"{self.peer} {g}/{'sigma_min' if final == 't_min' else 'zero'}"

    def options_for(self, nfe: int) -> Dict[str, Any]:
        o = dict(self.options)
        if self.lof_below_15 and nfe >= 15:  # our automatic rule could lower the order there
            o["lower_order_final"] = False
        return o


#: Every configuration of UniPC (bh1, bh2; orders 2 and 3) and DPM-Solver++ (2M, 3M) that the bench runs for the
#: peers, plus the same solvers on the grids it runs for other peers (leading; trailing and log-SNR at order 3),
#: in screening order (the order-3 methods first).
#: (diffusers' UniPC bh1 returns NaN on its steps to sigma = 0, B(h) = -h = -inf: only its sigma_min variants run.)
PEER_EQUIVALENTS: Tuple[PeerEquivalent, ...] = (
    PeerEquivalent("diffusers UniPC bh2 order 3", "unipc-bh2", {"order": 3}, logsnr_name="exponential"),
    PeerEquivalent("diffusers UniPC bh1 order 3", "unipc-bh1", {"order": 3}, finals=("t_min",),
                   logsnr_name="exponential"),
    PeerEquivalent("diffusers DPMSolverMultistep dpmsolver++ 3M", "dpm++3m", {"taylor3": False}, lof_below_15=True),
    PeerEquivalent("k-diffusion dpmpp_3m_sde (eta=0)", "dpm++3m",
                   {"taylor3": False, "taylor2": True, "lower_order_final": False}, ("karras", "logsnr"),
                   ("denoise",), logsnr_name="exponential"),
    PeerEquivalent("diffusers UniPC bh2 order 2", "unipc-bh2", {}, logsnr_name="exponential"),
    PeerEquivalent("diffusers UniPC bh1 order 2", "unipc-bh1", {}, finals=("t_min",), logsnr_name="exponential"),
    PeerEquivalent("diffusers DPMSolverMultistep dpmsolver++ 2M", "dpm++2m", {}, lof_below_15=True),
    # k-diffusion's 2M never lowers its order, but before the jump to clean data the order of 2M's last step
    # does not matter: these are the diffusers 2M candidates on the same grids (spelled alike, screened once)
    PeerEquivalent("k-diffusion dpmpp_2m", "dpm++2m", {}, ("karras", "logsnr"), ("denoise",), lof_below_15=True,
                   logsnr_name="exponential"),
)
#: a peer-equivalent is searched when the tuner searches a solver of its family
SOLVER_FAMILY = {"unipc-bh1": "unipc", "unipc-bh2": "unipc", "dpm++2m": "dpm++", "dpm++3m": "dpm++"}
#: Screening every peer-equivalent on the screening set may take this share of an NFE budget's time; beyond it they
#: are pre-screened on the first ``n_pre`` (>= PEER_MIN_PRESCREEN) calibration samples and the best PEER_PROMOTE go
#: on to the screening set (``BudgetSearch.screen``).
PEER_SHARE = 0.1
PEER_PROMOTE = 6
PEER_MIN_PRESCREEN = 16
#: the fitted solver (``tuning.fitted``): how many finalists get their coefficients refitted, with which mus
FIT_BASES = 2
FIT_MUS = MUS[:3]


def peer_times(process, spacing: str, nfe: int, final: str) -> Tensor:
    """The grid of a one-evaluation-per-step peer with ``nfe`` steps on ``spacing``, as the peer lays it: the
    ``nfe`` evaluation times, then t_min for ``final='t_min'``.

    * 'linspace' / 'leading': diffusers' multistep schedulers lay ``nfe + 1`` index points ending at 0 and drop
      the 0 (``SPACINGS[spacing](process, nfe + 1)[:-1]``); 'trailing': ``nfe`` points from N - 1
      (``SPACINGS['trailing'](process, nfe)``).  Integer timesteps: these are the peers' grids exactly.
    * 'karras' / 'logsnr': ``nfe`` (denoise) or ``nfe + 1`` (t_min) points of our spacing: k-diffusion's Karras and
      exponential sigmas exactly; diffusers' Karras and lu / exponential sigmas up to the rounding of their
      timesteps (its sigma_min variants end with an evaluation at sigma_min that does not advance the state;
      here that evaluation buys one more grid point instead).
    """
    if spacing not in INDEX_SPACINGS:
        return make_grid(process, nfe + 1 if final == "t_min" else nfe, spacing, "t_min").t
    fn = SPACINGS[spacing]
    ev = fn(process, nfe) if spacing == "trailing" else fn(process, nfe + 1)[:-1]
    if final == "t_min":
        ev = torch.cat([ev, torch.tensor([process.t_min], dtype=DT)])
    return ev.to(DT)


# ----------------------------------------------------------------------------------------
# calibration sets, candidates, runs, scores
# ----------------------------------------------------------------------------------------
class _Set:
    """Noise with its teacher targets; ``err(x, final)`` -> per-sample mean squared error."""

    def __init__(self, noise: Tensor, at_t_min: Tensor, denoised: Tensor):
        self.noise, self.tmin, self.den = noise, at_t_min, denoised

    @classmethod
    def of(cls, noise: Tensor, targets: Any) -> "_Set":
        return cls(noise, targets.at_t_min, targets.denoised)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def subset(self, n: int) -> "_Set":
        return _Set(self.noise[:n], self.tmin[:n], self.den[:n])

    def err(self, x: Tensor, final: str) -> Tensor:
        tgt = self.den if final == "denoise" else self.tmin
        return ((x.to(DT) - tgt) ** 2).flatten(1).mean(1)


def _objective(d2: Tensor, metric: str) -> float:
    if metric == "rmse":
        v = float(d2.mean().sqrt())
    elif metric == "median":
        v = float(d2.median().sqrt())
    elif metric == "trimmed":  # drop the worst 1%
        k = max(1, int(math.ceil(0.99 * d2.numel())))
        v = float(d2.sort()[0][:k].mean().sqrt())
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'rmse', 'trimmed' or 'median'")
    return v if math.isfinite(v) else math.inf


# ----------------------------------------------------------------------------------------
# candidates
# ----------------------------------------------------------------------------------------
@dataclass
class Candidate:
    solver: str
    t: Tensor
    final: str
    options: Dict[str, Any]
    label: str

    @property
    def key(self) -> tuple:
        return (self.solver, self.final, _frozen(sorted(self.options.items())), tuple(np.round(self.t.numpy(), 9)))

    def with_(self, **kw) -> "Candidate":
        d = dict(solver=self.solver, t=self.t, final=self.final, options=self.options, label=self.label)
        d.update(kw)
        return Candidate(**d)


def _frozen(v: Any) -> Any:
    """``v`` with its lists as tuples (a coefficient matrix in a candidate's options is part of its key)."""
    return tuple(_frozen(u) for u in v) if isinstance(v, (list, tuple)) else v


def _n_points(solver: str, nfe: int, final: str) -> Tuple[int, int]:
    """(grid points, NFE used) of the largest grid of ``solver`` within ``nfe``."""
    steps, used = steps_for_nfe(solver, nfe, final == "denoise")
    return (steps if final == "denoise" else steps + 1), used


def family_times(process, nfe: int, u_end: float, warp: float, final: str = "t_min", solver: str = "dpm-v3") -> Tensor:
    """The tuner's grid family: the evaluated points power-spaced in normalised log-SNR u (0 = t_max,
    1 = t_min), u_i = u_end (i / (n-1))^warp, then (``final='t_min'``) one last step to t_min."""
    n_pts, _ = _n_points(solver, nfe, final)
    n_eval = n_pts if final == "denoise" else n_pts - 1
    if n_eval < 1:
        raise ValueError("no evaluation fits the budget")
    hi = 1.0 if final == "denoise" else 1.0 - 1e-3
    u_end = float(min(max(u_end, 1e-3 * n_eval), hi))
    u = u_end * (np.arange(n_eval) / max(n_eval - 1, 1)) ** float(warp) if n_eval > 1 else np.zeros(1)
    if final == "t_min":
        u = np.concatenate([u, [1.0]])
    return from_unit(process, torch.from_numpy(u), fix_last=True)


def _named(process, solver: str, nfe: int, spacing: str, final: str) -> Candidate:
    n_pts, _ = _n_points(solver, nfe, final)
    t = make_grid(process, n_pts, spacing, "t_min").t
    return Candidate(solver, t, final, {}, f"{spacing}/{final}")


def _rule(process, nfe: int, parameterisation: Optional[str], guidance: Optional[float] = None) -> Candidate:
    """The library's default for this budget (``sampling.defaults.default_sampler``), as a candidate."""
    from ..sampling.defaults import default_sampler

    r = default_sampler(nfe, process, parameterisation, guidance)
    n_pts, _ = _n_points(r.solver, nfe, r.final)
    t = make_grid(process, n_pts, r.spacing, "t_min").t
    return Candidate(r.solver, t, r.final, dict(r.options), "default")


def refined(process, c: "Candidate", nfe: int) -> Optional["Candidate"]:
    """``c`` (a smaller budget's tuned grid) with points added in the middle of its widest log-SNR gaps until it
    spends ``nfe``: the warm start that keeps a larger budget's search from ending above a smaller one's."""
    n_pts, used = _n_points(c.solver, nfe, c.final)
    if used != nfe or c.t.numel() >= n_pts:
        return None
    lam = process.lam(c.t.to(torch.float64))
    while lam.numel() < n_pts:
        i = int(torch.argmax(lam[1:] - lam[:-1]))
        lam = torch.cat([lam[:i + 1], ((lam[i] + lam[i + 1]) / 2).reshape(1), lam[i + 1:]])
    t = process.t_of_lam(lam)
    t[0], t[-1] = c.t[0], c.t[-1]
    try:
        validate_times(process, t)
    except ValueError:
        return None
    return Candidate(c.solver, t, c.final, dict(c.options), f"{c.label} refined to {nfe} NFE")


def _options_label(options: Dict[str, Any]) -> str:
    return " " + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""


def peer_candidates(process, nfe: int, solvers: Sequence[str]) -> List[Tuple[Candidate, str]]:
    """The peer-equivalent candidates of an NFE budget, in screening order (final, then spacing, then
    ``PEER_EQUIVALENTS`` order), each with the peer configuration it reproduces: every ``PEER_EQUIVALENTS``
    entry whose solver family (``SOLVER_FAMILY``) is among ``solvers``, on each of its spacings and last steps
    that the process allows (the index spacings need a discrete process) and that spends exactly ``nfe``.
    Several peers may share one candidate (the same solver, options and times): it appears once per peer."""
    families = {SOLVER_FAMILY.get(s) for s in solvers} - {None}
    out: List[Tuple[Candidate, str]] = []
    for final in ("t_min", "denoise"):
        for spacing in PEER_SPACINGS:
            for pe in PEER_EQUIVALENTS:
                if SOLVER_FAMILY[pe.solver] not in families or spacing not in pe.spacings or final not in pe.finals:
                    continue
                n_pts, used = _n_points(pe.solver, nfe, final)
                if used != nfe:
                    continue
                try:
                    t = peer_times(process, spacing, nfe, final)
                    validate_times(process, t)
                except ValueError:  # an index spacing on a continuous process, a budget the grid cannot hold
                    continue
                if t.numel() != n_pts:
                    continue
                opts = pe.options_for(nfe)
                grid = f"diffusers-{spacing}" if spacing in INDEX_SPACINGS else spacing
                label = f"{pe.solver} {grid}/{final}{_options_label(opts)}"
                out.append((Candidate(pe.solver, t, final, opts, label), pe.variant(spacing, final)))
    return out


class _Clock:
    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.budget = float(budget)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


class _Runner:
    """Runs candidates on noise in chunks of ``batch``, and models the cost of a run as
    ``a * nfe + b * n * nfe`` (a: the solver's per-step set-up, e.g. DPM-Solver-v3's coefficients for a new grid;
    b: the network per sample), fitted to the runs so far."""

    def __init__(self, den: Denoiser, batch: int, kwargs: Dict[str, Any], stats: Optional[Statistics]):
        self.den, self.batch, self.kwargs, self.stats = den, batch, kwargs, stats
        self.tau = None  # seconds per (sample x NFE) of the network, measured before the first run
        self.log: List[Tuple[int, int, float]] = []
        self.runs = 0

    def options(self, c: Candidate) -> Dict[str, Any]:
        o = dict(c.options)
        if c.solver == "dpm-v3":
            o.update(stats=self.stats, check_stats=False)
        return o

    def run(self, c: Candidate, noise: Tensor, nfe: int) -> Optional[Tensor]:

        grid = explicit(self.den.process, t=c.t, final=c.final)
        opts = self.options(c)
        t0 = time.perf_counter()
        outs = []
        try:
            for i in range(0, noise.shape[0], self.batch):
                outs.append(sample(self.den, noise[i:i + self.batch], c.solver, grid=grid, nfe=nfe,
                                   model_kwargs=self.kwargs, **opts).to(DT))
        except (ValueError, RuntimeError):  # a grid or setting the solver cannot run (non-finite, ...)
            return None
        self.log = (self.log + [(nfe, noise.shape[0], time.perf_counter() - t0)])[-60:]
        self.runs += 1
        return torch.cat(outs)

    def coefficients(self) -> Tuple[float, float]:
        b0 = self.tau or 1e-3
        if len(self.log) < 4 or len({n for _, n, _ in self.log}) < 2:
            return 0.0, b0
        A = np.array([[f, f * n] for f, n, _ in self.log], dtype=float)
        y = np.array([t for _, _, t in self.log])
        a, b = np.linalg.lstsq(A, y, rcond=None)[0]
        if b <= 0 or a < 0:
            return max(0.0, float(np.median(y / A[:, 0]) - b0 * np.median(A[:, 1] / A[:, 0]))), b0
        return float(a), float(b)

    def cost(self, n: int, nfe: int) -> float:
        a, b = self.coefficients()
        return a * nfe + b * n * nfe


class _Search:
    """All evaluations of one NFE budget on the current working set, cached with their per-sample squared errors,
    and two objectives computed from them:

    * ``'rmse'``: the RMSE; on a stratified working set the weighted estimate of the full calibration set's RMSE.
    * ``'bulk'``: the trimmed RMSE of the working set's random part (its worst ``trim`` fraction dropped): the
      accuracy of the typical sample, blind to the rare samples that a small error sends to another mode.

    ``score_full`` scores a candidate on the whole calibration set (the finalists)."""

    def __init__(self, runner: _Runner, full: _Set, nfe: int, metric: str, trim: float = 0.02):
        self.runner, self.full, self.nfe, self.metric, self.trim = runner, full, nfe, metric, trim
        self.work, self.weights, self.random_part = full, None, None
        self.d2: Dict[tuple, Optional[Tensor]] = {}
        self.cands: Dict[tuple, Candidate] = {}
        self.full_scores: Dict[tuple, Tuple[float, Optional[Tensor], Candidate]] = {}
        self.evaluations = 0
        self.previous: Dict[str, List[Tuple[float, Candidate]]] = {"rmse": [], "bulk": []}

    @property
    def work_is_full(self) -> bool:
        return self.work is self.full

    def set_work(self, work: _Set, weights: Optional[Tensor] = None, random_part: Optional[Tensor] = None) -> None:
        """Score on ``work`` from now on (``weights``: per-sample weights of the 'rmse' estimate;
        ``random_part``: mask of the samples the 'bulk' objective uses).  Earlier rankings stay in ``previous``."""
        for obj in ("rmse", "bulk"):
            self.previous[obj] = self.ranked(obj) + self.previous[obj]
        self.work, self.weights, self.random_part = work, weights, random_part
        self.d2, self.cands = {}, {}

    def value(self, key: tuple, obj: str) -> float:
        d2 = self.d2.get(key)
        if d2 is None:
            return math.inf
        if obj == "bulk":
            part = d2 if self.random_part is None else d2[self.random_part]
            k = max(1, int(math.ceil((1 - self.trim) * part.numel())))
            v = float(part.sort()[0][:k].mean().sqrt())
        elif self.weights is not None and self.metric == "rmse":
            v = float(((self.weights * d2).sum() / self.weights.sum()).sqrt())
        else:
            v = _objective(d2, self.metric)
        return v if math.isfinite(v) else math.inf

    def _run(self, c: Candidate, s: _Set) -> Optional[Tensor]:
        try:
            validate_times(self.runner.den.process, c.t)
            x = self.runner.run(c, s.noise, self.nfe)
        except ValueError:
            x = None
        self.evaluations += 1
        if x is None:
            return None
        d2 = s.err(x, c.final)
        return d2 if torch.isfinite(d2).all() else None

    def score(self, c: Candidate, obj: str = "rmse") -> float:
        if c.key not in self.d2:
            if self.work_is_full and c.key in self.full_scores:
                self.d2[c.key] = self.full_scores[c.key][1]
            else:
                self.d2[c.key] = self._run(c, self.work)
            self.cands[c.key] = c
            if self.work_is_full and c.key not in self.full_scores:
                d2 = self.d2[c.key]
                self.full_scores[c.key] = (math.inf if d2 is None else _objective(d2, self.metric), d2, c)
        return self.value(c.key, obj)

    def score_full(self, c: Candidate) -> Tuple[float, Optional[Tensor]]:
        """RMSE (``metric``) and per-sample squared errors on the whole calibration set."""
        hit = self.full_scores.get(c.key)
        if hit is None:
            d2 = self._run(c, self.full)
            hit = (math.inf if d2 is None else _objective(d2, self.metric), d2, c)
            self.full_scores[c.key] = hit
            if self.work_is_full:
                self.d2[c.key], self.cands[c.key] = d2, c
        return hit[0], hit[1]

    def ranked(self, obj: str = "rmse") -> List[Tuple[float, Candidate]]:
        return sorted(((self.value(k, obj), c) for k, c in self.cands.items()), key=lambda r: r[0])

    def ranked_all(self, obj: str = "rmse") -> List[Tuple[float, Candidate]]:
        """This working set's ranking, then the earlier working sets' (for candidates not scored here)."""
        now = self.ranked(obj)
        return now + [r for r in self.previous[obj] if r[1].key not in self.cands]

    def best(self, obj: str = "rmse") -> Tuple[float, Optional[Candidate]]:
        r = self.ranked(obj)
        return r[0] if r else (math.inf, None)


def _group(c: Candidate) -> str:
    """A candidate's structural group (for diverse finalists): solver, last step, origin of its grid."""
    lab = c.label.split(" +evolve")[0]
    if "family(" in lab:
        ue, w = _parse_family(lab)
        return f"{c.solver} family u_end~{round(ue * 20) / 20:.2f}{' +evolve' if '+evolve' in c.label else ''}"
    return f"{c.solver} {lab.split(' ')[1] if ' ' in lab else lab}"


def _diverse(ranked: List[Tuple[float, Candidate]], k: int, exclude: set) -> List[Candidate]:
    """Up to k candidates, best first, at most one per group and none in ``exclude`` (nor the default)."""
    out, groups, excl = [], set(), set(exclude)
    for v, c in ranked:
        if len(out) >= k:
            break
        g = _group(c)
        if not math.isfinite(v) or g in groups or c.key in excl or c.label == "default":
            continue
        out.append(c)
        groups.add(g)
        excl.add(c.key)
    return out


def _option_variants(solver: str) -> List[Dict[str, Any]]:
    if solver == "dpm-v3":
        return [{"predictor_pseudo": p, "corrector": c} for p in (False, True) for c in (True, False)]
    if solver == "unipc-bh2":
        return [{"order": 3}]
    return []


# ----------------------------------------------------------------------------------------
# one NFE budget
# ----------------------------------------------------------------------------------------
class BudgetSearch:
    """The search of one NFE budget, in phases: ``candidates`` -> ``screen`` -> ``stratify`` (when the full
    calibration set is too expensive to search on) -> ``refine`` -> ``options`` -> ``polish`` -> ``finalists`` ->
    ``choose`` -> ``evaluate``.  ``run()`` calls them in order and returns the profile ``Entry``.

    Two objectives guide the search (see ``_Search``): the RMSE, which rare mode switches of a few samples
    dominate, and the 'bulk' (trimmed) RMSE of the typical sample.  Screening, a pattern search over the grid
    family, the solver options and an evolutionary polish run for both; the best few of each (structurally
    diverse) become finalists, scored on the whole calibration set, and ``_choose`` picks one -- never one with a
    larger calibration RMSE than the default's, the best named spacing's or the best peer-equivalent's
    (``PEER_EQUIVALENTS``: the peers' configurations that our solvers compute, screened right after the default).

    When the full calibration set is too expensive to search on, screening runs on a random subset; then a few
    diverse screened candidates ("probes") run on the full set, every sample with an outlying error under a probe
    (squared error > 10x that probe's median: the few that a small error sends to another mode) is kept, and the
    search continues on them plus a random part of the rest, weighted so that the 'rmse' objective estimates the
    full set's RMSE (stratified sampling: a small random subset would see too few mode switches)."""

    def __init__(self, den: Denoiser, runner: _Runner, cal: _Set, ev: _Set, nfe: int, solvers: List[str],
                 metric: str, deadline: float, clock: _Clock, seed: int, progress: bool,
                 warm: Sequence[Candidate] = (), trajectory: Optional[Trajectory] = None):
        self.den, self.runner, self.cal, self.ev, self.nfe = den, runner, cal, ev, nfe
        self.trajectory = trajectory  # the teacher's solutions from the first len(trajectory) calibration noises
        self.warm = list(warm)  # smaller budgets' tuned grids, refined to this one (``refined``)
        self.solvers, self.metric, self.deadline, self.clock = solvers, metric, deadline, clock
        self.seed, self.progress = seed, progress
        self.proc = den.process
        self.t_start = clock.elapsed()
        self.budget = max(deadline - self.t_start, 1e-3)
        self.N = len(cal)
        self.rng = np.random.default_rng(seed * 7919 + nfe)
        self.has_v3 = "dpm-v3" in solvers
        self.S = _Search(runner, cal, nfe, metric)
        self.phases: Dict[str, Any] = {}
        self.reserve = 0.0

    def run(self) -> Entry:
        self.candidates()
        self.size()
        self.screen()
        self.reserve += self.fit_cost()  # the search after screening leaves time for the fit
        if self.stratified:
            self.stratify()
        self.refine()
        self.options()
        self.polish()
        chosen = self.choose(self.fit(self.finalists()))
        return self.entry(chosen, self.evaluate(chosen))

    # -- phases ----------------------------------------------------------------------------
    def stop(self) -> bool:
        return self.clock.elapsed() > self.deadline - self.reserve

    def family(self, solver: str, points: Sequence[Tuple[float, float]]) -> List[Candidate]:
        out = []
        for ue, w in points:
            try:
                out.append(Candidate(solver, family_times(self.proc, self.nfe, ue, w, "t_min", solver), "t_min", {},
                                     f"{solver} family(u_end={ue:.3f}, warp={w:.3f})"))
            except ValueError:
                pass
        return out

    def candidates(self) -> None:
        """The default, the peer-equivalents (``peer_candidates``), the named spacings and the grid family's
        lattice, in priority order (a slow machine screens only the first ones)."""
        proc, nfe, solvers = self.proc, self.nfe, self.solvers
        fam_core = [(0.5, 0.7), (0.45, 0.55), (0.6, 0.8), (0.4, 0.55)]
        fam_rest = [(ue, w) for ue in (0.35, 0.45, 0.55, 0.65, 0.75, 0.9) for w in (0.45, 0.6, 0.75, 0.9, 1.15)]
        from ..sampling.defaults import model_guidance, model_parameterisation

        self.default = _rule(proc, nfe, model_parameterisation(self.den), model_guidance(self.den))
        self.peer_of: Dict[tuple, str] = {}  # candidate key -> the peer configurations it reproduces
        self.peers: List[Candidate] = []
        for c, variant in peer_candidates(proc, nfe, solvers):
            if c.key in self.peer_of:
                self.peer_of[c.key] += "; " + variant
            else:
                self.peer_of[c.key] = variant
                self.peers.append(c)
        self.named = [_named(proc, s, nfe, sp, fi).with_(label=f"{s} {sp}/{fi}")
                      for s in solvers for sp in NAMED_SPACINGS for fi in ("t_min", "denoise")]
        core = [c for s in solvers for c in self.family(s, fam_core)]
        # with statistics, the statistics-free solvers get the family's core only (they never win there)
        rest = [c for s in solvers if s == "dpm-v3" or not self.has_v3 for c in self.family(s, fam_rest)]
        seen = {self.default.key}
        self.cands = []
        for c in self.peers + self.warm + core + self.named + rest:  # each once (a named grid may be a peer's)
            if c.key not in seen:
                seen.add(c.key)
                self.cands.append(c)
        others = {c.key for c in core + self.named + rest} | {self.default.key}
        self.peer_only = {c.key for c in self.peers} - others  # screened only as peer-equivalents
        self.phases["peer_equivalents"] = len(self.peers)

    def size(self) -> None:
        """The finalists' reserve, the probes and the screening subset, from the measured cost of a run."""
        runner, N, nfe, budget = self.runner, self.N, self.nfe, self.budget
        self.full_cost = full_cost = runner.cost(N, nfe)
        k_final = 3
        fixed = 3  # finalists besides the diverse ones: the default, the best named and the best peer-equivalent
        while k_final > 1 and (2 * k_final + fixed) * full_cost > 0.35 * budget:
            k_final -= 1
        n_peer = len(self.peer_only)
        n_other = len(self.cands) - n_peer + min(n_peer, PEER_PROMOTE)
        n_screen = N
        while n_screen > 64 and n_other * runner.cost(n_screen, nfe) > 0.3 * budget:
            n_screen = max(64, n_screen // 2)
        n_pre = 0  # the peer-equivalents' pre-screening subset (0: none, they are all screened)
        if n_peer > PEER_PROMOTE and n_peer * runner.cost(n_screen, nfe) > PEER_SHARE * budget:
            n_pre = n_screen // 2
            while n_pre > PEER_MIN_PRESCREEN and n_peer * runner.cost(n_pre, nfe) > PEER_SHARE * budget:
                n_pre //= 2
            n_pre = max(n_pre, PEER_MIN_PRESCREEN)
            n_pre = n_pre if n_pre < n_screen else 0
        self.n_pre = n_pre
        self.stratified = n_screen < N
        n_probe = 0
        if self.stratified:
            n_probe = 4
            while n_probe > 1 and n_probe * full_cost > 0.15 * budget:
                n_probe -= 1
        self.k_final, self.n_screen, self.n_probe = k_final, n_screen, n_probe
        self.reserve = (2 * k_final + fixed) * full_cost if self.stratified else 0.0

    def screen(self) -> None:
        """Every candidate on the screening set, in order (the default, the peer-equivalents, ...), until the
        time is spent.  When screening all peer-equivalents would take over ``PEER_SHARE`` of the time
        (``size``), they are first pre-screened on ``n_pre`` samples and only the best ``PEER_PROMOTE`` of them
        go on (with those that are also named or family candidates)."""
        from tqdm.auto import tqdm

        S = self.S
        if self.stratified:
            S.set_work(self.cal.subset(self.n_screen))
        S.score(self.default)
        cands = self.cands
        if self.n_pre:
            pre, ranked = self.cal.subset(self.n_pre), []
            for c in cands:
                if c.key not in self.peer_only:
                    continue
                if self.stop() and len(ranked) >= MIN_SCREEN:
                    break
                d2 = S._run(c, pre)
                ranked.append((math.inf if d2 is None else _objective(d2, self.metric), c))
            ranked.sort(key=lambda r: r[0])
            keep = {c.key for v, c in ranked[:PEER_PROMOTE] if math.isfinite(v)}
            cands = [c for c in cands if c.key not in self.peer_only or c.key in keep]
            self.phases.update(peer_prescreen_n=self.n_pre, peer_prescreened=len(ranked))
        b = tqdm(total=len(cands), desc=f"NFE {self.nfe}: screening on {self.n_screen}", unit="cand",
                 leave=False, disable=not self.progress, dynamic_ncols=True)
        for c in cands:
            if self.stop() and S.evaluations >= MIN_SCREEN:  # a late budget still sees the first candidates
                break
            S.score(c)
            b.update(1)
            b.set_postfix(best=f"{S.best()[0]:.4g}")
        b.close()
        self.phases["screened"] = S.evaluations
        self.phases["peer_screened"] = sum(c.key in S.d2 for c in self.peers)

    def stratify(self) -> None:
        """Probes on the full set, then the stratified working set (the at-risk samples + a random part)."""
        S, N, cal = self.S, self.N, self.cal
        probes = _diverse(S.ranked("rmse"), (self.n_probe + 1) // 2, set())
        probes += _diverse(S.ranked("bulk"), self.n_probe - len(probes), {c.key for c in probes})
        d2s = []
        for c in probes:
            v, d2 = S.score_full(c)
            if d2 is not None:
                d2s.append(d2 / d2.median().clamp_min(1e-30))
        work_n = self.n_screen  # larger when the network is cheap next to the solver's per-grid set-up
        while 2 * work_n <= N // 2 and self.runner.cost(2 * work_n, self.nfe) <= 1.6 * self.runner.cost(
                self.n_screen, self.nfe):
            work_n *= 2
        if d2s:
            r = torch.stack(d2s).max(0)[0]
            order = torch.argsort(r, descending=True)
            risk = order[: min(int((r > 10).sum()), max(1, int(0.1 * N)), work_n // 3)]
        else:
            risk = torch.zeros(0, dtype=torch.long)
        risk_n = int(risk.numel())
        restidx = torch.from_numpy(np.setdiff1d(np.arange(N), risk.numpy()))
        bulk = restidx[torch.from_numpy(self.rng.permutation(restidx.numel())[: max(work_n - risk_n, 64)])]
        idx = torch.cat([risk, bulk])
        w = torch.cat([torch.ones(risk_n, dtype=DT), torch.full((bulk.numel(),), (N - risk_n) / bulk.numel(),
                                                                 dtype=DT)])
        part = torch.cat([torch.zeros(risk_n, dtype=torch.bool), torch.ones(bulk.numel(), dtype=torch.bool)])
        S.set_work(_Set(cal.noise[idx], cal.tmin[idx], cal.den[idx]), w, part)
        self.phases.update(probes=len(probes), at_risk=risk_n, work_n=int(idx.numel()))
        for obj in ("rmse", "bulk"):  # the screened leaders again, on the working set
            for v, c in S.previous[obj][:4]:
                if self.stop():
                    break
                S.score(c)

    def refine(self) -> None:
        """Pattern search in (u_end, warp) from the best family member, for each objective."""
        S = self.S
        n1 = S.evaluations
        for obj in ("rmse", "bulk"):
            for s in self.solvers:
                if s != "dpm-v3" and self.has_v3:
                    continue
                start = next((c for v, c in S.ranked_all(obj) if c.solver == s and "family(" in c.label
                              and "+evolve" not in c.label and not c.options and math.isfinite(v)), None)
                if start is None:
                    continue
                ue, w = _parse_family(start.label)
                step = [0.05, 0.15]
                cur = (S.score(start, obj), ue, w)
                it = 0
                while not self.stop() and it < 16 and max(step) > 0.01:
                    moved = False
                    for due, dw in ((step[0], 0), (-step[0], 0), (0, step[1]), (0, -step[1])):
                        if self.stop():
                            break
                        nu, nw = cur[1] + due, max(0.2, cur[2] + dw)
                        if not 0.05 < nu <= 0.999:
                            continue
                        cc = self.family(s, [(nu, nw)])
                        if not cc:
                            continue
                        v = S.score(cc[0], obj)
                        it += 1
                        if v < cur[0]:
                            cur, moved = (v, nu, nw), True
                    if not moved:
                        step = [step[0] / 2, step[1] / 2]
        self.phases["refined"] = S.evaluations - n1

    def options(self) -> None:
        """The solver options on the best grid of each solver and objective."""
        S = self.S
        n1 = S.evaluations
        tried = set()
        for obj in ("rmse", "bulk"):
            for s in self.solvers:
                c = next((c for v, c in S.ranked(obj) if c.solver == s and c.label != "default"
                          and math.isfinite(v) and not c.options), None)
                if c is None or c.key in tried:
                    continue
                tried.add(c.key)
                for o in _option_variants(s):
                    if self.stop():
                        break
                    S.score(c.with_(options=o, label=c.label + " " + ",".join(f"{k}={v}" for k, v in o.items())))
        self.phases["options"] = S.evaluations - n1

    def polish(self) -> None:
        """Evolutionary polish of the best candidate of each objective (half the remaining time each)."""
        S, clock = self.S, self.clock
        n1 = S.evaluations
        for j, obj in enumerate(("rmse", "bulk")):
            v_best, c_best = S.best(obj)
            if c_best is None or c_best.label == "default" or self.stop():
                continue
            t_end = clock.elapsed() + (self.deadline - self.reserve - clock.elapsed()) / (2 - j)
            _evolve(S, c_best, self.proc, lambda: self.stop() or clock.elapsed() > t_end, obj,
                    np.random.default_rng(self.seed + self.nfe + j))
        self.phases["evolution"] = S.evaluations - n1

    def best_peer(self) -> Optional[Candidate]:
        """The best peer-equivalent on the whole calibration set among the leaders of the rankings it was screened
        on (the working set's and, stratified, the screening subset's) and those already scored on the whole set."""
        S = self.S
        picks: Dict[tuple, Candidate] = {}
        for ranking in (S.ranked_all("rmse"), S.previous["rmse"]):
            c = next((c for v, c in ranking if c.key in self.peer_of and math.isfinite(v)), None)
            if c is not None:
                picks.setdefault(c.key, c)
        for v, d2, c in list(S.full_scores.values()):
            if c.key in self.peer_of and math.isfinite(v):
                picks.setdefault(c.key, c)
        scored = [(S.score_full(c)[0], c) for c in picks.values()]
        scored = [(v, c) for v, c in scored if math.isfinite(v)]
        return min(scored, key=lambda r: r[0])[1] if scored else None

    def finalists(self) -> List[Candidate]:
        """The best (diverse) of both objectives, the probes, the default, the best named-spacing configuration
        and the best peer-equivalent; scored on the whole calibration set (``self.full``, ``self.d2s``)."""
        S = self.S
        finalists = _diverse(S.ranked_all("rmse"), self.k_final, set())
        finalists += _diverse(S.ranked_all("bulk"), self.k_final, {c.key for c in finalists})
        seen = {c.key for c in finalists}
        for v, d2, c in list(S.full_scores.values()):
            if c.key not in seen and c.label != "default":
                finalists.append(c)
                seen.add(c.key)
        named_keys = {n.key for n in self.named}
        self.best_named = next((c for v, c in S.ranked_all("rmse") if c.key in named_keys and math.isfinite(v)),
                               None)
        self.best_peer_equivalent = self.best_peer()
        for c in (self.default, self.best_named, self.best_peer_equivalent):
            if c is not None and c.key not in seen:
                finalists.append(c)
                seen.add(c.key)
        self.full: Dict[tuple, float] = {}
        self.d2s: Dict[tuple, Optional[Tensor]] = {}
        for c in finalists:
            self.full[c.key], self.d2s[c.key] = S.score_full(c)
        return finalists

    def fit_cost(self) -> float:
        """The time ``fit`` takes: per base, a (2 + 2 folds x len(MUS))-fold run of the fitting noise and a run of
        the rest of the calibration noise."""
        if self.trajectory is None:
            return 0.0
        n = len(self.trajectory)
        per = self.runner.cost(n, self.nfe) * (2 + 2 * len(FIT_MUS)) + self.runner.cost(max(self.N - n, 0), self.nfe)
        return FIT_BASES * per

    def fit(self, finalists: List[Candidate]) -> List[Candidate]:
        """The finalists plus, for the best ``FIT_BASES`` of them that are coefficient matrices (``tuning.fitted``),
        the matrix refitted to the teacher's trajectory on the first calibration noises -- scored out of fold there
        and on the rest of the calibration noise as it is, so it competes on samples it was not fitted to."""
        traj = self.trajectory
        if traj is None:
            return finalists
        n1 = self.S.evaluations
        n = len(traj)
        proc, cal = self.proc, self.cal
        bases, grids = [], set()
        for c in sorted(finalists, key=lambda c: self.full[c.key]):
            g = (c.final, tuple(np.round(c.t.numpy(), 9)))
            if len(bases) < FIT_BASES and linear_solver(c.solver) and math.isfinite(self.full[c.key]) \
                    and g not in grids:
                bases.append(c)
                grids.add(g)
        fits = []
        for c in bases:
            if self.clock.elapsed() > self.deadline:
                break
            grid = explicit(proc, t=c.t, final=c.final)
            times = [float(v) for v in grid.t[1:] if math.isfinite(float(v))]
            targets = traj.at(times) if times else []
            if grid.clean_end:
                targets = targets + [cal.den[:n]]
            start = linear_coefficients(proc, c.solver, grid, **self.runner.options(c))
            try:
                f = fit_solver(self.den, grid, start, cal.noise[:n], targets, FIT_MUS, kwargs=self.runner.kwargs,
                               batch=self.runner.batch)
            except (ValueError, RuntimeError):  # a non-finite run of a fold
                continue
            fits.append({"base": c.label, "mu": f.mu, "cv": {str(k): v for k, v in f.cv.items()}})
            if not math.isfinite(f.mu):
                continue
            rows = [[float(v) for v in row[: i + 2]] + [0.0] * (grid.steps - i - 1)
                    for i, row in enumerate(f.coefficients.tolist())]
            cand = Candidate("fitted", c.t, c.final, {"coefficients": rows}, f"fitted {c.label} (mu={f.mu:g})")
            d2 = f.d2
            if self.N > n:
                rest = self.S._run(cand, _Set(cal.noise[n:], cal.tmin[n:], cal.den[n:]))
                if rest is None:
                    continue
                d2 = torch.cat([d2, rest])
            v = _objective(d2, self.metric)
            self.S.full_scores[cand.key] = (v, d2, cand)
            self.full[cand.key], self.d2s[cand.key] = v, d2
            finalists = finalists + [cand]
        self.phases.update(fitted=fits, fit_evaluations=self.S.evaluations - n1, fit_n=n)
        return finalists

    def choose(self, finalists: List[Candidate]) -> Candidate:
        self.final_list = finalists
        chosen = _choose(finalists, self.full, self.d2s, [self.default, self.best_named, self.best_peer_equivalent])
        _, used = _n_points(chosen.solver, self.nfe, chosen.final)
        if used != self.nfe:
            raise RuntimeError(f"internal: the chosen grid uses {used} NFE, not {self.nfe}")
        return chosen

    def evaluate(self, chosen: Candidate) -> Dict[str, Tuple[float, float]]:
        """(RMSE, median) on the evaluation noise of the choice and the baselines -- never used to choose."""
        ev_err = {}
        for name, c in (("tuned", chosen), ("default", self.default), ("best_named", self.best_named),
                        ("best_peer_equivalent", self.best_peer_equivalent)):
            if c is None:
                continue
            x = self.runner.run(c, self.ev.noise, self.nfe)
            if x is None:
                ev_err[name] = (math.inf, math.inf)
            else:
                d2 = self.ev.err(x, c.final)
                ev_err[name] = (_objective(d2, "rmse"), _objective(d2, "median"))
        return ev_err

    def entry(self, chosen: Candidate, ev_err: Dict[str, Tuple[float, float]]) -> Entry:
        full, d2s, default, best_named = self.full, self.d2s, self.default, self.best_named
        d = self.default
        base = {"default": {"label": f"{d.solver}{_options_label(d.options)} (the default rule)",
                            "calib_error": full[default.key], "eval_error": ev_err["default"][0]}}
        if best_named is not None:
            base["best_named"] = {"label": best_named.label, "calib_error": full[best_named.key],
                                  "eval_error": ev_err["best_named"][0]}
        peer = self.best_peer_equivalent
        if peer is not None:
            base["best_peer_equivalent"] = {"label": peer.label, "peer": self.peer_of[peer.key],
                                            "calib_error": full[peer.key], "eval_error": ev_err["best_peer_equivalent"][0]}
        finalists = self.final_list
        search = {"evaluations": self.S.evaluations, "phases": self.phases, "screen_n": self.n_screen,
                  "calib_n": self.N,
                  "finalists": [{"label": c.label, "calib_error": full[c.key],
                                 "calib_trimmed": None if d2s[c.key] is None else _objective(d2s[c.key], "trimmed")}
                                for c in sorted(finalists, key=lambda c: full[c.key])[:12]],
                  "n_finalists": len(finalists),
                  "chosen": chosen.label, "seconds": round(self.clock.elapsed() - self.t_start, 2)}
        return Entry(self.nfe, chosen.solver, [float(v) for v in chosen.t], chosen.final, dict(chosen.options),
                     chosen.solver == "dpm-v3", full[chosen.key], ev_err["tuned"][0], ev_err["tuned"][1], base,
                     search)


def _choose(finalists: List[Candidate], full: Dict[tuple, float], d2s: Dict[tuple, Optional[Tensor]],
            starts: List[Optional[Candidate]]) -> Candidate:
    """The final choice on the full calibration set: among the finalists whose mean squared error is within one
    standard error of the smallest (statistically tied: typically one rare mode switch more or fewer), the one
    with the smallest trimmed RMSE (worst 1% of the samples dropped: the typical sample's accuracy).  Never one
    with a larger RMSE than a starting configuration's."""
    best = min(finalists, key=lambda c: (full[c.key], c.label != "default"))
    d2 = d2s.get(best.key)
    if d2 is None or not math.isfinite(full[best.key]):
        return best
    mse, se = float(d2.mean()), float(d2.std() / math.sqrt(d2.numel()))
    cap = min([full[c.key] for c in starts if c is not None] + [math.inf])
    tied = [c for c in finalists if d2s.get(c.key) is not None and math.isfinite(full[c.key])
            and float(d2s[c.key].mean()) <= mse + se and full[c.key] <= cap]
    if not tied:
        return best
    return min(tied, key=lambda c: (_objective(d2s[c.key], "trimmed"), full[c.key]))


def _parse_family(label: str) -> Tuple[float, float]:
    inner = label[label.index("family(") + 7:label.index(")")]
    d = dict(p.strip().split("=") for p in inner.split(","))
    return float(d["u_end"]), float(d["warp"])


def _evolve(S: _Search, start: Candidate, proc, stop: Callable[[], bool], obj: str, rng: np.random.Generator,
            population: int = 10, elite: int = 2, mutation: float = 0.3, patience: int = 6) -> None:
    """Evolutionary polish (``evolution.evolve_points``, annealed mutation) of the free log-SNR positions of
    ``start``'s grid, seeded with the good candidates of the same solver, last step and options, scored by ``S``
    on objective ``obj`` (every child lands in ``S``'s rankings), until ``stop()``."""
    clean = start.final == "denoise"
    label = start.label.split(" +evolve")[0] + " +evolve"
    starts, scores = [free_points(proc, start.t, clean)], [S.score(start, obj)]
    if starts[0].size == 0:
        return
    for v, c in S.ranked(obj)[:12]:
        if c.solver == start.solver and c.final == start.final and c.options == start.options and c.key != start.key:
            starts.append(free_points(proc, c.t, clean))
            scores.append(v)

    def fitness(free: np.ndarray) -> float:
        return S.score(start.with_(t=grid_times(proc, free, clean), label=label), obj)

    evolve_points(fitness, starts, clean, rng, population=population, elite=elite, mutation=mutation,
                  patience=patience, stop=stop, fill=False, anneal=True, scores=scores)
