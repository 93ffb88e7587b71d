"""``ds.bench(...)`` and ``python -m diffsolve.bench``: our solvers against diffusers and k-diffusion on the
same frozen model, from the same noise, scored against the exact answer for where each run stops."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import numbers
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..grids import FINALS as _GRID_FINALS
from ..grids import SPACINGS as _GRID_SPACINGS
from . import harness as H
from . import library as ds
from . import peers as P

DT = torch.float64
SPACINGS = ("logsnr", "karras", "uniform", "quadratic")
FINALS = ("denoise", "t_min")
NFES = (5, 6, 8, 10, 15, 20)
TARGET_NFES = (5, 6, 8, 10, 15, 20)
DEFAULT_BATCH = {64: 256, 3072: 256}  # 256: a batch RMSE that a single sample switching mode moves little
QUICK_SOLVERS = ("ddim", "dpm++2m", "dpm++3m", "unipc-bh2")
QUICK_OVERHEAD_ALGORITHMS = ("ddim", "dpm++2m")
PEER_LIBRARIES = ("diffusers", "k-diffusion")
WRITE_FORMATS = ("md", "csv", "json", "png")


@dataclass
class BenchResult:
    """Everything one benchmark measured.  ``rows``: one per run (see ``harness.ROW_FIELDS``);
    ``parity``: matched pairs; ``overhead``: solver overhead per NFE; ``problems``: the models and their
    references; ``meta``: command, timings, versions, what was skipped; ``files``: what was written."""

    rows: List[Dict[str, Any]]
    parity: List[Dict[str, Any]]
    overhead: List[Dict[str, Any]]
    problems: List[Dict[str, Any]]
    nfes: List[int]
    meta: Dict[str, Any] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)

    def best(self, problem: str, nfe: int, ours: bool, key: str = "rmse",
             tuned: bool = False) -> Optional[Dict[str, Any]]:
        """The best run (smallest finite ``key``) of ours or of the peers at an NFE budget; ``tuned``: of ours,
        the tuned-profile runs only (otherwise they are left out: the generic configurations)."""
        cands = [r for r in self.rows if r["problem"] == problem and r["nfe_budget"] == nfe and not r["error"]
                 and (r["library"] == "diffsolve") == ours and _finite(r.get(key))
                 and (not ours or (r["family"] == H.TUNED) == tuned)]
        return min(cands, key=lambda r: abs(float(r[key]))) if cands else None

    def target_ratios(self, nfes: Sequence[int] = TARGET_NFES, key: str = "rmse",
                      tuned: bool = False) -> List[Dict[str, Any]]:
        """Our best configuration's error (``tuned``: the tuned profile's) / the best peer configuration's
        error, per problem and NFE."""
        out = []
        for pr in self.problems:
            for n in nfes:
                if n not in self.nfes:
                    continue
                o, p = self.best(pr["name"], n, True, key, tuned), self.best(pr["name"], n, False, key)
                if tuned and o is None:
                    continue
                ratio = float(o[key]) / float(p[key]) if o and p and float(p[key]) > 0 else float("nan")
                out.append({"problem": pr["name"], "dim": pr["dim"], "nfe": n, "ratio": ratio,
                            "ours": o, "peer": p})
        return out

    def tuned_reach(self, peer_nfe: int = 10, key: str = "rmse") -> List[Dict[str, Any]]:
        """Per problem with tuned runs: the fewest NFE at which the tuned profile's error is at most the best
        peer configuration's error at ``peer_nfe``."""
        out = []
        for pr in self.problems:
            p = self.best(pr["name"], peer_nfe, False, key)
            runs = [(n, self.best(pr["name"], n, True, key, tuned=True)) for n in self.nfes]
            runs = [(n, r) for n, r in runs if r is not None]
            if p is None or not runs:
                continue
            hit = [n for n, r in runs if float(r[key]) <= float(p[key])]
            out.append({"problem": pr["name"], "peer_nfe": peer_nfe, "peer": p, "peer_error": float(p[key]),
                        "fewest_nfe": min(hit) if hit else None, "tuned_nfes": [n for n, _ in runs]})
        return out


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def load_result(path: str) -> BenchResult:
    """A BenchResult read back from the JSON a run wrote (to re-render its report)."""
    import json
    with open(path) as f:
        d = json.load(f)

    def num(v):
        return float("nan") if v is None else v
    rows = [{k: (num(v) if k in _NUMERIC else v) for k, v in r.items()} for r in d["rows"]]
    parity = [{k: (num(v) if k.startswith("rel_diff") else v) for k, v in r.items()} for r in d["parity"]]
    over = [{k: (num(v) if k in ("overhead_per_nfe", "min", "spread", "cpu_per_nfe") else v) for k, v in o.items()}
            for o in d["overhead"]]
    return BenchResult(rows, parity, over, d["problems"], d["nfes"], d["meta"])


_NUMERIC = ("rmse", "rmse_median", "llgap", "llgap_se", "wall", "net_time", "overhead_per_nfe", "jump_distance")


def load_factory(spec: str):
    """'module:function' -> the object the function returns (a ds.Denoiser)."""
    if ":" not in spec:
        raise ValueError(f"--model expects 'module:function', got {spec!r}")
    mod, fn = spec.split(":", 1)
    den = getattr(importlib.import_module(mod), fn)()
    if not isinstance(den, ds.Denoiser):
        raise TypeError(f"{spec} returned {type(den).__name__}, expected a diffsolve.Denoiser")
    return den


def _is_factory(spec: str) -> bool:
    """'pkg.module:function' (and not an existing path such as C:\\models)."""
    import os
    return ":" in spec and not os.path.exists(spec)


def load_checkpoint(path: str):
    """A model the library can load (``ds.load``); a clear error where that is not available."""
    loader = getattr(ds, "load", None)
    if loader is None:
        raise NotImplementedError("this diffsolve has no checkpoint loader (ds.load); use --model module:function")
    return loader(path)


# ----------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark runs: the problems, our configurations, the peers, the parity and overhead checks,
    how it runs and what it writes.  ``bench(config)`` runs it; ``bench(**fields)`` builds one.

    Bad values raise ``ValueError`` when the config is built (``validate``).  ``quick=True`` replaces some
    fields by a run under a minute (dim 64, batch 32, NFE 5 and 10, a few solvers and peers): ``resolved()``
    is the config that actually runs.  A ``model`` or ``checkpoint`` replaces ``dims``: its reference is a
    high-NFE (``ref_nfe``) solution of the same model.  Each tuned profile in ``profiles`` (``ds.tune``) runs,
    as family ``tuned profile``, at its NFE budgets on every problem whose model it belongs to (checked by its
    fingerprint; a profile that matches no problem is reported under ``skipped``).
    """

    # problems
    dims: Sequence[int] = (64, 3072)  # exact Gaussian-mixture sizes (GaussianMixture.random(dim, seed=0), DDPM linear)
    nfes: Sequence[int] = NFES  # NFE budgets
    batch: Optional[Union[int, Sequence[int]]] = None  # one batch size for all problems or one per dim (None: 256)
    model: Any = None  # a ds.Denoiser, a 'module:function' factory returning one, a checkpoint folder or name
    checkpoint: Optional[str] = None  # a model checkpoint path for ds.load
    shape: Optional[Sequence[int]] = None  # the model's data shape when it has no sample_shape
    ref_nfe: int = 500  # NFE of the reference solution of a model that has no exact answer
    ref_solver: str = "dpm++3m"  # its solver
    ref_spacing: str = "auto"  # and its grid ('auto': uniform in t, Karras for EDM; see reference_convergence)
    # our configurations
    solvers: Optional[Sequence[str]] = None  # our solvers (None: every deterministic one a benchmark can run)
    spacings: Sequence[Any] = SPACINGS  # time-step spacings (names, or callables (process, n) -> times)
    finals: Sequence[str] = FINALS  # how each run ends: 'denoise' (jump to clean data) and/or 't_min'
    stochastic: bool = False  # also our stochastic solvers when solvers is None (likelihood metric only)
    profiles: Sequence[Any] = ()  # tuned profiles (paths or Profile objects) run on the models they belong to
    # peers
    peers: bool = True  # run diffusers and k-diffusion (each skipped with a warning when missing)
    libraries: Optional[Sequence[str]] = None  # a subset of the peer libraries (None: both)
    peer_dtype: torch.dtype = torch.float32  # the peers' state dtype (float32, as pipelines run)
    # parity
    parity: bool = True  # the matched-pairs check (ours vs a peer, same algorithm) on the smallest problem
    parity_steps: Sequence[int] = (5, 10, 20)  # step counts of the matched pairs
    # overhead
    overhead: bool = True  # measure solver overhead per NFE (cheap exact network, one thread)
    overhead_dim: int = 3072  # data size of the overhead measurement
    overhead_batch: int = 128  # batch of the overhead measurement
    overhead_nfe: int = 20  # NFE of each overhead run
    overhead_repeats: int = 7  # round-robin rounds (the median is reported)
    overhead_algorithms: Optional[Sequence[str]] = None  # algorithms or solver names (None: all we share with a peer)
    # run
    quick: bool = False  # a run under a minute: replaces the sizes, NFEs and subsets (see resolved())
    seed: int = 0  # noise seed
    threads: Optional[int] = 1  # torch threads during the run (1: tiny tensors on a shared machine; None: leave it)
    progress: bool = True  # show a progress bar
    command: Optional[str] = None  # the command line recorded in the report (None: 'ds.bench(...)')
    # output
    out: Optional[str] = None  # output folder (None: write nothing)
    write: Sequence[str] = WRITE_FORMATS  # formats to write: md, csv, json, png
    name: str = "benchmarks"  # basename of the output files

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on a bad value (checked on the values that run, after ``quick``)."""
        _checked(self._effective())

    def resolved(self) -> "BenchConfig":
        """The config that runs: ``quick`` applied, NFE budgets sorted, name lists as tuples."""
        return BenchConfig(**_checked(self._effective()))

    def _effective(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.quick:
            values.update(
                dims=(64,), nfes=(5, 10), batch=self.batch or 32, solvers=self.solvers or QUICK_SOLVERS,
                spacings=("logsnr", "karras"), parity_steps=(5,),
                overhead_dim=64, overhead_batch=32, overhead_repeats=2, overhead_nfe=10,
                overhead_algorithms=self.overhead_algorithms or tuple(
                    a for a in H.OVERHEAD_ALGORITHMS if a in QUICK_OVERHEAD_ALGORITHMS))
        return values


_FIELDS = tuple(f.name for f in fields(BenchConfig))


def _checked(v: Dict[str, Any]) -> Dict[str, Any]:
    """The field values ``v``, checked (``ValueError`` naming the field) and normalised."""
    v = dict(v)
    has_model = v["model"] is not None or v["checkpoint"] is not None
    # problems
    v["dims"] = _int_tuple("dims", v["dims"])
    if not v["dims"] and not has_model:
        raise ValueError("dims is empty: give at least one problem size (or a model or checkpoint)")
    v["nfes"] = tuple(sorted(_int_tuple("nfes", v["nfes"], lenient=True)))
    if not v["nfes"]:
        raise ValueError("nfes is empty: give at least one NFE budget")
    b = v["batch"]
    if b is not None:
        if isinstance(b, numbers.Integral) and not isinstance(b, bool):
            v["batch"] = _positive("batch", b)
        else:
            v["batch"] = _int_tuple("batch", b, what="an integer or a sequence of integers")
            if not has_model and len(v["batch"]) not in (1, len(v["dims"])):
                raise ValueError(f"batch needs one value or one per dim: {len(v['batch'])} values for "
                                 f"{len(v['dims'])} dims")
    if v["checkpoint"] is not None and not isinstance(v["checkpoint"], (str, os.PathLike)):
        raise ValueError(f"checkpoint must be a path, got {type(v['checkpoint']).__name__}")
    if v["shape"] is not None:
        v["shape"] = _int_tuple("shape", v["shape"])
    v["ref_nfe"] = _positive("ref_nfe", v["ref_nfe"])
    _solver("ref_solver", v["ref_solver"])
    # our configurations
    if v["solvers"] is not None:
        v["solvers"] = _names("solvers", v["solvers"])
        for s in v["solvers"]:
            _solver("solvers", s)
    v["spacings"] = _names("spacings", v["spacings"])
    for s in v["spacings"]:
        if not callable(s) and s not in _GRID_SPACINGS:
            raise ValueError(f"unknown spacing {s!r} in spacings; known: {', '.join(_GRID_SPACINGS)}")
    v["finals"] = _names("finals", v["finals"])
    for f in v["finals"]:
        if f not in _GRID_FINALS:
            raise ValueError(f"unknown final {f!r} in finals; known: {', '.join(_GRID_FINALS)}")
    p = v["profiles"]
    if isinstance(p, (str, os.PathLike)):
        v["profiles"] = (p,)
    elif isinstance(p, Iterable):
        v["profiles"] = tuple(p)
    else:
        raise ValueError(f"profiles must be a sequence of profile paths or Profile objects, got {p!r}")
    # peers
    if v["libraries"] is not None:
        v["libraries"] = _names("libraries", v["libraries"])
        for lib in v["libraries"]:
            if lib not in PEER_LIBRARIES:
                raise ValueError(f"unknown peer library {lib!r} in libraries; known: {', '.join(PEER_LIBRARIES)}")
    if not isinstance(v["peer_dtype"], torch.dtype) or not v["peer_dtype"].is_floating_point:
        raise ValueError(f"peer_dtype must be a floating torch dtype (torch.float32, torch.float64), "
                         f"got {v['peer_dtype']!r}")
    # parity
    v["parity_steps"] = _int_tuple("parity_steps", v["parity_steps"])
    # overhead
    for k in ("overhead_dim", "overhead_batch", "overhead_nfe", "overhead_repeats"):
        v[k] = _positive(k, v[k])
    if v["overhead_algorithms"] is not None:
        v["overhead_algorithms"] = _names("overhead_algorithms", v["overhead_algorithms"])
        for a in v["overhead_algorithms"]:
            if a not in H.OVERHEAD_ALGORITHMS:
                _solver("overhead_algorithms", a)
    # run
    if not isinstance(v["seed"], numbers.Integral):
        raise ValueError(f"seed must be an integer, got {v['seed']!r}")
    if v["threads"] is not None:
        if not isinstance(v["threads"], numbers.Integral) or v["threads"] < 0:
            raise ValueError(f"threads must be a positive integer, 0 or None (leave torch's setting), "
                             f"got {v['threads']!r}")
    if v["command"] is not None and not isinstance(v["command"], str):
        raise ValueError(f"command must be a string, got {v['command']!r}")
    # output
    if v["out"] is not None and not isinstance(v["out"], (str, os.PathLike)):
        raise ValueError(f"out must be a folder path or None, got {v['out']!r}")
    v["write"] = _names("write", v["write"])
    for w in v["write"]:
        if w not in WRITE_FORMATS:
            raise ValueError(f"unknown format {w!r} in write; known: {', '.join(WRITE_FORMATS)}")
    if not isinstance(v["name"], str) or not v["name"]:
        raise ValueError(f"name must be a non-empty string, got {v['name']!r}")
    return v


def _names(field_name: str, value) -> tuple:
    """A sequence of names; a string is one name or a comma-separated list."""
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    if not isinstance(value, Iterable):
        raise ValueError(f"{field_name} must be a sequence of names, got {value!r}")
    return tuple(value)


def _int_tuple(field_name: str, value, lenient: bool = False, what: str = "a sequence of integers") -> tuple:
    """Positive integers; ``lenient``: anything ``int()`` takes (as NFE budgets always have been read)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{field_name} must be {what}, got {value!r}")
    out = []
    for x in value:
        if lenient:
            try:
                x = int(x)
            except (TypeError, ValueError):
                raise ValueError(f"{field_name}: {x!r} is not an integer") from None
        out.append(_positive(field_name, x))
    return tuple(out)


def _positive(field_name: str, x) -> int:
    if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        raise ValueError(f"{field_name}: {x!r} is not an integer")
    if x <= 0:
        raise ValueError(f"{field_name} must be positive, got {x}")
    return int(x)


def _solver(field_name: str, name) -> None:
    try:
        ds.get_solver(name)
    except ValueError as e:
        raise ValueError(f"{field_name}: {e}") from None


def _config(config: Union[BenchConfig, str, "os.PathLike[str]", None], overrides: Dict[str, Any]) -> BenchConfig:
    """``bench``'s arguments as one config: a BenchConfig (or, as before, the output folder) and keywords."""
    if config is not None and not isinstance(config, BenchConfig):
        if not isinstance(config, (str, os.PathLike)):
            raise TypeError(f"bench() takes a BenchConfig or an output folder, got {type(config).__name__}")
        if "out" in overrides:
            raise TypeError("bench() got multiple values for argument 'out'")
        config, overrides = None, {"out": config, **overrides}
    for k in overrides:
        if k not in _FIELDS:
            raise TypeError(f"bench() got an unexpected keyword argument {k!r}")
    return replace(config, **overrides) if config is not None else BenchConfig(**overrides)


# ----------------------------------------------------------------------------------------
# the run, phase by phase
# ----------------------------------------------------------------------------------------
def bench(config: Union[BenchConfig, str, "os.PathLike[str]", None] = None, **overrides: Any) -> BenchResult:
    """Run ours and the peers' samplers on the same frozen model and noise; score every run against the
    exact answer for where it stopped; optionally write ``{out}/{name}.md|csv|json|png``.

    ``config``: a ``BenchConfig`` (or the output folder, ``out``); ``overrides``: any of its fields by name,
    applied on top of it (``bench(out="docs", quick=True)``, ``bench(cfg, seed=1)``).
    """
    t_start = time.perf_counter()
    cfg = _config(config, overrides).resolved()
    skipped: Dict[str, str] = {}
    solvers = _our_solvers(cfg, skipped)
    with _torch_threads(cfg.threads):
        libraries = _peer_libraries(cfg, skipped)
        problems = _problems(cfg)
        plan = _Plan(solvers, libraries, problems, _peer_configs(cfg, libraries, problems, skipped),
                     _parity_pairs(cfg, libraries), _overhead_algorithms(cfg), _tuned_runs(cfg, problems, skipped))
        bar = _progress_bar(cfg, plan)
        with torch.inference_mode():
            rows: List[Dict[str, Any]] = []
            for pb in problems:
                rows += _our_rows(cfg, plan, pb, bar)
                rows += _profile_rows(plan, pb, bar)
                rows += _peer_rows(cfg, plan, pb, bar)
            parity_rows = _parity(cfg, plan, bar)
            over_rows = _overhead(cfg, plan, bar)
        bar.close()
    res = BenchResult(rows, parity_rows, over_rows, [_describe(pb) for pb in problems], list(cfg.nfes),
                      _meta(cfg, plan, skipped, t_start))
    res.files = _write(cfg, res)
    return res


@dataclass
class _Plan:
    """What a run will do, decided before it starts."""

    solvers: List[str]  # our solvers
    libraries: List[str]  # the peer libraries that load
    problems: List[H.Problem]
    peer_configs: List[P.PeerConfig]
    pairs: List[H.ParityPair]  # parity pairs
    overhead_algorithms: List[str]  # [] without the overhead measurement
    tuned_runs: List[Tuple[H.Problem, Any, List[int]]]  # (problem, profile, its NFE budgets)


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    """torch's thread count set for the run (when ``threads``), and restored after it."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _our_solvers(cfg: BenchConfig, skipped: Dict[str, str]) -> List[str]:
    """Our solvers; those that need inputs a benchmark cannot supply (dpm-v3's model statistics) are
    reported under ``skipped`` and left out of the default."""
    usable = []
    for s in ds.solvers():
        if getattr(s, "requires", ()):
            skipped[f"ours {s.name}"] = f"needs {', '.join(s.requires)}= (model-specific inputs)"
        else:
            usable.append(s)
    if cfg.solvers:
        return [ds.get_solver(s).name for s in cfg.solvers]
    det = [s.name for s in usable if not s.stochastic]
    sto = [s.name for s in usable if s.stochastic]
    return det + (sto if cfg.stochastic else [])


def _peer_libraries(cfg: BenchConfig, skipped: Dict[str, str]) -> List[str]:
    """The peer libraries that run; a missing one is skipped with a warning."""
    libs_ok: List[str] = []
    if not cfg.peers:
        return libs_ok
    for lib, why in P.available_libraries().items():
        if cfg.libraries is not None and lib not in cfg.libraries:
            continue
        if why:
            skipped[lib] = why
            warnings.warn(f"diffsolve.bench: skipping {lib}: {why}", RuntimeWarning, stacklevel=3)
        else:
            libs_ok.append(lib)
    return libs_ok


def _problems(cfg: BenchConfig) -> List[H.Problem]:
    """The models with their references: the user's model, or the exact mixtures of ``dims``."""
    model, checkpoint, batch = cfg.model, cfg.checkpoint, cfg.batch
    if model is not None or checkpoint is not None:
        if isinstance(model, str) and not _is_factory(model):  # a checkpoint/diffusers folder or 'mnist'
            checkpoint, model = model, None
        b = batch if isinstance(batch, int) else (batch[0] if batch else 16)
        if checkpoint is not None:  # a checkpoint, a built-in name, or 'name@w' (guided, labels bound)
            from .models import load_spec
            den = load_spec(checkpoint, b)[0]
        else:
            den = load_factory(model) if isinstance(model, str) else model
        shape = cfg.shape or tuple(getattr(den, "sample_shape", None) or ()) or None
        label = checkpoint or (model if isinstance(model, str) else type(getattr(den, "net", den)).__name__)
        return [H.model_problem(den, b, cfg.seed, shape, cfg.ref_nfe, name=f"model {label}",
                                ref_solver=cfg.ref_solver, ref_spacing=cfg.ref_spacing)]
    if batch is None:
        batches = [DEFAULT_BATCH.get(d, 256) for d in cfg.dims]
    elif isinstance(batch, int):
        batches = [batch] * len(cfg.dims)
    else:  # one value, or one per dim (checked by BenchConfig)
        batches = list(batch) * (len(cfg.dims) if len(batch) == 1 else 1)
    return [H.exact_problem(d, b, cfg.seed) for d, b in zip(cfg.dims, batches)]


def _peer_configs(cfg: BenchConfig, libraries: List[str], problems: List[H.Problem],
                  skipped: Dict[str, str]) -> List[P.PeerConfig]:
    """The peers' configurations; a problem the peers cannot run is reported with a warning."""
    families = {pb.family for pb in problems if not pb.peers_ok}
    if len(families) > 1:
        raise ValueError(f"one bench runs one model family, got {sorted(families)}")
    family = families.pop() if families else "ddpm"
    cfgs = P.peer_configs(cfg.quick, libraries, family) if libraries else []
    for pb in problems:
        why = pb.peers_ok  # the reason the peers cannot run on it ('' when they can)
        if cfgs and why:
            skipped[f"peers on {pb.name}"] = why
            warnings.warn(f"diffsolve.bench: no peers on {pb.name}: {why}", RuntimeWarning, stacklevel=3)
    return cfgs


def _parity_pairs(cfg: BenchConfig, libraries: List[str]) -> List[H.ParityPair]:
    pairs = H.parity_pairs(cfg.quick) if cfg.parity and libraries else []
    return [p for p in pairs if p.cfg.library in libraries]


def _overhead_algorithms(cfg: BenchConfig) -> List[str]:
    return list(cfg.overhead_algorithms or H.OVERHEAD_ALGORITHMS) if cfg.overhead else []


def _tuned_runs(cfg: BenchConfig, problems: List[H.Problem],
                skipped: Dict[str, str]) -> List[Tuple[H.Problem, Any, List[int]]]:
    """(problem, profile, NFE budgets) for each profile on each problem whose model it belongs to; a profile
    that matches none is reported with a warning."""
    from ..tuning import ProfileMismatch, load_profile
    tuned_runs = []
    for spec in cfg.profiles:
        prof = load_profile(spec)
        label = prof.path or repr(prof)
        matched, why = False, "no models"
        for pb in problems:
            try:
                prof.check(pb.den, pb.shape)
            except ProfileMismatch as e:
                why = str(e)
                continue
            matched = True
            tuned_runs.append((pb, prof, [n for n in cfg.nfes if n in prof.entries]))
        if not matched:
            skipped[f"profile {label}"] = f"matches none of the models ({why})"
            warnings.warn(f"diffsolve.bench: profile {label} matches none of the models", RuntimeWarning,
                          stacklevel=3)
    return tuned_runs


def _progress_bar(cfg: BenchConfig, plan: _Plan):
    """A progress bar over every run the plan makes."""
    n_ours = len(plan.solvers) * len(cfg.spacings) * len(cfg.finals) * len(cfg.nfes)
    n_peer = sum(len(c.tolerances) if c.adaptive else len(cfg.nfes) for c in plan.peer_configs)
    n_par = len(plan.pairs) * len(cfg.parity_steps)
    n_over = cfg.overhead_repeats * sum(2 + sum(1 for p in H.OVERHEAD_ALGORITHMS.get(a, ("", {}, []))[2]
                                                if p[0] in plan.libraries) for a in plan.overhead_algorithms)
    n_tuned = sum(len(ns) for _, _, ns in plan.tuned_runs)
    total = sum(n_ours + (n_peer if not pb.peers_ok else 0) for pb in plan.problems) + n_par + n_over + n_tuned
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="run", desc="diffsolve bench", disable=not cfg.progress, dynamic_ncols=True)


def _our_rows(cfg: BenchConfig, plan: _Plan, pb: H.Problem, bar) -> List[Dict[str, Any]]:
    """Every configuration of ours on one problem: solver x NFE x spacing x final."""
    rows = []
    for s in plan.solvers:
        for n in cfg.nfes:
            bar.set_postfix_str(f"{pb.name} {s} NFE {n}", refresh=False)
            for sp in cfg.spacings:
                for fi in cfg.finals:
                    rows.append(H.run_ours(pb, s, n, sp, fi))
                    bar.update(1)
    return rows


def _profile_rows(plan: _Plan, pb: H.Problem, bar) -> List[Dict[str, Any]]:
    """The tuned profiles that belong to one problem's model, at their NFE budgets."""
    rows = []
    for tpb, prof, ns in plan.tuned_runs:
        if tpb is pb:
            for n in ns:
                bar.set_postfix_str(f"{pb.name} tuned NFE {n}", refresh=False)
                rows.append(H.run_profile(pb, prof, n))
                bar.update(1)
    return rows


def _peer_rows(cfg: BenchConfig, plan: _Plan, pb: H.Problem, bar) -> List[Dict[str, Any]]:
    """Every peer configuration on one problem: at each NFE budget, or (adaptive) at each tolerance."""
    rows: List[Dict[str, Any]] = []
    if pb.peers_ok:
        return rows
    for c in plan.peer_configs:
        bar.set_postfix_str(f"{pb.name} {c.name}", refresh=False)
        if c.adaptive:
            for tol in c.tolerances:
                r = H.run_peer_config(pb, c, None, cfg.peer_dtype, tolerance=tol)
                H.assign_budget(r, cfg.nfes)
                rows.append(r)
                bar.update(1)
            continue
        for n in cfg.nfes:
            rows.append(H.run_peer_config(pb, c, n, cfg.peer_dtype))
            bar.update(1)
    return rows


def _parity(cfg: BenchConfig, plan: _Plan, bar) -> List[Dict[str, Any]]:
    """The matched pairs on the smallest problem the peers run on, at each of ``parity_steps``."""
    rows: List[Dict[str, Any]] = []
    if not plan.pairs:
        return rows
    pb = min((p for p in plan.problems if not p.peers_ok), key=lambda p: p.dim, default=None)
    if pb is None:
        return rows
    for pair in plan.pairs:
        bar.set_postfix_str(f"parity {pair.cfg.name}", refresh=False)
        for n in cfg.parity_steps:
            r = H.run_parity(pb, pair, n)
            r["problem"] = pb.name
            rows.append(r)
            bar.update(1)
    return rows


def _overhead(cfg: BenchConfig, plan: _Plan, bar) -> List[Dict[str, Any]]:
    """Solver overhead per NFE, on one thread (then the run's thread count again)."""
    if not cfg.overhead:
        return []
    bar.set_postfix_str(f"overhead (dim {cfg.overhead_dim}, batch {cfg.overhead_batch}, 1 thread)", refresh=False)
    torch.set_num_threads(1)
    rows = H.overhead(cfg.overhead_dim, cfg.overhead_batch, cfg.overhead_nfe, cfg.overhead_repeats, cfg.seed,
                      algorithms=plan.overhead_algorithms, libraries=plan.libraries, progress=bar)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return rows


def _meta(cfg: BenchConfig, plan: _Plan, skipped: Dict[str, str], t_start: float) -> Dict[str, Any]:
    """The command, timings, versions, settings and what was skipped."""
    return {
        "command": cfg.command or "ds.bench(...)", "wall": time.perf_counter() - t_start, "quick": cfg.quick,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": cfg.threads, "versions": _versions(), "skipped": skipped,
        "peer_dtype": str(cfg.peer_dtype).replace("torch.", ""), "spacings": list(cfg.spacings),
        "finals": list(cfg.finals), "solvers": plan.solvers, "seed": cfg.seed, "parity_steps": list(cfg.parity_steps),
        "overhead": {"dim": cfg.overhead_dim, "batch": cfg.overhead_batch, "nfe": cfg.overhead_nfe,
                     "repeats": cfg.overhead_repeats},
        "jump_tol": H.JUMP_TOL,
        "profiles": [{"problem": pb.name, "profile": prof.path, "nfes": ns, "model": prof.model.get("fingerprint"),
                      "calibration": prof.meta.get("calibration"), "teacher": prof.meta.get("teacher")}
                     for pb, prof, ns in plan.tuned_runs],
    }


def _write(cfg: BenchConfig, res: BenchResult) -> Dict[str, str]:
    """The report files (none without ``out``)."""
    if not cfg.out:
        return {}
    from . import report
    return report.write_all(res, cfg.out, name=cfg.name, formats=cfg.write)


def _describe(pb: H.Problem) -> Dict[str, Any]:
    ref = pb.reference
    return {"name": pb.name, "dim": pb.dim, "batch": pb.batch, "shape": list(pb.shape), "exact": ref.exact,
            "process": repr(pb.process), "prediction": pb.den.prediction,
            "reference_seconds": ref.seconds, "reference_error_bar": ref.error_bar(),
            "reference": ("exact probability-flow ODE (DOP853, rtol 1e-10) of GaussianMixture.random"
                          f"(dim={pb.dim}, seed=0)" if ref.exact else
                          f"{getattr(ref, 'solver', '')} with {getattr(ref, 'nfe', '')} NFE on a "
                          f"{getattr(ref, 'spacing', 'logsnr')} grid")}


def _versions() -> Dict[str, Optional[str]]:
    from importlib import metadata
    out = {}
    for pkg in ("diffsolve", "torch", "diffusers", "k-diffusion", "numpy", "scipy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def _ints(s: str) -> List[int]:
    return [int(v) for v in str(s).split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffsolve.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out; the docs use --out docs)")
    p.add_argument("--quick", action="store_true", help="a run under one minute (dim 64, NFE 5 and 10, a subset)")
    p.add_argument("--dims", default="64,3072", help="exact Gaussian-mixture sizes (default 64,3072)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)), help="NFE budgets (default 5,6,8,10,15,20)")
    p.add_argument("--batch", default=None, help="batch, one for all or one per dim (default 256)")
    p.add_argument("--model", default=None, help="a checkpoint or diffusers folder, a built-in name (mnist, mnist-flow, "
                                                 "digits-edm, ...; name@w: classifier-free guidance with weight w, e.g. "
                                                 "mnist-cfg@3) or module:function returning a ds.Denoiser; the peers "
                                                 "are those of its family (DDPM, flow matching, EDM); reference: a "
                                                 "converged high-NFE solution of the same model")
    p.add_argument("--checkpoint", default=None, help="a model checkpoint path for ds.load")
    p.add_argument("--shape", default=None, help="data shape for --model/--checkpoint, e.g. 3,32,32")
    p.add_argument("--ref-nfe", type=int, default=500, help="NFE of the reference solution of a non-exact model "
                                                            "(default 500)")
    p.add_argument("--ref-solver", default="dpm++3m", help="its solver (default dpm++3m)")
    p.add_argument("--ref-spacing", default="auto", help="and its grid (default auto: uniform in t, Karras for EDM)")
    p.add_argument("--solvers", default=None, help="our solvers (default: every deterministic one)")
    p.add_argument("--spacings", default=",".join(SPACINGS))
    p.add_argument("--finals", default=",".join(FINALS))
    p.add_argument("--stochastic", action="store_true", help="also our stochastic solvers (likelihood metric)")
    p.add_argument("--no-peers", action="store_true", help="ours only")
    p.add_argument("--libraries", default=None, help="peer libraries (default: diffusers,k-diffusion)")
    p.add_argument("--peer-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--parity-steps", default="5,10,20")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--overhead-dim", type=int, default=3072)
    p.add_argument("--overhead-batch", type=int, default=128)
    p.add_argument("--overhead-nfe", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--name", default="benchmarks", help="basename of the output files")
    p.add_argument("--profile", action="append", default=[], metavar="PROFILE.json",
                   help="also run a tuned profile (`diffsolve tune`) on the model it belongs to (repeatable)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the report (md, png, csv) of a run from the JSON it wrote")
    return p


def _config_from_args(args: argparse.Namespace, profiles: Sequence[Any] = (),
                      command: Optional[str] = None) -> BenchConfig:
    """The BenchConfig of parsed command-line arguments (``build_parser``)."""
    return BenchConfig(
        dims=_ints(args.dims), nfes=_ints(args.nfes), batch=None if args.batch is None else _ints(args.batch),
        model=args.model, checkpoint=args.checkpoint, shape=_ints(args.shape) if args.shape else None,
        ref_nfe=args.ref_nfe, ref_solver=args.ref_solver, ref_spacing=args.ref_spacing,
        solvers=args.solvers.split(",") if args.solvers else None,
        spacings=[s for s in args.spacings.split(",") if s], finals=[f for f in args.finals.split(",") if f],
        stochastic=args.stochastic, profiles=profiles,
        peers=not args.no_peers, libraries=args.libraries.split(",") if args.libraries else None,
        peer_dtype=getattr(torch, args.peer_dtype),
        parity=not args.no_parity, parity_steps=_ints(args.parity_steps),
        overhead=not args.no_overhead, overhead_dim=args.overhead_dim, overhead_batch=args.overhead_batch,
        overhead_nfe=args.overhead_nfe, overhead_repeats=args.overhead_repeats,
        quick=args.quick, seed=args.seed, threads=args.threads, progress=not args.no_progress, command=command,
        out=args.out, name=args.name)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if "--inverse" in list(sys.argv[1:] if argv is None else argv):  # posterior samplers: bench/inverse.py
        from .inverse import main as inverse_main
        return inverse_main([a for a in (sys.argv[1:] if argv is None else argv) if a != "--inverse"])
    args = build_parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.render:
        from . import report
        res = load_result(args.render)
        res.files = report.write_all(res, args.out, name=args.name, formats=("md", "csv", "png"))
        print(report.summary(res))
        return 0
    try:
        from ..tuning import load_profile
        profiles = [load_profile(p) for p in args.profile]  # a missing or corrupted profile fails before any work
        cfg = _config_from_args(args, profiles, command="python -m diffsolve.bench " + " ".join(argv_list))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = bench(cfg)
    from . import report
    print(report.summary(res))
    return 0
