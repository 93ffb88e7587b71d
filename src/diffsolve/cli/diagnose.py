"""``diffsolve diagnose``: a thin layer over ``diffsolve.diagnostics.report.diagnose``.

    diffsolve diagnose --model mnist-flow --data mnist-heldout --n 20 --what likelihood,lid
    diffsolve diagnose --reference molrg64 --what likelihood,lid,conservativity,subspace,fokker_planck,gap
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

SECTIONS = ("likelihood", "lid", "conservativity", "subspace", "fokker_planck", "gap", "hallucination")


class _Err(ValueError):
    pass


def _floats(s: str) -> List[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise _Err(f"expected comma-separated numbers, got {s!r}") from None


def _references() -> Dict[str, Any]:
    import diffsolve as ds

    out = {name: (text, make) for name, (text, make) in ds.reference.REFERENCES.items() if name != "gmm3072"}
    out["gmm8"] = ("random low-rank mixture, 8 dims", lambda: ds.GaussianMixture.random(8, n_components=3, seed=1))
    out["molrg64"] = ("mixture of 4 rank-8 Gaussians in 64 dims with a small isotropic part (delta 1e-3)",
                      lambda: ds.GaussianMixture.random(64, n_components=4, rank=8, delta=1e-3, seed=3))
    return out


def add_parser(sub: Any) -> None:
    s = sub.add_parser("diagnose", help="diagnostics of a model: likelihood in bits/dim, intrinsic dimension, "
                                        "conservativity, Jacobian subspaces, Fokker-Planck residual, ODE-SDE gap, "
                                        "hallucination scores (JSON report and plots)",
                       description="Diagnostics of a frozen model, written to OUT/report.json and OUT/<section>.png.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="a checkpoint folder or built-in name (mnist, mnist-flow, "
                                                    "mnist-cfg, gaussian25, ...)")
    src.add_argument("--reference", default=None, help="an exact mixture with its exact denoiser: " +
                     ", ".join(_references()))
    s.add_argument("--process", default="vp-linear", help="the process of --reference (default: %(default)s)")
    s.add_argument("--data", default=None, help="data set of the points (default: the model's held-out split when "
                                                 "it has one, else its data set; mixture samples for --reference)")
    s.add_argument("--n", type=int, default=16, help="data points, spread over the classes (default: %(default)s)")
    s.add_argument("--what", default="likelihood,lid,conservativity,subspace",
                   help=f"comma-separated: {', '.join(SECTIONS)} (default: %(default)s)")
    s.add_argument("--null-label", action="store_true", help="a class-conditional model: evaluate its unconditional "
                                                             "branch (the null label)")
    s.add_argument("--dequantization", default=None, help="for 8-bit data: comma-separated uniform, truncnorm, none "
                                                          "(default: uniform; 'continuous' for --reference)")
    s.add_argument("--divergence", default="auto", choices=["auto", "exact", "hutchinson"])
    s.add_argument("--probes", type=int, default=4, help="Hutchinson probes (default: %(default)s)")
    s.add_argument("--rtol", type=float, default=1e-5, help="ODE tolerance of the likelihood (default: %(default)s)")
    s.add_argument("--steps", type=int, default=None, help="fixed ODE steps for the likelihood (6 N + 1 NFE per "
                                                           "sample, the same on every rank) instead of adaptive")
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--sigmas", default="0.02,0.05,0.1,0.3,1,3", help="noise levels sigma/alpha of the by-t "
                                                                      "diagnostics (default: %(default)s)")
    s.add_argument("--lid-sigma", type=float, default=0.05, help="FLIPD smoothing (default: %(default)s)")
    s.add_argument("--nb-sigma", type=float, default=0.01, help="normal-bundle noise level (default: %(default)s)")
    s.add_argument("--nb-scores", type=int, default=None, help="normal-bundle score vectors per point (default 4 d)")
    s.add_argument("--nb-points", type=int, default=None, help="points for the normal bundle (default: all)")
    s.add_argument("--flow-jacobian", action="store_true", help="also the flow-Jacobian LID (expensive)")
    s.add_argument("--subspace-points", type=int, default=4)
    s.add_argument("--gap-n", type=int, default=500, help="samples per side of the ODE-SDE gap (default: %(default)s)")
    s.add_argument("--gap-steps", type=int, default=200, help="steps of both runs (default: %(default)s)")
    s.add_argument("--hal-n", type=int, default=4000, help="samples for the hallucination scores, half to calibrate the "
                                                           "threshold, half scored (default: %(default)s)")
    s.add_argument("--hal-nfe", type=int, default=1000, help="NFE of the hallucination runs (default: %(default)s)")
    s.add_argument("--hal-solver", default="ddpm", help="solver of the hallucination runs (default: %(default)s)")
    s.add_argument("--hal-sigma-below", type=float, default=0.07, help="score the x0 predictions of the steps below "
                                                                       "this noise level (default: %(default)s)")
    s.add_argument("--hal-last-k", type=int, default=None, help="... only the last K of them (the paper: 10 of 1000)")
    s.add_argument("--hal-quantile", type=float, default=0.95, help="keep the samples below this quantile of the "
                                                                    "calibration half's scores (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch threads")
    s.add_argument("--out", default="out/diagnose", help="output folder (default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bars or log messages")
    s.set_defaults(func=cmd_diagnose)


def _spread(n_total: int, n: int) -> torch.Tensor:
    """n indices spread evenly over 0..n_total-1 (the bundled data sets are sorted by class)."""
    n = min(n, n_total)
    return torch.linspace(0, n_total - 1, n).round().long()


def _model_and_data(args: argparse.Namespace) -> Tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], Any,
                                                        Dict[str, Any]]:
    import diffsolve as ds

    from ..processes import PRESETS
    from ..util.datasets import GRID25, LABELLED, grid25_modes, grid25_scale, load_dataset, load_labels

    meta: Dict[str, Any] = {}
    exact = None
    labels = None
    if args.reference is not None:
        refs = _references()
        if args.reference not in refs:
            raise _Err(f"unknown reference {args.reference!r}; choose one of {', '.join(refs)}")
        if args.process not in PRESETS:
            raise _Err(f"unknown process {args.process!r}; choose one of {', '.join(PRESETS)}")
        exact = refs[args.reference][1]()
        model = exact.denoiser(PRESETS[args.process][1](), "epsilon")
        model.sample_shape = tuple(exact.shape)
        data = exact.sample(args.n, torch.Generator().manual_seed(args.seed)) if args.data is None else None
        meta.update(reference=args.reference, process=args.process)
        if args.data is None:
            return model, data, None, exact, meta
    else:
        name = args.model or "mnist"
        model = ds.load(name)
        meta["model"] = name
        cfg = getattr(model, "config", {}) or {}
        if cfg.get("num_classes"):
            if not args.null_label:
                raise _Err(f"{name!r} is class-conditional: pass --null-label to diagnose its unconditional branch")
            model = ds.Conditioned(model, {"class_labels": torch.tensor([int(cfg["null_label"])])})
        if cfg.get("dataset") == "gaussian25":
            meta["modes"], meta["mode_std"] = grid25_modes(), GRID25["std"] / grid25_scale()
    ds_name = args.data
    if ds_name is None:
        trained = str((getattr(model, "config", {}) or {}).get("dataset", ""))
        base = trained.split("-")[0]
        ds_name = f"{base}-heldout" if base in LABELLED else (trained or None)
    if ds_name is None:
        return model, None, None, exact, meta
    full = load_dataset(ds_name)
    idx = _spread(full.shape[0], args.n)
    data = full[idx].double()
    try:
        labels = load_labels(ds_name)[idx]
    except ValueError:
        labels = None
    meta["data"] = ds_name
    if (getattr(model, "config", {}) or {}).get("dataset", "").startswith(ds_name.split("-")[0]) and \
            not ds_name.endswith("heldout"):
        meta["note"] = "these points may be in the model's training data"
    return model, data, labels, exact, meta


def cmd_diagnose(args: argparse.Namespace) -> int:
    from ..diagnostics.report import DiagnoseConfig, diagnose

    if args.threads:
        torch.set_num_threads(args.threads)
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [w for w in what if w not in SECTIONS]
    if bad:
        raise _Err(f"unknown diagnostic(s) {bad}; choose from {', '.join(SECTIONS)}")
    if args.n < 1:
        raise _Err(f"--n must be >= 1, got {args.n}")
    model, data, labels, exact, meta = _model_and_data(args)
    deq = args.dequantization or ("continuous" if exact is not None or data is None or
                                  meta.get("modes") is not None else "uniform")
    cfg = DiagnoseConfig(what=what, seed=args.seed, dequantization=[d.strip() for d in deq.split(",")],
                         divergence=args.divergence, probes=args.probes, rtol=args.rtol, steps=args.steps,
                         batch_size=args.batch_size, lid_sigma=args.lid_sigma, nb_sigma=args.nb_sigma,
                         nb_scores=args.nb_scores, nb_points=args.nb_points, flow_jacobian=args.flow_jacobian,
                         sigmas=_floats(args.sigmas), subspace_points=args.subspace_points, gap_n=args.gap_n,
                         gap_steps=args.gap_steps, hal_n=args.hal_n, hal_nfe=args.hal_nfe, hal_solver=args.hal_solver,
                         hal_sigma_below=args.hal_sigma_below, hal_last_k=args.hal_last_k,
                         hal_quantile=args.hal_quantile,
                         modes=meta.pop("modes", None), mode_std=meta.pop("mode_std", None))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    report = diagnose(model, data, cfg, Path(args.out), labels=labels, exact=exact, progress=not args.quiet, log=log)
    report["source"] = meta
    from ..util.files import json_dump_atomic
    from ..util.jsonable import jsonable
    json_dump_atomic(jsonable(report), Path(args.out) / "report.json")
    print(summary_line(report) + f" -> {args.out}")
    return 0


def summary_line(report: Dict[str, Any]) -> str:
    parts = []
    for deq, s in (report.get("likelihood") or {}).items():
        if isinstance(s, dict) and "bpd" in s:
            parts.append(f"bpd[{deq}] {s['bpd']:.3f} ({s['nfe_mean']:.0f} NFE)")
    lid = report.get("lid")
    if lid:
        parts.append(f"LID FLIPD {lid['flipd']['median']:.1f}, normal bundle {lid['normal_bundle']['median']:.0f}")
    cons = report.get("conservativity")
    if cons:
        parts.append("asymmetry " + ", ".join(f"{r['asymmetry_pooled']:.2g}" for r in cons["by_sigma"]))
    hal = report.get("hallucination")
    if hal and "rate_unfiltered" in hal:
        parts.append(f"hallucinated {hal['rate_unfiltered']:.2%} -> {hal['rate_filtered']:.2%}")
    return "; ".join(parts) if parts else "diagnostics done"
