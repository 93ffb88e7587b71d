import pytest
import torch

import diffsolve as ds

torch.set_num_threads(1)  # tiny tensors: threads only add overhead

ALL_PROCESSES = {
    "vp-discrete": lambda: ds.VPDiscrete.linear(1000),
    "vp-discrete-cosine": lambda: ds.VPDiscrete.cosine(1000),
    "vp-continuous": lambda: ds.VPContinuous.linear(),
    "vp-cosine": lambda: ds.VPContinuous.cosine(),
    "ve": lambda: ds.VE(),
    "edm": lambda: ds.EDM(),
    "flow": lambda: ds.RectifiedFlow(),
    "affine": lambda: ds.AffineInterpolant(lambda t: torch.cos(t * torch.pi / 2), lambda t: torch.sin(t * torch.pi / 2),
                                           t_min=1e-3, t_max=1 - 1e-3, name="trig"),
}


@pytest.fixture(params=list(ALL_PROCESSES))
def process(request):
    return ALL_PROCESSES[request.param]()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
