#!/usr/bin/env python
"""Is the high-NFE reference of a trained model converged?  Independent fine solutions, compared.

For each model spec (``diffsolve.bench.models``: a shipped name, ``name@w`` for classifier-free guidance) and one
seeded noise batch (``diffsolve.util.seeding``, seed 0), the probability-flow ODE is solved from t_max to t_min
(``final="t_min"``: the state itself, no jump) by

* ``ddim-1000``: DDIM (first order) with 1000 steps on the fine grid (``uniform`` in t: every DDPM timestep on
  the discrete schedule; ``karras`` for EDM),
* ``dpm++3m-500`` / ``dpm++3m-1000``: DPM-Solver++(3M) with 500 and 1000 NFE on the same grid,
* ``unipc3-1000-logsnr``: UniPC-bh2 order 3 with 1000 NFE on a log-SNR grid (another grid, another solver),
* ``dpm++3m-200-logsnr``: the former bench reference,

and every pair is compared by RMSE per pixel (data range [-1, 1]).  The reference is trusted when the third-order
solutions agree with each other and with first-order DDIM far below the sampler errors being ranked (the smallest
errors at NFE 20 are ~1e-2).  Writes ``{out}/reference_convergence.json`` and prints a Markdown table.

    python benchmarks/reference_convergence.py --models mnist,mnist-flow,mnist-cfg@1.5,mnist-cfg@3 --batch 16
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Tuple

import torch

import diffsolve as ds
from diffsolve.bench.models import load_spec
from diffsolve.evaluation.teacher import fine_grid
from diffsolve.util import seeding

DT = torch.float64


def solutions(process) -> List[Tuple[str, str, Dict, str, int]]:
    g = fine_grid(process)
    return [("ddim-1000", "ddim", {}, g, 1000),
            ("dpm++3m-500", "dpm++3m", {}, g, 500),
            ("dpm++3m-1000", "dpm++3m", {}, g, 1000),
            ("unipc3-1000-logsnr", "unipc-bh2", {"order": 3}, "logsnr", 1000),
            ("dpm++3m-200-logsnr", "dpm++3m", {}, "logsnr", 200),
            ("dpm++3m-100", "dpm++3m", {}, g, 100)]


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(DT) - b.to(DT)).pow(2).mean().sqrt())


def study(spec: str, batch: int, seed: int = 0) -> Dict:
    model, den = load_spec(spec, batch)
    noise = seeding.noise(seeding.run_seeds(seed, batch), den.sample_shape)
    out: Dict[str, torch.Tensor] = {}
    secs: Dict[str, float] = {}
    for name, solver, opts, spacing, nfe in solutions(model.process):
        t0 = time.perf_counter()
        out[name] = ds.sample(model, noise, solver, nfe=nfe, spacing=spacing, final="t_min", dtype=DT, **opts)
        secs[name] = time.perf_counter() - t0
        print(f"  {spec} {name}: {secs[name]:.0f} s", flush=True)
    names = list(out)
    pairs = {f"{a} vs {b}": rmse(out[a], out[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return {"model": spec, "batch": batch, "seed": seed, "fine_grid": fine_grid(model.process),
            "pairs": pairs, "seconds": secs, "data_rms": float(out["dpm++3m-1000"].pow(2).mean().sqrt())}


def table(results: List[Dict]) -> str:
    keys = ["dpm++3m-500 vs dpm++3m-1000", "ddim-1000 vs dpm++3m-1000", "dpm++3m-1000 vs unipc3-1000-logsnr",
            "dpm++3m-1000 vs dpm++3m-200-logsnr", "dpm++3m-1000 vs dpm++3m-100"]
    lines = ["| model | fine grid | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"| {r['model']} | {r['fine_grid']} | " + " | ".join(
            f"{r['pairs'][k]:.1e}" if k in r["pairs"] else "—" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--models", default="mnist,mnist-flow,mnist-cfg@1.5,mnist-cfg@3")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/reference_convergence")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "reference_convergence.json")
    results = json.load(open(path)) if os.path.exists(path) else []
    done = {r["model"] for r in results}
    for spec in a.models.split(","):
        if spec in done:
            continue
        results.append(study(spec, a.batch, a.seed))
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
