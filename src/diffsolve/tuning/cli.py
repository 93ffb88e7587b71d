"""``diffsolve tune`` (``python -m diffsolve.tuning``): the command line of ``ds.tune``."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..adapters.denoiser import Denoiser
from ..reference import REFERENCES, GaussianMixture
from .search import DEFAULT_NFES, tune

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def _references():
    """The exact reference models of ``diffsolve sample`` (name -> (description, factory))."""
    return REFERENCES


def _ints(vals) -> List[int]:
    out = []
    for v in vals:
        out += [int(x) for x in str(v).split(",") if x.strip()]
    return out


def build_parser(prog: str = "diffsolve tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Tune a sampler of one model per NFE budget and write a "
                                "profile (JSON + safetensors) for `ds.sample(..., profile=...)`.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", choices=list(_references()), help="an exact Gaussian-mixture reference model "
                     "(DDPM linear, epsilon prediction)")
    src.add_argument("--model", help="a checkpoint folder, a diffusers model folder or a shipped model name "
                     "(ds.load); name@w: a class-conditional model under classifier-free guidance w")
    p.add_argument("--nfe", nargs="+", default=[str(n) for n in DEFAULT_NFES], help="NFE budgets (default 5 6 8 10)")
    p.add_argument("--out", default="profile.json", help="profile path (default: %(default)s; a .safetensors is "
                   "written next to it)")
    p.add_argument("--method", choices=("auto", "v3", "grids"), default="auto")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds for the whole run (default 270)")
    p.add_argument("--calib", type=int, default=None, help="calibration samples (default: by the budget)")
    p.add_argument("--calib-seed-start", type=int, default=1_000_000)
    p.add_argument("--eval", type=int, default=None, help="evaluation samples (default 256; 128 for a slow model)")
    p.add_argument("--eval-seed-start", type=int, default=0)
    p.add_argument("--teacher", default="auto", help="'auto' (= dpm++3m:100), SOLVER:NFE, or 'exact' (references)")
    p.add_argument("--eval-teacher", default=None, help="teacher of the evaluation targets (default: --teacher)")
    p.add_argument("--data", default=None, help="--model: clean data for the v3 statistics (a dataset name or "
                   "path for diffsolve.data.load_dataset, or a .pt/.safetensors tensor); default: the training data of the "
                   "shipped 'mnist' model, model samples for any other model")
    p.add_argument("--no-stats", action="store_true", help="no DPM-Solver-v3 statistics")
    p.add_argument("--metric", choices=("rmse", "trimmed", "median"), default="rmse")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for --reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def _load_tensor(path: str) -> Tensor:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        d = load_file(path)
        return next(iter(d.values()))
    if path.endswith(".pt"):
        return torch.load(path, weights_only=True)
    from ..util.datasets import load_dataset
    return load_dataset(path)


def model_from_args(args) -> Tuple[Denoiser, Optional[GaussianMixture]]:
    from ..processes import VPDiscrete
    if args.reference:
        ref = _references()[args.reference][1]()
        return ref.denoiser(VPDiscrete.linear(1000), "epsilon"), ref
    from ..hub import load_spec
    return load_spec(args.model, 4096)[0], None  # 'name@w': the guided model, labels bound (hub.spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.reference else None)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        den, ref = model_from_args(args)
        if args.no_stats:
            data: Any = False
        elif ref is not None:
            data = ref
        elif args.data or args.model == "mnist":  # the shipped model: the 5000 images it was trained on
            data = _load_tensor(args.data or "mnist")
        else:
            data = None
        log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
        t0 = time.perf_counter()
        cal = None
        if args.calib is not None:
            cal = list(range(args.calib_seed_start, args.calib_seed_start + args.calib))
        prof = tune(den, _ints(args.nfe), args.method, calib_seeds=cal,
                    eval_seeds=None if args.eval is None and args.eval_seed_start == 0 else
                    list(range(args.eval_seed_start, args.eval_seed_start + (args.eval or 256))),
                    data=data, shape=ref.shape if ref is not None else None, teacher=args.teacher,
                    eval_teacher=args.eval_teacher,
                    time_budget_s=args.time_budget, out=args.out, metric=args.metric, seed=args.seed,
                    progress=not args.quiet, log=log)
        print(prof.table())
        print(f"\nprofile written to {prof.path} ({time.perf_counter() - t0:.0f} s); use it with "
              f"ds.sample(den, noise, profile={prof.path!r}, nfe=N) or `diffsolve sample --profile {prof.path} "
              f"--nfe N ...`; against the peers: `diffsolve bench --profile {prof.path} ...`", file=sys.stderr)
        return 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(old)

