"""Stochastic-interpolant SDEs (arXiv:2303.08797) against exact answers: eps = 0 is the flow ODE solvers, eps > 0
keeps the exact mixture's marginal (mean and covariance within Monte-Carlo error at 200 steps), Euler-Maruyama of the
reverse SDE is the member eps = g^2/2, per-sample seeds, and clear errors."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.reference import DenseGaussianMixture

DT = torch.float64
REF = ds.GaussianMixture.random(dim=4, n_components=3, seed=2, delta=0.2)
FLOW = ds.RectifiedFlow()
TRIG = ds.AffineInterpolant(lambda t: torch.cos(t * math.pi / 2), lambda t: torch.sin(t * math.pi / 2),
                            t_min=1e-3, t_max=1 - 1e-3, d_alpha=lambda t: -math.pi / 2 * torch.sin(t * math.pi / 2),
                            d_sigma=lambda t: math.pi / 2 * torch.cos(t * math.pi / 2), name="trig")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("proc", [FLOW, TRIG, ds.VPDiscrete.linear(1000)], ids=["flow", "trig", "vp"])
def test_eps_zero_is_the_flow_ode(proc):
    """With eps = 0 the SDE integrators are Euler and Heun in process time, from a velocity model."""
    den = REF.denoiser(proc, "velocity")
    z = randn(8, 4, seed=1)
    for sde, ode in (("interpolant-sde", "euler"), ("interpolant-sde-heun", "heun")):
        for final in ("t_min", "denoise"):
            a = ds.sample(den, z, sde, nfe=21, epsilon=0.0, seeds=list(range(8)), final=final)
            b = ds.sample(den, z, ode, nfe=21, variable="t", final=final)
            assert float((a - b).abs().max()) <= 1e-6, (sde, final)


def test_euler_maruyama_is_the_member_eps_g2_over_2():
    """The reverse SDE with diffusion g~^2 (euler-maruyama) is the interpolant SDE with eps = g~^2 / 2, noise for
    noise under the same seeds."""
    proc = ds.VPContinuous.linear()
    den = REF.denoiser(proc, "epsilon")
    z, seeds = randn(6, 4, seed=2), list(range(20, 26))
    g2 = lambda t: 0.3 * proc.diffusion2(torch.as_tensor(t, dtype=DT))
    a = ds.sample(den, z, "euler-maruyama", nfe=30, seeds=seeds, diffusion=g2)
    b = ds.sample(den, z, "interpolant-sde", nfe=30, seeds=seeds, epsilon=lambda t: 0.5 * float(g2(t)))
    assert float((a - b).abs().max()) <= 1e-10


def _moments(x):
    x = x.reshape(x.shape[0], -1)
    m = x.mean(0)
    c = x - m
    prods = c[:, :, None] * c[:, None, :]
    return m, prods.mean(0), x.std(0) / math.sqrt(x.shape[0]), prods.std(0) / math.sqrt(x.shape[0])


EXACT = DenseGaussianMixture.from_mixture(REF)


@pytest.mark.parametrize("name", ["interpolant-sde", "interpolant-sde-heun"])
@pytest.mark.parametrize("proc, eps", [(FLOW, lambda t: 0.8 * t), (FLOW, 0.05), (ds.VPContinuous.linear(), None)],
                         ids=["flow-eps-0.8t", "flow-eps-0.05", "vp-reverse-sde"])
def test_eps_positive_keeps_the_exact_marginal(name, proc, eps):
    """2000 samples at 200 steps: mean and covariance within 4.5 Monte-Carlo standard errors of the mixture's (and the
    SDE really is stochastic: its samples are not the ODE's)."""
    torch.manual_seed(0)
    den = REF.denoiser(proc, "velocity" if proc is FLOW else "epsilon")
    n = 2000
    z = torch.randn(n, 4, dtype=DT)
    x = ds.sample(den, z, name, nfe=200 if name == "interpolant-sde" else 399, epsilon=eps)
    m, c, se_m, se_c = _moments(x)
    assert ((m - EXACT.mean()).abs() <= 4.5 * se_m).all(), (m, EXACT.mean())
    assert ((c - EXACT.covariance()).abs() <= 4.5 * se_c).all(), (c, EXACT.covariance())
    ode = ds.sample(den, z[:64], "heun", nfe=41)
    assert float((x[:64] - ode).abs().mean()) > 0.05


def test_seeds_are_batch_size_invariant():
    den = REF.denoiser(FLOW, "velocity")
    z = randn(5, 4, seed=3)
    for name in ("interpolant-sde", "interpolant-sde-heun"):
        full = ds.sample(den, z, name, nfe=20, seeds=[7, 8, 9, 10, 11], epsilon=lambda t: t)
        one = ds.sample(den, z[2:3], name, nfe=20, seeds=[9], epsilon=lambda t: t)
        assert torch.equal(full[2:3], one)
        other = ds.sample(den, z, name, nfe=20, seeds=[1, 2, 3, 4, 5], epsilon=lambda t: t)
        assert float((other - full).abs().min()) > 0


@pytest.mark.parametrize("eps", [-0.1, lambda t: 0.5 - t, float("nan")])
def test_negative_epsilon_is_a_clear_error(eps):
    den = REF.denoiser(FLOW, "velocity")
    with pytest.raises(ValueError, match=r"epsilon\(t\) must be finite and >= 0"):
        ds.sample(den, randn(2, 4), "interpolant-sde", nfe=10, epsilon=eps, seeds=[0, 1])
    assert den.nfe == 0  # refused before any network call
