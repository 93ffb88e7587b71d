"""A model's identity: what profiles and DPM-Solver-v3 statistics are checked against.

``model.identity()`` gives the declared part (process, prediction, guidance scale); ``model_fingerprint`` the
measured part: the model's eps outputs on fixed seeded probe inputs and a short hash of them.  The probes run
the unguided base model on the unconditional inputs (a guidance wrapper's ``uncond_kwargs``), so conditioning
inputs are not needed; the guidance scale is part of the declared identity.  ``check_identity`` compares both
with what a file recorded, and says in words what differs.
"""
from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .denoiser import Model, ModelWrapper, base_model

Tensor = torch.Tensor
DT = torch.float64


class ModelMismatch(ValueError):
    """A file (profile, statistics) used with a model, process, guidance scale or data shape it was not made for."""


def canonical_json(obj: Any) -> Any:
    """``obj`` as it reads back from sorted JSON (tuples -> lists, numbers -> floats where JSON has them)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=float))


def probe_kwargs(model: Model) -> Dict[str, Any]:
    """The unconditional keyword arguments of the outermost guidance wrapper (empty when there is none)."""
    m = model
    while isinstance(m, ModelWrapper):
        if hasattr(m, "uncond_kwargs"):
            return dict(m.uncond_kwargs)
        m = m.inner
    return {}


def model_fingerprint(model: Model, shape: Sequence[int], lambdas: Sequence[float], seed: int = 0,
                      kwargs: Optional[Dict[str, Any]] = None,
                      device: Optional[Union[str, torch.device]] = None) -> Tuple[Tensor, str]:
    """(eps outputs [len(lambdas), *shape], short hash) of the base model on fixed seeded probe inputs.

    Makes ``len(lambdas)`` network calls; a ``Denoiser``'s ``nfe`` counter is left unchanged (they are
    reported by the callers that make them, e.g. ``SampleInfo.check_calls``)."""
    g = torch.Generator().manual_seed(int(seed) + 20231020)
    base = base_model(model)
    proc = base.process
    kw = dict(kwargs if kwargs is not None else probe_kwargs(model))
    outs = []
    nfe = getattr(base, "nfe", None)
    try:
        with torch.no_grad():
            for lam in lambdas:
                t = proc.t_of_lam(torch.tensor(float(lam), dtype=DT))
                z = torch.randn((1,) + tuple(shape), generator=g, dtype=DT)
                a, s = float(proc.alpha(t)), float(proc.sigma(t))
                xin = a * 0.5 * torch.tanh(torch.randn((1,) + tuple(shape), generator=g, dtype=DT)) + s * z
                if device is not None:
                    xin = xin.to(device)
                outs.append(base.evaluate(xin, float(t), kw).eps.to(DT).cpu())
    finally:
        if nfe is not None:
            base.nfe = nfe  # type: ignore[attr-defined]
    out = torch.cat(outs)
    h = hashlib.sha256(out.to(torch.float32).numpy().round(3).tobytes()).hexdigest()[:16]
    return out, h


def fingerprint_mismatch(model: Model, shape: Sequence[int], recorded: Dict[str, Any], probe: Tensor,
                         device: Optional[Union[str, torch.device]] = None) -> Optional[str]:
    """None when ``model`` gives the recorded ``probe`` outputs on the probe inputs that ``recorded`` (probe_lambdas,
    probe_seed, probe_rtol, fingerprint) describes; otherwise what differs."""
    out, fp = model_fingerprint(model, shape, recorded["probe_lambdas"], recorded.get("probe_seed", 0), device=device)
    ref = probe.to(out)
    rel = float((out - ref).abs().max() / (ref.abs().max() + 1e-12))
    if rel <= recorded.get("probe_rtol", 1e-3):
        return None
    return (f"model fingerprint {fp} != the recorded {recorded.get('fingerprint')} (outputs on the probe inputs "
            f"differ by {rel:.2e} relative)")


def record(model: Model, shape: Sequence[int], probe_lambdas: Sequence[float], seed: int = 0,
           device: Optional[Union[str, torch.device]] = None) -> Tuple[Dict[str, Any], Tensor]:
    """(identity record, probe outputs) to store with a file made for ``model``."""
    probe, fp = model_fingerprint(model, shape, probe_lambdas, seed, device=device)
    ident = model.identity()
    rec = {"fingerprint": fp, "process": canonical_json(ident["process"]),
           "guidance_scale": float(ident.get("guidance_scale", 1.0)), "prediction": ident.get("prediction"),
           "probe_lambdas": [float(v) for v in probe_lambdas], "probe_seed": int(seed), "probe_rtol": 1e-3}
    return rec, probe


class IdentityCheck:
    """Compares models with one recorded identity; the fingerprint is measured once per model object."""

    def __init__(self, recorded: Dict[str, Any], probe: Optional[Tensor], shape: Sequence[int], what: str):
        self.recorded, self.probe, self.shape, self.what = recorded, probe, tuple(shape), what
        self._verified: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def problems(self, model: Model, fingerprint: bool = True,
                 device: Optional[Union[str, torch.device]] = None) -> Tuple[List[str], int]:
        """(what differs, network calls made to find out)."""
        m, out = self.recorded, []
        ident = model.identity()
        cfg = canonical_json(ident["process"])
        if m.get("process") != cfg:
            out.append(f"process {cfg} != {self.what}'s {m.get('process')}")
        gs = float(ident.get("guidance_scale", 1.0))
        if abs(float(m.get("guidance_scale", 1.0)) - gs) > 1e-12:
            out.append(f"guidance scale {gs} != {self.what}'s {m.get('guidance_scale')}")
        if m.get("prediction") not in (None, ident.get("prediction")):
            out.append(f"prediction {ident.get('prediction')!r} != {self.what}'s {m.get('prediction')!r}")
        calls = 0
        if fingerprint and not out and self.probe is not None and not self.verified(model):
            calls = len(m["probe_lambdas"])
            why = fingerprint_mismatch(model, self.shape, m, self.probe, device)
            if why:
                out.append(why)
            else:
                self._verified[model] = True
        return out, calls

    def verified(self, model: Model) -> bool:
        try:
            return model in self._verified
        except TypeError:  # an unhashable model object: measured every time
            return False
