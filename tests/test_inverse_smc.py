"""The spectral particle methods (MCGdiff, AFDPS) against exact posteriors, the published MCGdiff of the bench, and
clear errors for bad input to every inverse method."""
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.inverse import Dense, ExactPosterior, Function, methods, sample
from diffsolve.inverse.methods.smc import pin_points, snap_grid, systematic_resample
from diffsolve.reference import DenseGaussianMixture, GaussianMixture

DT = torch.float64
PROC = ds.VPDiscrete.linear(1000)
SMC = ("mcgdiff", "afdps", "tsmc")


def _gaussian(d=6, m=3, sigma_y=0.3, seed=0):
    """A standard normal prior (its exact denoiser is what every step assumes), a Gaussian operator, y."""
    prior = DenseGaussianMixture(torch.zeros(1, d, dtype=DT), torch.eye(d, dtype=DT)[None])
    op = Dense.gaussian(m, (d,), seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    y = op(prior.sample(1, g)) + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return prior, op, y[0], sigma_y


def _mixture(d=8, m=2, sigma_y=0.1, seed=0, components=4):
    prior = GaussianMixture.random(d, n_components=components, rank=2, seed=seed)
    op = Dense.gaussian(m, (d,), seed=seed + 1)
    x = prior.sample(1, torch.Generator().manual_seed(seed + 2))
    y = op(x) + sigma_y * torch.randn(1, m, generator=torch.Generator().manual_seed(seed + 3), dtype=DT)
    return prior, op, y[0], sigma_y


@pytest.mark.parametrize("method", SMC)
def test_smc_samples_the_gaussian_posterior(method):
    """On a standard normal prior with its exact denoiser.  TSMC's twist is then p(y | x_t) itself: 4000 particles
    match the exact posterior mean within 4 standard errors and its covariance within the Monte-Carlo error.  The
    flat-prior twists of MCGdiff and AFDPS are right only near t = 0, so their weights vary more (fewer distinct
    particles): mean within 0.15 posterior standard deviations, covariance within 15%."""
    prior, op, y, sy = _gaussian()
    post = ExactPosterior(prior, op, y, sy)
    sd = torch.diagonal(post.covariance()).sqrt()
    x, info = sample(prior.denoiser(PROC), op, y, sy, method=method, nfe=50, n=4000, seeds=range(4000))
    assert info.vjps == 0 and info.nfe == 50 and info.nfe_equivalents == 50
    err = (x.mean(0) - post.mean()).abs() / sd
    cov_err = float((torch.cov(x.T) - post.covariance()).norm() / post.covariance().norm())
    if method == "tsmc":
        assert torch.all(err < 4 / math.sqrt(4000)) and cov_err < 0.12, (err, cov_err)
    else:
        assert torch.all(err < 0.15) and cov_err < 0.15, (err, cov_err)


@pytest.mark.parametrize("method", SMC)
def test_smc_error_falls_with_particles(method):
    """The posterior-mean error falls with the particle count from 16 to 1024 with a log-log slope <= -0.3 (the
    weighted particles are exact as N grows; TDS has the same test in test_inverse.py).  A mild problem, so that the
    Monte-Carlo error, not the chain's time-discretisation bias, dominates up to 1024 particles: at 40 steps that
    bias (about 0.07) is reached at 256 particles, at 100 steps it is below the error of 1024."""
    prior, op, y, sy = _mixture(d=4, m=2, sigma_y=0.3, components=3)
    mu = ExactPosterior(prior, op, y, sy).mean()
    ns = (16, 64, 256, 1024)
    errs = []
    for n in ns:
        e = [float((sample(prior.denoiser(PROC), op, y, sy, method=method, nfe=100, n=n,
                           seeds=range(r * 10000, r * 10000 + n))[0].mean(0) - mu).norm()) for r in range(4)]
        errs.append(float(np.sqrt(np.mean(np.square(e)))))
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope <= -0.3, (errs, slope)


def test_oversample_counts_every_particle():
    prior, op, y, sy = _mixture()
    x, info = sample(prior.denoiser(PROC), op, y, sy, method="mcgdiff", nfe=40, n=16, oversample=4)
    assert x.shape == (16, 8) and torch.isfinite(x).all()
    assert info.evaluations == 40 and info.nfe_equivalents == 40  # 10 grid points x 4 particles per sample


def test_pins_and_grid_snapping():
    """MCGdiff's pins: the largest grid level at or below rho_i (first point above the grid, last point below);
    snapping moves interior points onto the requested levels and keeps the number of points."""
    S = torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01], dtype=DT)
    rho2 = torch.tensor([200.0, 5.0, 1.0, 1e-6], dtype=DT) ** 2
    assert pin_points(S, rho2).tolist() == [0, 2, 2, 4]
    grid = ds.grids.make_grid(PROC, 20, "logsnr", "t_min")
    new = snap_grid(grid, PROC, [3.0, 0.5])
    Sn = new.sigma / new.alpha
    assert new.t.numel() == 20 and torch.all(Sn[1:] < Sn[:-1])
    assert min(abs(float(v) - 3.0) for v in Sn) < 1e-9 and min(abs(float(v) - 0.5) for v in Sn) < 1e-9


def test_systematic_resampling_keeps_the_weights():
    logw = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=DT))
    idx = systematic_resample(logw, 0.3, 8)
    assert torch.bincount(idx, minlength=4).tolist() == [4, 2, 1, 1]


def test_published_mcgdiff_of_the_bench_samples_the_gaussian_posterior():
    """The bench's MCGdiff as published (multinomial resampling every step, the official weights and time steps) on
    a standard normal prior, two filters of 1500 particles: the posterior mean within 0.4 posterior standard
    deviations and the variances within [0.5, 1.2] of the exact ones.  Loose on purpose: the official code itself
    misses by up to 0.58 sd and 0.27x the variance on this problem at 50-100 steps (checked outside the test suite);
    without the conditioning the mean would miss by > 1 sd."""
    from diffsolve.bench.inverse_peers import mcgdiff_paper

    prior, op, y, sy = _gaussian()
    post = ExactPosterior(prior, op, y, sy)
    var = torch.diagonal(post.covariance())
    assert float(((post.mean() - prior.means[0]).abs() / var.sqrt()).max()) > 1
    x_T = torch.randn(3000, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    x, count = mcgdiff_paper(prior.denoiser(PROC), op, y, sy, x_T, 50, torch.Generator().manual_seed(1),
                             particles=1500)
    assert 45 <= count.nfe <= 50 and x.shape == (3000, 6)
    assert torch.all((x.mean(0) - post.mean()).abs() < 0.4 * var.sqrt())
    ratio = x.var(0) / var
    assert torch.all((ratio > 0.5) & (ratio < 1.2)), ratio


# ---------------------------------------------------------------------------------------------------------------
# bad input: every method, a clear error

SVD_METHODS = ("ddrm", "daps", "mcgdiff", "afdps", "tsmc", "pigdm", "pigdm-step", "diffpir", "reddiff")
GRAD_METHODS = ("dps", "dps-x0", "pigdm", "pigdm-step", "mmps", "tmpd", "tds")


class _NoSVD(Dense):
    def svd(self):
        raise NotImplementedError("this operator has no SVD")


@pytest.fixture(scope="module")
def problem():
    prior = GaussianMixture.random(6, n_components=2, rank=2, seed=0)
    op = Dense.gaussian(3, (6,), seed=1)
    y = op(prior.sample(1, torch.Generator().manual_seed(2)))[0]
    return prior, op, y


@pytest.mark.parametrize("method", sorted(methods()))
def test_bad_measurements_are_clear_errors(problem, method):
    prior, op, y = problem
    den = prior.denoiser(PROC)
    run = lambda y_, s_: sample(den, op, y_, s_, method=method, nfe=30, n=2, prior=prior)  # noqa: E731
    with pytest.raises(ValueError, match="measurement shape"):
        run(torch.zeros(5, dtype=DT), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        run(torch.full_like(y, math.nan), 0.1)
    with pytest.raises(ValueError, match="sigma_y"):
        run(y, -0.1)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_methods_that_need_the_svd_say_so(problem, method):
    prior, op, y = problem
    den = prior.denoiser(PROC)
    with pytest.raises(TypeError, match="SVD"):
        sample(den, _NoSVD(op.M), y, 0.1, method=method, nfe=30, n=2)
    if method != "reddiff":  # RED-diff runs on non-linear operators too
        nonlinear = Function(lambda x: x[:, :3] ** 2, (6,), (3,))
        with pytest.raises(TypeError, match="linear"):
            sample(den, nonlinear, y, 0.1, method=method, nfe=30, n=2)


@pytest.mark.parametrize("method", GRAD_METHODS)
def test_methods_that_need_gradients_say_so(problem, method):
    prior, op, y = problem

    def frozen(x, t, **_):
        with torch.no_grad():
            return prior.network(PROC)(x, t)

    with pytest.raises(TypeError, match="gradients"):
        sample(ds.Denoiser(frozen, PROC, "x0", dtype=DT), op, y, 0.1, method=method, nfe=30, n=2)


def test_start_weight_corrects_the_gaussian_start():
    """Two far modes (weights 0.8 / 0.2, means +-120 per coordinate, so alpha_T |mu| ~ 1.5 at t_max) and an
    uninformative measurement: from the N(0, I) start the chain gives the modes about 0.67 / 0.33; the start's
    importance weight (the model's score integrated along the ray, 3 nodes) restores 0.8 within Monte-Carlo error."""
    d = 4
    mu = torch.full((d,), 120.0, dtype=DT)
    prior = DenseGaussianMixture(torch.stack([mu, -mu]), torch.eye(d, dtype=DT).expand(2, d, d),
                                 torch.tensor([0.8, 0.2], dtype=DT))
    op = Dense(torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=DT))
    y, sy = torch.tensor([0.0], dtype=DT), 100.0
    w = float(ExactPosterior(prior, op, y, sy).mixture.log_weights.exp()[0])
    share = {}
    for start in (0, 3):
        x, info = sample(prior.denoiser(PROC), op, y, sy, method="tsmc", nfe=50, n=4000, seeds=range(4000),
                         start=start)
        assert info.nfe == 50
        share[start] = float((x[:, 0] > 0).double().mean())
    assert abs(share[3] - w) < 0.03 < abs(share[0] - w), (share, w)
