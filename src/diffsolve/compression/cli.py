"""``diffsolve quantize``: quantise a model, write a packed checkpoint, print the report (``--report``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .api import quantize
from .formats import FORMATS
from .quantize import BACKENDS, GRANULARITIES, Calibration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsolve quantize", description="Timestep-aware post-training quantisation "
                                "of a frozen model; a packed checkpoint and a report against full precision.")
    p.add_argument("--model", default="mnist", help="checkpoint folder or built-in name (default: %(default)s)")
    p.add_argument("--weights", default="int8", help=f"weight format: {', '.join(FORMATS)} (default: %(default)s)")
    p.add_argument("--activations", default="none", help="none | int8 | fp8_e4m3 | fp8_e5m2 (default: %(default)s)")
    p.add_argument("--granularity", default="channel", choices=GRANULARITIES)
    p.add_argument("--backend", default="fake", help=f"{' | '.join(BACKENDS)} (default: %(default)s)")
    p.add_argument("--rounding", default="nearest", help="nearest | learned (AdaRound block reconstruction)")
    p.add_argument("--rounding-iters", type=int, default=300, help="learned rounding: steps per block")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration trajectories (default: %(default)s)")
    p.add_argument("--calib-nfe", type=int, default=20, help="NFE of each calibration trajectory")
    p.add_argument("--calib-spacings", nargs="+", default=["logsnr", "uniform"], help="grids of the calibration runs")
    p.add_argument("--calib-solver", default="dpm++2m")
    p.add_argument("--bins", type=int, default=16, help="time bins of the activation ranges (default: %(default)s)")
    p.add_argument("--out", default=None, help="write a packed checkpoint to this folder (backend fake)")
    p.add_argument("--report", action="store_true", help="compare with the full-precision model (same noise)")
    p.add_argument("--nfe", type=int, nargs="+", default=[10, 20], help="NFE of the report's samples")
    p.add_argument("--images", type=int, default=256, help="samples per NFE in the report (seeds 0..n-1)")
    p.add_argument("--solver", default="dpm++2m", help="solver of the report's samples (default: %(default)s)")
    p.add_argument("--spacing", default="logsnr", help="grid of the report's samples (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    return p


def quantize_from_args(args: argparse.Namespace, den: Any) -> Any:
    calib = Calibration(samples=args.calib_samples, nfe=args.calib_nfe, solver=args.calib_solver,
                        spacings=tuple(args.calib_spacings), bins=args.bins)
    acts = None if str(args.activations).lower() == "none" else args.activations
    return quantize(den, weights=args.weights, activations=acts, granularity=args.granularity, calibration=calib,
                    backend=args.backend, rounding=args.rounding,
                    rounding_options={"iters": args.rounding_iters})


def report_lines(rep: Dict[str, Any]) -> List[str]:
    lines = [f"model {rep['name']}"]
    for k, v in rep["samples"].items():
        lines.append(f"  NFE {k}: sample RMSE {v['rmse']:.4f}  PSNR {v['psnr']:.1f} dB (vs float32, same noise)")
    if rep.get("fd"):
        f = rep["fd"]
        lines.append(f"  FD-LeNet at NFE {f['nfe']}: {f['fd']:.2f} (float32 {f['fd_float']:.2f}, delta {f['delta']:+.2f})")
    if rep.get("bytes"):
        b = rep["bytes"]
        lines.append(f"  packed file {b['packed']:,} bytes = {b['ratio']:.3f} x the float32 file ({b['float']:,})")
    if rep.get("ms_per_nfe") is not None:
        lines.append(f"  {rep['ms_per_nfe']:.1f} ms per NFE at batch 64 (float32: {rep.get('ms_float', float('nan')):.1f})")
    if rep.get("per_t"):
        lines.append("  network-output relative error by t: " + ", ".join(
            f"{r['t']:.0f}: {r['rel_err']:.4f}" for r in rep["per_t"]))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from ..hub import load
        from ..hub.checkpoint import WEIGHTS, resolve
        den = load(args.model)
        t0 = time.time()
        q = quantize_from_args(args, den)
        print(f"quantised in {time.time() - t0:.0f} s: weights={args.weights} activations={args.activations} "
              f"granularity={args.granularity} backend={args.backend} rounding={args.rounding}", file=sys.stderr)
        packed_path = None
        if args.out:
            if args.backend != "fake":
                raise ValueError("--out writes a packed checkpoint of backend 'fake' only")
            from .packed import save_packed
            packed_path = save_packed(q, args.out)
            print(f"packed checkpoint: {packed_path}", file=sys.stderr)
        if args.report:
            from ..evaluation.metrics import default_metric
            from .report import compare, ms_per_nfe, sample_set
            refs = {k: sample_set(den, args.images, k, args.solver, args.spacing) for k in args.nfe}
            metric = default_metric() if tuple(den.sample_shape or ()) == (1, 28, 28) else None
            rep = compare(f"{args.model} {args.weights}/{args.activations}/{args.granularity}/{args.backend}/"
                          f"{args.rounding}", q, den, refs, args.nfe, args.solver, args.spacing, metric,
                          per_t=args.backend == "fake").as_dict()
            rep["ms_float"] = ms_per_nfe(den)
            if packed_path is not None:
                from .packed import packed_bytes
                fbytes = (resolve(args.model) / WEIGHTS).stat().st_size
                pb = packed_bytes(packed_path)
                rep["bytes"] = {"packed": pb, "float": fbytes, "ratio": pb / fbytes}
            rep["machine"] = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
            print("\n".join(report_lines(rep)))
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
