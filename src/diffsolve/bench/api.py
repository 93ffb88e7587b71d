"""``ds.bench(...)`` and ``python -m diffsolve.bench``: our solvers against diffusers and k-diffusion on the
same frozen model, from the same noise, scored against the exact answer for where each run stops."""
from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

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


def bench(out: Optional[str] = None, dims: Sequence[int] = (64, 3072), nfes: Sequence[int] = NFES,
          batch: Optional[Union[int, Sequence[int]]] = None, model: Any = None, checkpoint: Optional[str] = None,
          shape: Optional[Sequence[int]] = None, solvers: Optional[Sequence[str]] = None,
          spacings: Sequence[str] = SPACINGS, finals: Sequence[str] = FINALS, stochastic: bool = False,
          peers: bool = True, libraries: Optional[Sequence[str]] = None, peer_dtype: torch.dtype = torch.float32,
          parity: bool = True, parity_steps: Sequence[int] = (5, 10, 20), overhead: bool = True,
          overhead_dim: int = 3072, overhead_batch: int = 128, overhead_nfe: int = 20, overhead_repeats: int = 7,
          overhead_algorithms: Optional[Sequence[str]] = None,
          quick: bool = False, seed: int = 0, threads: Optional[int] = 1, progress: bool = True,
          ref_nfe: int = 200, command: Optional[str] = None, write: Sequence[str] = ("md", "csv", "json", "png"),
          name: str = "benchmarks", profiles: Sequence[Any] = ()) -> BenchResult:
    """Run ours and the peers' samplers on the same frozen model and noise; score every run against the
    exact answer for where it stopped; optionally write ``{out}/{name}.md|csv|json|png``.

    Args:
        out: output folder (None: write nothing).
        dims: sizes of the exact Gaussian-mixture references (``GaussianMixture.random(dim, seed=0)``, DDPM
            linear, 1000 steps); ignored when ``model``/``checkpoint`` is given.
        nfes: NFE budgets.  batch: one size for all problems or one per dim (default 256).
        model: a ``ds.Denoiser`` or a 'module:function' factory returning one; its reference is a high-NFE
            (``ref_nfe``) solution of the same model.  checkpoint: a path for ``ds.load``.
        shape: the model's data shape when it has no ``sample_shape``.
        solvers / spacings / finals: our configurations (default: every deterministic solver x
            logsnr/karras/uniform/quadratic x denoise/t_min, ``lower_order_final`` automatic).
        stochastic: also run our stochastic solvers (likelihood metric only).
        peers: run diffusers and k-diffusion (each skipped with a warning when missing); libraries: a subset.
        peer_dtype: the peers' state dtype (float32, as pipelines run).
        parity: run the matched-pairs check on the smallest problem at ``parity_steps``.
        overhead: measure solver overhead per NFE (``overhead_dim`` x ``overhead_batch``, ``overhead_nfe``) for
            ``overhead_algorithms`` (default: every algorithm we share with a peer; any solver name works).
        quick: a run under a minute (dim 64, batch 32, NFE 5 and 10, a few solvers and peers).
        threads: torch threads during the run (1: tiny tensors on a shared machine); None leaves it.
        profiles: tuned profiles (``ds.tune``; paths or ``Profile`` objects): each runs, as family
            ``tuned profile``, at its NFE budgets on every problem whose model it belongs to (checked by its
            fingerprint; a profile that matches no problem is reported under ``skipped``).
    """
    t_start = time.perf_counter()
    if quick:
        dims, nfes = (64,), (5, 10)
        batch = batch or 32
        solvers = solvers or QUICK_SOLVERS
        spacings, parity_steps = ("logsnr", "karras"), (5,)
        overhead_dim, overhead_batch, overhead_repeats, overhead_nfe = 64, 32, 2, 10
    nfes = sorted(int(n) for n in nfes)
    skipped: Dict[str, str] = {}
    usable = []
    for s in ds.solvers():  # solvers that need inputs a benchmark cannot supply (dpm-v3's model statistics)
        if getattr(s, "requires", ()):
            skipped[f"ours {s.name}"] = f"needs {', '.join(s.requires)}= (model-specific inputs)"
        else:
            usable.append(s)
    det = [s.name for s in usable if not s.stochastic]
    sto = [s.name for s in usable if s.stochastic]
    our_solvers = [ds.get_solver(s).name for s in solvers] if solvers else det + (sto if stochastic else [])
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    libs_ok: List[str] = []
    if peers:
        for lib, why in P.available_libraries().items():
            if libraries is not None and lib not in libraries:
                continue
            if why:
                skipped[lib] = why
                warnings.warn(f"diffsolve.bench: skipping {lib}: {why}", RuntimeWarning, stacklevel=2)
            else:
                libs_ok.append(lib)
    try:
        problems = _problems(dims, batch, model, checkpoint, shape, seed, ref_nfe)
        cfgs = P.peer_configs(quick, libs_ok) if libs_ok else []
        for pb in problems:
            why = pb.peers_ok
            if cfgs and why:
                skipped[f"peers on {pb.name}"] = why
                warnings.warn(f"diffsolve.bench: no peers on {pb.name}: {why}", RuntimeWarning, stacklevel=2)
        n_ours = len(our_solvers) * len(spacings) * len(finals) * len(nfes)
        n_peer = sum(len(c.tolerances) if c.adaptive else len(nfes) for c in cfgs)
        pairs = H.parity_pairs(quick) if parity and libs_ok else []
        pairs = [p for p in pairs if p.cfg.library in libs_ok]
        n_par = len(pairs) * len(parity_steps)
        n_over = 0
        if overhead:
            algos = list(overhead_algorithms or [a for a in H.OVERHEAD_ALGORITHMS if not quick or a in ("ddim", "dpm++2m")])
            n_over = overhead_repeats * sum(2 + sum(1 for p in H.OVERHEAD_ALGORITHMS.get(a, ("", {}, []))[2]
                                                    if p[0] in libs_ok) for a in algos)
        from ..tuning import ProfileMismatch, load_profile
        tuned_runs = []  # (problem, profile, nfes)
        for spec in profiles:
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
                tuned_runs.append((pb, prof, [n for n in nfes if n in prof.entries]))
            if not matched:
                skipped[f"profile {label}"] = f"matches none of the models ({why})"
                warnings.warn(f"diffsolve.bench: profile {label} matches none of the models", RuntimeWarning,
                              stacklevel=2)
        n_tuned = sum(len(ns) for _, _, ns in tuned_runs)
        total = sum(n_ours + (n_peer if not pb.peers_ok else 0) for pb in problems) + n_par + n_over + n_tuned
        from tqdm.auto import tqdm
        bar = tqdm(total=total, unit="run", desc="diffsolve bench", disable=not progress, dynamic_ncols=True)
        rows: List[Dict[str, Any]] = []
        with torch.inference_mode():
            for pb in problems:
                for s in our_solvers:
                    for n in nfes:
                        bar.set_postfix_str(f"{pb.name} {s} NFE {n}", refresh=False)
                        for sp in spacings:
                            for fi in finals:
                                rows.append(H.run_ours(pb, s, n, sp, fi))
                                bar.update(1)
                for tpb, prof, ns in tuned_runs:
                    if tpb is pb:
                        for n in ns:
                            bar.set_postfix_str(f"{pb.name} tuned NFE {n}", refresh=False)
                            rows.append(H.run_profile(pb, prof, n))
                            bar.update(1)
                if pb.peers_ok:
                    continue
                for c in cfgs:
                    bar.set_postfix_str(f"{pb.name} {c.name}", refresh=False)
                    if c.adaptive:
                        for tol in c.tolerances:
                            r = H.run_peer_config(pb, c, None, peer_dtype, tolerance=tol)
                            H.assign_budget(r, nfes)
                            rows.append(r)
                            bar.update(1)
                        continue
                    for n in nfes:
                        rows.append(H.run_peer_config(pb, c, n, peer_dtype))
                        bar.update(1)
            parity_rows: List[Dict[str, Any]] = []
            if pairs:
                pb = min((p for p in problems if not p.peers_ok), key=lambda p: p.dim, default=None)
                if pb is not None:
                    for pair in pairs:
                        bar.set_postfix_str(f"parity {pair.cfg.name}", refresh=False)
                        for n in parity_steps:
                            r = H.run_parity(pb, pair, n)
                            r["problem"] = pb.name
                            parity_rows.append(r)
                            bar.update(1)
            over_rows: List[Dict[str, Any]] = []
            if overhead:
                bar.set_postfix_str(f"overhead (dim {overhead_dim}, batch {overhead_batch}, 1 thread)", refresh=False)
                torch.set_num_threads(1)
                over_rows = H.overhead(overhead_dim, overhead_batch, overhead_nfe, overhead_repeats, seed,
                                       algorithms=algos, libraries=libs_ok, progress=bar)
                if threads:
                    torch.set_num_threads(threads)
        bar.close()
    finally:
        torch.set_num_threads(old_threads)
    described = [_describe(pb) for pb in problems]
    meta = {
        "command": command or "ds.bench(...)", "wall": time.perf_counter() - t_start, "quick": quick,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": threads, "versions": _versions(), "skipped": skipped,
        "peer_dtype": str(peer_dtype).replace("torch.", ""), "spacings": list(spacings), "finals": list(finals),
        "solvers": our_solvers, "seed": seed, "parity_steps": list(parity_steps),
        "overhead": {"dim": overhead_dim, "batch": overhead_batch, "nfe": overhead_nfe, "repeats": overhead_repeats},
        "jump_tol": H.JUMP_TOL,
        "profiles": [{"problem": pb.name, "profile": prof.path, "nfes": ns, "model": prof.model.get("fingerprint"),
                      "calibration": prof.meta.get("calibration"), "teacher": prof.meta.get("teacher")}
                     for pb, prof, ns in tuned_runs],
    }
    res = BenchResult(rows, parity_rows, over_rows, described, nfes, meta)
    if out:
        from . import report
        res.files = report.write_all(res, out, name=name, formats=write)
    return res


def _problems(dims, batch, model, checkpoint, shape, seed, ref_nfe) -> List[H.Problem]:
    if model is not None or checkpoint is not None:
        if isinstance(model, str) and not _is_factory(model):  # a checkpoint/diffusers folder or 'mnist'
            checkpoint, model = model, None
        den = load_checkpoint(checkpoint) if checkpoint is not None else (
            load_factory(model) if isinstance(model, str) else model)
        shape = shape or tuple(getattr(den, "sample_shape", None) or ()) or None
        b = batch if isinstance(batch, int) else (batch[0] if batch else 16)
        label = checkpoint or (model if isinstance(model, str) else type(den.net).__name__)
        return [H.model_problem(den, b, seed, shape, ref_nfe, name=f"model {label}")]
    if batch is None:
        batches = [DEFAULT_BATCH.get(d, 256) for d in dims]
    elif isinstance(batch, int):
        batches = [batch] * len(dims)
    else:
        batches = list(batch) * (len(dims) if len(batch) == 1 else 1)
        if len(batches) != len(dims):
            raise ValueError("batch needs one value or one per dim")
    return [H.exact_problem(d, b, seed) for d, b in zip(dims, batches)]


def _describe(pb: H.Problem) -> Dict[str, Any]:
    ref = pb.reference
    return {"name": pb.name, "dim": pb.dim, "batch": pb.batch, "shape": list(pb.shape), "exact": ref.exact,
            "process": repr(pb.process), "prediction": pb.den.prediction,
            "reference_seconds": ref.seconds, "reference_error_bar": ref.error_bar(),
            "reference": ("exact probability-flow ODE (DOP853, rtol 1e-10) of GaussianMixture.random"
                          f"(dim={pb.dim}, seed=0)" if ref.exact else
                          f"{getattr(ref, 'solver', '')} with {getattr(ref, 'nfe', '')} NFE on a log-SNR grid")}


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
    p.add_argument("--model", default=None, help="a checkpoint or diffusers folder, a built-in name (mnist) or module:function returning a ds.Denoiser (reference: a high-NFE "
                                                 "solution of the same model)")
    p.add_argument("--checkpoint", default=None, help="a model checkpoint path for ds.load")
    p.add_argument("--shape", default=None, help="data shape for --model/--checkpoint, e.g. 3,32,32")
    p.add_argument("--ref-nfe", type=int, default=200, help="NFE of the reference solution of a non-exact model")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = bench(out=args.out, dims=_ints(args.dims), nfes=_ints(args.nfes),
                batch=None if args.batch is None else _ints(args.batch), model=args.model,
                checkpoint=args.checkpoint, shape=_ints(args.shape) if args.shape else None,
                solvers=args.solvers.split(",") if args.solvers else None,
                spacings=[s for s in args.spacings.split(",") if s], finals=[f for f in args.finals.split(",") if f],
                stochastic=args.stochastic, peers=not args.no_peers,
                libraries=args.libraries.split(",") if args.libraries else None,
                peer_dtype=getattr(torch, args.peer_dtype), parity=not args.no_parity,
                parity_steps=_ints(args.parity_steps), overhead=not args.no_overhead,
                overhead_dim=args.overhead_dim, overhead_batch=args.overhead_batch, overhead_nfe=args.overhead_nfe,
                overhead_repeats=args.overhead_repeats, quick=args.quick, seed=args.seed, threads=args.threads,
                progress=not args.no_progress, ref_nfe=args.ref_nfe,
                command="python -m diffsolve.bench " + " ".join(argv_list), name=args.name,
                profiles=profiles)
    from . import report
    print(report.summary(res))
    return 0
