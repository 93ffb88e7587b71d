"""Every shipped model loads by name and samples with every solver without a non-finite value; the class-
conditional one also under classifier-free guidance at w = 1.5 and 3."""
import pytest
import torch

import diffsolve as ds
from diffsolve.hub.checkpoint import BUILTIN_MODELS

SOLVERS = sorted(ds.SOLVERS)


def _noise(den, n=2, seed=0):
    return torch.randn((n,) + tuple(den.sample_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_loads_and_samples_with_every_solver(name):
    den = ds.load(name)
    kw = {}
    if den.config.get("num_classes"):
        kw = {"model_kwargs": {"class_labels": torch.tensor([3, 7])}}
    for solver in SOLVERS:
        info = ds.get_solver(solver)
        opts = {}
        if info.name == "dpm-v3":
            continue  # needs model statistics (tests/test_dpm_v3.py covers it)
        if any(not getattr(den.process, cap, False) for cap in info.needs):  # e.g. SDE solvers on PFGM++
            with pytest.raises(ValueError, match="needs a process"):
                ds.sample(den, _noise(den), solver, nfe=6, seeds=[0, 1])
            continue
        nfe = max(6, info.steps_for_nfe(6, True)[1])
        x = ds.sample(den, _noise(den), solver, nfe=nfe, seeds=[0, 1] if info.stochastic else None, **opts, **kw)
        assert torch.isfinite(x).all(), f"{name} {solver}"


@pytest.mark.parametrize("name", [n for n in sorted(BUILTIN_MODELS) if n.endswith("cfg")])
@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_class_conditional_model_under_guidance(name, scale):
    den = ds.load(name)
    null = torch.tensor([den.config["null_label"]])
    g = ds.ClassifierFreeGuidance(den, scale, {"class_labels": null})
    x = ds.sample(g, _noise(den, 4), "dpm++2m", nfe=10, model_kwargs={"class_labels": torch.tensor([0, 1, 2, 3])})
    assert torch.isfinite(x).all() and x.shape == (4, 1, 28, 28)
