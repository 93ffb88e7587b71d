"""The shipped-model demo: sample the embedded MNIST model at NFE 5 and 10 with the default rule
(``ds.sample(model, noise, nfe=k)``, nothing else) and with the previous default (dpm++2m on a log-SNR grid,
jumping to clean data), from the same noise, against a converged reference (DPM-Solver++(3M), 60 NFE on
a uniform grid; see ``benchmarks/reference_convergence.py``).

``demo_model(out_dir)`` writes ``out_dir/demo.png`` (labelled grids side by side) and returns the RMSE of
every run against the reference.  Runs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..hub import load
from ..sampling import sample
from ..util.images import save_labelled_grids

NFES = (5, 10)
REFERENCE = ("dpm++3m", 60, "uniform")  # 0.005 RMSE from 200 NFE, against errors of 0.08-0.3 at NFE 5-10
#: label -> sample() options: the default rule, and the default before it
RUNS = {"default": {}, "previous default": {"solver": "dpm++2m", "spacing": "logsnr", "final": "denoise"}}


def demo_model(out_dir: Union[str, os.PathLike] = "out", model: str = "mnist", n: int = 64, seed: int = 0,
               nfes=NFES, runs: Optional[Dict[str, Dict[str, Any]]] = None,
               reference: Tuple[str, int, str] = REFERENCE, threads: Optional[int] = None) -> Dict[str, Any]:
    """Sample ``n`` images with each of ``runs`` (label -> ``sample`` options) at each NFE in ``nfes`` and the
    ``reference`` (solver, NFE, spacing; stopping at t_min, no jump) from the same noise.

    Returns ``{"png": path, "rmse": {label: {nfe: rmse vs reference}}, "seconds": {label: {nfe: s}},
    "model": name, "reference": "...", "samples": {label: {nfe: tensor}}}`` (the reference under label
    "reference" and its NFE).
    """
    if threads:
        torch.set_num_threads(threads)
    runs = dict(RUNS if runs is None else runs)
    den = load(model)
    shape = den.sample_shape or (1, 28, 28)
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    samples: Dict[str, Dict[int, torch.Tensor]] = {}
    seconds: Dict[str, Dict[int, float]] = {}
    jobs = [(label, int(k), opts) for label, opts in runs.items() for k in nfes]
    r_solver, r_nfe, r_spacing = reference
    jobs.append(("reference", int(r_nfe), {"solver": r_solver, "spacing": r_spacing, "final": "t_min"}))
    with torch.inference_mode():
        for label, k, opts in jobs:
            t0 = time.perf_counter()
            x = sample(den, noise, nfe=k, **opts)
            seconds.setdefault(label, {})[k] = time.perf_counter() - t0
            samples.setdefault(label, {})[k] = x.clamp(-1, 1)
    ref = samples["reference"][int(r_nfe)]
    # RMSE over pixels in [-1, 1] and images
    rmse = {label: {k: float((x - ref).square().mean().sqrt()) for k, x in by.items()}
            for label, by in samples.items() if label != "reference"}
    out = Path(out_dir)
    panels = [(f"{label} NFE {k}  (RMSE {rmse[label][k]:.3f})", samples[label][k]) for label, k, _ in jobs[:-1]]
    panels.append((f"reference: {r_solver} {r_nfe} NFE {r_spacing}", ref))
    png = save_labelled_grids([x.float() for _, x in panels], [lab for lab, _ in panels], out / "demo.png",
                              nrow=int(round(n ** 0.5)), scale=2)
    return {"png": png, "rmse": rmse, "seconds": seconds, "model": model,
            "reference": f"{r_solver}, {r_nfe} NFE, {r_spacing}", "reference_nfe": int(r_nfe), "samples": samples}


#: the restoration panel: the centre 14x14 box of held-out digits removed, restored with a prior trained on
#: mnist-train (it never saw these images, mnist-heldout); the method is the best of docs/inverse_images.md that fits
#: the demo's time
RESTORE = {"model": "mnist-flow", "method": "repaint", "nfe": 100, "sigma_y": 0.05, "box": 14, "options": {}}


def restoration_panel(out_dir: Union[str, os.PathLike] = "out", images: int = 8, samples: int = 2,
                      seed: int = 0, **overrides: Any) -> Dict[str, Any]:
    """Box inpainting of ``images`` held-out digits (one per class in order, from ``mnist-heldout``) with
    ``samples`` posterior samples each, all in one ``ds.inverse.sample`` call (one measurement per sample); writes
    ``out_dir/restore.png`` (truth, measured, the samples) and returns the PSNR of every sample and the LeNet's
    reading of it."""
    from .. import inverse
    from ..adapters import Conditioned
    from ..evaluation.metrics import default_metric
    from ..util.datasets import load_dataset, load_labels

    cfg = {**RESTORE, **overrides}
    den = load(cfg["model"])
    null = den.config.get("null_label")
    prior = Conditioned(den, {"class_labels": torch.tensor([null])}) if null is not None else den
    data, labels = load_dataset("mnist-heldout"), load_labels("mnist-heldout")
    # mnist-heldout is sorted by class, 50 per digit: image 50 k + 1 is a digit k
    idx = [50 * (k % 10) + 1 + k // 10 for k in range(images)]
    truth = data[idx].to(torch.float64)
    op = inverse.Mask.box(tuple(truth.shape[1:]), cfg["box"])
    g = torch.Generator().manual_seed(1_000_003 + seed)
    y = op(truth)
    y = y + cfg["sigma_y"] * torch.randn(y.shape, generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    x, info = inverse.sample(prior, op, y.repeat_interleave(samples, 0), cfg["sigma_y"], method=cfg["method"],
                             nfe=cfg["nfe"], seeds=[seed * 1000 + j for j in range(images * samples)],
                             **cfg["options"])
    seconds = time.perf_counter() - t0
    x = x.clamp(-1, 1).reshape((images, samples) + tuple(truth.shape[1:]))
    read = default_metric().features(x.flatten(0, 1).float())[1].reshape(images, samples)
    mse = (x - truth[:, None]).pow(2).flatten(2).mean(-1)
    psnr = (10 * torch.log10(4.0 / mse)).tolist()  # data range [-1, 1]: peak-to-peak 2
    shown = op.adjoint(y).masked_fill(~op.mask[None], 0.0)
    panels = [truth.float(), shown.float().clamp(-1, 1)] + [x[:, j].float() for j in range(samples)]
    labels_txt = ["held-out truth", f"measured (box {cfg['box']}, sigma_y {cfg['sigma_y']})"] + \
        [f"{cfg['method']} sample {j + 1} ({info.nfe_equivalents:g} NFE-eq.)" for j in range(samples)]
    png = save_labelled_grids(panels, labels_txt, Path(out_dir) / "restore.png", nrow=images, scale=2)
    true = labels[idx].tolist()
    acc = float((torch.as_tensor(read) == torch.tensor(true)[:, None]).double().mean())
    return {"png": png, "psnr": psnr, "lenet_reads": read.tolist(), "labels": true, "lenet_accuracy": acc,
            "seconds": seconds, **{k: v for k, v in cfg.items() if k != "options"}, "options": dict(cfg["options"])}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="diffsolve.demo_model", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--model", default="mnist")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    r = demo_model(a.out, model=a.model, n=a.n, seed=a.seed)
    for label, by in r["rmse"].items():
        for k, v in by.items():
            print(f"{label:>16} NFE {k:3d}: RMSE vs the reference = {v:.4f}  ({r['seconds'][label][k]:.1f} s)")
    print(f"wrote {r['png']} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
