import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve import grids as T

DT = torch.float64


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras", "quadratic"])
@pytest.mark.parametrize("final", ["denoise", "t_min"])
def test_spacings_are_valid_on_every_process(process, spacing, final):
    for n in (2, 5, 17):
        g = ds.make_grid(process, n, spacing, final)
        t = g.t[:-1] if g.clean_end else g.t
        assert t.numel() == n
        assert torch.all(t[1:] < t[:-1])
        assert abs(float(t[0]) - process.t_max) < 1e-9 and abs(float(t[-1]) - process.t_min) < 1e-9
        if g.clean_end:
            assert float(g.sigma[-1]) == 0 and float(g.alpha[-1]) == 1 and float(g.lam[-1]) == float("inf")


def test_logsnr_is_uniform_in_lambda(process):
    g = ds.make_grid(process, 9, "logsnr", "t_min")
    d = g.lam[1:] - g.lam[:-1]
    assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-8)


def test_karras_matches_edm_formula():
    edm = ds.EDM()
    n, rho = 18, 7.0
    i = np.arange(n)
    ref = (80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert np.allclose(T.karras(edm, n).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [7, 10, 50])
def test_index_spacings_match_diffusers(spacing, n):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(n)
    ours = ds.timesteps.SPACINGS[spacing](ds.VPDiscrete.linear(1000), n)
    assert np.array_equal(ours.numpy(), sched.timesteps.numpy().astype(np.float64))


def test_index_spacings_need_a_discrete_process():
    with pytest.raises(ValueError, match="discrete"):
        ds.make_grid(ds.EDM(), 5, "trailing")


def test_make_grid_rejects_bad_requests():
    vp = ds.VPDiscrete.linear(1000)
    with pytest.raises(ValueError):
        ds.make_grid(vp, 0)
    with pytest.raises(ValueError):
        ds.make_grid(vp, 1, final="t_min")
    with pytest.raises(ValueError, match="spacing"):
        ds.make_grid(vp, 5, "nope")


def test_explicit_grid_forms_agree():
    vp = ds.VPDiscrete.linear(1000)
    t = torch.tensor([999.0, 500.0, 20.0], dtype=DT)
    a = ds.explicit(vp, t=t, final="t_min")
    b = ds.explicit(vp, sigmas=vp.sigma_ve(t), final="t_min")
    c = ds.explicit(vp, lambdas=vp.lam(t), final="t_min")
    assert torch.allclose(a.t, b.t, atol=1e-8) and torch.allclose(a.t, c.t, atol=1e-8)
    with pytest.raises(ValueError, match="exactly one"):
        ds.explicit(vp, t=t, sigmas=t)
    with pytest.raises(ValueError, match="positive"):
        ds.explicit(vp, sigmas=[5.0, -1.0])


def test_every_spacing_starts_exactly_at_t_max():
    import diffsolve as ds
    from diffsolve.grids import SPACINGS, make_grid

    proc = ds.VPDiscrete.linear(1000)
    for name in SPACINGS:
        if name == "leading":  # diffusers' 'leading' starts below t_max by design
            continue
        assert float(make_grid(proc, 5, name, "t_min").t[0]) == proc.t_max, name
