import math

import pytest
import torch
from conftest import randn

import diffsolve as ds

DT = torch.float64


def test_denoiser_matches_monte_carlo_tweedie():
    """E[x0 | x~] by self-normalised importance sampling over exact data samples, within 5 standard errors."""
    ref = ds.GaussianMixture.random(dim=3, n_components=3, rank=1, seed=5, delta=0.2)
    g = torch.Generator().manual_seed(0)
    data = ref.sample(400_000, generator=g)
    for s in (0.3, 1.0):
        xq = ref.sample(4, generator=g) + s * torch.randn(4, 3, generator=g, dtype=DT)
        exact = ref.denoise_ve(xq, s)
        for i in range(4):
            logw = -((xq[i] - data) ** 2).sum(-1) / (2 * s * s)
            w = torch.softmax(logw, 0)
            est = (w[:, None] * data).sum(0)
            se = torch.sqrt((w[:, None] ** 2 * (data - est) ** 2).sum(0))
            assert torch.all((est - exact[i]).abs() <= 5 * se + 1e-6), (s, i, est, exact[i], se)


def test_log_prob_is_normalised_2d():
    ref = ds.GaussianMixture.toy2d(n_components=4, radius=1.0, std=0.3, delta=0.15)
    u = torch.linspace(-3, 3, 601, dtype=DT)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    p = ref.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert abs(float(p.sum()) * float(u[1] - u[0]) ** 2 - 1) < 1e-4


def test_sample_moments():
    ref = ds.GaussianMixture.random(dim=4, n_components=2, rank=2, seed=1)
    x = ref.sample(200_000, generator=torch.Generator().manual_seed(1))
    w = ref.log_weights.exp()
    mean = (w[:, None] * ref.means).sum(0)
    se = x.std(0) / math.sqrt(x.shape[0])
    assert torch.all((x.mean(0) - mean).abs() < 5 * se)


@pytest.mark.parametrize("proc", [ds.VPDiscrete.linear(1000), ds.EDM(), ds.RectifiedFlow(), ds.VE()])
def test_reference_ode_matches_gaussian_closed_form(proc):
    ref = ds.GaussianMixture.random(dim=10, n_components=1, rank=3, seed=2, delta=0.1)
    x_T = randn(6, 10) * proc.prior_scale
    num, err = ref.ode_solution(proc, x_T, proc.t_max, proc.t_min, check=True)
    exact = ref.gaussian_ode_solution(proc, x_T, proc.t_max, proc.t_min)
    assert float((num - exact).abs().max()) < 1e-8
    assert err < 1e-8  # halving the tolerance moves the answer by less than 1e-8


def test_gaussian_closed_form_is_consistent_with_the_ode():
    """d/ds of the closed-form path equals eps of the exact denoiser (checks the formula itself)."""
    ref = ds.GaussianMixture.random(dim=5, n_components=1, rank=2, seed=4)
    proc = ds.EDM()
    x = randn(3, 5) * 10
    s0, h = 2.0, 1e-5
    xp = ref.gaussian_ode_solution(proc, x, 10.0, s0 + h)
    xm = ref.gaussian_ode_solution(proc, x, 10.0, s0 - h)
    xs = ref.gaussian_ode_solution(proc, x, 10.0, s0)
    eps = (xs - ref.denoise_ve(xs, s0)) / s0
    assert torch.allclose((xp - xm) / (2 * h), eps, atol=1e-6)


def test_mixture_marginal_score_by_finite_differences():
    ref = ds.GaussianMixture.random(dim=3, n_components=3, rank=1, seed=7)
    proc = ds.VPDiscrete.linear(1000)
    t = torch.tensor(300.0, dtype=DT)
    x = randn(2, 3)
    score = ref.score(x, proc, t)
    a = proc.alpha(t)
    h = 1e-6
    for j in range(3):
        e = torch.zeros(3, dtype=DT)
        e[j] = h
        # log p_t(x) = log p_ve(x/alpha; s) - d log alpha
        lp = lambda y: ref.log_prob_ve(y / a, proc.sigma_ve(t))
        fd = (lp(x + e) - lp(x - e)) / (2 * h)
        assert torch.allclose(score[:, j], fd, atol=1e-5)


def test_exact_targets_endpoints():
    ref = ds.GaussianMixture.random(dim=4, seed=0)
    proc = ds.VPDiscrete.linear(1000)
    x_T = randn(3, 4)
    tg = ds.exact_targets(ref, proc, x_T)
    assert torch.allclose(tg.denoised, ref.posterior(tg.at_t_min, proc, proc.t_min)[0])
    assert tg.for_grid(True) is tg.denoised and tg.for_grid(False) is tg.at_t_min
