#!/usr/bin/env python
"""Error against the exact solution versus NFE, for every diffsolve solver (ours only, stochastic ones too).

A thin wrapper over ``diffsolve.bench`` (the one benchmark machinery; ``python -m diffsolve.bench`` adds
the diffusers / k-diffusion peers, the parity check and the ours-vs-peers overhead): the exact
Gaussian-mixture references ``GaussianMixture.random(dim, seed=0)`` under DDPM linear betas (1000 steps),
one seeded batch of x_T per size, every solver x NFE x spacing x last step, each run scored against the
exact answer where it stops (RMSE for deterministic solvers, log-likelihood gap per dimension for all),
then the solver overhead per NFE of every solver (float64 and float32 state).

Writes ``error_vs_nfe.md``, ``error_vs_nfe.csv`` (one row per run, the columns below), ``error_vs_nfe.json``
and ``error_vs_nfe.png`` under ``--out``.

    python benchmarks/error_vs_nfe.py --out docs          # the full run (several minutes)
    python benchmarks/error_vs_nfe.py --quick --out /tmp  # a smoke test (seconds)
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import diffsolve as ds
from diffsolve.bench import api, report

QUICK_SOLVERS = ("ddim", "heun", "dpm++2m", "unipc-bh2", "ddpm")
CSV_FIELDS = ("dim", "batch", "solver", "stochastic", "spacing", "final", "nfe_budget", "nfe_used", "clean_end",
              "endpoint", "rmse", "rmse_median", "llgap", "llgap_se", "wall", "net_time", "error")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs", help="output folder (default: docs)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: dim 64, batch 32, solvers {','.join(QUICK_SOLVERS)}, NFE 5,10")
    p.add_argument("--dims", default="64,3072")
    p.add_argument("--batch", default=None, help="one for all dims or one per dim (default: 256 for 64, else 64)")
    p.add_argument("--nfes", default="5,6,8,10,15,20,50")
    p.add_argument("--solvers", default=None, help="comma-separated solver names (default: all)")
    p.add_argument("--spacings", default="logsnr,karras,uniform")
    p.add_argument("--finals", default="denoise,t_min")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--overhead-dim", type=int, default=None, help="default: the largest of --dims")
    p.add_argument("--overhead-batch", type=int, default=128)
    p.add_argument("--overhead-nfe", type=int, default=20)
    p.add_argument("--overhead-repeats", type=int, default=5)
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.dims, a.nfes = "64", "5,10"
        a.batch = a.batch or "32"
        a.solvers = a.solvers or ",".join(QUICK_SOLVERS)
        a.overhead_batch, a.overhead_repeats = 32, 2
    return a


def legacy_rows(res):
    """One CSV row per run in this script's historical columns."""
    out = []
    for r in res.rows:
        cfg = r["config"]
        out.append({"dim": r["dim"], "batch": r["batch"], "solver": r["family"], "stochastic": r["stochastic"],
                    "spacing": cfg.get("spacing", ""), "final": cfg.get("final", ""), "nfe_budget": r["nfe_budget"],
                    "nfe_used": r["nfe_used"], "endpoint": r["endpoint"],
                    "clean_end": "" if not r["endpoint"] else int(r["endpoint"] == "jump"),
                    **{k: r[k] for k in ("rmse", "rmse_median", "llgap", "llgap_se", "wall", "net_time", "error")}})
    return out


def main(argv=None) -> int:
    a = parse(argv)
    dims = api._ints(a.dims)
    solvers = [ds.get_solver(s).name for s in a.solvers.split(",")] if a.solvers else [s.name for s in ds.solvers()]
    command = "python benchmarks/error_vs_nfe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res = api.bench(out=None, dims=dims, nfes=api._ints(a.nfes), batch=None if a.batch is None else api._ints(a.batch),
                    solvers=solvers, spacings=a.spacings.split(","), finals=a.finals.split(","), peers=False,
                    parity=False, overhead=not a.no_overhead, overhead_dim=a.overhead_dim or max(dims),
                    overhead_batch=a.overhead_batch, overhead_nfe=a.overhead_nfe,
                    overhead_repeats=a.overhead_repeats, overhead_algorithms=solvers, seed=a.seed,
                    threads=a.threads, progress=not a.no_progress, command=command)
    os.makedirs(a.out, exist_ok=True)
    res.files = report.write_all(res, a.out, name="error_vs_nfe", formats=("md", "json", "png"))
    res.files["csv"] = os.path.join(a.out, "error_vs_nfe.csv")
    with open(res.files["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in legacy_rows(res):
            w.writerow({k: (f"{v:.6e}" if isinstance(v, float) else v) for k, v in r.items()})
    n_missing = sum(1 for r in res.rows if r["error"])
    print(f"{len(res.rows)} runs ({n_missing} missing) in {res.meta['wall']:.0f} s -> {a.out}/error_vs_nfe.{{md,csv,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
