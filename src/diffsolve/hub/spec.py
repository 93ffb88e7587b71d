"""Model specs of the command line, the tuner and the benchmarks: a shipped name, a checkpoint folder, with an optional
classifier-free guidance weight.

``"mnist"``, ``"runs/x/model"``: the model as ``ds.load`` gives it.  ``"mnist-cfg@3"``: the class-conditional
model under classifier-free guidance with weight 3 (``ds.ClassifierFreeGuidance`` against the null label), its
labels bound to the batch (``ds.Conditioned``: sample i has label i mod K), so that every caller (our solvers,
the peers' loops, the teacher, the tuner) evaluates the same guided model in one batched call per step.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..adapters import Conditioned, Denoiser, Model
from ..guidance import ClassifierFreeGuidance
from .load import load


def parse_spec(spec: str) -> Tuple[str, float | None]:
    """'name[@w]' -> (name, w or None)."""
    name, sep, w = str(spec).rpartition("@") if "@" in str(spec) else (str(spec), "", "")
    if not sep:
        return name, None
    try:
        return name, float(w)
    except ValueError:
        raise ValueError(f"model spec {spec!r}: the guidance weight after '@' must be a number, got {w!r}") from None


def class_labels(batch: int, num_classes: int) -> torch.Tensor:
    """The labels of a conditional benchmark batch: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(int(batch)) % int(num_classes)


def load_spec(spec: str, batch: int) -> Tuple[Model, Denoiser]:
    """(the model to sample, its base ``Denoiser``) for a spec; the guided model has its labels bound."""
    name, w = parse_spec(spec)
    den = load(name)
    classes = int((getattr(den, "config", None) or {}).get("num_classes", 0) or 0)
    if w is None:
        if classes:
            raise ValueError(f"{name!r} is class-conditional: give a guidance weight, e.g. {name}@1.5 "
                             "(@1 is the conditional model without guidance)")
        return den, den
    if not classes:
        raise ValueError(f"{name!r} is not class-conditional: classifier-free guidance ('@{w:g}') needs a model "
                         "trained with --num-classes")
    null = torch.tensor([int(den.config["null_label"])])
    guided = ClassifierFreeGuidance(den, w, {"class_labels": null})
    return Conditioned(guided, {"class_labels": class_labels(batch, classes)}), den
