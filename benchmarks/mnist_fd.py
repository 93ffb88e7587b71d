"""FD-LeNet of the shipped MNIST model: our default solver vs diffusers' DPMSolverMultistep at the same NFE.

    python benchmarks/mnist_fd.py --images 256 --nfes 5 10 100 --out docs

Both start from the same noise; diffusers runs its scheduler as a pipeline does (set_timesteps, step) with
its default configuration (dpmsolver++, order 2, 'linspace' timesteps, final sigma 0).  Writes
``mnist_fd.md`` / ``mnist_fd.json`` under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.evaluation.metrics import default_metric


def diffusers_dpm(den: ds.Denoiser, noise: torch.Tensor, steps: int) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    proc = den.process
    sched = DPMSolverMultistepScheduler(num_train_timesteps=proc.num_train_timesteps,
                                        trained_betas=(1 - proc.alphas_cumprod / torch.cat(
                                            [torch.ones(1, dtype=torch.float64), proc.alphas_cumprod[:-1]])).numpy())
    sched.set_timesteps(steps)
    x = noise.float() * sched.init_noise_sigma
    for t in sched.timesteps:
        out = den.net(sched.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x.double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--nfes", type=int, nargs="+", default=[5, 10, 100])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    den, metric = ds.load(args.model), default_metric()
    noise = torch.randn(args.images, *den.sample_shape, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    with torch.inference_mode():
        for nfe in args.nfes:
            runs = [("diffsolve dpm++2m (logsnr, jump to clean)", lambda: ds.sample(den, noise, "dpm++2m", nfe=nfe)),
                    ("diffsolve dpm++2m (uniform t, jump to clean)",
                     lambda: ds.sample(den, noise, "dpm++2m", nfe=nfe, spacing="uniform")),
                    ("diffusers DPMSolverMultistep (default config)", lambda: diffusers_dpm(den, noise, nfe))]
            for name, fn in runs[::2] if nfe > 20 else runs:  # the uniform grid only at small NFE
                t0 = time.perf_counter()
                x = fn()
                sc = metric.score(x.float().clamp(-1, 1))
                rows.append({"nfe": nfe, "sampler": name, **sc.as_dict(), "seconds": round(time.perf_counter() - t0, 1)})
                print(rows[-1]["nfe"], name, f"FD-LeNet {sc.fd_lenet:.2f}", f"classes {sc.classes_covered}")
    floor = metric.meta.get("floor_vs_real_stats_by_n", {}).get(str(args.images))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist_fd.json").write_text(json.dumps({"images": args.images, "floor": floor, "runs": rows}, indent=2))
    lines = [f"# FD-LeNet of the shipped MNIST model ({args.images} images, seed {args.seed})", "",
             f"Command: `python benchmarks/mnist_fd.py --images {args.images} --nfes {' '.join(map(str, args.nfes))}`. "
             f"Real-data floor at this sample size (n real images against the real statistics): {floor}. "
             "FD-LeNet uses a LeNet-5 trained on the same 5000 MNIST images; it is not comparable to Inception FID.",
             "", "| NFE | sampler | FD-LeNet | classes covered | class KL |", "|---|---|---|---|---|"]
    lines += [f"| {r['nfe']} | {r['sampler']} | {r['fd_lenet']:.2f} | {r['classes_covered']} | {r['class_kl']:.3f} |"
              for r in rows]
    (out / "mnist_fd.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
