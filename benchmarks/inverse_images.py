#!/usr/bin/env python
"""Image restoration on MNIST with a frozen model as the prior: every inverse method on every task, held-out truths.

Prior: ``--model`` (default ``mnist-flow``, the rectified flow trained on the ``mnist-train`` split; ``mnist-cfg``
runs with its null label).  Truths: 64 images of the held-out split ``mnist-heldout`` (every 10th image of the
bundled 5000, never seen in training): held-out indices 50 (k mod 10) + k div 10, k = 0..63, i.e. the first six or
seven of every digit.  Method options were chosen on other held-out images (indices 25 and up of each digit, see
``--dev``), never on these.

Tasks (sigma_y = 0.05 in the data's [-1, 1] units): ``box`` (centre 14 x 14 hidden), ``random`` (70% of the pixels
hidden), ``sr2`` / ``sr4`` (2 x 2 / 4 x 4 average pooling), ``deblur`` (7 x 7 Gaussian kernel, std 1, circular),
``cs10`` / ``cs25`` (78 / 196 Gaussian measurements), ``separation`` (y = (x1 + x2) / 2 + n for 32 pairs of the
64 truths, two copies of the prior, method ``joint`` with each inner method), ``class`` (class guidance towards the
64 truths' labels with the shipped LeNet on the x0 prediction; no measurement).

Every method gets ``--nfe`` NFE-equivalents per sample (a VJP through the network counts 2 NFE; a joint pair's
budget counts both networks) and draws ``--samples`` samples per truth.  Methods whose samples interact (SMC) run
one truth at a time with the K samples as their particles.

Metrics (``diffsolve.evaluation.image_quality``): PSNR (data range 2) of the samples and of their mean, SSIM (7 x 7
Gaussian window), the LeNet-feature distance (the shipped LeNet's 84 penultimate features -- *not* LPIPS, whose
weights cannot be loaded offline), FD-LeNet of all 64 K samples against the real statistics (its floor at this
sample size is in ``docs/model.md``), LeNet accuracy (the shipped classifier reads the true digit; per sample and
of the posterior mean), the per-pixel posterior spread, the 90%-interval coverage of the truth (a calibrated
posterior gives about 0.9 (K - 1) / (K + 1) at K samples), and the measurement chi^2 per degree of freedom.  Cost:
NFE, VJPs and NFE-equivalents per sample, and the wall time per sample.

Results are cached per (task, method) under ``--out`` (a crash loses one cell), so the run can be stopped and
resumed; ``--doc`` writes ``docs/inverse_images.md`` and the sample grids from whatever cells exist.

    python benchmarks/inverse_images.py --out out/inverse_images                     # every task and method
    python benchmarks/inverse_images.py --out out/inverse_images --tasks box --methods repaint ddrm
    python benchmarks/inverse_images.py --out out/inverse_images --doc docs           # the tables and grids
    python benchmarks/inverse_images.py --out /tmp/ii --quick                         # smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import diffsolve as ds
from diffsolve import inverse
from diffsolve.adapters import Conditioned
from diffsolve.evaluation import image_quality as iq
from diffsolve.evaluation.metrics import default_metric
from diffsolve.evaluation.restore import EXCLUDED
from diffsolve.inverse.methods.joint import Mix, split
from diffsolve.util.datasets import load_dataset, load_labels

SHAPE = (1, 28, 28)
SIGMA_Y = 0.05
NOISE_SEED = 20_240_611  # the measurement noise
TASKS: Dict[str, Tuple[str, Callable[[], Any]]] = {
    "box": ("box inpainting, centre 14 x 14 hidden", lambda: inverse.Mask.box(SHAPE, 14)),
    "random": ("random inpainting, 70% of the pixels hidden (mask seed 0)", lambda: inverse.Mask.random(SHAPE, 0.7, 0)),
    "sr2": ("super-resolution x2 (2 x 2 average pooling)", lambda: inverse.AvgPool(SHAPE, 2)),
    "sr4": ("super-resolution x4 (4 x 4 average pooling)", lambda: inverse.AvgPool(SHAPE, 4)),
    "deblur": ("Gaussian deblurring, 7 x 7 kernel, std 1", lambda: inverse.GaussianBlur(SHAPE, 1.0, 7)),
    "cs10": ("compressed sensing, 78 Gaussian measurements (10%)", lambda: inverse.Dense.gaussian(78, SHAPE, 0)),
    "cs25": ("compressed sensing, 196 Gaussian measurements (25%)", lambda: inverse.Dense.gaussian(196, SHAPE, 0)),
    "separation": ("two-digit separation, y = (x1 + x2) / 2 + n, 32 pairs", lambda: Mix(SHAPE, (0.5, 0.5))),
    "class": ("class guidance with the shipped LeNet towards the truths' labels", lambda: None),
}
LINEAR = ("box", "random", "sr2", "sr4", "deblur", "cs10", "cs25")
CLASS_METHODS = ("unguided", "classifier", "classifier+precision")


def report_indices(n: int = 64) -> List[int]:
    """Held-out indices of the reported truths: the first images of each digit (the split is sorted by class,
    50 per digit)."""
    return [50 * (k % 10) + k // 10 for k in range(n)]


def dev_indices(n: int = 16) -> List[int]:
    """Held-out indices used to choose options (disjoint from the reported ones for n <= 250)."""
    return [50 * (k % 10) + 25 + k // 10 for k in range(n)]


def parse_method(spec: str) -> Tuple[str, Dict[str, Any]]:
    """``"repaint:resample=1,jump=5"`` -> ("repaint", {"resample": 1, "jump": 5})."""
    name, _, rest = spec.partition(":")
    opts: Dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return name, opts


def default_methods(task: str) -> List[str]:
    if task == "class":
        return list(CLASS_METHODS)
    return [m for m in inverse.methods() if m not in EXCLUDED]


def load_prior(name: str):
    den = ds.load(name)
    null = den.config.get("null_label")
    return Conditioned(den, {"class_labels": torch.tensor([null])}) if null is not None else den


# ---------------------------------------------------------------------------------------------------------------
# running one cell
# ---------------------------------------------------------------------------------------------------------------
def measure(task: str, truth: torch.Tensor) -> Tuple[Any, torch.Tensor, torch.Tensor]:
    """(operator, the problems' truths [P, ...], y [P, ...]) of a task: one problem per truth, or per pair."""
    op = TASKS[task][1]()
    g = torch.Generator().manual_seed(NOISE_SEED)
    if task == "separation":
        half = truth.shape[0] // 2
        truth = torch.cat([truth[:half], truth[half:2 * half]], 1)  # pairs (k, k + 32), stacked
    clean = op(truth)
    return op, truth, clean + SIGMA_Y * torch.randn(clean.shape, generator=g, dtype=torch.float64)


def run_cell(prior, task: str, spec: str, truth: torch.Tensor, labels: torch.Tensor, k: int, nfe: int,
             chunk: int) -> Dict[str, Any]:
    """Samples [P, K, ...] and costs of one method on one task."""
    name, opts = parse_method(spec)
    t0 = time.perf_counter()
    if task == "class":
        return run_class(prior, name, opts, labels, k, nfe) | {"wall": time.perf_counter() - t0}
    op, truth_p, y = measure(task, truth)
    method, extra = (("joint", {"inner": name, **opts}) if task == "separation" else (name, opts))
    coupled = inverse.METHODS[name].coupled
    Y = y.repeat_interleave(k, 0)
    n = Y.shape[0]
    step = k if coupled else max(k, chunk - chunk % k)
    xs, infos = [], []
    for c in range(0, n, step):
        yc = Y[c:c + step] if not coupled else Y[c]
        x, info = inverse.sample(prior, op, yc, SIGMA_Y, method=method, nfe=nfe, seeds=range(c, min(n, c + step)),
                                 **extra)
        xs.append(x.detach().to(torch.float64))
        infos.append(info)
    x = torch.cat(xs).reshape((y.shape[0], k) + tuple(op.in_shape))
    i0 = infos[0]
    return {"samples": x, "nfe": i0.nfe, "vjps": i0.vjps, "nfe_equivalents": i0.nfe_equivalents,
            "solver": i0.solver, "options": i0.options, "seconds_per_sample": sum(i.seconds for i in infos) / n,
            "wall": time.perf_counter() - t0}


def run_class(prior, name: str, opts: Dict[str, Any], labels: torch.Tensor, k: int, nfe: int) -> Dict[str, Any]:
    """Class guidance towards ``labels`` (K samples each) with the shipped LeNet on the x0 prediction."""
    from diffsolve.guidance import ClassifierGuidance, PrecisionWeighted

    lenet = default_metric().net
    lab = labels.repeat_interleave(k)
    n = lab.numel()
    from diffsolve.util import seeding

    noise = seeding.noise(list(range(n)), SHAPE)
    solver = opts.pop("solver", "dpm++2m")
    scale = float(opts.pop("scale", 1.0))
    if name == "unguided":
        model, per = prior, 1
    else:
        model = ClassifierGuidance(prior, lenet, lab, scale=scale)
        per = 3  # one evaluation and one VJP
        if name == "classifier+precision":
            model = PrecisionWeighted(model, **opts)
    t0 = time.perf_counter()
    x, si = ds.sample(model, noise, solver, nfe=nfe // per, return_info=True, grad=name != "unguided")
    sec = time.perf_counter() - t0
    vjps = si.nfe if name != "unguided" else 0
    return {"samples": x.detach().to(torch.float64).reshape((labels.numel(), k) + SHAPE), "nfe": si.nfe, "vjps": vjps,
            "nfe_equivalents": si.nfe + 2 * vjps, "solver": solver, "options": {"scale": scale, **opts},
            "seconds_per_sample": sec / n}


def cell_path(out: Path, task: str, spec: str) -> Path:
    safe = spec.replace(":", "__").replace(",", "_").replace("=", "-")
    return out / "cells" / task / f"{safe}.npz"


def claim(path: Path) -> bool:
    """Claim a cell for this process (a lock file holding its pid), so that several runs can share the cache;
    a lock whose process is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return False  # another run is on it
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its process is gone
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(path: Path) -> None:
    path.with_name(path.name + ".lock").unlink(missing_ok=True)


def save_cell(path: Path, res: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    meta = {k: v for k, v in res.items() if k != "samples"}
    np.savez(tmp, samples=res["samples"].numpy().astype(np.float32), meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def load_cell(path: Path) -> Dict[str, Any]:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        return {"samples": torch.from_numpy(f["samples"]).double(), **meta}


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
def score(task: str, res: Dict[str, Any], truth: torch.Tensor, labels: torch.Tensor, metric) -> Dict[str, float]:
    x = res["samples"].clamp(-1, 1) if task != "separation" else res["samples"]
    P, K = x.shape[:2]
    out: Dict[str, float] = {}
    if task == "class":
        flat = x.flatten(0, 1)
        read = torch.as_tensor(metric.features(flat.float())[1]).reshape(P, K)
        out["accuracy"] = float((read == labels[:, None]).double().mean())
        out["fd_lenet"] = metric.score(flat.float()).fd_lenet
        out["std"] = float(x.std(1).mean())
        return out
    if task == "separation":
        half = P
        t1, t2 = truth[:half], truth[half:2 * half]
        x1, x2 = split(x.flatten(0, 1))
        x1, x2 = x1.reshape(P, K, *SHAPE).clamp(-1, 1), x2.reshape(P, K, *SHAPE).clamp(-1, 1)
        e_same = iq.mse(x1.flatten(0, 1), t1.repeat_interleave(K, 0)) + iq.mse(x2.flatten(0, 1), t2.repeat_interleave(K, 0))
        e_swap = iq.mse(x1.flatten(0, 1), t2.repeat_interleave(K, 0)) + iq.mse(x2.flatten(0, 1), t1.repeat_interleave(K, 0))
        swap = (e_swap < e_same).reshape(P, K, 1, 1, 1)  # the better of the two assignments
        a, b = torch.where(swap, x2, x1), torch.where(swap, x1, x2)
        x = torch.cat([a, b], 0)  # [2P, K, ...] matched to [t1; t2]
        truth = torch.cat([t1, t2], 0)
        labels = torch.cat([labels[:half], labels[half:2 * half]])
        P = 2 * P
    flat, ref = x.flatten(0, 1), truth.repeat_interleave(K, 0)
    mean = x.mean(1)
    out["psnr"] = float(iq.psnr(flat, ref).mean())
    out["psnr_mean"] = float(iq.psnr(mean, truth).mean())
    out["ssim"] = float(iq.ssim(flat, ref).mean())
    out["lenet_dist"] = float(iq.lenet_feature_distance(flat, ref, metric).mean())
    out["fd_lenet"] = metric.score(flat.float()).fd_lenet
    read = torch.as_tensor(metric.features(flat.float())[1]).reshape(P, K)
    out["accuracy"] = float((read == labels[:, None]).double().mean())
    out["accuracy_mean"] = float((torch.as_tensor(metric.features(mean.float())[1]) == labels).double().mean())
    if K >= 2:
        out["std"] = float(x.std(1).mean())
        out["coverage"] = float(np.mean([iq.coverage(x[i], truth[i]) for i in range(P)]))
    if task != "separation":
        op, _, y = measure(task, truth)
        out["chi2"] = float(iq.chi2_per_dof(op, flat, y.repeat_interleave(K, 0), SIGMA_Y).mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# DPM-Encoder: round trip and class translation (CycleDiffusion) with the class-conditional model
# ---------------------------------------------------------------------------------------------------------------
def encoder_demo(truth: torch.Tensor, labels: torch.Tensor, metric, steps: int = 20, eta: float = 1.0,
                 t0: float = 0.6) -> Dict[str, Any]:
    """Encode held-out digits under ``mnist-cfg`` conditioned on their own label (DPM-Encoder, eta = 1, ``steps``
    points), decode (a) with the same label: the round trip, and (b) with label + 1 mod 10 from a partial encoding
    (``t0`` of the time range): a class translation that keeps the writing style.  Reports the round-trip error,
    the LeNet's reading of the translations and their distance to the source."""
    from diffsolve.grids import make_grid
    from diffsolve.inverse.methods.dpm_encoder import decode, encode, partial_grid
    from diffsolve.solvers.state import Noise
    from diffsolve.util import seeding

    den = ds.load("mnist-cfg")
    own = Conditioned(den, {"class_labels": labels})
    target = (labels + 1) % 10
    other = Conditioned(den, {"class_labels": target})
    n = truth.shape[0]
    rng = Noise(seeding.solver_generators(list(range(n))))
    grid = make_grid(den.process, steps, "logsnr", "t_min")
    z = encode(own, truth, grid, eta, rng)
    back = decode(own, z)
    zp = encode(own, truth, partial_grid(den, grid, t0), eta, Noise(seeding.solver_generators(list(range(n)))))
    moved = decode(other, zp).clamp(-1, 1)
    read = torch.as_tensor(metric.features(moved.float())[1])
    return {"round_trip_max_abs_error": float((back - truth).abs().max()),
            "translated_read_as_target": float((read == target).double().mean()),
            "translated_psnr_to_source": float(iq.psnr(moved, truth).mean()), "steps": steps, "eta": eta, "t0": t0,
            "nfe": 2 * steps, "images": moved}


# ---------------------------------------------------------------------------------------------------------------
# how much of the digit the box leaves: what a perfect posterior sampler could reach
# ---------------------------------------------------------------------------------------------------------------
def box_ceiling(truth: torch.Tensor, labels: torch.Tensor, metric) -> Dict[str, float]:
    """Reference points for box inpainting's LeNet accuracy, from the training split (4,500 images) and the same
    noisy measurements: the LeNet on the truths and on the measured images (box filled with background); the
    LeNet on nearest-neighbour completions (the training image closest on the visible pixels lends its centre);
    the per-sample accuracy of a 5-nearest-neighbour "posterior" (a sample = one of the 5 nearest training images);
    and an RBF support-vector classifier trained on the visible pixels of the training split (a proxy of the best
    possible classifier of the visible part: a posterior sampler's per-sample accuracy E[p(true digit | y)] cannot
    exceed the accuracy of the Bayes classifier of y)."""
    train, train_labels = load_dataset("mnist-train").double(), load_labels("mnist-train")
    op, _, y = measure("box", truth)
    out: Dict[str, float] = {}

    def acc(images: torch.Tensor) -> float:
        return float((torch.as_tensor(metric.features(images.float().clamp(-1, 1))[1]) == labels).double().mean())

    out["lenet_on_truths"] = acc(truth)
    out["lenet_on_measured"] = acc(op.adjoint(y).masked_fill(~op.mask[None], -1.0))
    d = torch.cdist(y, op(train))
    near = d.topk(5, largest=False).indices
    comp = op.adjoint(y).masked_fill(~op.mask[None], 0.0) + train[near[:, 0]] * (~op.mask[None]).double()
    out["lenet_on_nn_completion"] = acc(comp)
    out["knn5_per_sample"] = float((train_labels[near] == labels[:, None]).double().mean())
    try:
        from sklearn.svm import SVC
    except ImportError:
        return out
    svc = SVC(C=10.0).fit(op(train).numpy(), train_labels.numpy())
    out["svc_on_visible_pixels"] = float((torch.as_tensor(svc.predict(y.numpy())) == labels).double().mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# the document
# ---------------------------------------------------------------------------------------------------------------
COLUMNS = [("psnr", "PSNR", "{:.2f}"), ("psnr_mean", "PSNR mean", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
           ("lenet_dist", "LeNet dist", "{:.3g}"), ("fd_lenet", "FD-LeNet", "{:.1f}"), ("accuracy", "LeNet acc", "{:.2f}"),
           ("accuracy_mean", "acc (mean)", "{:.2f}"), ("std", "spread", "{:.3f}"), ("coverage", "cov 90%", "{:.2f}"),
           ("chi2", "chi2/dof", "{:.2f}")]


def write_doc(out: Path, doc: Path, model: str, k_default: int, truth, labels, metric) -> Path:
    from diffsolve.util.images import save_grid

    figs = doc / "inverse_images"
    figs.mkdir(parents=True, exist_ok=True)
    lines = ["# Image restoration on MNIST (`benchmarks/inverse_images.py`)", "",
             "Generated by `python benchmarks/inverse_images.py --out out/inverse_images --doc docs` from the "
             "cached cells; see the script's docstring for the protocol.", ""]
    for task, (desc, _) in TASKS.items():
        folder = out / "cells" / task
        cells = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if not cells:
            continue
        rows = []
        for p in cells:
            res = load_cell(p)
            spec = p.stem.replace("__", ":").replace("-", "=")
            rows.append((spec, res, score(task, res, truth, labels, metric)))
        rows.sort(key=lambda r: -r[2].get("accuracy", 0))
        K = rows[0][1]["samples"].shape[1]
        lines += [f"## {task}: {desc}", "",
                  f"{rows[0][1]['samples'].shape[0]} problems, K = {K} samples each (coverage of a calibrated "
                  f"posterior at this K: {0.9 * (K - 1) / (K + 1):.2f}), prior `{model}`.", ""]
        cols = [c for c in COLUMNS if any(c[0] in r[2] for r in rows)]
        lines.append("| method | " + " | ".join(c[1] for c in cols) + " | NFE | VJPs | NFE-eq | s/sample |")
        lines.append("|---" * (len(cols) + 5) + "|")
        for spec, res, sc in rows:
            vals = [c[2].format(sc[c[0]]) if c[0] in sc else "-" for c in cols]
            lines.append(f"| {spec} | " + " | ".join(vals) + f" | {res['nfe']} | {res['vjps']} | "
                         f"{res['nfe_equivalents']:g} | {res['seconds_per_sample']:.2f} |")
        lines.append("")
        # grid: truths (or targets), then the first sample of the best four methods, for 10 problems
        show = min(10, rows[0][1]["samples"].shape[0])
        panels = []
        if task == "separation":
            _, _, y = measure(task, truth)
            panels.append(y[:show] * 2)  # the mixtures, x1 + x2 + 2 n
        elif task != "class":
            op, _, y = measure(task, truth)
            vis, _ = iq_vis(op, y[:show])
            panels += [truth[:show], vis]
        for spec, res, _ in rows[:4]:
            s = res["samples"][:show, 0]
            panels += list(split(s)) if task == "separation" else [s]
        grid = torch.cat([p.clamp(-1, 1).float() for p in panels])
        path = save_grid(grid, figs / f"{task}.png", nrow=show, scale=2)
        lines += [f"![{task}](inverse_images/{path.name})", "",
                  "Rows: " + ("the mixtures, then for each of the best methods its two separated digits"
                              if task == "separation" else "the targets' samples" if task == "class"
                              else "truth, measurement, then the first sample") + " of: "
                  + ", ".join(f"`{r[0]}`" for r in rows[:4]) + ".", ""]
    ceiling = out / "box_ceiling.json"
    if ceiling.exists():
        c = json.loads(ceiling.read_text())
        lines += ["## How much of the digit the box leaves", "",
                  "Reference points for box inpainting's LeNet accuracy (`box_ceiling` in the script; the same 64 "
                  "truths and noisy measurements, the 4,500 training images):", "",
                  "| reference | LeNet accuracy |", "|---|---|"]
        names = {"lenet_on_truths": "the truths themselves", "lenet_on_measured": "the measured images (box filled "
                 "with background)", "lenet_on_nn_completion": "nearest-neighbour completion (training image "
                 "closest on the visible pixels)", "knn5_per_sample": "a 5-nearest-neighbour posterior, per sample",
                 "svc_on_visible_pixels": "an RBF SVM trained on the visible pixels (Bayes-classifier proxy)"}
        lines += [f"| {names.get(k, k)} | {v:.2f} |" for k, v in c.items()] + [""]
    enc = out / "encoder.npz"
    if enc.exists():
        e = load_cell(enc)
        from diffsolve.util.images import save_grid as _save

        _save(torch.cat([truth[:10], e["samples"][:10, 0]]).float(), figs / "encoder.png", nrow=10, scale=2)
        lines += ["## DPM-Encoder (CycleDiffusion) on `mnist-cfg`", "",
                  f"The first 10 truths encoded with `mnist-cfg` conditioned on their own label ({e['steps']} "
                  f"points, eta = {e['eta']:g}). Decoded with the same label, the code returns the image: largest "
                  f"error {e['round_trip_max_abs_error']:.1e}. Encoded to t0 = {e['t0']:g} of the time range and "
                  f"decoded with label + 1 mod 10, the LeNet reads the new label in "
                  f"{100 * e['translated_read_as_target']:.0f}% of the 64 translations (PSNR to the source "
                  f"{e['translated_psnr_to_source']:.1f} dB), {2 * e['steps']} NFE each.", "",
                  "![encoder](inverse_images/encoder.png)", "", "Rows: truth, translated to the next digit.", ""]
    path = doc / "inverse_images.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def iq_vis(op, y):
    from diffsolve.evaluation.restore import visualise_measurement

    vis = [visualise_measurement(op, y[i:i + 1])[0] for i in range(y.shape[0])]
    return torch.cat(vis), ""


# ---------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/inverse_images", help="cache of the cells (default: %(default)s)")
    ap.add_argument("--model", default="mnist-flow")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method specs NAME[:KEY=VALUE,...] (default: every method; for 'class': "
                         + ", ".join(CLASS_METHODS) + ")")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2, help="K posterior samples per truth (default: %(default)s)")
    ap.add_argument("--nfe", type=int, default=100, help="NFE-equivalents per sample (default: %(default)s)")
    ap.add_argument("--chunk", type=int, default=32, help="samples per call (default: %(default)s)")
    ap.add_argument("--dev", action="store_true", help="the option-choosing images (held-out, not the reported)")
    ap.add_argument("--doc", default=None, help="write DOC/inverse_images.md and its grids from the cache")
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 images, 20 NFE, two methods, two tasks")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ceiling", action="store_true", help="compute the box-inpainting reference points")
    ap.add_argument("--encoder", action="store_true", help="run the DPM-Encoder demonstration")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.nfe = 4, 20
        args.tasks = args.tasks if args.tasks != list(TASKS) else ["box", "sr4"]
        args.methods = args.methods or ["ddrm", "repaint"]
    out = Path(args.out) / ("dev" if args.dev else "report")
    idx = dev_indices(args.images) if args.dev else report_indices(args.images)
    data, all_labels = load_dataset("mnist-heldout"), load_labels("mnist-heldout")
    truth, labels = data[idx].to(torch.float64), all_labels[idx]
    metric = default_metric()
    if args.doc is not None:
        print(f"wrote {write_doc(out, Path(args.doc), args.model, args.samples, truth, labels, metric)}")
        return 0
    if args.ceiling:
        c = box_ceiling(truth, labels, metric)
        out.mkdir(parents=True, exist_ok=True)
        (out / "box_ceiling.json").write_text(json.dumps(c, indent=2) + "\n")
        print(json.dumps(c, indent=2))
        return 0
    if args.encoder:
        e = encoder_demo(truth, labels, metric)
        save_cell(out / "encoder.npz", {"samples": e.pop("images")[:, None], **e})
        print(json.dumps(e, indent=2))
        return 0
    prior = load_prior(args.model)
    from tqdm.auto import tqdm

    jobs = [(t, m) for t in args.tasks for m in (args.methods or default_methods(t))
            if (t == "class") == (parse_method(m)[0] in CLASS_METHODS)]
    for task, spec in tqdm(jobs, desc="cells", unit="cell"):
        path = cell_path(out, task, spec)
        if path.exists() or not claim(path):
            continue
        try:
            res = run_cell(prior, task, spec, truth, labels, args.samples, args.nfe, args.chunk)
        except (ValueError, TypeError) as e:  # a method that does not apply (e.g. needs another operator)
            release(path)
            print(f"{task} {spec}: skipped ({e})", file=sys.stderr)
            continue
        except BaseException:
            release(path)
            raise
        save_cell(path, res)
        release(path)
        sc = score(task, res, truth, labels, metric)
        print(f"{task:>10} {spec:<28} " + " ".join(f"{k}={v:.3g}" for k, v in sc.items())
              + f"  nfe-eq={res['nfe_equivalents']:g} {res['wall']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
