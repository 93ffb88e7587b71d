"""Quantisation of the shipped MNIST model: same-noise RMSE / PSNR against float32 at NFE 10 and 20, FD-LeNet,
packed bytes, ms per NFE per backend, per-t network error; and calibration on one grid, sampling on another.

    python benchmarks/compression.py --variants w8a8 w4-learned ... --out out/compression   # one JSON per variant

Samples: seeds 0..255, dpm++2m on the log-SNR grid (the solver of the research measurements), 1 thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch

import diffsolve as ds
from diffsolve.compression import Calibration, quantize, save_packed
from diffsolve.compression.packed import packed_bytes
from diffsolve.compression.report import compare, ms_per_nfe, rmse_psnr, sample_set
from diffsolve.evaluation.metrics import default_metric
from diffsolve.hub.checkpoint import WEIGHTS, resolve

VARIANTS: Dict[str, Dict[str, Any]] = {
    "w8": dict(weights="int8"),
    "w8-tensor": dict(weights="int8", granularity="tensor"),
    "w8a8": dict(weights="int8", activations="int8"),
    "w8a8-fp8": dict(weights="fp8_e4m3", activations="fp8_e4m3"),
    "w8-a8fp8": dict(weights="int8", activations="fp8_e4m3"),
    "w8-e4m3": dict(weights="fp8_e4m3"),
    "w8-e5m2": dict(weights="fp8_e5m2"),
    "w4": dict(weights="int4"),
    "w4-learned": dict(weights="int4", rounding="learned"),
    "fp4": dict(weights="fp4_e2m1"),
    "fp4-learned": dict(weights="fp4_e2m1", rounding="learned"),
    "quanto-w8a8": dict(weights="int8", activations="int8", backend="quanto"),
    "quanto-w8": dict(weights="int8", backend="quanto"),
    "torchao-w8a8": dict(weights="int8", activations="int8", backend="torchao"),
}


def references(den, n: int, nfes, solver, spacing, out: Path) -> Dict[int, torch.Tensor]:
    """The float32 model's samples (seeds 0..n-1) at each NFE, cached in ``out``."""
    from safetensors.torch import load_file, save_file

    path = out / f"refs_{n}_{solver}_{spacing}_{'-'.join(map(str, nfes))}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return {k: t[str(k)] for k in nfes}
    refs = {k: sample_set(den, n, k, solver, spacing) for k in nfes}
    save_file({str(k): v.contiguous() for k, v in refs.items()}, str(path) + ".tmp")
    Path(str(path) + ".tmp").rename(path)
    return refs


def run_variant(name: str, den, metric, nfes, solver, spacing, out: Path, iters: int, n: int,
                samples: int = 256, calib_samples: int = 32) -> Dict[str, Any]:
    kw = dict(VARIANTS[name])
    t0, c0 = time.time(), time.process_time()
    if kw.get("rounding") == "learned":
        kw["rounding_options"] = {"iters": iters, "samples": samples}
    q = quantize(den, calibration=Calibration(samples=calib_samples), **kw)
    spent = {"quantize_wall_s": time.time() - t0, "quantize_cpu_s": time.process_time() - c0}
    refs = references(den, n, nfes, solver, spacing, out)
    rep = compare(name, q, den, refs, nfes, solver, spacing, metric, per_t=kw.get("backend", "fake") == "fake")
    d = rep.as_dict()
    d.update(spent, settings={k: v for k, v in kw.items() if k != "rounding_options"})
    if kw.get("backend", "fake") == "fake":
        folder = save_packed(q, out / "packed" / name)
        fb = (resolve("mnist") / WEIGHTS).stat().st_size
        d["bytes"] = {"packed": packed_bytes(folder), "float": fb, "ratio": packed_bytes(folder) / fb}
    return d


def cross_grid(den, n: int, out: Path) -> Dict[str, Any]:
    """W8A8 calibrated on grid A (dpm++2m, log-SNR, NFE 10) or on grid B (uniform, NFE 20); both sampled on B."""
    ref = sample_set(den, n, 20, "dpm++2m", "uniform")
    res = {}
    for tag, cal in (("A", Calibration(spacings=("logsnr",), nfe=10)), ("B", Calibration(spacings=("uniform",), nfe=20))):
        q = quantize(den, weights="int8", activations="int8", calibration=cal)
        res[tag] = rmse_psnr(sample_set(q, n, 20, "dpm++2m", "uniform"), ref)
    res["degradation"] = res["A"]["rmse"] / res["B"]["rmse"] - 1
    return res


def table(out: Path) -> str:
    """Markdown tables of the JSONs in ``out``."""
    rows = ["| variant | weights | activations | granularity | rounding | backend | RMSE NFE 10 | PSNR NFE 10 | "
            "RMSE NFE 20 | FD-LeNet (float) | ΔFD | packed bytes (× float32) | ms/NFE (batch 64) |",
            "|" + "---|" * 13]
    for name in VARIANTS:
        f = out / f"{name}.json"
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        st = d.get("settings", {})
        s10, s20 = d["samples"].get("10", {}), d["samples"].get("20", {})
        fd = d.get("fd") or {}
        b = d.get("bytes")
        rows.append(f"| {name} | {st.get('weights')} | {st.get('activations') or '-'} | "
                    f"{st.get('granularity', 'channel')} | {st.get('rounding', 'nearest')} | "
                    f"{st.get('backend', 'fake')} | {s10.get('rmse', float('nan')):.4f} | "
                    f"{s10.get('psnr', float('nan')):.1f} | {s20.get('rmse', float('nan')):.4f} | "
                    f"{fd.get('fd', float('nan')):.2f} ({fd.get('fd_float', float('nan')):.2f}) | "
                    f"{fd.get('delta', float('nan')):+.2f} | "
                    + (f"{b['packed']:,} ({b['ratio']:.3f})" if b else "-")
                    + f" | {d.get('ms_per_nfe', float('nan')):.0f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=[], help=f"any of {list(VARIANTS)} and 'cross-grid', 'timing'")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--solver", default="dpm++2m")
    ap.add_argument("--spacing", default="logsnr")
    ap.add_argument("--iters", type=int, default=300, help="learned rounding: steps per block")
    ap.add_argument("--rounding-samples", type=int, default=256, help="learned rounding: calibration inputs used")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories")
    ap.add_argument("--out", default="out/compression")
    ap.add_argument("--table", action="store_true", help="print the Markdown table of the JSONs in --out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(table(out))
        return 0
    den = ds.load("mnist")
    metric = default_metric()
    for name in args.variants:
        t0 = time.time()
        if name == "cross-grid":
            res = cross_grid(den, args.images, out)
        elif name == "timing":
            res = {"float32": ms_per_nfe(den)}
            for v in ("w8a8", "quanto-w8", "quanto-w8a8", "torchao-w8a8"):
                kw = VARIANTS[v]
                res[v] = ms_per_nfe(quantize(den, calibration=Calibration(samples=4, nfe=10), **kw))
            res["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, shared"
        else:
            res = run_variant(name, den, metric, args.nfe, args.solver, args.spacing, out, args.iters, args.images,
                              args.rounding_samples, args.calib_samples)
        res["wall_s"] = time.time() - t0
        (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(name, json.dumps({k: v for k, v in res.items() if k != "per_t"}), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
