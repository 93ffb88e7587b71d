"""``diagnose``: run several diagnostics on one model and write a JSON report and one plot per diagnostic
(the library side of ``diffsolve diagnose``).

With ``exact=`` (the closed-form prior the model samples, e.g. a ``GaussianMixture`` and its exact denoiser) every
section also records the exact answer next to the estimate: log p of the data at the ODE's start, the component
rank, zero asymmetry.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..adapters.denoiser import Model
from ..util.files import json_dump_atomic
from ..util.jsonable import jsonable
from .conservativity import conservativity_by_t
from .core import DT, DiagnosticError, check_model, sigma_of
from .gap import fokker_planck_residual, ode_sde_gap
from .hallucination import (
    auroc,
    filter_report,
    hallucination_filter,
    hallucination_scores,
    hallucination_threshold,
    support_mask,
)
from .lid import flipd, flow_jacobian, normal_bundle
from .likelihood import bits_per_dim, log_likelihood
from .subspace import jacobian_structure

Tensor = torch.Tensor
SECTIONS = ("likelihood", "lid", "conservativity", "subspace", "fokker_planck", "gap", "hallucination")


@dataclass
class DiagnoseConfig:
    """Settings of ``diagnose`` (defaults sized for a CPU)."""

    what: Sequence[str] = ("likelihood", "lid", "conservativity", "subspace")
    seed: int = 0
    # likelihood: 'continuous' (no dequantisation) or any of likelihood.DEQUANTIZATIONS for 8-bit data
    dequantization: Sequence[str] = ("continuous",)
    data_range: Tuple[float, float] = (-1.0, 1.0)
    divergence: str = "auto"
    probes: int = 4
    rtol: float = 1e-5
    steps: Optional[int] = None                # fixed steps (6 N + 1 NFE) instead of the adaptive solve
    batch_size: Optional[int] = None
    # local intrinsic dimension
    lid_sigma: float = 0.05                    # FLIPD smoothing (sigma / alpha)
    nb_sigma: float = 0.01                     # normal-bundle noise level
    nb_scores: Optional[int] = None            # score vectors per point (default 4 d)
    nb_points: Optional[int] = None            # points for the normal bundle (default all)
    flow_jacobian: bool = False                # also the flow-Jacobian LID (d VJPs through a sampler per point)
    # by noise level
    sigmas: Sequence[float] = (0.02, 0.05, 0.1, 0.3, 1.0, 3.0)
    conservativity_probes: int = 4
    subspace_points: int = 4
    # ODE-SDE gap
    gap_n: int = 500
    gap_steps: int = 200
    gap_sde_solver: str = "ddpm"
    # hallucination
    hal_n: int = 4000                          # half calibrate the threshold, half are scored
    hal_solver: str = "ddpm"
    hal_nfe: int = 1000
    hal_last_k: Optional[int] = None           # the variance over the last k steps (None: all in the window)
    hal_sigma_below: Optional[float] = 0.07    # ... that start at sigma / alpha <= this
    hal_quantile: float = 0.95                 # keep the samples below this quantile of the calibration scores
    modes: Optional[Tensor] = None             # known modes [K, *S] and their std: count out-of-support samples
    mode_std: Optional[float] = None
    support_k: float = 6.0
    extra: Dict[str, Any] = field(default_factory=dict)


def diagnose(model: Model, data: Optional[Tensor], config: DiagnoseConfig, out: Path,
             labels: Optional[Tensor] = None, exact: Any = None, progress: bool = False,
             log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """Run ``config.what`` on ``model`` (data-based sections at ``data`` [n, *S], grouped by ``labels`` [n] where
    given); write ``out/report.json`` and ``out/<section>.png``; return the report."""
    model = check_model(model)
    unknown = [w for w in config.what if w not in SECTIONS]
    if unknown:
        raise DiagnosticError(f"unknown diagnostic(s) {unknown}; choose from {', '.join(SECTIONS)}")
    needs_data = {"likelihood", "lid", "conservativity", "subspace", "fokker_planck"} & set(config.what)
    if needs_data and data is None:
        raise DiagnosticError(f"{sorted(needs_data)} need data points")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in asdict(config).items() if k != "modes"}
    report: Dict[str, Any] = {"model": model.identity(), "config": cfg, "files": {}}
    if data is not None:
        report["data"] = {"n": int(data.shape[0]), "shape": list(data.shape[1:])}
    plots: List[Tuple[str, Callable[[Any], None]]] = []
    for name in config.what:
        log(f"diagnose: {name} ...")
        t0 = time.perf_counter()
        section, plot = SECTION_FNS[name](model, data, labels, config, exact, progress)
        section["wall_s"] = round(time.perf_counter() - t0, 2)
        report[name] = section
        if plot is not None:
            plots.append((name, plot))
        json_dump_atomic(jsonable(report), out / "report.json")  # after every section: nothing lost on a crash
    for name, plot in plots:
        path = out / f"{name}.png"
        _save_plot(plot, path)
        report["files"][name] = str(path)
    json_dump_atomic(jsonable(report), out / "report.json")
    return report


# ----------------------------------------------------------------------------------------
# sections: (model, data, labels, config, exact, progress) -> (JSON section, plot(ax-less fig fn) or None)
# ----------------------------------------------------------------------------------------
def _likelihood(model, data, labels, c: DiagnoseConfig, exact, progress):
    sec: Dict[str, Any] = {}
    hists = {}
    kw = dict(divergence=c.divergence, probes=c.probes, rtol=c.rtol, atol=c.rtol, steps=c.steps,
              batch_size=c.batch_size, progress=progress)
    for deq in c.dequantization:
        if deq == "continuous":
            ll = log_likelihood(model, data, seed=c.seed, **kw)
        else:
            ll = bits_per_dim(model, data, dequantization=deq, data_range=c.data_range, seed=c.seed, **kw)
        s = ll.summary()
        if exact is not None and deq == "continuous":
            s0 = float(sigma_of(model.process, ll.t_start))
            ref = exact.log_prob_ve(data, s0)
            s["exact_nll_nats"] = float(-ref.mean())
            s["abs_error_nats_per_dim"] = float((ll.log_prob - ref).abs().max()) / ll.dim
        sec[deq] = s
        hists[deq] = ll.bpd.numpy()

    def plot(fig):
        ax = fig.add_subplot(111)
        for deq, v in hists.items():
            ax.hist(v, bins=20, alpha=0.6, label=f"{deq}: mean {v.mean():.3f}")
        ax.set_xlabel("bits / dim")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
        ax.set_title("probability-flow ODE likelihood")

    return sec, plot


def _lid(model, data, labels, c: DiagnoseConfig, exact, progress):
    fl = flipd(model, data, sigma=c.lid_sigma, divergence=c.divergence, probes=max(c.probes, 2), seed=c.seed)
    m = data.shape[0] if c.nb_points is None else min(c.nb_points, data.shape[0])
    nb = normal_bundle(model, data[:m], sigma=c.nb_sigma, scores=c.nb_scores, seed=c.seed, progress=progress)
    se = fl.stderr if fl.stderr is not None else torch.zeros(1)
    sec: Dict[str, Any] = {"flipd": {**fl.summary(), "stderr_mean": float(se.mean())}, "normal_bundle": nb.summary()}
    if exact is not None and hasattr(exact, "rank"):
        sec["exact_rank"] = int(exact.rank)
        sec["normal_bundle"]["fraction_equal_rank"] = float((nb.lid == exact.rank).double().mean())
    ests = {"FLIPD": fl.lid, "normal bundle": nb.lid.double()}
    if c.flow_jacobian:
        fj = flow_jacobian(model, data[:m], seed=c.seed)
        sec["flow_jacobian"] = fj.summary()
        ests["flow Jacobian"] = fj.lid.double()
    if labels is not None:
        per: Dict[str, Any] = {}
        for k in sorted(set(labels.tolist())):
            sel = labels == k
            row = {"n": int(sel.sum()), "flipd_median": float(fl.lid[sel].median())}
            seln = sel[:m]
            if seln.any():
                row["normal_bundle_median"] = float(nb.lid[seln].double().median())
            per[str(k)] = row
        sec["per_class"] = per

    def plot(fig):
        ax = fig.add_subplot(111)
        if labels is not None:
            ks = sorted(set(labels.tolist()))
            for j, (name, v) in enumerate(ests.items()):
                lab = labels[: v.numel()]
                med = [float(v[lab == k].median()) if (lab == k).any() else np.nan for k in ks]
                ax.bar(np.arange(len(ks)) + 0.8 * j / len(ests) - 0.3, med, width=0.8 / len(ests), label=name)
            ax.set_xticks(range(len(ks)))
            ax.set_xticklabels([str(k) for k in ks])
            ax.set_xlabel("class")
            ax.set_ylabel("median LID")
        else:
            for name, v in ests.items():
                ax.hist(v.numpy(), bins=20, alpha=0.6, label=f"{name}: median {float(v.median()):.1f}")
            ax.set_xlabel("local intrinsic dimension")
        ax.legend(fontsize=8)
        ax.set_title(f"LID (FLIPD at sigma {fl.sigma:.3g}, normal bundle at {nb.sigma:.3g})")

    return sec, plot


def _conservativity(model, data, labels, c: DiagnoseConfig, exact, progress):
    rows = conservativity_by_t(model, data, _usable(model, c.sigmas), probes=c.conservativity_probes, seed=c.seed)
    sec = {"by_sigma": [r.summary() for r in rows]}

    def plot(fig):
        ax = fig.add_subplot(111)
        s = [r.sigma for r in rows]
        ax.errorbar(s, [r.pooled for r in rows], yerr=[0 if math.isnan(r.stderr) else r.stderr for r in rows],
                    marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("noise level sigma / alpha")
        ax.set_ylabel("||J - J^T||_F / ||J||_F")
        ax.set_title("asymmetry of the denoiser Jacobian")

    return sec, plot


def _subspace(model, data, labels, c: DiagnoseConfig, exact, progress):
    m = min(c.subspace_points, data.shape[0])
    rows = jacobian_structure(model, data[:m], _usable(model, c.sigmas), seed=c.seed)
    sec: Dict[str, Any] = {"by_sigma": [r.summary() for r in rows]}
    if exact is not None and hasattr(exact, "bases"):
        from .subspace import subspace_distance

        comp = _components(exact, data[:m])
        sec["exact_rank"] = int(exact.rank)
        for r, row in zip(rows, sec["by_sigma"]):
            row["max_sin_angle_to_component_basis"] = max(
                subspace_distance(sub, exact.bases[int(k)]) if sub.shape[1] <= exact.rank else 1.0
                for sub, k in zip(r.subspaces, comp))

    image = data.dim() == 4 and data.shape[1] == 1
    cols = 3 if image else 2

    def plot(fig):
        ax1 = fig.add_subplot(1, cols, 1)
        ax1.plot([r.sigma for r in rows], [float(r.rank.double().mean()) for r in rows], marker="o")
        ax1.set_xscale("log")
        ax1.set_xlabel("sigma / alpha")
        ax1.set_ylabel("mean rank (singular values > 1/2)")
        ax2 = fig.add_subplot(1, cols, 2)
        for r in rows:
            sv = r.singular_values.mean(0).numpy()
            ax2.semilogy(np.arange(1, sv.size + 1), np.maximum(sv, 1e-8), label=f"sigma {r.sigma:.3g}")
        ax2.set_xscale("log")
        ax2.set_xlabel("index")
        ax2.set_ylabel("singular value of dD/dx")
        ax2.legend(fontsize=7)
        if image:  # the principal directions of the first point, at the middle noise level
            r = rows[len(rows) // 2]
            h, w = data.shape[2], data.shape[3]
            vecs = [v / (np.abs(v).max() + 1e-12) for v in r.leading[0, :8].reshape(8, h, w).numpy()]
            tile = np.concatenate([np.concatenate(vecs[:4], axis=1), np.concatenate(vecs[4:], axis=1)], axis=0)
            ax3 = fig.add_subplot(1, cols, 3)
            ax3.imshow(tile, cmap="RdBu_r", vmin=-1, vmax=1)
            ax3.set_axis_off()
            ax3.set_title(f"top 8 singular vectors, point 0, sigma {r.sigma:.3g}", fontsize=8)
        fig.suptitle("denoiser Jacobian: rank and spectrum by noise level")

    plot.wide = image  # type: ignore[attr-defined]
    return sec, plot


def _fokker_planck(model, data, labels, c: DiagnoseConfig, exact, progress):
    rows = fokker_planck_residual(model, data, _usable(model, c.sigmas), divergence=c.divergence, probes=c.probes,
                                  seed=c.seed)

    def plot(fig):
        ax = fig.add_subplot(111)
        ax.loglog([r["sigma"] for r in rows], [abs(r["relative_residual"]) for r in rows], marker="o")
        ax.set_xlabel("sigma / alpha")
        ax.set_ylabel("||residual|| / ||dS/ds||")
        ax.set_title("score Fokker-Planck residual")

    return {"by_sigma": rows}, plot


def _gap(model, data, labels, c: DiagnoseConfig, exact, progress):
    shape = tuple(getattr(model, "sample_shape", None) or (data.shape[1:] if data is not None else ()))
    feats = None
    if shape == (1, 28, 28):  # MNIST-shaped: also compare in the shipped LeNet's feature space
        from ..evaluation.metrics import default_metric

        lenet = default_metric()
        feats = lambda x: torch.from_numpy(lenet.features(x.float())[0])  # noqa: E731
    g = ode_sde_gap(model, n=c.gap_n, steps=c.gap_steps, sigmas=_usable(model, c.sigmas), sde_solver=c.gap_sde_solver,
                    seed=c.seed, progress=progress, shape=shape, features=feats)

    def plot(fig):
        ax = fig.add_subplot(111)
        rows = [r for r in g.rows if r["label"] != "final-features"]
        lowest = min([r["sigma"] for r in rows if r["label"] != "final"] or [1.0])
        xs = [r["sigma"] if r["label"] != "final" else lowest / 3 for r in rows]
        ax.errorbar(xs, [r["mmd2_null_mean"] for r in rows], yerr=[2 * r["mmd2_null_sd"] for r in rows], fmt="none",
                    color="0.6", label="permutation null (mean +- 2 sd)")
        ax.plot(xs, [r["mmd2"] for r in rows], "o", label="MMD^2 ODE vs SDE")
        ax.set_xscale("log")
        ax.set_xlabel("sigma / alpha (leftmost: final samples)")
        ax.set_ylabel("MMD^2")
        ax.legend(fontsize=8)
        ax.set_title(f"ODE ({g.info['ode_solver']}) vs SDE ({g.info['sde_solver']}), {g.info['steps']} steps")

    return {"rows": g.rows, **g.info}, plot


def _hallucination(model, data, labels, c: DiagnoseConfig, exact, progress):
    shape = tuple(getattr(model, "sample_shape", None) or (data.shape[1:] if data is not None else ()))
    base = c.seed * 1_000_000
    runs = []
    for part in range(2):  # calibrate the threshold on one half of the seeds, report on the other
        seeds = list(range(base + part * c.hal_n, base + part * c.hal_n + c.hal_n // 2))
        runs.append(hallucination_scores(model, seeds=seeds, shape=shape, solver=c.hal_solver, nfe=c.hal_nfe,
                                         last_k=c.hal_last_k, sigma_below=c.hal_sigma_below, progress=progress))
    cal, run = runs
    keep, thr = hallucination_filter(run.scores, threshold=hallucination_threshold(cal.scores, "quantile",
                                                                                   c.hal_quantile))
    sec: Dict[str, Any] = {**run.info, "samples_calibration": c.hal_n // 2, "samples_test": c.hal_n // 2,
                           "threshold": thr, "quantile": c.hal_quantile, "kept": float(keep.double().mean())}
    oos = None
    if c.modes is not None and c.mode_std is not None:
        oos = support_mask(run.samples, c.modes, c.mode_std, c.support_k)
        sec.update({"support_k_std": c.support_k, "auroc": auroc(run.scores, oos), **filter_report(oos, keep)})

    def plot(fig):
        if run.samples[0].numel() == 2:
            ax = fig.add_subplot(121)
            x = run.samples.flatten(1).numpy()
            sc = ax.scatter(x[:, 0], x[:, 1], c=np.log10(run.scores.clamp_min(1e-12).numpy()), s=3, cmap="viridis")
            fig.colorbar(sc, ax=ax, label="log10 score")
            ax.set_aspect("equal")
            ax.set_title("samples by score")
            ax2 = fig.add_subplot(122)
        else:
            ax2 = fig.add_subplot(111)
        ls = np.log10(run.scores.clamp_min(1e-12).numpy())
        if oos is not None:
            ax2.hist(ls[~oos.numpy()], bins=40, alpha=0.6, label="in support")
            ax2.hist(ls[oos.numpy()], bins=40, alpha=0.6, label="out of support")
            ax2.set_yscale("log")
        else:
            ax2.hist(ls, bins=40)
        ax2.axvline(math.log10(thr), color="k", ls="--", label=f"threshold ({c.hal_quantile:g} quantile)")
        ax2.set_xlabel("log10 variance of x0 over the last steps")
        ax2.legend(fontsize=8)

    return sec, plot


SECTION_FNS = {"likelihood": _likelihood, "lid": _lid, "conservativity": _conservativity, "subspace": _subspace,
               "fokker_planck": _fokker_planck, "gap": _gap, "hallucination": _hallucination}


def _usable(model: Model, sigmas: Sequence[float]) -> List[float]:
    """The noise levels inside the process's range."""
    proc = model.process
    lo, hi = float(sigma_of(proc, proc.t_min)), float(sigma_of(proc, proc.t_max))
    keep = [float(s) for s in sigmas if lo * 0.99 <= float(s) <= hi * 1.01]
    if not keep:
        raise DiagnosticError(f"none of the noise levels {list(sigmas)} lies in the process's range [{lo:.3g}, {hi:.3g}]")
    return keep


def _components(exact: Any, x: Tensor) -> Tensor:
    """The most likely mixture component of each clean point."""
    logp, _ = exact._components(x.reshape(x.shape[0], -1).to(DT), torch.tensor(0.0, dtype=DT))
    return (logp + exact.log_weights).argmax(1)


def _save_plot(plot: Callable[[Any], None], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12 if getattr(plot, "wide", False) else 9, 4))
    plot(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
