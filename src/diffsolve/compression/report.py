"""The quantisation report: how far a quantised model is from its full-precision self, and what it costs.

For a quantised model against the full-precision one, from the same noise:
  * per-t error of the network output: relative L2 error ||f_q - f|| / ||f|| on the full-precision model's own
    trajectory inputs (held-out seeds), per time bin;
  * samples: RMSE and PSNR (peak-to-peak 2 for data in [-1, 1]) against the full-precision samples at each NFE
    (the primary quality figure; FID-like scores barely move at 8 bit);
  * FD-LeNet of both sample sets (same noise) and its change;
  * bytes of the packed file against the float32 checkpoint;
  * milliseconds per network evaluation (batch ``time_batch``, median of ``time_repeats``) of each backend.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..adapters.denoiser import Model, base_model
from ..sampling import sample
from ..util import seeding
from .quantize import Calibration, record_inputs

Tensor = torch.Tensor


@dataclass
class QuantReport:
    """One quantised model against the full-precision one (see the module doc)."""

    name: str
    per_t: List[Dict[str, float]] = field(default_factory=list)
    samples: Dict[int, Dict[str, float]] = field(default_factory=dict)
    fd: Optional[Dict[str, float]] = None
    bytes: Optional[Dict[str, float]] = None
    ms_per_nfe: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "per_t": self.per_t, "samples": {str(k): v for k, v in self.samples.items()},
                "fd": self.fd, "bytes": self.bytes, "ms_per_nfe": self.ms_per_nfe}


def rmse_psnr(x: Tensor, ref: Tensor) -> Dict[str, float]:
    r = float((x.double() - ref.double()).square().mean().sqrt())
    return {"rmse": r, "psnr": 20 * math.log10(2.0 / r) if r > 0 else float("inf")}


@torch.no_grad()
def per_t_error(model: Model, reference: Model, samples: int = 8, nfe: int = 20, seed: int = 2_000_000
                ) -> List[Dict[str, float]]:
    """Relative L2 error of the network output at each call of ``reference``'s own trajectories (uniform grid)."""
    qnet = base_model(model).net  # type: ignore[attr-defined]
    fnet = base_model(reference).net  # type: ignore[attr-defined]
    data = record_inputs(reference, Calibration(samples=samples, nfe=nfe, spacings=("uniform",), seed=seed))
    out = []
    for tv in torch.unique(data.t).flip(0):
        m = data.t == tv
        a, b = fnet(data.x[m], data.t[m]), qnet(data.x[m], data.t[m])
        out.append({"t": float(tv), "rel_err": float((b - a).norm() / a.norm().clamp_min(1e-12))})
    return out


def ms_per_nfe(model: Model, batch: int = 64, repeats: int = 5, shape: Optional[Sequence[int]] = None) -> float:
    """Median milliseconds of one network call at batch ``batch`` (after one warm-up call)."""
    den = base_model(model)
    shape = tuple(shape or den.sample_shape)  # type: ignore[attr-defined]
    x = torch.randn(batch, *shape)
    t = torch.full((batch,), 500.0)
    net = den.net  # type: ignore[attr-defined]
    times = []
    with torch.no_grad():
        net(x, t)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, t)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def sample_set(model: Model, n: int, nfe: int, solver: Optional[str], spacing: Optional[str], batch: int = 128,
               shape: Optional[Sequence[int]] = None) -> Tensor:
    """Samples from seeds 0 .. n-1 at ``nfe`` (float32)."""
    shape = tuple(shape or getattr(model, "sample_shape"))
    out = []
    kw: Dict[str, Any] = {}
    if solver:
        kw["solver"] = solver
    if spacing:
        kw["spacing"] = spacing
    with torch.no_grad():
        for i in range(0, n, batch):
            z = seeding.noise(range(i, min(n, i + batch)), shape)
            out.append(sample(model, z, nfe=nfe, **kw).float())
    return torch.cat(out)


def compare(name: str, model: Model, reference: Model, references: Dict[int, Tensor], nfes: Sequence[int],
            solver: Optional[str], spacing: Optional[str], metric: Any = None, per_t: bool = True,
            timing: bool = True) -> QuantReport:
    """The report of ``model`` against ``reference`` whose samples at each NFE are ``references`` (seeds 0..n-1)."""
    rep = QuantReport(name)
    n = next(iter(references.values())).shape[0]
    for k in nfes:
        x = sample_set(model, n, k, solver, spacing)
        rep.samples[k] = rmse_psnr(x, references[k])
        if metric is not None and k == nfes[0]:
            fq, ff = metric.score(x).fd_lenet, metric.score(references[k]).fd_lenet
            rep.fd = {"nfe": k, "fd": fq, "fd_float": ff, "delta": fq - ff}
    if per_t:
        rep.per_t = per_t_error(model, reference)
    if timing:
        rep.ms_per_nfe = ms_per_nfe(model)
    return rep
