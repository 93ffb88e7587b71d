"""Merged vs adapter outputs of the LoRA adapter written by benchmarks/lora_reuse.py, in float32 and float64.

    python benchmarks/lora_float64.py out/lora_reuse/adapter.safetensors
"""
import copy
import json
import sys

import torch

import diffsolve as ds
from diffsolve.compression import load_adapter, merge_lora
from diffsolve.util import seeding

torch.set_num_threads(1)
den = ds.load("mnist")
res = {}
for dtype in (torch.float32, torch.float64):
    net = load_adapter(copy.deepcopy(den.net).to(dtype), sys.argv[1]).to(dtype)
    x = seeding.noise(range(16), (1, 28, 28)).to(dtype)
    t = torch.linspace(1, 999, 16, dtype=dtype)
    with torch.no_grad():
        a = net(x, t)
        m = merge_lora(copy.deepcopy(net))(x, t)
    res[str(dtype)] = {"max_abs": float((m - a).abs().max()), "max_abs_output": float(a.abs().max())}
print(json.dumps(res, indent=2))
