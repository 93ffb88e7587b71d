"""Estimating DPM-Solver-v3's empirical model statistics (Zheng et al. 2023, arXiv:2310.13268, sec. 3.3).

The paper's estimators on K noised data points per lambda, in the 'VE view' x~ = x/alpha where they do not
depend on the process (E = e^{-lam} eps, f = E - l x~, dx~/dlam = -E):

    l      = E[diag(sigma * d eps/dx)]            (Hutchinson: v * JVP(v), v Rademacher)
    f'     = E' + l E - l' x~,  E' = dE/dlam along the ODE   (one JVP in (x, t) per point)
    s, b   = least squares of f' on f per dimension: s = Cov(f', f) / (Var f + ridge), b = E f' - s E f

The ridge (``s_ridge`` times the mean variance at that lambda) keeps s finite where Var f vanishes.  Data come
from the caller or are drawn from the model itself with ``ds.sample``; chunks of lambdas are saved as they finish
so a killed run resumes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..adapters import identity
from ..adapters.denoiser import Model
from ..adapters.derivatives import jvp
from ..sampling import sample
from ..solvers.dpm_v3_stats import Statistics
from ..util.files import save_safetensors

Tensor = torch.Tensor
DT = torch.float64

# ----------------------------------------------------------------------------------------
_MOMENTS = ("E", "X", "Ep", "EE", "XX", "EX", "EpE", "EpX", "ld")


def compute_statistics(den: Model, data: Optional[Union[Tensor, Callable[[int, torch.Generator], Tensor]]] = None,
                       *, K: int = 1024, n_lambda: int = 121, lam_range: Optional[Tuple[float, float]] = None,
                       shape: Optional[Sequence[int]] = None, batch_size: int = 256, seed: int = 0,
                       path: Optional[Union[str, os.PathLike]] = None, resume: bool = True, chunk: int = 8,
                       progress: bool = True, model_kwargs: Optional[Dict[str, Any]] = None,
                       s_ridge: float = 1e-4, data_solver: str = "dpm++3m", data_nfe: int = 50,
                       device: Optional[Union[str, torch.device]] = None,
                       on_chunk: Optional[Callable[[int, int], None]] = None) -> Statistics:
    """Empirical model statistics of ``den`` from K noised data points per lambda (forward-mode JVPs).

    Args:
        data: clean samples [N >= K, *shape], a callable ``(n, generator) -> samples``, or ``None`` to draw
            them from the model itself (``data_solver`` at ``data_nfe``; needs ``shape``).
        K: data points per lambda.
        n_lambda: points of the (uniform) log-SNR grid over ``lam_range`` (default: the process's whole range
            [lambda(t_max), lambda(t_min)]).
        batch_size: rows per network call (each row costs two JVPs).
        path: where the statistics are saved (.safetensors).  Partial results go to ``path + '.partial/'``, one
            file per chunk of ``chunk`` lambdas, so a killed run resumes where it stopped (``resume=True``);
            the partial directory is removed when the run completes.
        model_kwargs: per-sample conditioning tensors [N, ...] (sliced with the data), or fixed values.
        s_ridge: ridge of the s fit relative to the mean Var f at that lambda.
        on_chunk: called as ``on_chunk(done, total)`` after each chunk is saved (progress hooks, tests).
    """
    proc = den.process
    if lam_range is None:
        lam_range = proc.lam_range
    lo, hi = float(lam_range[0]), float(lam_range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"lam_range must be finite and increasing, got {lam_range}")
    if n_lambda < 3:
        raise ValueError("n_lambda must be >= 3")
    lam = torch.linspace(lo, hi, n_lambda, dtype=DT)
    gen = torch.Generator().manual_seed(int(seed))
    x0 = _get_data(den, data, K, shape, gen, data_solver, data_nfe, model_kwargs, device)
    K = x0.shape[0]
    shape = tuple(x0.shape[1:])
    dev = x0.device
    mk_all = dict(model_kwargs or {})
    probe_l = [float(np.clip(0.0, lo, hi)), lo + 0.8 * (hi - lo)]
    model_meta, probe = identity.record(den, shape, probe_l, seed, device=dev)
    config = {"K": K, "lam_range": [lo, hi], "n_lambda": n_lambda, "seed": int(seed), "shape": list(shape),
              "model": model_meta, "data_hash": hashlib.sha256(x0.to(torch.float32).cpu().numpy().tobytes()).hexdigest()[:16]}
    part_dir = None if path is None else os.fspath(path) + ".partial"
    if part_dir is not None:
        os.makedirs(part_dir, exist_ok=True)
    chunks = [list(range(i, min(i + chunk, n_lambda))) for i in range(0, n_lambda, chunk)]
    moments: Dict[str, Tensor] = {k: torch.zeros((n_lambda,) + shape, dtype=DT) for k in _MOMENTS}
    todo = []
    for ci, idx in enumerate(chunks):
        got = _load_chunk(part_dir, ci, config) if (part_dir and resume) else None
        if got is None:
            todo.append(ci)
        else:
            for k in _MOMENTS:
                moments[k][idx] = got[k]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(len(chunks[ci]) for ci in todo) * K, desc="dpm-v3 statistics", unit="pt",
                   leave=False)
    t0 = time.time()
    try:
        with warnings.catch_warnings():  # torch's first forward-AD use warns about its own jit.script
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
            for ci in todo:
                idx = chunks[ci]
                res = _chunk_moments(den, x0, lam[idx], idx, seed, batch_size, mk_all, bar)
                for k in _MOMENTS:
                    moments[k][idx] = res[k]
                if part_dir is not None:
                    _save_chunk(part_dir, ci, config, res)
                if on_chunk is not None:
                    on_chunk(ci + 1, len(chunks))
    finally:
        if bar is not None:
            bar.close()
    l, s, b = finalize(lam, moments, K, s_ridge)
    meta = {"kind": "empirical", "K": K, "lam_range": [lo, hi], "n_lambda": n_lambda, "seed": int(seed),
            "shape": list(shape), "model": model_meta, "data_hash": config["data_hash"], "s_ridge": s_ridge,
            "seconds": round(time.time() - t0, 3), "estimator": "hutchinson-jvp"}
    st = Statistics(lam, l, s, b, meta, probe)
    if path is not None:
        st.save(path)
        if part_dir is not None:
            for ci in range(len(chunks)):
                f = os.path.join(part_dir, f"chunk_{ci:05d}.safetensors")
                if os.path.exists(f):
                    os.remove(f)
            try:
                os.rmdir(part_dir)
            except OSError:
                pass
    return st


def finalize(lam: Tensor, m: Dict[str, Tensor], K: int, s_ridge: float = 1e-4) -> Tuple[Tensor, Tensor, Tensor]:
    """(l, s, b) from the accumulated per-lambda sums (see the module doc for the formulas)."""
    mean = {k: m[k] / K for k in ("E", "X", "Ep", "ld")}
    cov = lambda ab, a, b: m[ab] / K - mean[a] * mean[b]
    vE, vX, cEX = cov("EE", "E", "E"), cov("XX", "X", "X"), cov("EX", "E", "X")
    cEpE, cEpX = cov("EpE", "Ep", "E"), cov("EpX", "Ep", "X")
    l = mean["ld"]
    dl = _derivative(l, lam)
    var_f = (vE - 2 * l * cEX + l * l * vX).clamp_min(0)
    cov_ff = cEpE - l * cEpX + l * vE - l * l * cEX - dl * cEX + l * dl * vX
    red = tuple(range(1, var_f.dim()))
    scale = var_f.mean(dim=red, keepdim=True) if red else var_f
    mean_f = mean["E"] - l * mean["X"]
    sq = (mean_f * mean_f).mean(dim=red, keepdim=True) if red else mean_f * mean_f
    ridge = s_ridge * scale + 1e-10 * (scale + sq) + 1e-300  # + a floor: Var f at rounding level counts as 0
    s = cov_ff / (var_f + ridge)
    mean_fp = mean["Ep"] + l * mean["E"] - dl * mean["X"]
    b = mean_fp - s * mean_f
    return l, s, b


def _derivative(y: Tensor, x: Tensor) -> Tensor:
    """dy/dx along dim 0: 4th-order finite differences on a uniform grid (2nd order otherwise / n < 5)."""
    n = x.numel()
    dx = x[1:] - x[:-1]
    if n < 5 or float((dx.max() - dx.min()).abs()) > 1e-9 * float(dx.abs().max()):
        return torch.gradient(y, spacing=(x,), dim=0, edge_order=2)[0]
    h = float(dx.mean())
    d = torch.empty_like(y)
    d[2:-2] = (y[:-4] - 8 * y[1:-3] + 8 * y[3:-1] - y[4:]) / (12 * h)
    d[0] = (-25 * y[0] + 48 * y[1] - 36 * y[2] + 16 * y[3] - 3 * y[4]) / (12 * h)
    d[1] = (-3 * y[0] - 10 * y[1] + 18 * y[2] - 6 * y[3] + y[4]) / (12 * h)
    d[-1] = (25 * y[-1] - 48 * y[-2] + 36 * y[-3] - 16 * y[-4] + 3 * y[-5]) / (12 * h)
    d[-2] = (3 * y[-1] + 10 * y[-2] - 18 * y[-3] + 6 * y[-4] - y[-5]) / (12 * h)
    return d


def _get_data(den, data, K, shape, gen, data_solver, data_nfe, model_kwargs, device) -> Tensor:
    if data is None:
        if shape is None:
            raise ValueError("compute_statistics without data needs shape= (samples are drawn from the model)")
        z = torch.randn((K,) + tuple(shape), generator=gen, dtype=DT)
        if device is not None:
            z = z.to(device)
        return sample(den, z, data_solver, nfe=data_nfe, model_kwargs=model_kwargs).detach()
    if callable(data) and not isinstance(data, Tensor):
        x = data(K, gen)
    else:
        x = torch.as_tensor(data)
        if x.shape[0] < K:
            raise ValueError(f"compute_statistics needs K={K} data points, got {x.shape[0]} (pass K={x.shape[0]})")
        x = x[:K]
    x = x.to(DT)
    if device is not None:
        x = x.to(device)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"data shape {tuple(x.shape[1:])} != shape {tuple(shape)}")
    return x


def _rows_kwargs(mk: Dict[str, Any], rows: Tensor, K: int) -> Dict[str, Any]:
    out = {}
    for k, v in mk.items():
        out[k] = v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == K else v
    return out


def _chunk_moments(den: Model, x0: Tensor, lams: Tensor, idx: List[int], seed: int, batch_size: int,
                   mk: Dict[str, Any], bar) -> Dict[str, Tensor]:
    """Sums over the K data points of the moments at each lambda of the chunk."""
    proc = den.process
    K, shape = x0.shape[0], tuple(x0.shape[1:])
    dev = x0.device
    out = {k: torch.zeros((len(idx),) + shape, dtype=DT) for k in _MOMENTS}
    # rows = (lambda j, data point k).  Common random numbers: the same noise and probe vector for a data point at
    # every lambda, so the estimates are smooth in lambda (l' by finite differences stays accurate) and any
    # chunk can be recomputed alone (resume).
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919)
    eps_all = torch.randn((K,) + shape, generator=g, dtype=DT).to(dev)
    v_all = (torch.randint(0, 2, (K,) + shape, generator=g).to(DT) * 2 - 1).to(dev)
    t = proc.t_of_lam(lams)
    a, s = proc.alpha(t), proc.sigma(t)
    dlam_dt = proc.d_alpha(t) / a - proc.d_sigma(t) / s
    dt_dlam = 1.0 / dlam_dt
    dloga_dlam = (proc.d_alpha(t) / a) * dt_dlam
    n_rows = len(idx) * K
    fn = lambda xx, tt, kw: den.evaluate(xx, tt, kw).eps
    bshape = lambda v: v.reshape((-1,) + (1,) * len(shape))
    for start in range(0, n_rows, batch_size):
        rows = torch.arange(start, min(start + batch_size, n_rows))
        jj, kk = rows // K, rows % K
        a_r, s_r, lam_r = bshape(a[jj]).to(dev), bshape(s[jj]).to(dev), bshape(lams[jj]).to(dev)
        x = a_r * x0[kk] + s_r * eps_all[kk]
        tt = t[jj].to(dev)
        kw = _rows_kwargs(mk, kk.to(dev) if dev.type != "cpu" else kk, K)
        v = v_all[kk]
        f1 = lambda xx, t_: fn(xx, t_, kw)
        eps, jv = jvp(f1, (x, tt), (v, torch.zeros_like(tt)))
        eps, jv = eps.to(DT), jv.to(DT)
        dx = bshape(dloga_dlam[jj]).to(dev) * x - s_r * eps
        _, deps = jvp(f1, (x, tt), (dx.to(x.dtype), dt_dlam[jj].to(dev)))
        deps = deps.to(DT)
        emil = torch.exp(-lam_r)
        E = emil * eps
        X = x / a_r
        Ep = -E + emil * deps
        vals = {"E": E, "X": X, "Ep": Ep, "EE": E * E, "XX": X * X, "EX": E * X, "EpE": Ep * E, "EpX": Ep * X,
                "ld": v * s_r * jv}
        for key, val in vals.items():  # jj: the lambda's position in this chunk
            out[key].index_add_(0, jj, val.cpu())
        if bar is not None:
            bar.update(len(rows))
    return out


def _chunk_file(part_dir: str, ci: int) -> str:
    return os.path.join(part_dir, f"chunk_{ci:05d}.safetensors")


def _save_chunk(part_dir: str, ci: int, config: dict, res: Dict[str, Tensor]) -> None:
    save_safetensors(res, _chunk_file(part_dir, ci), {"config": json.dumps(config, sort_keys=True)})


def _load_chunk(part_dir: str, ci: int, config: dict) -> Optional[Dict[str, Tensor]]:
    from safetensors import safe_open

    f = _chunk_file(part_dir, ci)
    if not os.path.exists(f):
        return None
    try:
        with safe_open(f, framework="pt") as h:
            if json.loads((h.metadata() or {}).get("config", "null")) != json.loads(json.dumps(config, sort_keys=True)):
                return None
            return {k: h.get_tensor(k) for k in h.keys()}
    except Exception:  # a truncated file from a kill mid-write: recompute that chunk
        return None


