"""The report of ``diffsolve bench --inverse``: Markdown (median SW per cell and method, the target ratio, costs, the
DPS step-size sweep), CSV (every row) and a PNG (per cell: every method's SW against the floor and ignore-y)."""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from ..util.files import write_text_atomic
from .inverse_roles import BASELINES, PEERS, REFERENCE_ROWS, _kind, _median

FIELDS = ("phase", "suite", "d", "d_y", "rep", "seed", "sigma_y", "singular_values", "modes", "method", "kind",
          "options", "samples", "sw", "sw2", "nonfinite", "nfe", "vjps", "nfe_eq", "seconds", "error")
TARGET = 0.5


def _f(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.1e}" if abs(v) >= 1000
                                                                               else f"{v:.2f}")


def _label(c: Dict[str, Any]) -> str:
    return f"{c['d']}/{c['d_y']}"


def summary_text(summary: List[Dict[str, Any]]) -> str:
    lines = ["suite    d    d_y  floor  best ours            best peer                 ratio"]
    for c in summary:
        o, p = c["best_ours"], c["best_peer"]
        lines.append(f"{c['suite']:8s} {c['d']:<4d} {c['d_y']:<4d} {_f(c['median'].get('floor', math.nan)):6s} "
                     f"{_f(o[0]):6s} {o[1]:13s} {_f(p[0]):6s} {p[1]:18s} {_f(c['ratio'])}")
    return "\n".join(lines)


def _order(methods: Sequence[str]) -> List[str]:
    return (list(BASELINES) + [m for m in methods if m in REFERENCE_ROWS] + [m for m in methods if _kind(m) == "ours"]
            + [m for m in methods if _kind(m) == "peer"])


def markdown(cfg, rows, tune_rows, summary, methods, meta) -> str:
    out: List[str] = ["# Posterior sampling against the exact posterior (`diffsolve bench --inverse`)", ""]
    out += [f"Command: `{meta['command']}` (code `{meta['version']}`, torch {meta['torch']}, {meta['threads']} "
            f"thread(s); this run's wall time {meta['wall_s'] / 60:.1f} min).", "",
            f"{cfg.samples} samples per method and problem at <= {cfg.nfe} NFE-equivalents per sample (a VJP "
            "counts 2 NFE; a particle method's cost per sample is its network calls over all particles divided by "
            "the samples it returns).  SW: mean over 100 random directions of the 1-D W1 distance to as many exact "
            "posterior samples (lower is better); floor: two exact sample sets; ignore-y: prior samples; oracle: "
            f"the exact posterior denoiser under `{'dpm++2m'}` at the same budget (a reference, not a contender).  "
            "Ours: `ds.inverse` methods with their defaults (DPS: step size chosen per cell).  Peers: azula's "
            "methods run through azula's code (`azula:*`; `-ddpm`: its DDIM sampler with eta = 1), MCGdiff, DDRM "
            "and DAPS from the papers' equations (`paper:*`)."]
    if meta.get("skipped"):
        out += ["", f"Not run (azula is not installed): {', '.join(meta['skipped'])}."]
    if meta.get("skip"):
        out += ["", "Not run at large d, for time ('-' in the tables): " + ", ".join(
            f"{m} at d >= {d}" for m, d in meta["skip"].items()) + "."]
    for suite in dict.fromkeys(c["suite"] for c in summary):
        cs = [c for c in summary if c["suite"] == suite]
        out += ["", f"## Suite `{suite}`: median SW per cell (d / d_y; problems per cell: "
                f"{', '.join(str(c['n']) for c in cs)})", "",
                "| method | " + " | ".join(_label(c) for c in cs) + " |", "|---|" + "---|" * len(cs)]
        for m in _order(methods):
            if not any(m in c["median"] for c in cs):
                continue
            cells = []
            for c in cs:
                v = c["median"].get(m, math.nan)
                s = _f(v)
                if (c["best_ours"][1] == m or c["best_peer"][1] == m) and s != "-":
                    s = f"**{s}**"
                nan = c["nan"].get(m, 0)
                cells.append(s + (f" ({nan} NaN)" if nan else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out += ["", f"Target: our best median <= {TARGET}x the best peer's.", "",
                "| d | d_y | floor | ignore-y | oracle | best ours | best peer | ratio | met |",
                "|---|---|---|---|---|---|---|---|---|"]
        for c in cs:
            o, p, r = c["best_ours"], c["best_peer"], c["ratio"]
            met = "-" if math.isnan(r) else ("yes" if r <= TARGET else "**no**")
            out.append(f"| {c['d']} | {c['d_y']} | {_f(c['median'].get('floor', math.nan))} | "
                       f"{_f(c['median'].get('ignore-y', math.nan))} | {_f(c['median'].get('oracle', math.nan))} | "
                       f"{_f(o[0])} ({o[1]}) | {_f(p[0])} ({p[1]}) | {_f(r)} | {met} |")
    out += ["", "## Cost per sample and median seconds per problem", "",
            "| method | NFE | VJPs | NFE-equivalents | " + " | ".join(f"s (d={d})" for d in sorted({c['d'] for c in summary}))
            + " |", "|---|---|---|---|" + "---|" * len({c['d'] for c in summary})]
    for m in _order(methods):
        if m in BASELINES:
            continue
        rs = [r for r in rows if r["method"] == m and r.get("nfe", "") != ""]
        if not rs:
            continue
        nfe = max(float(r["nfe"]) for r in rs)
        vjps = max(float(r["vjps"]) for r in rs)
        eq = max(float(r["nfe_eq"]) for r in rs)
        secs = [_f(_median([float(r["seconds"]) for r in rs if r["d"] == d])) for d in sorted({c['d'] for c in summary})]
        out.append(f"| {m} | {nfe:g} | {vjps:g} | {eq:g} | " + " | ".join(secs) + " |")
    if tune_rows:
        zs = sorted({json_zeta(r) for r in tune_rows})
        out += ["", "## DPS step size: median SW on the tuning problems (NaN: problems without a finite sample set)",
                "", "azula's DPS normalises by the residual norm of the whole batch: its step is listed as "
                f"zeta / sqrt({cfg.samples}).", "",
                "| suite | d | d_y | method | " + " | ".join(f"zeta={_f(z)}" for z in zs) + " | chosen |",
                "|---|---|---|---|" + "---|" * (len(zs) + 1)]
        for c in summary:
            for m in dict.fromkeys(r["method"] for r in tune_rows):
                rs = [r for r in tune_rows if (r["suite"], r["d"], r["d_y"], r["method"]) ==
                      (c["suite"], c["d"], c["d_y"], m)]
                if not rs:
                    continue
                vals = []
                for z in zs:
                    v = [float(r["sw"]) for r in rs if json_zeta(r) == z]
                    nan = sum(math.isnan(x) for x in v)
                    vals.append(_f(_median(v)) + (f" ({nan} NaN)" if nan else ""))
                ch = meta["zetas"].get(f"{c['suite']}/{c['d']}/{c['d_y']}/{m}")
                ch = ch / math.sqrt(cfg.samples) if (ch is not None and m in PEERS) else ch
                out.append(f"| {c['suite']} | {c['d']} | {c['d_y']} | {m} | " + " | ".join(vals) + f" | {_f(ch)} |")
    bad = []
    for c in summary:
        for m, k in c["nan"].items():
            if k:
                errs = sorted({r["error"] for r in rows if (r["suite"], r["d"], r["d_y"], r["method"]) ==
                               (c["suite"], c["d"], c["d_y"], m) and r["error"]})
                bad.append(f"- {c['suite']} d={c['d']} d_y={c['d_y']} {m}: {k} of {c['n']} problems without a "
                           "finite sample set" + (f" ({'; '.join(errs)[:300]})" if errs else ""))
    out += ["", "## Non-finite samples and errors", ""] + (bad or ["None."])
    return "\n".join(out) + "\n"


def json_zeta(r: Dict[str, Any]) -> float:
    import json

    z = float(json.loads(r["options"])["zeta"])
    return z / math.sqrt(float(r["samples"])) if r["method"] in PEERS else z


def write_csv(rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def plot(summary: List[Dict[str, Any]], rows: List[Dict[str, Any]], methods: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    order = [m for m in _order(methods) if m not in BASELINES]
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 0.23 * len(order) * nrows + 1.2 * nrows), squeeze=False)
    colour = {"ours": "tab:blue", "peer": "tab:orange", "reference": "k"}
    for ax, c in zip(axes.flat, summary):
        ms = [m for m in order if m in c["median"]]
        ypos = np.arange(len(ms))[::-1]
        for y, m in zip(ypos, ms):
            v = [float(r["sw"]) for r in rows if (r["suite"], r["d"], r["d_y"], r["method"]) ==
                 (c["suite"], c["d"], c["d_y"], m) and not math.isnan(float(r["sw"]))]
            if not v:
                continue
            lo, med, hi = np.percentile(v, [25, 50, 75])
            ax.errorbar([med], [y], xerr=[[med - lo], [hi - med]], fmt="o", ms=4, color=colour[_kind(m)], lw=1)
        for b, st in (("floor", ":"), ("ignore-y", "--")):
            if b in c["median"]:
                ax.axvline(c["median"][b], color="0.4", ls=st, lw=1, label=b)
        ax.set_yticks(ypos)
        ax.set_yticklabels(ms, fontsize=6)
        ax.set_xscale("log")
        ax.set_title(f"{c['suite']} d={c['d']} d_y={c['d_y']} ({c['n']} problems)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", which="both", alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("median (IQR) sliced W1 to the exact posterior; blue: ours, orange: peers, black: oracle",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write(cfg, rows, tune_rows, summary, methods, meta) -> Dict[str, str]:
    files = {"md": os.path.join(cfg.out, "inverse_bench.md"), "csv": os.path.join(cfg.out, "inverse_bench.csv"),
             "png": os.path.join(cfg.out, "inverse_bench.png")}
    write_text_atomic(markdown(cfg, rows, tune_rows, summary, methods, meta), files["md"])
    write_text_atomic(write_csv(rows + tune_rows), files["csv"])
    plot(summary, rows, methods, files["png"])
    return files
