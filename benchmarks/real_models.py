#!/usr/bin/env python
"""Our default, our tuned profile and the best peer configuration on every shipped model, per NFE.

For each model spec (``diffsolve.bench.models``: ``mnist``, ``mnist-flow``, ``mnist-cfg@1.5`` ...) one seeded
noise batch (the bench's, seed 0) is sampled at NFE 5, 6, 8, 10, 15 and 20 by

* the default rule (``ds.sample(model, noise, nfe=k)``, nothing else),
* the tuned profile ``docs/profiles/<model>.json`` when it exists (``diffsolve tune`` on calibration seeds; this
  noise is never seen by the tuner); ``--tune`` makes it first (the tuner's 5-minute default budget),
* the peers of the model's family (``diffsolve.bench.peers``: diffusers' DDPM, flow-matching or EDM schedulers and
  k-diffusion's samplers), each through its own code, the best configuration per NFE kept,

and scored by RMSE to a converged reference of the same model (``--ref``: solver:NFE:grid, see
``benchmarks/reference_convergence.py``) and, on 28x28 models, by FD-LeNet (with the floor of real images at
the same sample size).  Only runs that end at clean data or at sigma/alpha <= ``STOP_MAX`` are ranked: a run that
stops at a larger noise level returns visibly noisy images, however close to the ODE state there.  Writes
``{out}/<model>/rows.json`` (a rerun skips finished models), picture grids (NFE 5 and 10, ours vs the best peer,
same noise) and ``{out}/real_models.md``.

    python benchmarks/real_models.py --models mnist,mnist-flow,mnist-cfg@1.5,mnist-cfg@3,digits-edm,digits-v --out docs/real_models
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

import diffsolve as ds
from diffsolve.bench import harness as H
from diffsolve.bench import peers as P
from diffsolve.bench.models import load_spec

NFES = (5, 6, 8, 10, 15, 20)
CANDIDATE_NFES = (5, 8, 15)  # the rule's candidates are compared here; 6, 10 and 20 only report the choice
STOP_MAX = 0.02  # sigma/alpha above which a run that stops early is not ranked
# the DDPM peers worth running (the full list of the bench, ~100 configurations, is trimmed to the families and
# grids that were ever best or close on the mixtures and MNIST: docs/benchmarks.md, docs/mnist_bench.md)
DDPM_KEEP = {
    "DDIM": ("trailing/alpha1", "leading/alpha1"),
    "DPMSolverMultistep dpmsolver++ 2M": None, "DPMSolverMultistep dpmsolver++ 3M": None,
    "UniPC bh2 order 2": ("linspace/zero", "linspace/sigma_min", "trailing/zero", "trailing/sigma_min",
                          "karras/sigma_min"),
    "UniPC bh2 order 3": None, "UniPC bh1 order 3": None, "DEIS order 3": ("linspace", "trailing"),
    "Euler": ("trailing/zero", "karras/zero"),
}
# what users of each library run without options (always in the DDPM list)
DDPM_DEFAULTS = {("diffusers", "DPMSolverMultistep dpmsolver++ 2M", "linspace/zero"),
                 ("diffusers", "UniPC bh2 order 2", "linspace/zero"), ("k-diffusion", "dpmpp_2m", "karras/zero"),
                 ("diffusers", "DPMSolverMultistep dpmsolver++ 3M", "karras/sigma_min")}
K_KEEP = ("heun", "dpmpp_2m", "dpmpp_3m_sde (eta=0)")


def slug(spec: str) -> str:
    return spec.replace("@", "_w").replace("/", "_")


# the flow peers worth running (FlowMatchEuler is diffusers' default for flows; UniPC bh1 on 'zero' is NaN)
FLOW_KEEP = {"FlowMatchEuler": ("default",), "FlowMatchHeun": None,
             "DPMSolverMultistep dpmsolver++ 2M (flow)": ("flow/zero",),
             "DPMSolverMultistep dpmsolver++ 3M (flow)": None, "UniPC bh2 order 2 (flow)": ("flow/zero",),
             "UniPC bh2 order 3 (flow)": ("flow/zero",)}


def peers_for(family: str, quick: bool, top: int = 0) -> List[P.PeerConfig]:
    """The peers to run: ``top`` > 0 (DDPM family only): the ``top`` best per NFE of the exhaustive MNIST bench
    (``docs/mnist_bench.csv``: every diffusers and k-diffusion configuration at NFE 5-10); else the trimmed list."""
    cfgs = [c for c in P.peer_configs(quick, None, family) if not c.adaptive]
    if top and family == "ddpm":
        import csv
        from collections import defaultdict
        by: Dict[str, List[Tuple[float, Tuple[str, str, str]]]] = defaultdict(list)
        with open(os.path.join(os.path.dirname(__file__), "..", "docs", "mnist_bench.csv"), newline="") as f:
            for r in csv.DictReader(f):
                if r["library"] != "diffsolve" and not r["error"] and r["rmse"] not in ("", "nan") \
                        and r["stochastic"] == "0" and r["nfe_budget"]:
                    by[r["nfe_budget"]].append((float(r["rmse"]), (r["library"], r["family"], r["variant"])))
        names = {n for runs in by.values() for _, n in sorted(runs)[:top]} | DDPM_DEFAULTS
        return [c for c in cfgs if (c.library, c.family, c.variant) in names]
    out = []
    for c in cfgs:
        if c.library == "k-diffusion":
            if c.family in K_KEEP:
                out.append(c)
        elif family == "flow" and not quick:
            if c.family in FLOW_KEEP and (FLOW_KEEP[c.family] is None or c.variant in FLOW_KEEP[c.family]):
                out.append(c)
        elif family != "ddpm" or quick:
            out.append(c)
        elif c.family in DDPM_KEEP and (DDPM_KEEP[c.family] is None or c.variant in DDPM_KEEP[c.family]):
            out.append(c)
    return out


def candidates(process, short: bool = False):
    """Default-rule candidates: third- and second-order multistep solvers on the plausible grids, both last steps."""
    from diffsolve.sampling.defaults import PowerSpacing
    solvers = [("unipc-bh1", {"order": 3}), ("unipc-bh2", {"order": 3}), ("unipc-bh2", {"order": 2})] + \
        ([] if short else [("dpm++2m", {}), ("dpm++3m", {})])
    spacings: List[Any] = ["uniform", "logsnr", "karras", PowerSpacing(1.5)] + ([] if short else [PowerSpacing(2.0)])
    if getattr(process, "num_train_timesteps", None) is not None:
        spacings.append("linspace")
    finals = ("t_min",) if short else ("t_min", "denoise")
    return [(s, o, sp, f) for s, o in solvers for sp in spacings for f in finals]


def ranked(r: Dict[str, Any]) -> bool:
    if r.get("error") or not isinstance(r.get("rmse"), float) or not math.isfinite(r["rmse"]):
        return False
    if r["endpoint"] in ("jump", "sigma=0"):
        return True
    return r["_sigma_stop"] <= STOP_MAX


def fd_floor(n: int, seed: int = 0) -> Optional[float]:
    """FD-LeNet of n real MNIST images (random, fixed seed) against the statistics of all 5000."""
    from diffsolve.evaluation.metrics import default_metric
    from diffsolve.util.datasets import load_dataset
    x = load_dataset("mnist")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return float(default_metric().score(x[idx].float()).fd_lenet)


def _rows_of(rows, family=None, library=None) -> set:
    return {(r["library"], r["family"], r["variant"], r["nfe_budget"]) for r in rows
            if (family is None or r["family"] == family) and (library is None or r["library"] == library)}


def run_model(spec: str, a, res: Optional[Dict[str, Any]],
              save=None) -> Tuple[Dict[str, Any], Optional[H.Problem]]:
    """The rows of one model: those already in ``res`` are kept, the missing ones are run (the problem and its
    reference are only built when something is missing)."""
    model, den = load_spec(spec, 4096)
    solver, nfe_ref, spacing = (a.ref.split(":") + ["", ""])[:3]
    spacing = spacing or H.fine_grid(model.process)
    ppath = os.path.join(a.profiles, slug(spec) + ".json")
    if a.tune and not os.path.exists(ppath):
        ds.tune(model, nfes=NFES, out=ppath, progress=False, log=print)
    from diffsolve.tuning import load_profile
    profile = load_profile(ppath) if os.path.exists(ppath) else None
    res = res or {"model": spec, "batch": a.batch, "seed": a.seed, "reference": f"{solver}:{nfe_ref}:{spacing}",
                  "rows": []}
    rows: List[Dict[str, Any]] = res["rows"]
    have = _rows_of(rows)
    state: Dict[str, Any] = {}

    def problem() -> H.Problem:
        if "pb" not in state:
            t0 = time.perf_counter()
            state["pb"] = H.model_problem(model, a.batch, a.seed, None, int(nfe_ref), name=spec, ref_solver=solver,
                                          ref_spacing=spacing)
            res["reference_seconds"] = time.perf_counter() - t0
        return state["pb"]

    def add(r: Dict[str, Any]) -> None:
        pb = problem()
        r["_sigma_stop"] = (float(pb.process.sigma_ve(torch.tensor(float(r["t_stop"]), dtype=torch.float64)))
                            if r.get("t_stop") not in ("", None) else 0.0)
        r["config"] = json.dumps(r["config"], default=str)
        rows.append(r)
        if save is not None:  # nothing lost on a crash: the rows so far are on disk
            save(res)

    from diffsolve.sampling.defaults import default_sampler, model_guidance, model_parameterisation
    for n in NFES:
        rule = default_sampler(n, model.process, model_parameterisation(model), model_guidance(model))
        if not any(is_rule_row(r, rule_key(rule)) and r["nfe_budget"] == n for r in rows):
            add(H.run_default(problem(), n))
    if profile is not None and res.get("profile_created") != profile.meta.get("created"):
        rows[:] = [r for r in rows if r["family"] != H.TUNED]  # a new profile replaces the old one's rows
        for n in NFES:
            if n in profile.entries:
                add(H.run_profile(problem(), profile, n))
        res["profile"], res["profile_created"] = ppath, profile.meta.get("created")
        res["profile_cut"] = profile.meta.get("cut", [])
    if a.candidates:
        for solver_, opts, sp, fin in candidates(model.process, a.candidates == "short"):
            variant = f"{solver_}{''.join(f',{k}={v}' for k, v in opts.items())} {sp}/{fin}"
            for n in CANDIDATE_NFES:
                if ("diffsolve", "candidate", variant, n) not in have:
                    r = H.run_ours(problem(), solver_, n, sp, fin, **opts)
                    r["family"], r["variant"] = "candidate", variant
                    add(r)
        print(f"  {spec}: candidates done", flush=True)
    family = P.peer_family(model.process)
    for c in peers_for(family, a.quick, a.peer_top):
        if any((c.library, c.family, c.variant, n) not in have for n in NFES):
            for n in NFES:
                if (c.library, c.family, c.variant, n) not in have:
                    add(H.run_peer_config(problem(), c, n, torch.float32))
            print(f"  {spec}: {c.library} {c.family} {c.variant} done", flush=True)
    res.update(process=type(model.process).__name__, family=family)
    if "fd_floor" not in res:
        res["fd_floor"] = fd_floor(a.batch) if tuple(den.sample_shape) == (1, 28, 28) else None
    return res, state.get("pb")


def best(rows, nfe, pick) -> Optional[Dict[str, Any]]:
    c = [r for r in rows if r["nfe_budget"] == nfe and pick(r) and ranked(r)]
    return min(c, key=lambda r: r["rmse"]) if c else None


def grids(res: Dict[str, Any], pb: H.Problem, out_dir: str, n_show: int = 16) -> List[str]:
    """PNG grids at NFE 5 and 10: the default rule and the best peer from the same (first n_show) noise."""
    from diffsolve.util.images import save_labelled_grids
    files = []
    if len(pb.shape) != 3:
        return files
    rows = res["rows"]
    by_name = {(c.library, c.family, c.variant): c for c in P.peer_configs(False, None, pb.family)}
    for n in (5, 10):
        bp = best(rows, n, lambda r: r["library"] != "diffsolve")
        ours = ds.sample(pb.den, pb.noise[:n_show], nfe=n).float()
        panels = [("ours: default rule", ours)]
        if bp is not None:
            cfg = by_name[(bp["library"], bp["family"], bp["variant"])]
            steps = P.plan_steps(cfg, pb.process, n)
            o = P.run_peer(cfg, pb.peer_net, pb.process, pb.noise[:n_show], steps, torch.float32)
            x = o.x.to(torch.float64)
            if o.view == "ve" and o.last_sigma > 0:
                t = pb.process.t_of_sigma_ve(torch.tensor(o.last_sigma, dtype=torch.float64))
                x = x * pb.process.alpha(t)
            panels.append((f"best peer: {bp['library']} {bp['family']}", x.float()))
        f = os.path.join(out_dir, f"nfe{n}.png")
        scale = max(2, 84 // pb.shape[-1])
        save_labelled_grids([x.clamp(-1, 1) for _, x in panels], [f"{lab} (NFE {n})" for lab, _ in panels], f,
                            nrow=8, scale=scale)
        files.append(f)
    return files


def rule_key(rule) -> Tuple[str, str]:
    """(solver, variant) of a default-rule row of this choice of the rule."""
    return rule.solver, f"{rule.spacing}/{rule.final}" + "".join(f",{k}={v}" for k, v in rule.options.items())


def is_rule_row(r: Dict[str, Any], key: Tuple[str, str]) -> bool:
    if r["family"] != H.DEFAULT:
        return False
    cfg = r["config"]
    solver = (json.loads(cfg) if isinstance(cfg, str) else cfg).get("solver")
    return (solver, r["variant"]) == key


def rule_variant(spec: str, n: int) -> Tuple[str, str]:
    """The key of the default-rule rows that the current rule gives at NFE n (older rules' rows are ignored)."""
    from diffsolve.sampling.defaults import default_sampler, model_guidance, model_parameterisation
    model, _ = load_spec(spec, 1)
    return rule_key(default_sampler(n, model.process, model_parameterisation(model), model_guidance(model)))


def summary(res: Dict[str, Any], n: int) -> Dict[str, Optional[Dict[str, Any]]]:
    rows, v = res["rows"], rule_variant(res["model"], n)
    return {"default": best(rows, n, lambda r: is_rule_row(r, v)),
            "tuned": best(rows, n, lambda r: r["family"] == H.TUNED),
            "peer": best(rows, n, lambda r: r["library"] != "diffsolve")}


def render(results: List[Dict[str, Any]], out: str) -> str:
    """One table per NFE: per model, the default rule, the tuned profile and the best peer configuration by RMSE
    to the converged reference and by FD-LeNet (with the floor of real images at this sample size)."""
    def f(r, k="rmse"):
        return "—" if r is None or r.get(k) in ("", None) else f"{float(r[k]):.3g}"

    L: List[str] = []
    for n in NFES:
        L += [f"### NFE {n}", "",
              "| model | default rule | tuned profile | best peer (configuration) | default / peer | tuned / peer |"
              " FD-LeNet: default / tuned / peer (floor) |", "|---|---|---|---|---|---|---|"]
        for res in results:
            S = summary(res, n)
            d, t, p = S["default"], S["tuned"], S["peer"]
            ratio = lambda r: "—" if r is None or p is None else f"**{r['rmse'] / p['rmse']:.2f}**"  # noqa: E731
            pc = "—" if p is None else f"{f(p)} ({p['library']} {p['family']}, {p['variant']})"
            fd = "—" if res.get("fd_floor") is None else \
                f"{f(d, 'fd_lenet')} / {f(t, 'fd_lenet')} / {f(p, 'fd_lenet')} ({res['fd_floor']:.1f})"
            L.append(f"| {res['model']} | {f(d)} | {f(t)} | {pc} | {ratio(d)} | {ratio(t)} | {fd} |")
        L.append("")
    return "\n".join(L)


def losses(results: List[Dict[str, Any]]) -> List[str]:
    """Every cell where our default or tuned profile is above the best peer (RMSE), and every target cell missed
    (tuned <= 0.7x the best peer at NFE 5-10)."""
    out = []
    for res in results:
        for n in NFES:
            S = summary(res, n)
            p = S["peer"]
            if p is None:
                continue
            for k in ("default", "tuned"):
                r = S[k]
                if r is not None and r["rmse"] > 1.005 * p["rmse"]:  # ties within 0.5% are not listed
                    out.append(f"{res['model']} NFE {n}: {k} {r['rmse']:.3g} > best peer {p['rmse']:.3g} "
                               f"({r['rmse'] / p['rmse']:.2f}x; {p['library']} {p['family']} {p['variant']})")
            t = S["tuned"]
            if n <= 10 and t is not None and 0.7 * p["rmse"] < t["rmse"] <= 1.005 * p["rmse"]:
                out.append(f"{res['model']} NFE {n}: tuned {t['rmse'] / p['rmse']:.2f}x the best peer (target 0.7x)")
    return out


def write_doc(results: List[Dict[str, Any]], path: str, conv: List[Dict[str, Any]], command: str) -> None:
    """docs/real_models.md's generated part: the reference study, the tables, the pictures, where we lose."""
    import shutil
    d = os.path.dirname(path)
    img_dir = os.path.join(d, "real_models")
    os.makedirs(img_dir, exist_ok=True)
    L = ["<!-- generated by benchmarks/real_models.py --doc; edit the script, not this block -->", "",
         f"Reproduce: `{command}` (every run in `out/real_models/<model>/rows.json`).", ""]
    if conv:
        keys = [("dpm++3m-500 vs dpm++3m-1000", "3M 500 vs 1000"), ("ddim-1000 vs dpm++3m-1000", "DDIM 1000 vs 3M 1000"),
                ("dpm++3m-1000 vs unipc3-1000-logsnr", "3M 1000 vs UniPC-3 1000 log-SNR"),
                ("dpm++3m-1000 vs dpm++3m-200-logsnr", "3M 200 log-SNR (old ref.) vs 3M 1000"),
                ("dpm++3m-1000 vs dpm++3m-100", "3M 100 vs 3M 1000")]
        L += ["## Is the reference converged?", "",
              "RMSE per pixel between independent fine solutions of the probability-flow ODE, from the same noise, "
              "stopping at t_min (`python benchmarks/reference_convergence.py`; the fine grid is uniform in t, i.e. "
              "every DDPM timestep on a discrete schedule, and Karras for EDM):", "",
              "| model | batch | fine grid | " + " | ".join(k[1] for k in keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
        for r in conv:
            L.append(f"| {r['model']} | {r['batch']} | {r['fine_grid']} | " + " | ".join(
                f"{r['pairs'][k]:.1e}" if k in r["pairs"] else "—" for k, _ in keys) + " |")
        L.append("")
    L += ["## Tables", "", "RMSE per pixel (data in [-1, 1]) to the reference, same noise for every row; ratio < 1: "
          "ours is more accurate. Only runs that end at clean data or at sigma/alpha <= 0.02 are ranked. FD-LeNet on "
          "the same images (28x28 models only) with the floor of real images at this sample size.", "",
          render(results, d)]
    L += ["## Pictures (NFE 5 and 10, ours vs the best peer, same noise)", ""]
    for res in results:
        for g in res.get("grids") or []:
            name = f"{slug(res['model'])}_{os.path.basename(g)}"
            if os.path.exists(g):
                shutil.copy(g, os.path.join(img_dir, name))
            L.append(f"![{res['model']} {os.path.basename(g)}](real_models/{name})")
        L.append("")
    L += ["## Where we lose (generated)", "", "Every cell above the best peer by more than 0.5% (ties within 0.5% are not "
          "listed), and every NFE 5-10 cell where the tuned profile misses its target of 0.7x the best peer:", ""] + \
        [f"- {x}" for x in losses(results)] + [""]
    cuts = [(res["model"], c) for res in results for c in res.get("profile_cut") or []]
    if cuts:
        L += ["## What the 5-minute tuning budget cut", ""] + [f"- {m}: {c}" for m, c in cuts] + [""]
    text = open(path).read() if os.path.exists(path) else "# Real models\n\n"
    mark = "<!-- generated by benchmarks/real_models.py"
    head = text.split(mark)[0] if mark in text else text
    with open(path, "w") as f:
        f.write(head.rstrip() + "\n\n" + "\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--models", default="mnist,mnist-flow,mnist-cfg@1.5,mnist-cfg@3,digits-edm,digits-v")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", default="dpm++3m:500", help="reference solver:NFE[:grid] (grid: uniform, EDM karras)")
    ap.add_argument("--profiles", default="docs/profiles")
    ap.add_argument("--tune", action="store_true", help="tune a profile first where none exists")
    ap.add_argument("--quick", action="store_true", help="the bench's quick peer subsets")
    ap.add_argument("--candidates", choices=("all", "short"), default=None,
                    help="also run the default-rule candidates (short: 4 solvers x 4-5 grids, t_min)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grids", action="store_true", help="redraw the picture grids")
    ap.add_argument("--doc", default=None, help="write the generated part of this Markdown page (docs/real_models.md)")
    ap.add_argument("--peer-top", type=int, default=0,
                    help="DDPM models: only the N best peers per NFE of docs/mnist_bench.csv (0: the trimmed list)")
    ap.add_argument("--out", default="out/real_models")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    for spec in a.models.split(","):
        d = os.path.join(a.out, slug(spec))
        path = os.path.join(d, "rows.json")
        old = json.load(open(path)) if os.path.exists(path) else None
        os.makedirs(d, exist_ok=True)
        def save(r, path=path):
            with open(path + ".tmp", "w") as f:
                json.dump(r, f, indent=1, default=str)
            os.replace(path + ".tmp", path)

        res, pb = run_model(spec, a, old, save)
        if pb is not None or not res.get("grids") or a.grids:
            res["grids"] = grids(res, pb or H.model_problem(load_spec(spec, 4096)[0], a.batch, a.seed, None, 20), d)
        with open(path, "w") as f:
            json.dump(res, f, indent=1, default=str)
        results.append(res)
    if a.doc:
        cpath = "out/reference_convergence/reference_convergence.json"
        conv = json.load(open(cpath)) if os.path.exists(cpath) else []
        import sys
        write_doc(results, a.doc, conv, "python benchmarks/real_models.py " + " ".join(sys.argv[1:]))
    text = render(results, a.out)
    with open(os.path.join(a.out, "real_models_tables.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
