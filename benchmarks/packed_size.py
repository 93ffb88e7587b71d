"""Packed checkpoint sizes of the shipped MNIST model against its float32 file, and the bit-exact round trip.

    python benchmarks/packed_size.py --out out/packed
"""
import argparse
import json

import torch

import diffsolve as ds
from diffsolve.compression import load_packed, quantize, save_packed
from diffsolve.compression.packed import packed_bytes
from diffsolve.hub.checkpoint import WEIGHTS, resolve
from diffsolve.util import seeding

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="out/packed")
args = ap.parse_args()
torch.set_num_threads(1)
den = ds.load("mnist")
fb = (resolve("mnist") / WEIGHTS).stat().st_size
res = {"float32_bytes": fb}
z = seeding.noise(range(4), (1, 28, 28))
for w in ("int8", "int4", "fp8_e4m3", "fp4_e2m1"):
    q = quantize(den, weights=w)
    folder = save_packed(q, f"{args.out}/{w}")
    same = bool(torch.equal(ds.sample(q, z, nfe=5), ds.sample(load_packed(folder), z, nfe=5)))
    res[w] = {"bytes": packed_bytes(folder), "ratio": packed_bytes(folder) / fb, "round_trip_bit_exact": same}
print(json.dumps(res, indent=2))
