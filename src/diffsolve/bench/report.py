"""Benchmark output: markdown tables (solver x NFE, best per NFE in bold, ours vs peers), CSV and JSON with
every number and the exact configuration of each run, and a log-log PNG of error vs NFE (ours solid,
peers dashed)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import harness as H

LIB_ORDER = {"diffsolve": 0, "diffusers": 1, "k-diffusion": 2}
PARITY_TOL = {"diffusers": H.PARITY_FLOAT32, "k-diffusion": H.PARITY_FLOAT64}
CONVENTIONS = """\
Where the peers' conventions differ from ours (details, measurements and the diffsolve equivalents in
[conventions.md](conventions.md)); each item changes the result, so each is part of a peer's configuration
here rather than something we normalise away:

1. **Where a run stops.** DDIM (`set_alpha_to_one=True`),
   DPMSolverMultistep/Singlestep and UniPC with `final_sigmas_type="zero"`, Euler/Heun/KDPM2 and every
   k-diffusion sampler on sigmas ending in 0 finish with a jump to clean data; the `sigma_min` variants,
   DDIM/PNDM with `set_alpha_to_one=False`, DEIS, SA-Solver and k-diffusion's `dpm_fast`/`dpm_adaptive` stop at
   timestep 0; LMS and PNDM with `set_alpha_to_one=True` integrate to sigma = 0 with a multistep formula (no
   jump). The harness
   detects this per run (column `endpoint`) and scores against the matching exact target.
2. **Grids.** diffusers' index spacings (`linspace`, `leading`, `trailing`) and its Karras / exponential /
   `use_lu_lambdas` conversions; k-diffusion's Karras and exponential sigmas. `leading` never starts at
   t = 999 (x_T is treated as the marginal at t = 1000 - 1000/n); `trailing` DDIM/PNDM step targets and the next
   model timestep disagree by one when n does not divide 1000.
3. **Model time on sigma grids.** diffusers' Karras/exponential/lu options round the model's timestep to an
   integer while the update uses the unrounded sigma; Euler-type schedulers interpolate sigma linearly in t.
   diffsolve and our k-diffusion wrapper call the model at the time its coefficients use (log-alpha
   interpolation between integer timesteps).
4. **Order near the end.** DPMSolverMultistep lowers the order on the last steps only below 15 steps;
   UniPC always; k-diffusion never (except the first-order step to sigma = 0); diffsolve's automatic rule also
   lowers when the last log-SNR interval is over 3x the one before.
5. **Coefficients.** The reference DPM-Solver++(3M) second-difference weight is half the Taylor weight
   (diffsolve's default `taylor3=True` is third order; `taylor3=False` reproduces diffusers);
   k-diffusion's `dpmpp_3m_sde` warm-up step uses the phi_2 weight.
6. **Start.** diffusers' Euler-type schedulers start from x_T * sigma_max with `linspace`/`trailing` spacing
   (not x_T * sqrt(sigma_max^2 + 1), a 2e-5 relative difference); here every k-diffusion run starts from the
   exact VE image x_T / alpha(t_max) of the shared x_T.
7. **Precision.** diffusers keeps its schedule in float32 and DPMSolverMultistep/Euler cast the state to float32
   in `step`; k-diffusion computes in the dtype of x and of its sigmas (torch's default dtype); diffsolve keeps
   coefficients in float64 and the state in float64 (or float32 with `dtype=torch.float32`).
8. **Defaults that are not part of the solver.** DDIM's default `clip_sample=True` clips x0 to [-1, 1] (off
   here); SA-Solver's default `tau_func` is stochastic between t = 200 and 800 (tau = 0 here, the ODE);
   diffusers' UniPC bh1 with `final_sigmas_type="zero"` returns NaN (recorded as a failed run).
"""


READING = """How to read these numbers:

- Each cell is a best configuration: for ours over 4 spacings x 2 last steps, for a peer over its variants
  (grids, `final_sigmas_type`, `set_alpha_to_one`, ...). Where it stops matters: below ~10 NFE the best runs of
  both sides stop at t = 0 instead of jumping to clean data from a noisy last point; diffusers' default index
  grids (`linspace`, `leading`) spend their last network call far from t = 0 (t = 1000/n) and jump from there,
  which sets an error floor that no solver order removes.
- At 64 dimensions the batch RMSE is dominated by a few samples that sit near a basin boundary of the ODE flow
  and end in another mixture component under a small error (one such sample adds ~0.3/sqrt(256) = 0.02): the
  large ours/peer gap at 10-20 NFE there comes from the configurations (PNDM and UniPC on the quadratic grid)
  that keep those samples in their basin. The median per-sample ratio shows the typical sample.
- The peers run a float32 state, as their pipelines do; at these error levels (>= 1e-3) float32 rounding
  (~1e-7) does not matter, so the accuracy comparison is between algorithms, grids and last-step rules."""


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _fin(v) -> bool:
    return math.isfinite(_f(v))


def row_key(r: Dict[str, Any]) -> Tuple[str, str]:
    return (r["library"], r["family"])


def row_label(lib: str, family: str) -> str:
    return f"**ours** `{family}`" if lib == "diffsolve" else f"{lib} {family}"


def ordered_rows(rows: List[Dict[str, Any]]) -> List[Tuple[str, str]]:
    seen: Dict[Tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        seen.setdefault(row_key(r), i)
    return sorted(seen, key=lambda k: (LIB_ORDER.get(k[0], 9), seen[k]))


def best_run(rows: List[Dict[str, Any]], key: str = "rmse") -> Optional[Dict[str, Any]]:
    ok = [r for r in rows if not r["error"] and _fin(r.get(key))]
    return min(ok, key=lambda r: abs(_f(r[key]))) if ok else None


def _cell(r: Optional[Dict[str, Any]], key: str, bold: bool, signed: bool = False) -> str:
    if r is None:
        return "—"
    v = _f(r[key])
    txt = f"{v:+.2e}" if signed else f"{v:.2e}"
    if bold:
        txt = f"**{txt}**"
    extra = ""
    if str(r["nfe_used"]) != str(r["nfe_budget"]):
        extra = f", {r['nfe_used']} NFE"
    return f"{txt} <sub>{r['variant']}{extra}</sub>"


def run_table(rows: List[Dict[str, Any]], nfes: Sequence[int], key: str = "rmse", signed: bool = False) -> List[str]:
    """Markdown: one line per (library, solver family), one column per NFE budget; each cell the best
    configuration of that row (its variant in small print), the best of the column in bold."""
    keys = ordered_rows(rows)
    by: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    for r in rows:
        if r["nfe_budget"] != "":
            by.setdefault((r["library"], r["family"], int(r["nfe_budget"])), []).append(r)
    best = {(k, n): best_run(by.get((k[0], k[1], n), []), key) for k in keys for n in nfes}
    win = {}
    for n in nfes:
        c = [(abs(_f(best[k, n][key])), k) for k in keys if best[k, n] is not None]
        win[n] = min(c)[1] if c else None
    L = ["| solver | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for k in keys:
        if all(best[k, n] is None for n in nfes) and not any(by.get((k[0], k[1], n)) for n in nfes):
            continue
        L.append(f"| {row_label(*k)} | " + " | ".join(_cell(best[k, n], key, win[n] == k, signed) for n in nfes) + " |")
    return L


def target_table(res, nfes: Sequence[int]) -> List[str]:
    L = ["| problem | NFE | ours best (RMSE, configuration) | best peer (RMSE, configuration) | ratio |",
         "|---|---|---|---|---|"]
    for t in res.target_ratios(nfes):
        o, p = t["ours"], t["peer"]
        oc = f"{_f(o['rmse']):.3e} `{o['family']}` {o['variant']}" if o else "—"
        pc = f"{_f(p['rmse']):.3e} {p['library']} {p['family']} ({p['variant']})" if p else "—"
        ratio = t["ratio"]
        rt = "—" if not math.isfinite(ratio) else (f"**{ratio:.2f}**" if ratio <= 1.0 else f"{ratio:.2f} ✗")
        L.append(f"| {t['problem']} | {t['nfe']} | {oc} | {pc} | {rt} |")
    return L


def ratio_grid(res, nfes: Sequence[int], key: str = "rmse", tuned: bool = False) -> List[str]:
    ts = res.target_ratios(nfes, key, tuned=tuned)
    probs = [p["name"] for p in res.problems if any(t["problem"] == p["name"] for t in ts)]
    L = ["| problem | " + " | ".join(f"NFE {n}" for n in nfes if n in res.nfes) + " |",
         "|---|" + "---|" * len([n for n in nfes if n in res.nfes])]
    for pr in probs:
        cells = []
        for n in nfes:
            if n not in res.nfes:
                continue
            t = next((x for x in ts if x["problem"] == pr and x["nfe"] == n), None)
            r = t["ratio"] if t else float("nan")
            cells.append("—" if not math.isfinite(r) else (f"{r:.2f}" if r <= 1.0 else f"**{r:.2f}** ✗"))
        L.append(f"| {pr} | " + " | ".join(cells) + " |")
    return L


def tuned_table(res, nfes: Sequence[int]) -> List[str]:
    """Markdown: per problem and NFE the tuned profile's entry, its RMSE and median, the best peer's, ratios."""
    L = ["| problem | NFE | tuned sampler | tuned RMSE | best peer (configuration) | ratio | tuned median | "
         "best peer median | ratio (median) |", "|---|---|---|---|---|---|---|---|---|"]
    med = {(t["problem"], t["nfe"]): t for t in res.target_ratios(nfes, "rmse_median", tuned=True)}
    for t in res.target_ratios(nfes, tuned=True):
        o, p = t["ours"], t["peer"]
        m = med.get((t["problem"], t["nfe"]))
        pc = f"{_f(p['rmse']):.3e} ({p['library']} {p['family']}, {p['variant']})" if p else "—"
        mp = m["peer"] if m else None
        L.append(f"| {t['problem']} | {t['nfe']} | `{o['variant']}` | {_f(o['rmse']):.3e} | {pc} | "
                 f"**{t['ratio']:.2f}** | {_f(o['rmse_median']):.3e} | "
                 f"{_f(mp['rmse_median']) if mp else float('nan'):.3e} | {m['ratio'] if m else float('nan'):.2f} |")
    return L


def _seeds_text(cal) -> str:
    """'calibration seeds 1000000-1001023 (1024)' from a profile's meta['calibration']."""
    seeds = (cal or {}).get("seeds")
    if isinstance(seeds, dict):
        return f"calibration seeds {seeds['start']}–{seeds['start'] + seeds['count'] - 1} ({seeds['count']})"
    if isinstance(seeds, list):
        return f"{len(seeds)} calibration seeds"
    return "calibration seeds unknown"


def tuned_findings(res, goal: float = 0.5) -> List[str]:
    ts = [t for t in res.target_ratios(res.nfes, tuned=True) if math.isfinite(t["ratio"])]
    if not ts:
        return []
    L = []
    bad = [t for t in ts if t["ratio"] > goal]
    per = "; ".join(f"{t['problem']} NFE {t['nfe']}: {t['ratio']:.2f}" for t in ts)
    L.append(f"- **Tuned profiles** (`diffsolve tune`, evaluated on this run's noise, never used in tuning): "
             f"tuned RMSE / best peer RMSE = {per}. "
             + (f"At most {goal}x everywhere." if not bad else
                f"Above {goal}x at " + ", ".join(f"{t['problem']} NFE {t['nfe']}" for t in bad) + "."))
    for r in res.tuned_reach():
        few = r["fewest_nfe"]
        L.append(f"- {r['problem']}: the best peer's NFE-{r['peer_nfe']} RMSE ({r['peer_error']:.3e}, "
                 f"{r['peer']['library']} {r['peer']['family']}) is reached by the tuned profile "
                 + (f"with {few} NFE." if few is not None else
                    f"at none of its NFE budgets ({', '.join(map(str, r['tuned_nfes']))})."))
    return L


def parity_summary(parity: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One line per pair: rel diff per step count, the max, and whether it is within float tolerance."""
    pairs: Dict[Tuple, Dict[str, Any]] = {}
    for r in parity:
        k = (r["library"], r["family"], r["variant"], r["ours"])
        e = pairs.setdefault(k, {"library": r["library"], "family": r["family"], "variant": r["variant"],
                                 "ours": r["ours"], "by_steps": {}, "errors": [], "note": r.get("note", ""),
                                 "nfe": {}})
        e["by_steps"][r["steps"]] = r["rel_diff"]
        if _fin(r.get("rel_diff_float64_schedule")):
            e.setdefault("float64_schedule", {})[r["steps"]] = r["rel_diff_float64_schedule"]
        e["nfe"][r["steps"]] = (r["nfe_peer"], r["nfe_ours"])
        if r["error"]:
            e["errors"].append(r["error"])
    out = []
    for e in pairs.values():
        vals = [v for v in e["by_steps"].values() if _fin(v)]
        e["max"] = max(vals) if vals and len(vals) == len(e["by_steps"]) else float("nan")
        tol = PARITY_TOL.get(e["library"], 1e-4)
        e["tol"] = tol
        e["match"] = bool(_fin(e["max"]) and e["max"] <= tol)
        # over tolerance, but within it once the peer's float32 schedule is made float64: rounding, not algorithm
        f64 = e.get("float64_schedule", {})
        e["float32_limited"] = bool(not e["match"] and _fin(e["max"]) and f64 and all(
            _f(f64.get(s, v)) <= tol for s, v in e["by_steps"].items()))
        out.append(e)
    return out


def parity_table(parity: List[Dict[str, Any]]) -> List[str]:
    ps = parity_summary(parity)
    steps = sorted({s for e in ps for s in e["by_steps"]})
    marks = {n: f"[{chr(97 + i)}]" for i, n in enumerate(sorted({e["note"] for e in ps if e["note"]}))}
    L = ["| peer (configuration) | diffsolve | " + " | ".join(f"{s} steps" for s in steps)
         + " | max | within float tolerance |", "|---|---|" + "---|" * len(steps) + "---|---|"]
    for e in ps:
        cells = [f"{_f(e['by_steps'].get(s)):.1e}" if _fin(e["by_steps"].get(s)) else "—" for s in steps]
        mx = f"{e['max']:.1e}" if _fin(e["max"]) else "—"
        if e["match"]:
            ok = f"yes (≤ {e['tol']:.0e})"
        elif e["float32_limited"]:
            f64 = ", ".join(f"{v:.0e} at {s}" for s, v in sorted(e["float64_schedule"].items()))
            ok = f"float32-limited: {f64} with diffusers' schedule in float64 [*]"
        else:
            ok = f"no (> {e['tol']:.0e})" if _fin(e["max"]) else "error"
        note = f" {marks[e['note']]}" if e["note"] else ""
        L.append(f"| {e['library']} {e['family']} ({e['variant']}){note} | `{e['ours']}` | " + " | ".join(cells)
                 + f" | {mx} | {ok} |")
    if marks:
        L += [""] + [f"{m} {n}." for n, m in marks.items()]
    if any(e["float32_limited"] for e in ps):
        L += ["", "[*] Over the float32 tolerance, but the same diffusers run with its float32 schedule tensors "
                  "(`alphas_cumprod`, `alpha_t`, `sigma_t`, `lambda_t`, `sigmas`) replaced by float64 ones agrees "
                  "within it: diffusers' float32 rounding, amplified by a high-order step across the large final "
                  "log-SNR interval (diffusers keeps full order from 15 steps on), not a different algorithm."]
    errs = sorted({x for e in ps for x in e["errors"]})
    if errs:
        L += ["", "Errors: " + "; ".join(errs)]
    return L


def overhead_summary(over: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    algos: Dict[str, List[Dict[str, Any]]] = {}
    for o in over:
        algos.setdefault(o["algorithm"], []).append(o)
    out = []
    for a, es in algos.items():
        ours = {e["dtype"]: e for e in es if e["library"] == "diffsolve" and not e["error"]}
        ps = [e for e in es if e["library"] != "diffsolve" and not e["error"] and _fin(e["cpu_per_nfe"])]
        fast = min(ps, key=lambda e: e["cpu_per_nfe"]) if ps else None  # by CPU time: robust to other load
        o64, o32 = ours.get("float64"), ours.get("float32")
        out.append({"algorithm": a, "ours64": o64, "ours32": o32, "peers": ps, "fastest": fast,
                    "ratio64": (o64["overhead_per_nfe"] / fast["overhead_per_nfe"]) if o64 and fast else float("nan"),
                    "ratio32": (o32["overhead_per_nfe"] / fast["overhead_per_nfe"]) if o32 and fast else float("nan"),
                    "cpu_ratio32": (o32["cpu_per_nfe"] / fast["cpu_per_nfe"]) if o32 and fast and fast["cpu_per_nfe"] > 0
                    else float("nan"),
                    "cpu_ratio64": (o64["cpu_per_nfe"] / fast["cpu_per_nfe"]) if o64 and fast and fast["cpu_per_nfe"] > 0
                    else float("nan")})
    return out


def adaptive_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Adaptive samplers pick their own NFE: every run with the NFE it used (whether or not a budget covers it)."""
    ad = [r for r in rows if isinstance(r.get("config"), dict) and "rtol" in r["config"].get("options", {})]
    if not ad:
        return []
    L = ["| problem | peer | rtol | NFE used | RMSE | endpoint |", "|---|---|---|---|---|---|"]
    for r in ad:
        L.append(f"| {r['problem']} | {r['library']} {r['family']} | {r['config']['options']['rtol']:g} | "
                 f"{r['nfe_used']} | {_f(r['rmse']):.2e} | {r['endpoint']} |")
    return L


def overhead_table(over: List[Dict[str, Any]]) -> List[str]:
    if not any(o["library"] != "diffsolve" for o in over):  # ours only
        L = ["| solver | NFE used | float64 state (ms/NFE) | float32 state (ms/NFE) | CPU time, float64 (ms/NFE) |",
             "|---|---|---|---|---|"]
        for s in sorted(overhead_summary(over), key=lambda s: _f(s["ours64"]["overhead_per_nfe"]) if s["ours64"] else 1e9):
            a, b = s["ours64"], s["ours32"]
            L.append(f"| {s['algorithm']} | {a['nfe_used'] if a else '—'} | "
                     + (f"{a['overhead_per_nfe'] * 1e3:.2f} <sub>±{a['spread'] * 1e3 / 2:.2f}</sub>" if a else "—")
                     + " | " + (f"{b['overhead_per_nfe'] * 1e3:.2f} <sub>±{b['spread'] * 1e3 / 2:.2f}</sub>" if b else "—")
                     + " | " + (f"{a['cpu_per_nfe'] * 1e3:.2f}" if a else "—") + " |")
        return L
    L = ["| algorithm | ours float64 | ours float32 | peers (float32 state) | fastest peer | "
         "ours f64 / fastest | ours f32 / fastest | wall-time ratio f64 / f32 |", "|---|---|---|---|---|---|---|---|"]

    def ms(e):
        return f"{e['cpu_per_nfe'] * 1e3:.2f} <sub>(wall {e['overhead_per_nfe'] * 1e3:.2f})</sub>" if e else "—"

    def rt(v):
        return "—" if not _fin(v) else (f"**{v:.2f}**" if v <= 1.0 else f"{v:.2f} ✗")
    for s in overhead_summary(over):
        peers = "; ".join(f"{e['library']} {e['family']}: {e['cpu_per_nfe'] * 1e3:.2f}" for e in s["peers"]) or "—"
        fast = f"{s['fastest']['library']} {s['fastest']['family']}" if s["fastest"] else "—"
        L.append(f"| {s['algorithm']} | {ms(s['ours64'])} | {ms(s['ours32'])} | {peers} | {fast} | "
                 f"{rt(s['cpu_ratio64'])} | {rt(s['cpu_ratio32'])} | {_f(s['ratio64']):.2f} / {_f(s['ratio32']):.2f} |")
    return L


def endpoint_table(rows: List[Dict[str, Any]], problem: str) -> List[str]:
    """Where every configuration stopped, as detected from its runs (all NFE budgets)."""
    eps: Dict[Tuple[str, str, str], set] = {}
    for r in rows:
        if r["problem"] != problem or r["library"] == "diffsolve":
            continue
        k = (r["library"], r["family"], r["variant"].split("=")[0])
        eps.setdefault(k, set()).add(r["endpoint"] if not r["error"] else "failed" if "NFE budget" not in r["error"]
                                     else "")
    L = ["| peer | configuration | detected endpoint(s) |", "|---|---|---|"]
    for (lib, fam, var), s in eps.items():
        s = sorted(x for x in s if x)
        L.append(f"| {lib} {fam} | {var} | {', '.join(s) or '—'} |")
    return L


def missing(rows: List[Dict[str, Any]]) -> List[str]:
    groups: Dict[str, List[str]] = {}
    for r in rows:
        if r["error"]:
            msg = r["error"]
            if msg.startswith("no step count fits"):
                msg = "no step count fits the NFE budget"
            groups.setdefault(msg, []).append(f"{r['library']} {r['family']} {r['variant']}@{r['nfe_budget']}")
    L = []
    for e, who in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        u = sorted(set(who))
        L.append(f"- {e} ({len(who)} runs: {', '.join(u[:6])}{' …' if len(u) > 6 else ''})")
    return L or ["None."]


def findings(res) -> List[str]:
    """The closing numbers, computed from this run: targets, parity, overhead."""
    L = []
    ts = [t for t in res.target_ratios() if math.isfinite(t["ratio"])]
    if ts:
        bad = [t for t in ts if t["ratio"] > 1.0]
        worst = max(ts, key=lambda t: t["ratio"])
        if not bad:
            nf = ', '.join(str(n) for n in sorted({t['nfe'] for t in ts}))
            L.append(f"- **Accuracy target met**: at every NFE in {{{nf}}} on "
                     f"{', '.join(p['name'] for p in res.problems)}, our best configuration's RMSE is at most the best "
                     f"peer configuration's (largest ratio {worst['ratio']:.2f}: {worst['problem']}, NFE {worst['nfe']}).")
        else:
            L.append("- **Accuracy target missed** at " + "; ".join(
                f"{t['problem']} NFE {t['nfe']} (ratio {t['ratio']:.2f}; best peer {t['peer']['library']} "
                f"{t['peer']['family']} {t['peer']['variant']}, ours `{t['ours']['family']}` {t['ours']['variant']})"
                for t in bad) + ".")
    tm = [t for t in res.target_ratios(key="rmse_median") if math.isfinite(t["ratio"])]
    badm = [t for t in tm if t["ratio"] > 1.0]
    if tm:
        L.append("- Median per-sample RMSE (secondary, robust to basin flips): " + (
            "ours is at least as accurate everywhere." if not badm else "ours is above the best peer at " + "; ".join(
                f"{t['problem']} NFE {t['nfe']} (ratio {t['ratio']:.2f}: {t['peer']['library']} {t['peer']['family']} "
                f"{t['peer']['variant']} vs ours `{t['ours']['family']}` {t['ours']['variant']})" for t in badm) + "."))
    ps = parity_summary(res.parity)
    if ps:
        ok = [e for e in ps if e["match"]]
        lim = [e for e in ps if e["float32_limited"]]
        rest = [e for e in ps if not e["match"] and not e["float32_limited"]]
        mx_d = max((e["max"] for e in ok if e["library"] == "diffusers"), default=float("nan"))
        mx_k = max((e["max"] for e in ok if e["library"] == "k-diffusion"), default=float("nan"))
        line = (f"- **Parity**: {len(ok)} of {len(ps)} matched pairs agree within float tolerance (diffusers: max "
                f"{mx_d:.1e}, float32 schedule; k-diffusion: max {mx_k:.1e}, float64)")
        if lim:
            line += "; " + ", ".join(f"{e['library']} {e['family']} ({e['variant']})" for e in lim) + \
                    " exceeds it only through diffusers' float32 rounding (agrees once its schedule is float64)"
        if rest:
            line += "; **differs**: " + ", ".join(f"{e['library']} {e['family']} ({e['variant']}): {e['max']:.1e}"
                                                   for e in rest)
        L.append(line + ".")
    ov = [s for s in overhead_summary(res.overhead) if _fin(s["cpu_ratio32"])]
    if ov:
        lose32 = [s for s in ov if s["cpu_ratio32"] > 1.0]
        lose64 = [s for s in ov if s["cpu_ratio64"] > 1.0]
        L.append(f"- **Overhead per NFE, float32 state (like for like)**: ours is at most the fastest peer's for "
                 f"{len(ov) - len(lose32)} of {len(ov)} shared algorithms"
                 + (" (not for " + ", ".join(f"{s['algorithm']}: {s['cpu_ratio32']:.2f}x" for s in lose32) + ")"
                    if lose32 else "") + ".")
        L.append(f"- **Overhead per NFE, float64 state (our default)**: at most the fastest float32 peer's for "
                 f"{len(ov) - len(lose64)} of {len(ov)}"
                 + (" (above it for " + ", ".join(f"{s['algorithm']}: {s['cpu_ratio64']:.2f}x" for s in lose64) + ")"
                    if lose64 else "")
                 + ". A float64 state moves twice the bytes of a float32 one and casts the network's input and output "
                   "between float64 and the network's float32 at every call; that is the price of float64 "
                   "coefficients *and* state. `dtype=torch.float32` keeps float64 coefficients and removes both.")
    return L


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=H.ROW_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(H.to_jsonable(v), sort_keys=True) if isinstance(v, dict) else
                            (f"{v:.6e}" if isinstance(v, float) else v)) for k, v in r.items() if k in H.ROW_FIELDS})


def write_json(path: str, res) -> None:
    data = {"meta": res.meta, "problems": res.problems, "nfes": res.nfes, "rows": res.rows, "parity": res.parity,
            "parity_summary": [{k: v for k, v in e.items()} for e in parity_summary(res.parity)],
            "overhead": res.overhead,
            "targets": [{"problem": t["problem"], "dim": t["dim"], "nfe": t["nfe"], "ratio": t["ratio"],
                         "ours": _brief(t["ours"]), "peer": _brief(t["peer"])} for t in res.target_ratios()],
            "tuned_targets": [{"problem": t["problem"], "nfe": t["nfe"], "ratio": t["ratio"], "ours": _brief(t["ours"]),
                               "peer": _brief(t["peer"])} for t in res.target_ratios(res.nfes, tuned=True)],
            "tuned_reach": [{k: (v if k != "peer" else _brief(v)) for k, v in r.items()} for r in res.tuned_reach()]}
    with open(path, "w") as f:
        json.dump(H.to_jsonable(data), f, separators=(",", ":"))


def _brief(r):
    if r is None:
        return None
    return {k: r[k] for k in ("library", "family", "variant", "rmse", "nfe_used", "endpoint", "config")}


def write_png(path: str, res) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = res.problems
    fig, axes = plt.subplots(1, len(probs), figsize=(7.5 * len(probs) + 3.2, 6.2), squeeze=False)
    cmap = plt.get_cmap("tab20")
    handles: Dict[str, Any] = {}
    for ax, pr in zip(axes[0], probs):
        rows = [r for r in res.rows if r["problem"] == pr["name"]]
        keys = ordered_rows(rows)
        for j, k in enumerate(keys):
            pts = []
            for n in res.nfes:
                b = best_run([r for r in rows if row_key(r) == k and r["nfe_budget"] == n])
                if b is not None and _f(b["rmse"]) > 0:
                    pts.append((n, _f(b["rmse"])))
            if not pts:
                continue
            ours = k[0] == "diffsolve"
            tuned = k[1] == H.TUNED
            (h,) = ax.plot(*zip(*pts), ls="-" if ours else "--", lw=2.4 if tuned else (1.0 if ours else 0.9),
                           marker="o" if ours else "x", ms=4 if tuned else 3,
                           color="red" if tuned else cmap(j % 20), alpha=0.9)
            handles.setdefault(("ours " if ours else k[0] + " ") + k[1], h)
        for ours, ls in ((True, "-"), (False, "--")):
            pts = [(n, _f(b["rmse"])) for n in res.nfes
                   for b in [res.best(pr["name"], n, ours)] if b is not None and _f(b["rmse"]) > 0]
            if pts:
                (h,) = ax.plot(*zip(*pts), ls=ls, lw=2.8, color="black", alpha=0.85)
                handles.setdefault("BEST of ours" if ours else "BEST of peers", h)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(list(res.nfes))
        ax.set_xticklabels([str(n) for n in res.nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE budget")
        ax.set_ylabel("RMSE to the exact answer where the run stops (best configuration)")
        ax.set_title(f"{pr['name']} (batch {pr['batch']}): ours solid, peers dashed", fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.legend(list(handles.values()), list(handles.keys()), loc="center right", fontsize=5.5, ncol=1,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 3.0 / (7.5 * len(probs) + 3.2), 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_md(path: str, res, name: str, notes: str = "") -> None:
    m = res.meta
    v = m.get("versions", {})
    L = ["# diffsolve bench: our solvers against diffusers and k-diffusion", "",
         f"Generated by `{m['command']}` in {m['wall']:.0f} s wall ({'quick mode, ' if m['quick'] else ''}"
         f"torch {m['torch']}, diffusers {v.get('diffusers')}, k-diffusion {v.get('k-diffusion')}, "
         f"{m['threads']} thread(s), {m['machine']}, {m['cpus']} cores). Every run, with its exact configuration, "
         f"is in `{name}.csv` / `{name}.json`; the curves are in `{name}.png`.", "",
         "Reproduce: `pip install -e '.[bench]' && pip install --no-deps k-diffusion` (the peers; k-diffusion "
         "without its own dependencies), then `python -m diffsolve.bench --out docs` (the same in Python: "
         "`ds.bench(out='docs')`; `--quick` for a one-minute smoke run, `--model module:function` for your own "
         "model, `--render docs/benchmarks.json` to re-render this page from a run's JSON).", "",
         f"![error vs NFE]({name}.png)", ""]
    if m.get("skipped"):
        L += ["**Skipped:** " + "; ".join(f"{k}: {w}" for k, w in m["skipped"].items()), ""]
    L += ["## How it is measured", "",
          "- **Models:** " + "; ".join(f"{p['name']}: {p['reference']}, process {p['process']}, batch {p['batch']}, "
                                      f"reference error bar {p['reference_error_bar']:.1e}, computed in "
                                      f"{p['reference_seconds']:.0f} s" for p in res.problems) + ".",
          "- **Same start:** one seeded x_T ~ N(0, I) per model, the VP state at t = 999; every diffusers "
          "scheduler gets it as its pipeline does (`x_T * init_noise_sigma`), every k-diffusion sampler its exact "
          "VE image x_T / alpha(999).",
          "- **Ours:** every deterministic solver x spacing {" + ", ".join(m["spacings"]) + "} x last step {"
          + ", ".join(m["finals"]) + "}, `lower_order_final` automatic, float64 state; a row shows the best "
          "configuration per NFE.",
          "- **Peers:** diffusers schedulers driven as a pipeline drives them (`set_timesteps`, "
          "`scale_model_input`, network, `step`) with the model's DDPM schedule and `prediction_type=\"epsilon\"`; "
          "k-diffusion samplers on Karras and exponential (uniform log-SNR) sigmas through a DDPM epsilon "
          "wrapper (t = `t_of_sigma_ve(sigma)`, c_in = 1/sqrt(1 + sigma^2)). k-diffusion's package `__init__` "
          "imports torchvision, which does not import beside our torch, so `k_diffusion/sampling.py` is loaded by "
          "file path under a stub package (`diffsolve.bench.peers.load_k_sampling`). Peer state dtype: "
          f"{m['peer_dtype']}. Each peer row shows its best configuration per NFE (variant in small print).",
          "- **NFE** is counted by wrapping the network, never taken from a step count; a peer runs the largest "
          "step count whose pipeline stays within the budget.",
          f"- **Endpoint detection:** a run ended with a jump to clean data when its output equals the x0 "
          f"prediction of its last network call (relative distance ≤ {m['jump_tol']:.0e}); otherwise it stopped "
          "at the last noise level it reports (`sigmas[-1]`, DDIM's final alpha), or integrated to sigma = 0. "
          "The error is the RMSE against the exact answer there: the exact posterior mean of the exact t = 0 ODE "
          "state for jumps (the NFE -> infinity limit of every jumping sampler), the exact probability-flow ODE "
          "state at the stopping time otherwise (sigma/alpha = 1e-6 for 'sigma=0').",
          "- **Log-likelihood gap** per dimension (CSV/JSON, `llgap`): [mean log p(exact) - mean log p(run)] / dim "
          "under the true mixture (clean endpoints) or the exact marginal at the stopping time.", ""]
    have_peers = any(r["library"] != "diffsolve" for r in res.rows)
    if have_peers:
        L += ["## Summary", ""] + findings(res) + [""]
        L += ["## Target: our best configuration vs the best peer configuration", "",
              "Ratio of RMSEs at each NFE (≤ 1: ours is at least as accurate; ✗ marks where it is not):", ""]
        L += ratio_grid(res, [n for n in (5, 6, 8, 10, 15, 20)])
        L += ["", "The same ratio for the median per-sample RMSE (insensitive to the few samples near a basin "
                  "boundary of the ODE flow that end in another mixture component under a small error; at 64 "
                  "dimensions such samples dominate the batch RMSE):", ""]
        L += ratio_grid(res, [n for n in (5, 6, 8, 10, 15, 20)], key="rmse_median")
        L += ["", "<details><summary>Which configurations</summary>", ""] + target_table(res, res.nfes)
        L += ["", "</details>", ""]
    if have_peers and res.target_ratios(res.nfes, tuned=True):
        L += ["## Tuned profiles vs the best peer configuration", "",
              "A profile from `diffsolve tune` (solver, time grid, last step and DPM-Solver-v3 statistics chosen for "
              "this model at each NFE on its own calibration seeds) run on this benchmark's noise, which the tuner "
              "never saw; the peers' row is the best of all their configurations at the same NFE. Profiles: "
              + "; ".join(f"`{p['profile']}` on {p['problem']} ({_seeds_text(p.get('calibration'))})"
                          for p in m.get("profiles", [])) + ".", ""]
        L += tuned_findings(res) + [""]
        L += ["Ratio of RMSEs (tuned / best peer):", ""] + ratio_grid(res, res.nfes, tuned=True) + [""]
        L += tuned_table(res, res.nfes) + [""]
    if have_peers:
        L += [READING, ""]
    if notes:
        L += [notes, ""]
    for pr in res.problems:
        rows = [r for r in res.rows if r["problem"] == pr["name"]]
        L += [f"## {pr['name']}: RMSE to the exact answer where each run stops", "",
              "Best configuration per row and NFE budget (bold: the best of the column).", ""]
        L += run_table(rows, res.nfes, "rmse")
        L += [""]
        if any(_fin(r.get("llgap")) for r in rows):
            L += ["<details><summary>Log-likelihood gap per dimension (smallest |gap| per row and NFE; "
                  "a distribution metric: + too unlikely / noisy, − collapsed towards modes)</summary>", ""]
            L += run_table(rows, res.nfes, "llgap", signed=True) + ["", "</details>", ""]
    if res.parity:
        L += ["## Parity: same algorithm, same configuration -> same result", "",
              "‖ours − peer‖ / ‖peer‖ for every algorithm we share with a peer, both run from the same x_T in "
              "float64 state on the same model, on the times the peer's run called the network (read back from "
              "the wrapped network) and the endpoint detected from its run, with the peer's order rule "
              "(`lower_order_final = n < 15` for DPMSolverMultistep/DEIS, `True` for UniPC, `False` for "
              "k-diffusion, `taylor3=False` for the reference 3M coefficient). diffusers keeps its schedule in "
              "float32 (and DPMSolverMultistep casts the state to float32), hence the ~1e-6 level; k-diffusion "
              "runs fully in float64. Only diffusers configurations with integer timesteps are paired (its "
              "Karras/lu grids round the model time, see below).", ""]
        L += parity_table(res.parity) + [""]
    if res.overhead:
        o = m["overhead"]
        L += ["## Solver overhead per NFE", "",
              f"(time − network time) / NFE in ms, dim {o['dim']}, batch {o['batch']}, NFE {o['nfe']}, one thread, "
              f"median of {o['repeats']} round-robin repeats. The first number is this process's CPU time "
              "(`time.process_time`, which other processes' load on a shared machine does not inflate), the wall "
              "time in small print. The network is a cheap exact Gaussian denoiser run in float32 in every entry "
              "(as a real model runs, and as the peers feed it), so the subtraction is precise; overhead is "
              "everything outside it: for ours the adapter's eps -> x0 conversion, the grid, finiteness checks "
              "and, with a float64 state, the casts to and from the network's float32; for diffusers "
              "`scale_model_input` and `step`; for k-diffusion our denoiser wrapper and the sampler. Ours runs a "
              "log-SNR grid ending with the jump, the peers their default variant. The peers run a float32 "
              "state, so `ours f32 / fastest` is the like-for-like ratio; `ours f64` is our default.", ""]
        L += overhead_table(res.overhead) + [""]
    if have_peers:
        L += ["## Where the peers' conventions differ", "", CONVENTIONS, ""]
    if have_peers and res.problems:
        L += ["<details><summary>Where each peer configuration stopped (detected from its runs)</summary>", ""]
        L += endpoint_table(res.rows, res.problems[0]["name"]) + ["", "</details>", ""]
    ad = adaptive_table(res.rows)
    if ad:
        L += ["## Adaptive step size (k-diffusion `dpm_adaptive`)", "",
              "It chooses its own NFE; each run with what it used (a budget column shows it only when one covers "
              "that NFE):", ""] + ad + [""]
    L += ["## Runs that did not produce a score", ""] + missing(res.rows) + [""]
    with open(path, "w") as f:
        f.write("\n".join(L))


def write_all(res, out: str, name: str = "benchmarks", formats: Sequence[str] = ("md", "csv", "json", "png"),
              notes: str = "") -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    files = {}
    if "csv" in formats:
        files["csv"] = os.path.join(out, f"{name}.csv")
        write_csv(files["csv"], res.rows)
    if "json" in formats:
        files["json"] = os.path.join(out, f"{name}.json")
        write_json(files["json"], res)
    if "png" in formats:
        files["png"] = os.path.join(out, f"{name}.png")
        write_png(files["png"], res)
    if "md" in formats:
        files["md"] = os.path.join(out, f"{name}.md")
        write_md(files["md"], res, name, notes)
    return files


def summary(res) -> str:
    """A plain-text digest for the console."""
    L = [f"{len(res.rows)} runs ({sum(1 for r in res.rows if r['error'])} without a score) in {res.meta['wall']:.0f} s"]
    for t in res.target_ratios():
        L.append(f"  {t['problem']:>12s} NFE {t['nfe']:>2d}: ours/best peer = {t['ratio']:.2f}")
    for t in res.target_ratios(res.nfes, tuned=True):
        L.append(f"  {t['problem']:>12s} NFE {t['nfe']:>2d}: tuned profile/best peer = {t['ratio']:.2f}")
    for r in res.tuned_reach():
        L.append(f"  {r['problem']:>12s}: tuned reaches the best peer's NFE-{r['peer_nfe']} error with "
                 f"{r['fewest_nfe'] if r['fewest_nfe'] is not None else 'none of its'} NFE")
    ps = parity_summary(res.parity)
    if ps:
        ok = sum(e["match"] for e in ps)
        L.append(f"  parity: {ok}/{len(ps)} pairs within float tolerance; max rel diff "
                 f"{max((e['max'] for e in ps if _fin(e['max'])), default=float('nan')):.1e}")
    for s in overhead_summary(res.overhead):
        if _fin(s["cpu_ratio64"]):
            L.append(f"  overhead {s['algorithm']:>14s}: ours f64/f32 vs fastest peer (CPU time) = "
                     f"{s['cpu_ratio64']:.2f} / {s['cpu_ratio32']:.2f}")
    if res.files:
        L.append("  wrote " + ", ".join(res.files.values()))
    return "\n".join(L)
