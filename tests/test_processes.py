import numpy as np
import pytest
import torch

import diffsolve as ds

DT = torch.float64


def fine_grid(p, n=2001):
    return torch.linspace(p.t_min, p.t_max, n, dtype=DT)


@pytest.mark.parametrize("proc", [ds.VPDiscrete.linear(1000), ds.VPDiscrete.scaled_linear(1000), ds.VPDiscrete.cosine(1000),
                                  ds.VPContinuous.linear(), ds.VPContinuous.cosine()])
def test_vp_is_variance_preserving(proc):
    t = fine_grid(proc)
    assert torch.allclose(proc.alpha(t) ** 2 + proc.sigma(t) ** 2, torch.ones_like(t), atol=1e-14, rtol=0)


def test_lambda_strictly_decreasing(process):
    lam = process.lam(fine_grid(process))
    assert torch.all(torch.isfinite(lam))
    assert torch.all(lam[1:] < lam[:-1])


def test_lambda_round_trip(process):
    t = fine_grid(process, 997)
    back = process.t_of_lam(process.lam(t))
    assert float((back - t).abs().max()) < 1e-10


def test_sigma_ve_round_trip(process):
    t = fine_grid(process, 301)
    assert float((process.t_of_sigma_ve(process.sigma_ve(t)) - t).abs().max()) < 1e-10


def test_derivatives_match_finite_differences(process):
    # points off the integer grid of discrete schedules (where log alpha has kinks)
    t = torch.linspace(process.t_min, process.t_max, 41, dtype=DT)[1:-1] + 0.37e-3 * (process.t_max - process.t_min)
    h = 1e-7 * max(1.0, process.t_max)
    fd_a = (process.alpha(t + h) - process.alpha(t - h)) / (2 * h)
    fd_s = (process.sigma(t + h) - process.sigma(t - h)) / (2 * h)
    assert torch.allclose(process.d_alpha(t), fd_a, rtol=1e-5, atol=1e-7)
    assert torch.allclose(process.d_sigma(t), fd_s, rtol=1e-5, atol=1e-7)
    assert torch.all(process.diffusion2(t) >= -1e-12)


def test_vp_discrete_matches_alphas_cumprod_exactly():
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=DT)
    ac = torch.cumprod(1 - betas, 0)
    proc = ds.VPDiscrete.from_betas(betas)
    n = torch.arange(1000, dtype=DT)
    assert float((proc.alpha(n) ** 2 - ac).abs().max()) <= 1e-15
    assert float((proc.sigma(n) ** 2 - (1 - ac)).abs().max()) <= 1e-15
    # t_of_lam lands exactly on integer indices at the grid's own log-SNRs
    assert float((proc.t_of_lam(proc.lam(n)) - n).abs().max()) < 1e-9


def test_vp_discrete_linear_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    proc = ds.VPDiscrete.linear(1000)
    assert np.allclose(proc.alphas_cumprod.numpy(), sched.alphas_cumprod.double().numpy(), rtol=1e-6)


def test_marginal_and_edm_identity():
    edm = ds.EDM()
    t = torch.tensor([0.5, 3.0], dtype=DT)
    assert torch.equal(edm.sigma(t), t)
    assert torch.allclose(edm.lam(t), -torch.log(t))
    x0, eps = torch.ones(2, 3, dtype=DT), torch.full((2, 3), 2.0, dtype=DT)
    xt = edm.marginal(x0, eps, t)
    assert torch.allclose(xt, x0 + t[:, None] * eps)


def test_flow_path():
    f = ds.RectifiedFlow()
    t = torch.tensor(0.25, dtype=DT)
    assert float(f.alpha(t)) == 0.75 and float(f.sigma(t)) == 0.25
    assert f.ode_variable == "t"


@pytest.mark.parametrize("bad", [[0.5, 0.6], [1.2, 0.5], [0.9, float("nan")]])
def test_bad_schedules_raise(bad):
    with pytest.raises(ValueError):
        ds.VPDiscrete(bad)


def test_bad_betas_raise():
    with pytest.raises(ValueError):
        ds.VPDiscrete.from_betas([0.1, 1.5])


def test_process_config_round_trip():
    for p in [ds.VE(0.02, 30), ds.EDM(sigma_data=0.3), ds.RectifiedFlow(1e-3, 0.99), ds.VPContinuous.cosine()]:
        q = ds.process_from_config(p.config())
        t = torch.linspace(p.t_min, p.t_max, 5, dtype=DT)
        assert torch.allclose(p.alpha(t), q.alpha(t)) and torch.allclose(p.sigma(t), q.sigma(t))
    with pytest.raises(ValueError):
        ds.process_from_config({"type": "nope"})
