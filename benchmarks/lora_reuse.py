"""LoRA on the shipped MNIST UNet (merge exactness, adapter size) and feature reuse (FLOPs, same-noise RMSE, FD).

    python benchmarks/lora_reuse.py --out out/lora_reuse --images 256
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import diffsolve as ds
from diffsolve.compression import feature_reuse, finetune_lora, flops, merge_lora, save_adapter
from diffsolve.evaluation.metrics import default_metric
from diffsolve.hub.checkpoint import WEIGHTS, resolve
from diffsolve.util import seeding
from diffsolve.util.datasets import load_dataset


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/lora_reuse")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    den = ds.load("mnist")
    res = {}
    # LoRA: a short fine-tune on the MNIST images, then merged vs adapter outputs and the adapter's size
    t0 = time.process_time()
    net = finetune_lora(den, load_dataset("mnist"), steps=args.lora_steps, batch_size=16, rank=args.rank)
    x = seeding.noise(range(16), (1, 28, 28)).float()
    t = torch.linspace(1, 999, 16)
    with torch.no_grad():
        adapted = net(x, t)
        path = save_adapter(net, out / "adapter.safetensors")
        merged = merge_lora(copy.deepcopy(net))(x, t)
        base = den.net(x, t)
    res["lora"] = {"rank": args.rank, "steps": args.lora_steps, "cpu_s": time.process_time() - t0,
                   "max_abs_merged_minus_adapter": float((merged - adapted).abs().max()),
                   "max_abs_adapter_minus_base": float((adapted - base).abs().max()),
                   "adapter_bytes": path.stat().st_size,
                   "model_bytes": (resolve("mnist") / WEIGHTS).stat().st_size}
    res["lora"]["ratio"] = res["lora"]["adapter_bytes"] / res["lora"]["model_bytes"]
    print(json.dumps(res["lora"]), flush=True)
    # feature reuse at NFE 20 (default rule), same noise
    metric = default_metric()
    n = args.images
    xs = {}
    for name, model in (("full", den), ("reuse d1 k2", feature_reuse(den, depth=1, interval=2))):
        parts, total = [], 0
        with torch.no_grad():
            for i in range(0, n, 128):
                f, y = flops(lambda: ds.sample(model, seeding.noise(range(i, min(n, i + 128)), (1, 28, 28)),
                                               nfe=args.nfe))
                parts.append(y.float())
                total += f
        xs[name] = torch.cat(parts)
        res[name] = {"flops_per_sample": total / n, "fd_lenet": metric.score(xs[name]).fd_lenet}
    for name in xs:
        res[name]["flop_ratio"] = res[name]["flops_per_sample"] / res["full"]["flops_per_sample"]
        res[name]["rmse_vs_full"] = float((xs[name] - xs["full"]).square().mean().sqrt())
        res[name]["delta_fd"] = res[name]["fd_lenet"] - res["full"]["fd_lenet"]
    res["images"], res["nfe"] = n, args.nfe
    (out / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
