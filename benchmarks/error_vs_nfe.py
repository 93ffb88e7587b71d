#!/usr/bin/env python
"""Error against the exact solution versus NFE, for every solver, on exact Gaussian-mixture models.

For each reference size (MoLRG mixtures ``GaussianMixture.random(dim, seed=0)`` under the DDPM
linear VP schedule, 1000 steps) one batch of seeded noise x_T is drawn and the exact targets are
computed once (adaptive DOP853 on the probability-flow ODE, rtol 1e-10).  Then every solver runs at
every NFE budget, time spacing and last-step policy (``final``), and we record:

* ``rmse``: per-element root-mean-square distance to the matching exact target (deterministic
  solvers only): ``targets.denoised`` for runs that end with the jump to clean data,
  ``targets.at_t_min`` for runs that stop at t_min.
* ``llgap``: log-likelihood gap per dimension, [mean log p(exact) - mean log p(solver)] / dim over
  the batch (every solver).  Runs ending with the jump are scored under the data mixture; runs
  stopping at t_min under the exact marginal at t_min (the data convolved with the t_min noise),
  against the exact ODE state at t_min.  ``llgap_se`` is the standard error of that mean.
* ``nfe_used``, ``wall`` (seconds for the run) and ``net_time`` (seconds spent inside the network).

Then the solver overhead per NFE, (wall - network time) / NFE, is measured on the largest reference
at NFE 20 with one thread (median of a few repeats).

Writes ``error_vs_nfe.md``, ``error_vs_nfe.csv`` and ``error_vs_nfe.png`` under ``--out``.

    python benchmarks/error_vs_nfe.py --out docs          # the full run (several minutes)
    python benchmarks/error_vs_nfe.py --quick --out /tmp  # a smoke test (seconds)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import diffsolve as ds

DT = torch.float64
QUICK_SOLVERS = ("ddim", "heun", "dpm++2m", "unipc-bh2", "ddpm")
DEFAULT_BATCH = {64: 256, 3072: 64}
CSV_FIELDS = ("dim", "batch", "solver", "stochastic", "spacing", "final", "nfe_budget", "nfe_used", "clean_end",
              "rmse", "rmse_median", "flips", "llgap", "llgap_se", "wall", "net_time", "error")


# ----------------------------------------------------------------------------------------
# the timed network
# ----------------------------------------------------------------------------------------
class TimedNet:
    """Wraps ``net(x, t)`` and accumulates the time spent inside it: wall (time.perf_counter) and
    this process's CPU time (time.process_time, insensitive to other load on a shared machine)."""

    def __init__(self, net):
        self.net = net
        self.reset()

    def reset(self) -> None:
        self.time, self.cpu, self.calls = 0.0, 0.0, 0

    def __call__(self, x, t, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.net(x, t, **kwargs)
        self.time += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        self.calls += 1
        return out


@dataclass
class Case:
    """One reference size: mixture, model, fixed noise and exact targets."""

    dim: int
    batch: int
    ref: ds.GaussianMixture
    proc: ds.NoiseProcess
    net: TimedNet
    den: ds.Denoiser
    noise: torch.Tensor
    seeds: List[int]
    targets: ds.reference.ExactTargets
    lp_exact: Dict[bool, torch.Tensor] = field(default_factory=dict)  # clean_end -> log p per sample
    comp_exact: Dict[bool, torch.Tensor] = field(default_factory=dict)  # clean_end -> mixture component
    ref_err: float = float("nan")  # max |difference| of the targets to a solve at rtol/2 (a subset)
    target_time: float = 0.0

    def log_prob(self, x: torch.Tensor, clean_end: bool) -> torch.Tensor:
        """log-density (up to a constant shared by all runs of the same ``final``) of the run's end state."""
        if clean_end:
            return self.ref.log_prob(x)
        t = torch.tensor(self.targets.t_min, dtype=DT)
        a, s_ve = float(self.proc.alpha(t)), float(self.proc.sigma_ve(t))
        return self.ref.log_prob_ve(x / a, s_ve)  # the -d log(alpha) Jacobian cancels in the gap

    def component(self, x: torch.Tensor, clean_end: bool) -> torch.Tensor:
        """Most likely mixture component of each sample (under the same density as ``log_prob``)."""
        if clean_end:
            xv, s2 = x, 0.0
        else:
            t = torch.tensor(self.targets.t_min, dtype=DT)
            xv, s2 = x / float(self.proc.alpha(t)), float(self.proc.sigma_ve(t)) ** 2
        logp, _ = self.ref._components(self.ref._flat(xv), torch.tensor(s2, dtype=DT))
        return (logp + self.ref.log_weights).argmax(-1)


def make_case(dim: int, batch: int, seed: int, check_ref: int = 8) -> Case:
    proc = ds.VPDiscrete.linear(1000)
    ref = ds.GaussianMixture.random(dim=dim, seed=0)
    net = TimedNet(ref.network(proc, "epsilon"))
    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, dim, generator=g, dtype=DT)
    t0 = time.perf_counter()
    targets = ds.exact_targets(ref, proc, noise * proc.prior_scale)
    case = Case(dim, batch, ref, proc, net, den, noise, [seed * 1_000_003 + i for i in range(batch)], targets,
                target_time=time.perf_counter() - t0)
    for clean in (True, False):
        case.lp_exact[clean] = case.log_prob(targets.for_grid(clean), clean)
        case.comp_exact[clean] = case.component(targets.for_grid(clean), clean)
    if check_ref:  # error bar of the reference: the same solve at rtol/2 on a few samples
        n = min(check_ref, batch)
        _, err = ref.ode_solution(proc, noise[:n] * proc.prior_scale, proc.t_max, proc.t_min, check=True)
        case.ref_err = err
    return case


# ----------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------
def run_one(case: Case, solver: str, nfe: int, spacing: str, final: str) -> dict:
    info = ds.get_solver(solver)
    row = {"dim": case.dim, "batch": case.batch, "solver": info.name, "stochastic": int(info.stochastic),
           "spacing": spacing, "final": final, "nfe_budget": nfe, "nfe_used": "", "clean_end": "",
           "rmse": "", "rmse_median": "", "flips": "", "llgap": "", "llgap_se": "", "wall": "", "net_time": "",
           "error": ""}
    case.net.reset()
    t0 = time.perf_counter()
    try:
        x, si = ds.sample(case.den, case.noise, info.name, nfe=nfe, spacing=spacing, final=final,
                          seeds=case.seeds if info.stochastic else None, return_info=True)
    except Exception as e:  # recorded as missing, never fatal
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
        return row
    wall = time.perf_counter() - t0
    clean = bool(si.grid.clean_end)
    row.update(nfe_used=si.nfe, clean_end=int(clean), wall=wall, net_time=case.net.time)
    if not info.stochastic:
        target = case.targets.for_grid(clean)
        per_sample = (x - target).pow(2).reshape(x.shape[0], -1).mean(1)
        row["rmse"] = float(per_sample.mean().sqrt())
        row["rmse_median"] = float(per_sample.sqrt().median())
        row["flips"] = int((case.component(x, clean) != case.comp_exact[clean]).sum())
    lp = case.log_prob(x, clean)
    diff = (case.lp_exact[clean] - lp) / case.dim
    row["llgap"] = float(diff.mean())
    row["llgap_se"] = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else float("nan")
    return row


def measure_overhead(dim: int, batch: int, nfe: int, solvers: Sequence[str], repeats: int, seed: int,
                     progress=None) -> List[dict]:
    """(wall - network time) / NFE per solver, median over ``repeats`` runs (logsnr, final='denoise')."""
    proc = ds.VPDiscrete.linear(1000)
    ref = ds.GaussianMixture.random(dim=dim, seed=0)
    net = TimedNet(ref.network(proc, "epsilon"))
    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    seeds = list(range(batch))
    ds.sample(den, noise, "ddim", nfe=3)  # warm-up (allocator, lazy imports)
    names = [ds.get_solver(s).name for s in solvers]
    per_nfe: Dict[str, List[float]] = {s: [] for s in names}
    per_call: Dict[str, List[float]] = {s: [] for s in names}
    cpu_nfe: Dict[str, List[float]] = {s: [] for s in names}
    used: Dict[str, int] = {s: 0 for s in names}
    err: Dict[str, str] = {s: "" for s in names}
    for _ in range(repeats):  # round-robin, so that load changes on a shared machine hit every solver alike
        for name in names:
            if not err[name]:
                net.reset()
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    _, si = ds.sample(den, noise, name, nfe=nfe, spacing="logsnr", final="denoise",
                                      seeds=seeds if ds.get_solver(name).stochastic else None, return_info=True)
                except Exception as e:
                    err[name] = f"{type(e).__name__}: {e}"[:200]
                else:
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    used[name] = si.nfe
                    per_nfe[name].append((wall - net.time) / si.nfe)
                    cpu_nfe[name].append((cpu - net.cpu) / si.nfe)
                    per_call[name].append(net.time / max(net.calls, 1))
            if progress is not None:
                progress.update(1)
    out = []
    for s in names:
        v, c = per_nfe[s], per_call[s]
        out.append({"solver": s, "nfe_used": used[s],
                    "overhead_per_nfe": statistics.median(v) if v else float("nan"),
                    "net_per_call": statistics.median(c) if c else float("nan"),
                    "min": min(v) if v else float("nan"), "spread": (max(v) - min(v)) if v else float("nan"),
                    "cpu_per_nfe": statistics.median(cpu_nfe[s]) if cpu_nfe[s] else float("nan"),
                    "error": err[s]})
    return out


# ----------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------
def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def best_config(rows: List[dict], key: str) -> Optional[dict]:
    """The run with the smallest |key| (finite) among ``rows``."""
    ok = [r for r in rows if math.isfinite(_f(r[key]))]
    return min(ok, key=lambda r: abs(_f(r[key]))) if ok else None


def cell(r: Optional[dict], key: str, bold: bool, signed: bool = False) -> str:
    if r is None:
        return "—"
    v = _f(r[key])
    txt = f"{v:+.2e}" if signed else f"{v:.2e}"
    if bold:
        txt = f"**{txt}**"
    extra = f", {r['nfe_used']} NFE" if int(r["nfe_used"]) != int(r["nfe_budget"]) else ""
    if key.startswith("rmse") and str(r.get("flips", "")) not in ("", "0"):
        n = int(r["flips"])
        extra += f", {n} flip{'s' if n > 1 else ''}"
    return f"{txt} <sub>{r['spacing']}/{r['final']}{extra}</sub>"


def table(rows: List[dict], solvers: Sequence[str], nfes: Sequence[int], key: str, signed: bool) -> List[str]:
    best: Dict[Tuple[str, int], Optional[dict]] = {}
    for s in solvers:
        for n in nfes:
            best[s, n] = best_config([r for r in rows if r["solver"] == s and int(r["nfe_budget"]) == n], key)
    winner = {}
    for n in nfes:
        cands = [(abs(_f(best[s, n][key])), s) for s in solvers if best[s, n] is not None]
        winner[n] = min(cands)[1] if cands else None
    lines = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for s in solvers:
        lines.append(f"| {s} | " + " | ".join(cell(best[s, n], key, winner[n] == s, signed) for n in nfes) + " |")
    return lines


def oddities(rows: List[dict], dims: Sequence[int], solvers: Sequence[str], nfes: Sequence[int]) -> List[str]:
    """Best-config RMSE that grows with NFE, and single configurations that do so strongly."""
    notes = []
    for d in dims:
        for s in solvers:
            rs = [r for r in rows if int(r["dim"]) == d and r["solver"] == s]
            if not rs or int(rs[0]["stochastic"]):
                continue
            seq = []
            for n in nfes:
                b = best_config([r for r in rs if int(r["nfe_budget"]) == n], "rmse")
                if b is not None:
                    seq.append((n, _f(b["rmse"]), b))
            for (n0, e0, b0), (n1, e1, b1) in zip(seq, seq[1:]):
                if e1 > 1.2 * e0:
                    notes.append(f"dim {d}, {s}: best RMSE grows from {e0:.2e} at NFE {n0} to {e1:.2e} at NFE {n1}"
                                 f"{_flip_note(b0, b1)}")
            for sp in sorted({r["spacing"] for r in rs}):
                for fi in sorted({r["final"] for r in rs}):
                    cfg = sorted([r for r in rs if r["spacing"] == sp and r["final"] == fi
                                  and math.isfinite(_f(r["rmse"]))], key=lambda r: int(r["nfe_budget"]))
                    for a, b in zip(cfg, cfg[1:]):
                        if _f(b["rmse"]) > 2.0 * _f(a["rmse"]):
                            notes.append(f"dim {d}, {s} ({sp}/{fi}): RMSE grows from {_f(a['rmse']):.2e} at NFE "
                                         f"{a['nfe_budget']} to {_f(b['rmse']):.2e} at NFE {b['nfe_budget']}"
                                         f"{_flip_note(a, b)}")
    return notes


def _flip_note(a: dict, b: dict) -> str:
    fa, fb = str(a.get("flips", "")), str(b.get("flips", ""))
    if fa in ("", "0") and fb in ("", "0"):
        return ""
    return f" (flipped samples: {fa or 0} -> {fb or 0}; median per-sample RMSE {_f(a['rmse_median']):.2e} -> " \
           f"{_f(b['rmse_median']):.2e})"


def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6e}" if isinstance(v, float) else v) for k, v in r.items()})


def write_png(path: str, rows: List[dict], dims: Sequence[int], solvers: Sequence[str], nfes: Sequence[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    det = [s for s in solvers if not ds.get_solver(s).stochastic]
    fig, axes = plt.subplots(1, len(dims), figsize=(6.5 * len(dims), 5.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    colors = [cmap(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]  # dark shades first
    markers = "osD^v<>pPX*h"
    for ax, d in zip(axes[0], dims):
        for j, s in enumerate(det):
            pts = []
            for n in nfes:
                b = best_config([r for r in rows if int(r["dim"]) == d and r["solver"] == s
                                 and int(r["nfe_budget"]) == n], "rmse")
                if b is not None and _f(b["rmse"]) > 0:
                    pts.append((int(b["nfe_used"]), _f(b["rmse"])))
            if pts:
                ax.plot(*zip(*pts), marker=markers[j % len(markers)], color=colors[j % 20], label=s, lw=1.2, ms=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(nfes))
        ax.set_xticklabels([str(n) for n in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE used")
        ax.set_ylabel("RMSE to the exact solution (best spacing/final)")
        ax.set_title(f"MoLRG dim {d}, DDPM linear VP (1000 steps)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(path: str, rows: List[dict], cases: List[Case], solvers: Sequence[str], nfes: Sequence[int],
             overhead: List[dict], args, wall: float, command: str) -> None:
    det = [s for s in solvers if not ds.get_solver(s).stochastic]
    sto = [s for s in solvers if ds.get_solver(s).stochastic]
    L = ["# Error versus NFE on exact Gaussian-mixture models", "",
         "Generated by `benchmarks/error_vs_nfe.py`; every run is in `error_vs_nfe.csv`, the RMSE curves are in "
         "`error_vs_nfe.png`.", "",
         f"- Command: `{command}` — {wall:.0f} s wall ({'quick mode, ' if args.quick else ''}"
         f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}, "
         f"{os.cpu_count()} cores, shared machine).",
         "- Model: the exact epsilon-prediction denoiser of `GaussianMixture.random(dim, seed=0)` (float64), "
         "process `VPDiscrete.linear(1000)` (DDPM linear betas).",
         f"- Noise: one fixed seeded batch per size (seed {args.seed}); stochastic solvers get per-sample seeds, "
         "the same in every run.",
         f"- Spacings: {', '.join(args.spacings)}; last step: {', '.join(args.finals)} "
         "(`denoise` = the final jump to clean data with the denoiser, `t_min` = stop at t_min = 0).",
         "- Exact targets: the probability-flow ODE solved by adaptive DOP853 (rtol 1e-10), then the exact "
         "posterior mean for runs ending with the jump. Reference error bar (max |difference| to a solve at "
         "rtol 5e-11, first 8 samples): " + ", ".join(f"dim {c.dim}: {c.ref_err:.1e}" for c in cases) + ".",
         "- **RMSE**: per-element root mean square of (sample − matching exact target), deterministic solvers. "
         "Each cell shows the best spacing/final for that solver and NFE budget (and the NFE actually used "
         "when fewer than the budget); the best solver at each NFE is in bold. `—`: the solver raised "
         "(e.g. budget below its minimum) for every configuration. `k flips`: k samples end in a different "
         "mixture component than their exact target (most likely component under the density below). A sample "
         "near a basin boundary of the ODE flow switches component under a tiny error, and one such sample adds "
         "~0.3/sqrt(batch) to the batch RMSE: that is the floor several solvers sit on at 50 NFE; the median "
         "per-sample RMSE table does not see it.",
         "- **Log-likelihood gap per dimension** (`llgap`): [mean log p(exact targets) − mean log p(solver "
         "samples)] / dim over the batch, under the true mixture for runs ending with the jump, and under "
         "the exact marginal at t_min for runs stopping there (against the exact ODE state at t_min). Positive: "
         "the samples are less likely than exact ones (too noisy / off the data); negative: more likely "
         "(collapsed towards modes). It is a distribution metric, not a divergence, so the best cell is the "
         "smallest |gap|. Noise floor: see `llgap_se` in the CSV (typically "
         + ", ".join(f"dim {c.dim}: ~{_typ_se(rows, c.dim):.0e}" for c in cases) + ").",
         ""]
    for c in cases:
        rs = [r for r in rows if int(r["dim"]) == c.dim]
        L += [f"## dim {c.dim} (batch {c.batch})", "",
              f"Exact targets: {c.target_time:.0f} s.", "",
              "### RMSE to the exact solution (deterministic solvers)", ""]
        L += table(rs, det, nfes, "rmse", signed=False)
        L += ["", "### Median per-sample RMSE (deterministic solvers; insensitive to a few flipped samples)", ""]
        L += table(rs, det, nfes, "rmse_median", signed=False)
        L += ["", "### Log-likelihood gap per dimension (all solvers; stochastic ones last)", ""]
        L += table(rs, det + sto, nfes, "llgap", signed=True)
        L += [""]
    if overhead:
        od = overhead[0]
        L += [f"## Solver overhead per NFE", "",
              f"Wall time of a run minus the time inside the network, divided by the NFE used: dim "
              f"{args.overhead_dim}, batch {args.overhead_batch}, NFE budget {args.overhead_nfe}, logsnr spacing, "
              f"final=denoise, torch.set_num_threads(1), median of {args.overhead_repeats} runs. Overhead includes "
              "the adapter's eps -> x0 conversion, finiteness checks and (stochastic solvers) per-sample noise "
              "drawing. The network is the exact mixture denoiser (float64), shown per call for context. Solvers "
              "take turns (round-robin) so that load changes hit all alike; on a shared machine differences "
              "below the spread (max - min over the repeats) are noise. The CPU-time column is the same difference "
              "measured with this process's CPU time (time.process_time), which other processes' load does not "
              "inflate; it is the more reproducible number. Sorted by the wall-time median.", "",
              "| solver | NFE used | overhead / NFE, wall median (ms) | min (ms) | spread (ms) | "
              "overhead / NFE, CPU time (ms) | network / call (ms) | overhead share |",
              "|---|---|---|---|---|---|---|---|"]
        for o in sorted(overhead, key=lambda o: _f(o["overhead_per_nfe"])):
            if o["error"]:
                L.append(f"| {o['solver']} | — | — | — | — | — | — | {o['error']} |")
                continue
            ov, nc = o["overhead_per_nfe"] * 1e3, o["net_per_call"] * 1e3
            L.append(f"| {o['solver']} | {o['nfe_used']} | {ov:.2f} | {o['min'] * 1e3:.2f} | "
                     f"{o['spread'] * 1e3:.2f} | {o['cpu_per_nfe'] * 1e3:.2f} | {nc:.1f} | {ov / (ov + nc):.0%} |")
        L += [""]
    missing = [r for r in rows if r["error"]]
    L += ["## Missing runs", ""]
    if missing:
        groups: Dict[str, List[str]] = {}
        for r in missing:
            groups.setdefault(r["error"], []).append(f"{r['solver']}@{r['nfe_budget']}/{r['final']}")
        for e, who in groups.items():
            uniq = sorted(set(who))
            L.append(f"- {e} ({len(who)} runs: {', '.join(uniq[:8])}{' …' if len(uniq) > 8 else ''})")
    else:
        L.append("None: every configuration ran.")
    L += ["", "## Automatic checks: error growing with NFE", ""]
    notes = oddities(rows, [c.dim for c in cases], solvers, nfes)
    L += [f"- {n}" for n in notes] if notes else ["None: the best RMSE of every solver decreases with NFE."]
    if cases:
        L += ["", "Last finite step of each grid in log-SNR (h = lambda(t_min) - lambda(t_1), final=t_min): a large "
              "last step dominates the error and can make it non-monotone in NFE (its error can change sign); "
              "with fewer than 15 steps, or when it is over 3x the step before, the automatic "
              "`lower_order_final` also makes it first order.", "",
              "| spacing | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for sp in args.spacings:
            hs = []
            for n in nfes:
                try:
                    g = ds.make_grid(cases[0].proc, n + 1, sp, "t_min")
                    hs.append(f"{float(g.lam[-1] - g.lam[-2]):.2f}")
                except Exception:
                    hs.append("—")
            L.append(f"| {sp} | " + " | ".join(hs) + " |")
    L += [""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def _typ_se(rows: List[dict], dim: int) -> float:
    v = [_f(r["llgap_se"]) for r in rows if int(r["dim"]) == dim and math.isfinite(_f(r["llgap_se"]))]
    return statistics.median(v) if v else float("nan")


# ----------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs", help="output folder (default: docs)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: dim 64, batch 32, solvers {','.join(QUICK_SOLVERS)}, NFE 5,10")
    p.add_argument("--dims", default="64,3072", help="mixture dimensions (default 64,3072)")
    p.add_argument("--batch", default=None,
                   help="batch size, one for all dims or one per dim (default: 256 for dim 64, 64 for 3072)")
    p.add_argument("--nfes", default="5,6,8,10,15,20,50", help="NFE budgets")
    p.add_argument("--solvers", default=None, help="comma-separated solver names (default: all)")
    p.add_argument("--spacings", default="logsnr,karras,uniform")
    p.add_argument("--finals", default="denoise,t_min")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the sweep (default 1: robust on a shared machine)")
    p.add_argument("--overhead-dim", type=int, default=None, help="default: the largest of --dims")
    p.add_argument("--overhead-batch", type=int, default=128)
    p.add_argument("--overhead-nfe", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.dims, a.nfes = "64", "5,10"
        a.batch = a.batch or "32"
        a.solvers = a.solvers or ",".join(QUICK_SOLVERS)
        a.overhead_batch, a.overhead_repeats = 32, 2
    a.dims = [int(v) for v in str(a.dims).split(",") if v]
    a.nfes = sorted(int(v) for v in str(a.nfes).split(",") if v)
    a.spacings = [v for v in a.spacings.split(",") if v]
    a.finals = [v for v in a.finals.split(",") if v]
    a.solvers = [ds.get_solver(s).name for s in a.solvers.split(",")] if a.solvers else [s.name for s in ds.solvers()]
    if a.batch is None:
        a.batch = [DEFAULT_BATCH.get(d, 64) for d in a.dims]
    else:
        b = [int(v) for v in str(a.batch).split(",")]
        a.batch = b * len(a.dims) if len(b) == 1 else b
        if len(a.batch) != len(a.dims):
            p.error("--batch needs one value or one per dim")
    if a.overhead_dim is None:
        a.overhead_dim = max(a.dims)
    return a


def main(argv=None) -> int:
    args = parse(argv)
    from tqdm.auto import tqdm

    command = "python benchmarks/error_vs_nfe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    per_dim = len(args.solvers) * len(args.nfes) * len(args.spacings) * len(args.finals)
    n_over = 0 if args.no_overhead else len(args.solvers) * args.overhead_repeats
    bar = tqdm(total=per_dim * len(args.dims) + n_over, unit="run", desc="error vs NFE", disable=args.no_progress,
               dynamic_ncols=True)
    rows: List[dict] = []
    cases: List[Case] = []
    for dim, batch in zip(args.dims, args.batch):
        bar.set_postfix_str(f"dim {dim}: exact targets")
        case = make_case(dim, batch, args.seed)
        cases.append(case)
        for s in args.solvers:
            for n in args.nfes:
                bar.set_postfix_str(f"dim {dim} {s} NFE {n}")
                for sp in args.spacings:
                    for fi in args.finals:
                        rows.append(run_one(case, s, n, sp, fi))
                        bar.update(1)
        write_csv(os.path.join(args.out, "error_vs_nfe.csv"), rows)  # partial results survive a crash
    overhead: List[dict] = []
    if not args.no_overhead:
        bar.set_postfix_str(f"overhead (dim {args.overhead_dim}, batch {args.overhead_batch}, 1 thread)")
        torch.set_num_threads(1)
        overhead = measure_overhead(args.overhead_dim, args.overhead_batch, args.overhead_nfe, args.solvers,
                                    args.overhead_repeats, args.seed, bar)
        torch.set_num_threads(args.threads)
    bar.close()
    wall = time.perf_counter() - t_start
    write_csv(os.path.join(args.out, "error_vs_nfe.csv"), rows)
    write_png(os.path.join(args.out, "error_vs_nfe.png"), rows, args.dims, args.solvers, args.nfes)
    write_md(os.path.join(args.out, "error_vs_nfe.md"), rows, cases, args.solvers, args.nfes, overhead, args,
             wall, command)
    n_missing = sum(1 for r in rows if r["error"])
    print(f"{len(rows)} runs ({n_missing} missing) in {wall:.0f} s -> {args.out}/error_vs_nfe.{{md,csv,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
