"""Diagnostics studies behind docs/diagnostics.md (figures and JSON under docs/diagnostics/).

    python benchmarks/diagnostics.py hallucination   # the 25-mode toy: rates, the filter chosen on one seed set and
                                                     # scored on another, the exact denoiser
    python benchmarks/diagnostics.py flipd-curve     # FLIPD of held-out MNIST digits against the smoothing level
    python benchmarks/diagnostics.py likelihood      # held-out MNIST bits/dim: models x dequantisations, with NFE

Single-number diagnostics of one model (``diffsolve diagnose``) are reproduced by the commands quoted in the doc.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

import diffsolve as ds
import diffsolve.diagnostics as dg
from diffsolve.util.datasets import GRID25, grid25_modes, grid25_scale, load_dataset, load_labels
from diffsolve.util.jsonable import jsonable

DT = torch.float64


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(obj: Dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2) + "\n")
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# hallucination on the 25-mode toy
# ----------------------------------------------------------------------------------------
def exact_grid25() -> ds.GaussianMixture:
    """The 25 isotropic Gaussians of the 'gaussian25' data set as an exact mixture."""
    std = GRID25["std"] / grid25_scale()
    bases = torch.zeros(25, 2, 1, dtype=DT)
    bases[:, 0, 0] = 1.0
    return ds.GaussianMixture(grid25_modes(), bases, torch.zeros(25, 1, dtype=DT), std)


class _AllSteps:
    """Records every step's x0 prediction with the noise level the step starts at."""

    def __init__(self, process):
        self.process, self.sigma, self.x0 = process, [], []

    def __call__(self, state, step):
        self.sigma.append(float(self.process.sigma_ve(torch.tensor(step.t_from, dtype=DT))))
        self.x0.append(step.denoised.clone())

    def scores(self, sigma_below=None, last_k=None) -> torch.Tensor:
        h = [x for s, x in zip(self.sigma, self.x0) if sigma_below is None or s <= sigma_below]
        h = h[-last_k:] if last_k else h
        return torch.stack(h).var(0, unbiased=True).flatten(1).mean(1)


def _run(model, seeds, solver, nfe):
    rec = _AllSteps(model.process)
    x = ds.sample(model, seeds=seeds, shape=(2,), solver=solver, nfe=nfe, after_step=rec)
    return x, rec


def hallucination(args: argparse.Namespace) -> None:
    """Choose the noise window (by AUROC) and the threshold (the calibration scores' 0.95 quantile) on calibration
    seeds; report the filter on test seeds, for each sampler, beside the paper's literal rule (last 10 steps)."""
    model = ds.load(args.model)
    modes, std = grid25_modes(), GRID25["std"] / grid25_scale()
    n = args.samples
    cal_seeds, test_seeds = list(range(n)), list(range(10**6, 10**6 + n))
    windows = [0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3]
    out: Dict[str, Any] = {"model": args.model, "samples_per_set": n, "support": f"> {args.k:g} std from every mode",
                           "quantile": args.quantile, "windows": windows, "samplers": {}}
    figdata = None
    for solver, nfe in args.samplers:
        t0 = time.perf_counter()
        (xc, rc), (xt, rt) = _run(model, cal_seeds, solver, nfe), _run(model, test_seeds, solver, nfe)
        oc, ot = dg.support_mask(xc, modes, std, args.k), dg.support_mask(xt, modes, std, args.k)
        au = {w: dg.auroc(rc.scores(w), oc) for w in windows}
        best = max(windows, key=lambda w: au[w])
        res: Dict[str, Any] = {"rate_calibration": float(oc.double().mean()), "auroc_calibration": au,
                               "sigma_below": best}
        for name, kw in (("chosen window", {"sigma_below": best}), ("paper: last 10 steps", {"last_k": 10})):
            thr = dg.hallucination_threshold(rc.scores(**kw), "quantile", args.quantile)
            st = rt.scores(**kw)
            res[name] = {"threshold": thr, "auroc_test": dg.auroc(st, ot), **dg.filter_report(ot, st <= thr)}
            r = res[name]
            print(f"{solver} {nfe} NFE, {name} ({kw}): test hallucinated {r['rate_unfiltered']:.2%} -> "
                  f"{r['rate_filtered']:.2%}; removed {r['removed_out_of_support']:.1%} of out-of-support, kept "
                  f"{r['kept_in_support']:.1%} of in-support; AUROC {r['auroc_test']:.3f}", flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out["samplers"][f"{solver}@{nfe}"] = res
        if figdata is None:
            figdata = (solver, nfe, xt, rt.scores(best), ot, res["chosen window"]["threshold"], best)
    exact = exact_grid25().denoiser(model.process, "epsilon")
    for solver, nfe in args.samplers[:1]:
        xe = ds.sample(exact, seeds=test_seeds, shape=(2,), solver=solver, nfe=nfe)
        out["exact_denoiser"] = {"sampler": f"{solver}@{nfe}",
                                 "rate": float(dg.support_mask(xe, modes, std, args.k).double().mean())}
        print(f"exact denoiser, {solver} {nfe}: hallucinated {out['exact_denoiser']['rate']:.3%}")
    _save(out, Path(args.out) / "hallucination_toy.json")

    solver, nfe, x, s, o, thr, best = figdata
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    xs, ls = x.numpy(), np.log10(s.clamp_min(1e-12).numpy())
    sc = axes[0].scatter(xs[:, 0], xs[:, 1], c=ls, s=2, cmap="viridis")
    fig.colorbar(sc, ax=axes[0], label="log10 Hal(x)")
    axes[0].set_title(f"trained MLP, {solver} {nfe} NFE (test seeds)", fontsize=9)
    keep = s.numpy() <= thr
    axes[1].scatter(xs[keep, 0], xs[keep, 1], s=2, c="C0", label="kept")
    axes[1].scatter(xs[~keep, 0], xs[~keep, 1], s=4, c="C3", label="filtered out")
    axes[1].legend(fontsize=8, markerscale=4)
    axes[1].set_title(f"filter: x0 variance over steps at sigma <= {best:g}, calibrated threshold", fontsize=9)
    on = o.numpy()
    axes[2].hist(ls[~on], bins=60, alpha=0.6, label="in support")
    axes[2].hist(ls[on], bins=60, alpha=0.6, label=f"out of support (> {args.k:g} std)")
    axes[2].axvline(math.log10(thr), color="k", ls="--", label="threshold")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("log10 Hal(x)")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(args.out) / "hallucination_toy.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# FLIPD against the smoothing level on held-out MNIST
# ----------------------------------------------------------------------------------------
def flipd_curve(args: argparse.Namespace) -> None:
    x_all, y_all = load_dataset("mnist-heldout"), load_labels("mnist-heldout")
    per = args.per_class
    idx = torch.cat([torch.nonzero(y_all == k).flatten()[:per] for k in range(10)])
    x, y = x_all[idx].double(), y_all[idx]
    sigmas = [float(s) for s in args.sigmas]
    out: Dict[str, Any] = {"per_class": per, "probes": args.probes, "sigmas": sigmas, "models": {}}
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for j, name in enumerate(args.models):
        model = ds.load(name)
        rows: List[Dict[str, Any]] = []
        for s in sigmas:
            t0 = time.perf_counter()
            r = dg.flipd(model, x, sigma=s, probes=args.probes, seed=args.seed)
            rows.append({"sigma": s, "median": float(r.lid.median()), "stderr_mean": float(r.stderr.mean()),
                         "per_class_median": [float(r.lid[y == k].median()) for k in range(10)],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(name, s, f"median {rows[-1]['median']:.1f}", [round(v) for v in rows[-1]["per_class_median"]],
                  flush=True)
        out["models"][name] = rows
        axes[0].semilogx(sigmas, [r["median"] for r in rows], marker="o", label=name)
        if j == 0:
            best = rows[args.class_sigma_index]
            axes[1].bar(range(10), best["per_class_median"], color="C0")
            axes[1].set_title(f"{name}: median FLIPD per digit at sigma {best['sigma']:g}", fontsize=9)
    axes[0].axhline(0, color="0.5", lw=0.8)
    axes[0].set_xlabel("smoothing sigma / alpha")
    axes[0].set_ylabel("median FLIPD (784 dims)")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"FLIPD of {10 * per} held-out digits against the smoothing level", fontsize=9)
    axes[1].set_xticks(range(10))
    axes[1].set_xlabel("digit")
    fig.tight_layout()
    _save(out, Path(args.out) / "flipd_mnist.json")
    path = Path(args.out) / "flipd_mnist.png"
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------
# held-out MNIST bits/dim
# ----------------------------------------------------------------------------------------
def likelihood(args: argparse.Namespace) -> None:
    x_all = load_dataset("mnist-heldout")
    idx = torch.linspace(0, x_all.shape[0] - 1, args.images).round().long()
    x = x_all[idx].double()
    out: Dict[str, Any] = {"images": args.images, "probes": args.probes, "rtol": args.rtol, "rows": []}
    for spec in args.models:
        name, _, tag = spec.partition(":")
        model = ds.load(name)
        if tag == "null":
            model = ds.Conditioned(model, {"class_labels": torch.tensor([int(model.config["null_label"])])})
        for deq in args.dequantizations:
            t0 = time.perf_counter()
            r = dg.bits_per_dim(model, x, dequantization=deq, probes=args.probes, rtol=args.rtol, atol=args.rtol,
                                seed=args.seed, batch_size=args.batch_size, progress=True)
            row = {"model": spec, "trained_on": model.config.get("dataset") if hasattr(model, "config") else None,
                   **r.summary(), "seconds": round(time.perf_counter() - t0, 1)}
            out["rows"].append(row)
            print(f"{spec} {deq}: {row['bpd']:.3f} bpd (+- {row['bpd_se_over_samples']:.3f} over images, "
                  f"Hutchinson s.e. {row['bpd_hutchinson_se']:.3f}), NFE {row['nfe_mean']:.0f}", flush=True)
            _save(out, Path(args.out) / f"likelihood_mnist{args.tag}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hallucination")
    h.add_argument("--model", default="gaussian25")
    h.add_argument("--samples", type=int, default=10000, help="per set (calibration and test)")
    h.add_argument("--samplers", type=lambda v: (v.split("@")[0], int(v.split("@")[1])), nargs="+",
                   default=[("ddpm", 1000), ("ddpm", 250), ("dpm++2m", 100)], help="solver@nfe ...")
    h.add_argument("--quantile", type=float, default=0.95)
    h.add_argument("--k", type=float, default=6.0, help="out of support: farther than k std from every mode")
    f = sub.add_parser("flipd-curve")
    f.add_argument("--models", nargs="+", default=["mnist-flow", "mnist"])
    f.add_argument("--per-class", type=int, default=5)
    f.add_argument("--probes", type=int, default=4)
    f.add_argument("--sigmas", nargs="+", default=["0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5"])
    f.add_argument("--class-sigma-index", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    lk = sub.add_parser("likelihood")
    lk.add_argument("--models", nargs="+", default=["mnist-flow", "mnist-cfg:null", "mnist"])
    lk.add_argument("--dequantizations", nargs="+", default=["uniform", "truncnorm", "none"])
    lk.add_argument("--images", type=int, default=50)
    lk.add_argument("--probes", type=int, default=2)
    lk.add_argument("--rtol", type=float, default=1e-5)
    lk.add_argument("--batch-size", type=int, default=25)
    lk.add_argument("--seed", type=int, default=0)
    lk.add_argument("--tag", default="", help="suffix of the JSON file name")
    for p in (h, f, lk):
        p.add_argument("--out", default="docs/diagnostics")
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"hallucination": hallucination, "flipd-curve": flipd_curve, "likelihood": likelihood}[args.cmd](args)


if __name__ == "__main__":
    main()
