"""``diffsolve distill``: a few-step student from a frozen teacher (resumable; run it again to continue)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..util.options import parse_options
from .api import METHODS, distill


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffsolve distill", description="Distil a frozen teacher into a few-step "
                                "student; running the same command again resumes from the latest checkpoint.")
    p.add_argument("--teacher", default="mnist", help="checkpoint folder or built-in name (default: %(default)s)")
    p.add_argument("--method", default="reflow", choices=sorted(METHODS))
    p.add_argument("--nfe", type=int, default=2, help="the student's NFE (default: %(default)s)")
    p.add_argument("--budget-minutes", type=float, default=None, help="cap on the job's process CPU minutes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/distill", help="output folder (default: %(default)s)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. pairs=1024, p_grid=0.75, lora=8)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        path = distill(args.teacher, method=args.method, nfe=args.nfe, budget_minutes=args.budget_minutes,
                       out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       checkpoint_every=args.checkpoint_every, progress=args.progress, threads=args.threads,
                       **parse_options(args.option))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"student written to {path}; load it with ds.load({str(path)!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
