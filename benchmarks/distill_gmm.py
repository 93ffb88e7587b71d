"""A 1-NFE reflow student on the exact 64-dim Gaussian mixture, scored against the exact probability-flow ODE
endpoint on held-out noise, next to the best samplers at NFE 4 (ours on the same noise; the peers through the bench).

    python benchmarks/distill_gmm.py --out out/distill_gmm [--budget-minutes 30] [--peers]

Teacher: the mixture's exact denoiser (x0 prediction) on DDPM's linear schedule (1000 steps), the bench's problem.
Pairs: the teacher's ODE by dpm++3m at 100 NFE (error ~1e-6) from pair seeds disjoint from the evaluation seeds 0..N-1.
Student: an MLP (``diffsolve.models.MLP``) trained by ``distill(method='reflow', nfe=1)``; its one evaluation is the
jump to clean data from x_T.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.distillation import distill
from diffsolve.models.mlp import MLP, MLPConfig
from diffsolve.util import seeding


def rmse(x, y):
    return float((x.double() - y.double()).square().mean().sqrt())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/distill_gmm")
    ap.add_argument("--pairs", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--budget-minutes", type=float, default=30)
    ap.add_argument("--eval", type=int, default=1024, help="held-out noise samples")
    ap.add_argument("--peers", action="store_true", help="also run the bench's peers at NFE 4 on this mixture")
    ap.add_argument("--eval-only", action="store_true", help="score the latest checkpoint in --out (no training)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ref = ds.GaussianMixture.random(64, seed=0)
    proc = ds.VPDiscrete.linear(1000)
    teacher = ref.denoiser(proc, "x0")
    teacher.sample_shape = (64,)
    teacher.config = {"process": proc.config(), "prediction": "x0", "dataset": "gmm64", "sample_shape": [64]}
    torch.manual_seed(0)
    student = MLP(MLPConfig(dim=64, hidden=args.hidden, layers=3, time_scale=1.0))
    t0 = time.time()
    if args.eval_only:  # the latest checkpoint of a run that is still going (or was stopped)
        from safetensors.torch import load_file
        ck = sorted((Path(args.out) / "checkpoints").glob("step_*"))[-1]
        student.load_state_dict(load_file(str(ck / "student.safetensors")))
        state = torch.load(ck / "state.pt", weights_only=True)
        st = ds.Denoiser(student.eval().requires_grad_(False), proc, prediction="x0")
        info = {"checkpoint": ck.name, "cpu_minutes": round(state["cpu_s"] / 60, 2),
                "wall_minutes": round(state["wall_s"] / 60, 2),
                "sampler": {"solver": "ddim", "nfe": 1, "spacing": "uniform", "final": "denoise"}}
    else:
        path = distill(teacher, method="reflow", nfe=1, out_dir=args.out, steps=args.steps, batch_size=256, lr=1e-3,
                       budget_minutes=args.budget_minutes, checkpoint_every=500, student=student, pairs=args.pairs,
                       chunk=2048, pair_solver="dpm++3m", pair_nfe=100, p_grid=0.9, progress=True)
        st = ds.load(path)
        info = st.config["distillation"]
    wall = time.time() - t0
    z = seeding.noise(range(args.eval), (64,))
    exact = ds.exact_targets(ref, proc, proc.prior_from_noise(z)).denoised
    with torch.no_grad():
        x1 = ds.sample(st, z, **info["sampler"])
    res = {"student_nfe1_rmse": rmse(x1, exact), "student": info, "wall_s": wall, "eval_samples": args.eval}
    ours = {}
    for solver in ("dpm++2m", "dpm++3m", "unipc-bh2", "deis", "ipndm"):
        for spacing in ("logsnr", "karras", "uniform", "quadratic"):
            for final in ("denoise", "t_min"):
                x = ds.sample(teacher, z, solver=solver, nfe=4, spacing=spacing, final=final)
                target = exact if final == "denoise" else ds.exact_targets(ref, proc, proc.prior_from_noise(z)).at_t_min
                ours[f"{solver}/{spacing}/{final}"] = rmse(x, target)
    best = min(ours, key=ours.get)
    res["ours_nfe4_best"] = {"config": best, "rmse": ours[best]}
    x_default = ds.sample(teacher, z, nfe=4)
    res["ours_nfe4_default_rule"] = rmse(x_default, exact)
    if args.peers:
        r = ds.bench(dims=(64,), nfes=(4,), parity=False, overhead=False, progress=False)
        b = r.best("mixture-64", 4, ours=False)
        res["peers_nfe4_best"] = {"config": b.get("config") if b else None, "rmse": b.get("rmse") if b else None,
                                  "noise": "the bench's own 256 samples"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / ("result_eval.json" if args.eval_only else "result.json")).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "student"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
