"""Learned rounding: AdaRound (Nagel et al. 2020, arXiv:2004.10568) with BRECQ-style block reconstruction
(Li et al. 2021, arXiv:2102.05426) on timestep-sampled calibration inputs, for any format's value table.

Every weight w with unscaled value u = w / s lies between two representable neighbours lo <= u <= hi of its
format's grid (uniform for INT4, non-uniform for FP4 e2m1).  Round-to-nearest picks the closer one; here each weight
gets a continuous variable alpha and the soft weight s (lo + h(alpha) (hi - lo)), with the rectified sigmoid
h = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, initialised at the nearest-value
fraction.  Block by block (a residual block, an attention block, a lone layer), the alphas minimise

    || block_q(x_q) - block(x) ||^2 / ||block(x)||^2  +  lambda * mean(1 - |2 h(alpha) - 1|^beta)

where x are the block's inputs in the full-precision network and x_q those in the network quantised so far
(blocks before it already hard-rounded), both recorded on calibration inputs from the model's own trajectories at
many t (``quantize.Calibration``).  beta anneals from 20 to 2 after a warm-up without the regulariser, which pushes
every h to 0 or 1; the final weights take the neighbour h rounds to.  The per-channel scale is first chosen by a
grid search of the clipping ratio that minimises the weight's own squared rounding error.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .quantize import GAMMA, ZETA, CalibrationSet, QuantizedNet, QuantLayer, rectified_sigmoid

Tensor = torch.Tensor
CONTAINERS = (nn.ModuleList, nn.Sequential)


def _neighbours(layer: QuantLayer) -> Tuple[Tensor, Tensor]:
    """Indices into the format's grid of the representable values below and above w / s."""
    g = layer.wfmt.grid
    u = (layer.w_float / layer.scale).clamp(float(g[0]), float(g[-1]))
    hi = torch.searchsorted(g, u.contiguous(), right=True).clamp(1, g.numel() - 1)
    return hi - 1, hi


def search_scale(layer: QuantLayer, ratios: Tensor = torch.linspace(0.5, 1.0, 26)) -> None:
    """Per output channel (or per tensor), the clipping ratio r of s = r max|W| / qmax with the least squared
    rounding error of the weight itself."""
    w, fmt = layer.w_float, layer.wfmt
    base = layer.scale.clone()
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    dims = tuple(range(1, w.dim())) if layer.granularity == "channel" else tuple(range(w.dim()))
    for r in ratios.tolist():
        s = base * r
        err = (fmt.quantize(w, s) - w).square().sum(dim=dims, keepdim=True)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    layer.scale = best
    layer.set_codes(fmt.encode(w, best))


def blocks(net: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The reconstruction units: descending through containers (ModuleList, Sequential) and the root, every other
    module that holds quantised layers is one block; a quantised layer in a container is a block of its own."""
    out: List[Tuple[str, nn.Module]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if not any(isinstance(m, QuantLayer) for m in child.modules()):
                continue
            if isinstance(child, CONTAINERS):
                visit(full + ".", child)
            else:
                out.append((full, child))

    visit("", net)
    return out


@torch.no_grad()
def _record(net: nn.Module, names: List[str], data: CalibrationSet, idx: Tensor, caller: Optional[nn.Module] = None,
            batch: int = 64) -> Dict[str, Tuple[List[Tensor], Tensor]]:
    """Inputs and outputs of the blocks ``names`` of ``net`` on the calibration samples ``idx``, in one pass; the
    samples go through ``caller`` (default ``net``; a ``QuantizedNet`` for its inner network, to set time bins)."""
    ins: Dict[str, List[Tuple[Tensor, ...]]] = {n: [] for n in names}
    outs: Dict[str, List[Tensor]] = {n: [] for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, out, n=n):
            ins[n].append(tuple(a.detach() for a in args))
            outs[n].append(out.detach())
        hooks.append(net.get_submodule(n).register_forward_hook(hook))
    caller = caller if caller is not None else net
    try:
        for i in range(0, idx.numel(), batch):
            j = idx[i:i + batch]
            caller(data.x[j], data.t[j])
    finally:
        for h in hooks:
            h.remove()
    return {n: ([torch.cat([b[k] for b in ins[n]]) for k in range(len(ins[n][0]))], torch.cat(outs[n]))
            for n in names}



def learn_rounding(qnet: QuantizedNet, float_net: nn.Module, data: CalibrationSet, samples: int = 256,
                   iters: int = 400, batch: int = 32, lr: float = 1e-2, reg: float = 0.01, warmup: float = 0.2,
                   seed: int = 0, progress: bool = True) -> Dict[str, float]:
    """Learn the rounding of every quantised layer of ``qnet`` block by block (see the module doc); returns the
    relative reconstruction error of each block after hard rounding."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:samples]
    layers = qnet.quant_layers()
    for layer in layers.values():
        search_scale(layer)
    units = blocks(qnet.net)
    it = units
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(units, desc="learned rounding", unit="block")
    errors: Dict[str, float] = {}
    float_io = _record(float_net, [n for n, _ in units], data, idx)  # targets: the full-precision blocks
    for name, qblock in it:
        xq = _record(qnet.net, [name], data, idx, caller=qnet)[name][0]  # inputs: the network quantised so far
        y = float_io.pop(name)[1]
        own = [m for m in qblock.modules() if isinstance(m, QuantLayer)]
        params = []
        for m in own:
            lo, hi = _neighbours(m)
            m.lo_idx, m.hi_idx = lo, hi
            gvals = m.wfmt.grid
            frac = ((m.w_float / m.scale).clamp(float(gvals[0]), float(gvals[-1])) - gvals[lo]) \
                / (gvals[hi] - gvals[lo]).clamp_min(1e-12)
            frac = frac.clamp(0.01, 0.99)
            m.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
            params.append(m.alpha)
        opt = torch.optim.Adam(params, lr=lr)
        denom = y.square().mean().clamp_min(1e-12)
        n = y.shape[0]
        with torch.enable_grad():
            for k in range(iters):
                j = torch.randint(0, n, (min(batch, n),), generator=g)
                out = qblock(*[a[j] for a in xq])
                rec = (out - y[j]).square().mean() / denom
                loss = rec
                u = k / iters
                if u >= warmup:
                    beta = 20 + (2 - 20) * (u - warmup) / (1 - warmup)
                    r = sum(((1 - (2 * rectified_sigmoid(m.alpha) - 1).abs().pow(beta)).sum()) for m in own)
                    loss = rec + reg * r / sum(m.alpha.numel() for m in own)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for m in own:
            with torch.no_grad():
                codes = torch.where(rectified_sigmoid(m.alpha) >= 0.5, m.hi_idx, m.lo_idx)
            m.alpha = None
            del m.lo_idx, m.hi_idx
            m.set_codes(codes)
        with torch.no_grad():
            errors[name] = float(((qblock(*xq) - y).square().mean() / denom))
    qnet.spec["rounding"] = "learned"
    return errors
