"""diffsolve bench: our solvers against diffusers and k-diffusion, side by side, on the same frozen model.

    import diffsolve as ds
    res = ds.bench(out="bench-out", quick=True)      # Python
    res = ds.bench(BenchConfig(quick=True), out="bench-out")   # the same, from a typed config
    python -m diffsolve.bench --out docs             # command line (docs/benchmarks.md)

Modules: ``peers`` (diffusers / k-diffusion drivers), ``harness`` (one run = one configuration, NFE
counting, endpoint detection, exact targets, parity, overhead), ``report`` (markdown, CSV, JSON, PNG).
The peers are an optional extra (``pip install 'diffsolve[bench]'`` and ``pip install --no-deps k-diffusion``).
"""
import sys
import types

from .api import BenchConfig, BenchResult, bench, build_parser, main

__all__ = ["bench", "main", "build_parser", "BenchConfig", "BenchResult"]


class _CallableModule(types.ModuleType):
    """``ds.bench(...)`` calls ``bench`` whether or not the ``diffsolve.bench`` package was imported first."""

    def __call__(self, *args, **kwargs):
        return bench(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
