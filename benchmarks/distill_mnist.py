"""Few-step students of the shipped MNIST teacher against the best training-free samplers at the same and more NFE.

    python benchmarks/distill_mnist.py --student reflow=out/distill/reflow2/model --student mmd=out/distill/mmd4/model \\
        --images 512 --out out/distill_mnist

FD-LeNet of ``--images`` samples (seeds 0..n-1) with two classifiers: the LeNet shipped with the model (the MMD
student's training features) and the independently trained judge (``evaluation.metrics.judge_metric``).
Training-free baselines at NFE 2, 4 and 5: the default rule, the shipped tuned profile (docs/profiles/mnist.json),
and a sweep of solver x grid; the best of each NFE by the judge is the "tuned training-free" value.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

import torch

import diffsolve as ds
from diffsolve.evaluation.metrics import default_metric, judge_metric
from diffsolve.util import seeding

SWEEP = [(s, g, f) for s in ("unipc-bh2", "dpm++2m", "dpm++3m", "ipndm", "deis", "ddim")
         for g in ("uniform", "linspace", "logsnr", "quadratic") for f in ("denoise", "t_min")]


def samples(model, n: int, **kw) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, n, 128):
            seeds = list(range(i, min(n, i + 128)))
            out.append(ds.sample(model, seeding.noise(seeds, (1, 28, 28)), seeds=seeds, **kw).float())
    return torch.cat(out)


def score(x, metrics) -> Dict[str, float]:
    return {name: m.score(x).fd_lenet for name, m in metrics.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--nfes", type=int, nargs="+", default=[2, 4, 5])
    ap.add_argument("--sweep", action="store_true", help="also the solver x grid sweep (slow)")
    ap.add_argument("--out", default="out/distill_mnist")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.json"
    res: Dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    res["images"] = args.images
    metrics = {"lenet": default_metric(), "judge": judge_metric()}
    den = ds.load("mnist")
    for item in args.student:
        name, _, folder = item.partition("=")
        st = ds.load(folder)
        info = st.config["distillation"]
        res.setdefault("students", {})[name] = {"folder": folder, "distillation": info,
                                                "fd": score(samples(st, args.images, **info["sampler"]), metrics)}
        path.write_text(json.dumps(res, indent=2) + "\n")
    base = res.setdefault("teacher", {})
    for k in args.nfes:
        key = f"default@{k}"
        if key not in base:
            base[key] = score(samples(den, args.images, nfe=k), metrics)
        key = f"profile@{k}"
        if key not in base:
            try:
                base[key] = score(samples(den, args.images, nfe=k, profile=ds.Profile.load("docs/profiles/mnist.json")),
                                  metrics)
            except ValueError as e:
                base[key] = {"error": str(e)}
        if args.sweep:
            for s, g, f in SWEEP:
                key = f"{s}/{g}/{f}@{k}"
                if key not in base:
                    try:
                        base[key] = score(samples(den, args.images, solver=s, nfe=k, spacing=g, final=f), metrics)
                    except ValueError as e:
                        base[key] = {"error": str(e)}
        path.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
