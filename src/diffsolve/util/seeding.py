"""One per-sample seeding convention for every entry point.

A sample is named by an integer seed k.  Its starting noise comes from ``torch.Generator().manual_seed(2k)``
and the random stream of a stochastic solver from ``manual_seed(2k + 1)``, whatever the batch it is drawn in:
seed 3 is the same sample in ``ds.sample(seeds=)``, ``ds.tune``, ``diffsolve sample`` and the bench.  The
command line's ``--seed s`` with ``n`` samples names the sample seeds ``(s << 31) + i``, i < n.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

Tensor = torch.Tensor
NOISE, SOLVER = 0, 1


def stream(seed: int, which: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """The generator of stream ``which`` (NOISE or SOLVER) of sample seed ``seed``."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed}")
    return torch.Generator(device=device).manual_seed(2 * seed + which)


def noise(seeds: Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float64,
          device: Union[str, torch.device] = "cpu") -> Tensor:
    """Standard normal starting noise [len(seeds), *shape], sample i from seed ``seeds[i]``'s noise stream."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        return torch.zeros((0,) + tuple(shape), dtype=dtype, device=device)
    return torch.stack([torch.randn(tuple(shape), generator=stream(s, NOISE), dtype=dtype) for s in seeds]).to(device)


def solver_generators(seeds: Sequence[int], device: Union[str, torch.device] = "cpu") -> List[torch.Generator]:
    """The solver streams of ``seeds`` (one generator per sample)."""
    return [stream(s, SOLVER, device) for s in seeds]


def run_seeds(seed: int, n: int, start: Optional[int] = None) -> List[int]:
    """The sample seeds of a command-line run with ``--seed seed`` and ``n`` samples."""
    base = (int(seed) << 31) if start is None else int(start)
    return [base + i for i in range(n)]
