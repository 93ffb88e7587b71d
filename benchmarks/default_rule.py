#!/usr/bin/env python
"""The default sampler rule against the best peer configurations, per problem and NFE.

``ds.sample(den, noise, nfe=k)`` with no other option runs ``diffsolve.sampling.defaults.default_sampler``.
This script measures, on the same seeded noise (``diffsolve.util.seeding``), the RMSE at NFE 5, 6, 8, 10, 15
and 20 of

* candidate default configurations of ours (``NAMED`` + ``POWER`` on the mixtures, ``SHORT`` on MNIST:
  UniPC-bh2 / bh1 order 3, UniPC-bh2 order 2 and DPM-Solver++(3M) on the plausible grids and last steps,
  and power-of-t grids ``PowerSpacing(p)``); the rule and the old default are always included,
* the best peer configurations named in the bench CSVs (``docs/benchmarks.csv``, ``docs/mnist_bench.csv``:
  per problem and NFE the ``--peer-top`` best diffusers / k-diffusion configurations, the union of them run
  on every problem), each through the peers' own code as the bench drives it (``diffsolve.bench.harness``),

on the exact Gaussian mixtures ``GaussianMixture.random(64 | 3072, seed=0)`` under DDPM linear betas (exact
targets, ``ExactTeacher``) and on the shipped MNIST model (``ds.load("mnist")``; the reference is the same
model with ``--ref-nfe`` NFE of DPM-Solver++(3M) on a log-SNR grid, ``ModelTeacher``, cached on disk).  It
writes every run to ``{out}/runs.csv`` (a rerun skips what is there) and prints the Markdown tables of
``docs/default_rule.md``: rule / best peer RMSE ratios, the selection (per NFE band, the configuration with
the smallest worst ratio over the selection problems mixture-64 and MNIST; mixture-3072 is held out), the
median per-sample ratios, the old default's ratios and every candidate's.

    python benchmarks/default_rule.py --problems mixture-64 --candidates all --peer-top 2 --out out/default_rule/mix64
    python benchmarks/default_rule.py --problems mnist --batch 64 --candidates short --peer-top 1 --out out/default_rule/mnist --cache out/default_rule/cache
    python benchmarks/default_rule.py --problems mixture-3072 --candidates all --peer-top 2 --out out/default_rule/mix3072
    python benchmarks/default_rule.py --render out/default_rule/mix64/runs.csv,out/default_rule/mnist/runs.csv,out/default_rule/mix3072/runs.csv
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import diffsolve as ds
from diffsolve.adapters.denoiser import with_network
from diffsolve.bench import harness as H
from diffsolve.bench import peers as P_
from diffsolve.evaluation.teacher import ModelTeacher
from diffsolve.sampling.defaults import PowerSpacing, default_sampler
from diffsolve.util import seeding

DT = torch.float64
NFES = (5, 6, 8, 10, 15, 20)
SELECTION = ("mixture-64", "mnist")  # the rule was chosen on these
HELD_OUT = ("mixture-3072",)  # and is only reported on these
BENCH_CSVS = ("docs/benchmarks.csv", "docs/mnist_bench.csv")
OLD_DEFAULT = ("dpm++2m", {}, "logsnr", "denoise")
RULE = "default rule"
OLD = "old default"

P = {p: PowerSpacing(p) for p in (1.1, 1.25, 1.4, 1.5, 2.0)}
BH2, BH1 = ("unipc-bh2", {"order": 3}), ("unipc-bh1", {"order": 3})
SOLVERS = (BH2, BH1, ("unipc-bh2", {"order": 2}), ("dpm++3m", {}))
#: candidate defaults of ours, (solver, options, spacing, final): the solvers of the best bench configurations
#: (UniPC order 3 and 2, DPM-Solver++(3M)) on the grids of the bench and diffusers' linspace, stopping at t_min
#: (below ~10 NFE every best bench run stops there); linspace and trailing also with the jump to clean data
NAMED: List[Tuple[str, Dict[str, Any], Any, str]] = [
    (s, o, sp, "t_min") for s, o in SOLVERS for sp in ("linspace", "uniform", "quadratic", "logsnr", "karras")
] + [(*BH2, "linspace", "denoise"), (*BH2, "trailing", "denoise")]
#: power-of-t grids between uniform (p = 1) and quadratic (p = 2)
POWER: List[Tuple[str, Dict[str, Any], Any, str]] = [
    (s, o, P[p], "t_min") for s, o in (BH2, BH1) for p in P
] + [("unipc-bh2", {"order": 2}, P[1.25], "t_min"), ("dpm++3m", {}, P[1.25], "t_min")]
#: the short list for the MNIST model (a network evaluation there costs ~1000x a mixture's): the bench's MNIST
#: CSV puts karras, logsnr, quadratic and the jump to clean data at 1.3-4x the best peer at NFE 5-10 and
#: DPM-Solver++(3M) behind UniPC order 3; the power grids and bh1 after the mixture-64 runs
SHORT: List[Tuple[str, Dict[str, Any], Any, str]] = [
    (s, o, sp, "t_min") for s, o in (BH2, BH1) for sp in ["linspace"] + list(P.values())
] + [("unipc-bh2", {"order": 2}, P[1.25], "t_min")]
CANDIDATES = {"all": NAMED + POWER, "short": SHORT, "rule": []}


# ----------------------------------------------------------------------------------------
# problems: model + seeded noise + reference (the bench's Problem, CountingNet and references)
# ----------------------------------------------------------------------------------------
def mixture_problem(dim: int, batch: int, seed: int) -> H.Problem:
    """``GaussianMixture.random(dim, seed=0)`` on DDPM linear (1000) with its exact targets."""
    proc = ds.VPDiscrete.linear(1000)
    ref = ds.GaussianMixture.random(dim=dim, seed=0)
    net = H.CountingNet(ref.network(proc, "epsilon"))
    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    seeds = seeding.run_seeds(seed, batch)
    noise = seeding.noise(seeds, (dim,))
    return H.Problem(f"mixture-{dim}", dim, batch, den, net, net, noise, H.ExactReference(ref, proc, noise),
                     (dim,), seeds)


class CachedModelReference(H.ModelReference):
    """``harness.ModelReference`` whose t_min targets are kept on disk (keyed by model, noise and NFE), so
    that a rerun does not repeat the high-NFE solve."""

    def __init__(self, den, x_T: torch.Tensor, nfe: int, cache_dir: Optional[str], solver: str = "dpm++3m"):
        self.teacher = ModelTeacher(den, solver, nfe)
        self.den, self.x_T, self.nfe, self.solver = den, x_T, nfe, solver
        self.process = den.process
        from diffsolve.evaluation.metrics import default_metric
        self.image_metric = default_metric() if tuple(x_T.shape[1:]) == (1, 28, 28) else None
        key = hashlib.sha1(x_T.to(DT).numpy().tobytes()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"mnist_ref_{solver}_{nfe}_{key}.pt") if cache_dir else None
        t0 = time.perf_counter()
        if path and os.path.exists(path):
            saved = torch.load(path)
            at_t_min, denoised = saved["at_t_min"], saved["denoised"]
        else:
            tg = self.teacher.targets(x_T)
            at_t_min, denoised = tg.at_t_min, tg.denoised
            if path:
                os.makedirs(cache_dir, exist_ok=True)
                torch.save({"at_t_min": at_t_min, "denoised": denoised}, path)
        self._cache = {("stop", round(self.process.t_min, 6)): at_t_min, ("jump", None): denoised}
        self.seconds = time.perf_counter() - t0


def mnist_problem(batch: int, seed: int, ref_nfe: int, cache_dir: Optional[str]) -> H.Problem:
    """The shipped MNIST model; the reference is the same model at ``ref_nfe`` NFE (dpm++3m, log-SNR)."""
    den = ds.load("mnist")
    shape = tuple(den.sample_shape)
    made: List[H.CountingNet] = []
    den2 = with_network(den, lambda f: made.append(H.CountingNet(f)) or made[-1])
    net = made[0]
    seeds = seeding.run_seeds(seed, batch)
    noise = seeding.noise(seeds, shape)
    net.record = False
    reference = CachedModelReference(den2, noise, ref_nfe, cache_dir)
    net.record = True
    dim = int(torch.tensor(shape).prod())
    return H.Problem("mnist", dim, batch, den2, net, H._eps_net(den2, net), noise, reference, shape, seeds)


def make_problem(name: str, batch: Optional[int], seed: int, ref_nfe: int, cache_dir: Optional[str]) -> H.Problem:
    if name.startswith("mixture-"):
        return mixture_problem(int(name.split("-", 1)[1]), batch or 256, seed)
    if name == "mnist":
        return mnist_problem(batch or 64, seed, ref_nfe, cache_dir)
    raise ValueError(f"unknown problem {name!r}: mixture-<dim> or mnist")


# ----------------------------------------------------------------------------------------
# the configurations
# ----------------------------------------------------------------------------------------
def _label(solver: str, options: Dict[str, Any], spacing: str, final: str) -> str:
    opts = "".join(f" {k}={v}" for k, v in sorted(options.items()))
    return f"{solver}{opts} {spacing}/{final}"


def bench_peer_names(top: int, csvs: Sequence[str] = BENCH_CSVS) -> List[Tuple[str, str, str]]:
    """(library, family, variant) of the ``top`` best peer configurations per problem and NFE budget in the
    bench CSVs (deterministic, fixed-step ones), the union over problems and budgets."""
    names: set = set()
    for path in csvs:
        if not os.path.exists(path):
            continue
        by: Dict[Tuple[str, str], List[Tuple[float, Tuple[str, str, str]]]] = defaultdict(list)
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if (r["library"] == "diffsolve" or r["error"] or not r["nfe_budget"] or r["stochastic"] != "0"
                        or r["rmse"] in ("", "nan")):
                    continue
                by[(r["problem"], r["nfe_budget"])].append((float(r["rmse"]), (r["library"], r["family"], r["variant"])))
        for runs in by.values():
            names.update(n for _, n in sorted(runs)[:top])
    return sorted(names)


def peer_configs(names: Sequence[Tuple[str, str, str]]) -> List[P_.PeerConfig]:
    """The bench's PeerConfig objects of those names (adaptive samplers are left out)."""
    by_name = {(c.library, c.family, c.variant): c for c in P_.peer_configs(False) if not c.adaptive}
    missing = [n for n in names if n not in by_name]
    if missing:
        print(f"warning: peer configurations not found in diffsolve.bench.peers: {missing}", file=sys.stderr)
    return [by_name[n] for n in names if n in by_name]


# ----------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------
def run_problem(pb: H.Problem, nfes: Sequence[int], candidates, peers: Sequence[P_.PeerConfig],
                done=frozenset(), log=print) -> List[Dict[str, Any]]:
    """The rule, the old default, the candidates and the peers at every NFE (skipping the (label, NFE) runs in
    ``done``, made before on the same problem, noise and batch)."""
    rows: List[Dict[str, Any]] = []
    for n in nfes:
        rule = default_sampler(n, pb.process, pb.den.prediction)
        configs = [(RULE, rule), (OLD, OLD_DEFAULT)] + [("candidate", c) for c in candidates]
        seen = set()
        for role, (solver, opts, spacing, final) in configs:
            lab = _label(solver, opts, spacing, final)
            if lab in seen or (lab, n) in done:
                continue
            seen.add(lab)
            t0 = time.perf_counter()
            r = H.run_ours(pb, solver, n, spacing, final, **opts)
            r.update(role=role, label=lab)
            rows.append(r)
            log(f"{pb.name} NFE {n:2d} ours  {lab:<45} rmse {r['rmse']!s:<12.10} {r['error']} "
                f"({time.perf_counter() - t0:.1f} s)")
    for c in peers:
        for n in nfes:
            lab = f"{c.library} {c.family} {c.variant}"
            if (lab, n) in done:
                continue
            t0 = time.perf_counter()
            r = H.run_peer_config(pb, c, n)
            r.update(role="peer", label=lab)
            rows.append(r)
            log(f"{pb.name} NFE {n:2d} peer  {lab:<45} rmse {r['rmse']!s:<12.10} {r['error']} "
                f"({time.perf_counter() - t0:.1f} s)")
    return rows


FIELDS = ("problem", "role", "label", "library", "family", "variant", "nfe_budget", "nfe_used", "steps", "endpoint",
          "rmse", "rmse_median", "fd_lenet", "batch", "error")


def _key(r) -> Tuple[str, str, int, int]:
    return (r["problem"], r["label"], int(r["nfe_budget"]), int(r["batch"]))


def write_rows(path: str, rows: List[Dict[str, Any]]) -> None:
    """Merge rows into the runs CSV (a new run replaces an old one of the same problem, label, NFE, batch)."""
    new = {_key(r) for r in rows}
    old = [r for r in read_rows(path) if _key(r) not in new] if os.path.exists(path) else []
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in old + rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------
def _ok(r) -> bool:
    try:
        return not r["error"] and float(r["rmse"]) == float(r["rmse"])
    except (TypeError, ValueError):
        return False


def rule_label(nfe: int) -> str:
    """The label of the rule's configuration at ``nfe`` (every problem here is DDPM-discrete, epsilon)."""
    return _label(*default_sampler(nfe, "VPDiscrete", "epsilon"))


def summarise(rows: List[Dict[str, Any]]) -> Dict[str, Dict[int, Dict[str, Any]]]:
    """problem -> NFE -> {'peer': best peer row, 'rule': the current rule's row, 'old': old default row,
    'ours': {label: row}} (the rule's row is found by its configuration, so earlier runs render the rule of
    ``diffsolve.sampling.defaults`` as it is now when its configurations were among them)."""
    out: Dict[str, Dict[int, Dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if not _ok(r):
            continue
        n = int(r["nfe_budget"])
        d = out[r["problem"]].setdefault(n, {"peer": None, "peer_median": None, "rule": None, "old": None,
                                             "ours": {}})
        if r["role"] == "peer":
            if d["peer"] is None or float(r["rmse"]) < float(d["peer"]["rmse"]):
                d["peer"] = r
            if d["peer_median"] is None or float(r["rmse_median"]) < float(d["peer_median"]["rmse_median"]):
                d["peer_median"] = r
        else:
            d["ours"][r["label"]] = r
            if r["label"] == rule_label(n):
                d["rule"] = r
            if r["label"] == _label(*OLD_DEFAULT):
                d["old"] = r
    return out


def _problem_order(names) -> List[str]:
    order = list(SELECTION) + list(HELD_OUT)
    return sorted(names, key=lambda p: (order.index(p) if p in order else len(order), p))


def ratio_table(summary, which: str = "rule", key: str = "rmse") -> str:
    """Markdown: per problem and NFE, RMSE of the rule (``which='old'``: the old default) / best peer RMSE
    (``key='rmse_median'``: the median per-sample RMSE / the best peer's by that measure)."""
    peer = "peer" if key == "rmse" else "peer_median"
    nfes = sorted({n for d in summary.values() for n in d})
    lines = ["| problem | role | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---|" * len(nfes)]
    for p in _problem_order(summary):
        role = "selection" if p in SELECTION else "held out"
        cells = []
        for n in nfes:
            d = summary[p].get(n)
            if not d or d[which] is None or d[peer] is None:
                cells.append("-")
                continue
            q = float(d[which][key]) / float(d[peer][key])
            cells.append(f"**{q:.3f}** ✗" if q > 1.0 else f"{q:.3f}")
        lines.append(f"| {p} | {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(summary) -> str:
    lines = ["| problem | NFE | rule (RMSE, configuration) | best peer (RMSE, configuration) | ratio |",
             "|---|---|---|---|---|"]
    for p in _problem_order(summary):
        for n in sorted(summary[p]):
            d = summary[p][n]
            if d["rule"] is None or d["peer"] is None:
                continue
            q = float(d["rule"]["rmse"]) / float(d["peer"]["rmse"])
            lines.append(f"| {p} | {n} | {float(d['rule']['rmse']):.4g} `{d['rule']['label']}` | "
                         f"{float(d['peer']['rmse']):.4g} {d['peer']['label']} | {q:.3f} |")
    return "\n".join(lines)


def candidate_table(summary, problem: str) -> str:
    """Every configuration of ours on one problem: RMSE / best peer RMSE per NFE."""
    nfes = sorted(summary[problem])
    labels = sorted({lab for n in nfes for lab in summary[problem][n]["ours"]})
    lines = [f"| {problem}: configuration | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for lab in labels:
        cells = []
        for n in nfes:
            d = summary[problem][n]
            r = d["ours"].get(lab)
            cells.append("-" if r is None or d["peer"] is None else f"{float(r['rmse']) / float(d['peer']['rmse']):.2f}")
        lines.append(f"| `{lab}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the NFE bands of the selection (one configuration per band: the rule does not switch at single NFEs)
BANDS = ((1, 10), (11, 10_000))


def selection_table(summary, top: int = 8) -> str:
    """Per band, the configurations of ours run on every selection problem at every NFE of the band, by their
    worst RMSE ratio to the best peer over those problems and NFEs (the rule takes the first)."""
    lines = ["| NFE band | configuration | worst ratio | " + " | ".join(SELECTION) + " |",
             "|---|---|---|" + "---|" * len(SELECTION)]
    for lo, hi in BANDS:
        scored = []
        labels = set.intersection(*[set(d["ours"]) for p in SELECTION if p in summary
                                    for n, d in summary[p].items() if lo <= n <= hi] or [set()])
        for lab in labels:
            per = {}
            for p in SELECTION:
                qs = [float(d["ours"][lab]["rmse"]) / float(d["peer"]["rmse"])
                      for n, d in summary.get(p, {}).items() if lo <= n <= hi and d["peer"] is not None]
                per[p] = max(qs) if qs else float("nan")
            scored.append((max(per.values()), lab, per))
        band = f"{lo}-{hi}" if hi < 10_000 else f">= {lo}"
        for worst, lab, per in sorted(scored)[:top]:
            lines.append(f"| {band} | `{lab}` | {worst:.3f} | " + " | ".join(f"{per[p]:.3f}" for p in SELECTION) + " |")
    return "\n".join(lines)


def render(rows: List[Dict[str, Any]]) -> str:
    s = summarise(rows)
    parts = ["## Default rule / best peer (RMSE ratio; ≤ 1: at least as good)", ratio_table(s, "rule"),
             "## Selection: worst ratio over the selection problems and the NFEs of each band",
             selection_table(s),
             "## The same for the median per-sample RMSE (robust to the few samples that end in another mode)",
             ratio_table(s, "rule", "rmse_median"),
             "## Old default (dpm++2m logsnr/denoise) / best peer", ratio_table(s, "old"),
             "## Which configurations", detail_table(s)]
    for p in _problem_order(s):
        parts += [f"## Candidates on {p} (RMSE / best peer)", candidate_table(s, p)]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--problems", default="mixture-64,mnist,mixture-3072",
                   help="comma-separated: mixture-<dim>, mnist (default: %(default)s)")
    p.add_argument("--nfes", default=",".join(map(str, NFES)))
    p.add_argument("--batch", type=int, default=None, help="batch (default: 256 for mixtures, 64 for mnist)")
    p.add_argument("--seed", type=int, default=0, help="noise seeds: diffsolve.util.seeding.run_seeds(seed, batch)")
    p.add_argument("--ref-nfe", type=int, default=400, help="NFE of the MNIST reference (dpm++3m, log-SNR)")
    p.add_argument("--peer-top", type=int, default=2, help="best peer configurations per problem and NFE taken "
                                                          "from the bench CSVs (default: %(default)s)")
    p.add_argument("--candidates", choices=tuple(CANDIDATES), default="all",
                   help="our configurations besides the rule and the old default: 'all' (NAMED + POWER), "
                        "'short' (SHORT, for the MNIST model) or 'rule' (none) (default: %(default)s)")
    p.add_argument("--rerun", action="store_true", help="run again what runs.csv already holds (default: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave torch's setting)")
    p.add_argument("--out", default="out/default_rule", help="folder of runs.csv, tables.md, the reference cache")
    p.add_argument("--cache", default=None, help="folder of the MNIST reference cache (default: {out}/cache)")
    p.add_argument("--render", default=None, metavar="CSV[,CSV]",
                   help="only print the tables of earlier runs.csv files (comma-separated)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.render:
        print(render([r for path in a.render.split(",") for r in read_rows(path)]))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    nfes = [int(v) for v in a.nfes.split(",") if v.strip()]
    candidates = CANDIDATES[a.candidates]
    peers = peer_configs(bench_peer_names(a.peer_top))
    print(f"peers ({len(peers)}): " + "; ".join(f"{c.library} {c.family} {c.variant}" for c in peers))
    path = os.path.join(a.out, "runs.csv")
    for name in [s.strip() for s in a.problems.split(",") if s.strip()]:
        t0 = time.perf_counter()
        pb = make_problem(name, a.batch, a.seed, a.ref_nfe, a.cache or os.path.join(a.out, "cache"))
        print(f"{name}: batch {pb.batch}, reference in {pb.reference.seconds:.1f} s")
        done = frozenset() if a.rerun or not os.path.exists(path) else frozenset(
            (r["label"], int(r["nfe_budget"])) for r in read_rows(path)
            if r["problem"] == pb.name and int(r["batch"]) == pb.batch and not r["error"])
        with torch.inference_mode():
            rows = run_problem(pb, nfes, candidates, peers, done)
        for r in rows:
            r["batch"] = pb.batch
        write_rows(path, rows)
        print(f"{name}: {len(rows)} runs in {time.perf_counter() - t0:.0f} s -> {path}")
    text = render(read_rows(path))
    with open(os.path.join(a.out, "tables.md"), "w") as f:
        f.write(f"Command: `python benchmarks/default_rule.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
                f"\n\n{text}")
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "nfes": nfes,
                   "peers": [c.describe() for c in peers]}, f, indent=1, default=str)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
