"""Inverse problems against exact answers: operators by their algebra, the exact posterior by Bayes' rule, the
guidance methods by the closed-form Gaussian posterior, the oracle by the Monte-Carlo floor."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.evaluation.distances import sliced_wasserstein
from diffsolve.inverse import (
    AvgPool,
    Dense,
    ExactPosterior,
    Function,
    GaussianBlur,
    Identity,
    Mask,
    guided_model,
    methods,
    sample,
)
from diffsolve.reference import DenseGaussianMixture, GaussianMixture

DT = torch.float64
PROC = ds.VPDiscrete.linear(1000)


def _ops():
    img = (1, 8, 8)
    return [Identity(img), Mask.box(img, 4), Mask.random(img, 0.7, seed=1), AvgPool(img, 2), GaussianBlur(img, 1.0, 5),
            Dense.gaussian(12, img, seed=2)]


@pytest.mark.parametrize("op", _ops(), ids=lambda o: type(o).__name__)
def test_linear_operator_algebra(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3,) + op.in_shape, generator=g, dtype=DT)
    y = torch.randn((3,) + op.out_shape, generator=g, dtype=DT)
    # adjoint: <A x, y> = <x, A^T y>
    assert torch.allclose((op(x) * y).flatten(1).sum(1), (x * op.adjoint(y)).flatten(1).sum(1), rtol=1e-10, atol=1e-10)
    M = op.matrix()
    assert torch.allclose(op(x).reshape(3, -1), x.reshape(3, -1) @ M.T, atol=1e-10)
    U, S, V = op.svd()
    assert torch.allclose(U @ torch.diag(S) @ V.T, M, atol=1e-9)
    # pseudo-inverse: A A^+ A x = A x (GaussianBlur's cut-off keeps well-conditioned frequencies only)
    ax = op(x)
    tol = 1e-2 if isinstance(op, GaussianBlur) else 1e-9
    assert float((op(op.pinv(ax)) - ax).abs().max()) < tol
    # prox: (A^T A + rho I) x = A^T y + rho x0, against a dense solve
    rho = 0.3
    px = op.prox(x, y, rho).reshape(3, -1)
    ref = torch.linalg.solve(M.T @ M + rho * torch.eye(M.shape[1], dtype=DT),
                             (y.reshape(3, -1) @ M + rho * x.reshape(3, -1)).T).T
    assert torch.allclose(px, ref, atol=1e-9)


def test_operator_errors():
    op = Mask.box((1, 8, 8), 4)
    with pytest.raises(ValueError, match="x must be"):
        op(torch.zeros(2, 1, 7, 8))
    with pytest.raises(ValueError):
        Mask.box((1, 8, 8), 9)
    with pytest.raises(ValueError):
        AvgPool((1, 8, 8), 3)
    with pytest.raises(ValueError, match="non-finite"):
        Dense(torch.tensor([[float("nan"), 1.0]]))
    f = Function(lambda x: x.pow(2).sum(1, keepdim=True), (4,), (1,))
    with pytest.raises(TypeError, match="non-linear"):
        f.adjoint(torch.zeros(1, 1))


def test_dense_mixture_equals_low_rank_mixture():
    g = GaussianMixture.random(16, n_components=3, seed=1)
    dg = DenseGaussianMixture.from_mixture(g)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1), dtype=DT)
    for s in (0.05, 0.4, 3.0):
        assert torch.allclose(g.log_prob_ve(x, s), dg.log_prob_ve(x, s), atol=1e-9)
        assert torch.allclose(g.denoise_ve(x, s), dg.denoise_ve(x, s), atol=1e-10)


def _mixture_problem(d=8, m=3, sigma_y=0.2, K=4, seed=0):
    prior = GaussianMixture.random(d, n_components=K, rank=2, seed=seed)
    op = Dense.gaussian(m, (d,), seed=seed + 1)
    x = prior.sample(1, torch.Generator().manual_seed(seed + 2))
    y = op(x) + sigma_y * torch.randn(1, m, generator=torch.Generator().manual_seed(seed + 3), dtype=DT)
    return prior, op, y[0], sigma_y


def test_exact_posterior_is_bayes_rule():
    prior, op, y, sy = _mixture_problem()
    post = ExactPosterior(prior, op, y, sy)
    x = prior.sample(64, torch.Generator().manual_seed(5))
    loglik = -0.5 * (((y - op(x)) / sy) ** 2).sum(1) - 0.5 * y.numel() * math.log(2 * math.pi * sy**2)
    bayes = prior.log_prob(x) + loglik - post.log_evidence
    assert torch.allclose(post.log_prob(x), bayes, atol=1e-9)


def _gaussian_problem(unit: bool, d=6, m=3, sigma_y=0.1):
    g = torch.Generator().manual_seed(0)
    if unit:
        C, mu = torch.eye(d, dtype=DT), torch.zeros(1, d, dtype=DT)
    else:
        L = 0.4 * torch.randn(d, d, generator=g, dtype=DT)
        C, mu = L @ L.T + 0.1 * torch.eye(d, dtype=DT), 0.5 * torch.randn(1, d, generator=g, dtype=DT)
    prior = DenseGaussianMixture(mu, C[None])
    op = Dense.gaussian(m, (d,), seed=1)
    y = op(prior.sample(1, g)) + sigma_y * torch.randn(1, m, generator=g, dtype=DT)
    return prior, op, y[0], sigma_y


@pytest.mark.parametrize("method,unit", [("mmps", False), ("pigdm", True), ("oracle", False)])
def test_gaussian_posterior_moments_are_exact(method, unit):
    """With a Gaussian prior and its exact denoiser, MMPS (full covariance) and PiGDM (unit-variance prior) give
    the exact E[x0 | x_t, y]; the probability-flow ODE from the exact p_T(x | y) is then an affine map of the noise,
    so its mean (noise 0) and covariance (unit noise vectors) are exact, up to the solver's error at 50 NFE."""
    prior, op, y, sy = _gaussian_problem(unit)
    post = ExactPosterior(prior, op, y, sy)
    assert_ode_moments_exact(guided_model(prior.denoiser(PROC), op, y, sy, method, prior=prior), post)


def assert_ode_moments_exact(model, post, tol=1e-3):
    """The probability-flow ODE of ``model`` from the exact p_T(x | y) (its mean, and unit noise vectors) ends at
    the posterior mean and covariance within ``tol`` (relative), when model's x0 is exact and affine in x."""
    t = torch.tensor(PROC.t_max, dtype=DT)
    a, s = PROC.alpha(t), PROC.sigma(t)
    d = post.mean().numel()
    L = torch.linalg.cholesky(a**2 * post.covariance() + s**2 * torch.eye(d, dtype=DT))
    x_T = a * post.mean() + torch.cat([torch.zeros(1, d, dtype=DT), torch.eye(d, dtype=DT)]) @ L.T
    x = ds.sample(model, x_T / PROC.prior_scale, "dpm++3m", nfe=50)
    mean, M = x[0], (x[1:] - x[0]).T
    assert float((mean - post.mean()).norm() / post.mean().norm()) < tol
    assert float((M @ M.T - post.covariance()).norm() / post.covariance().norm()) < tol


def test_oracle_guidance_reaches_the_monte_carlo_floor():
    prior, op, y, sy = _mixture_problem(d=8, m=2)
    post = ExactPosterior(prior, op, y, sy)
    n = 1000
    x, info = sample(prior.denoiser(PROC), op, y, sy, method="oracle", nfe=200, n=n, prior=prior, solver="dpm++2m")
    assert info.vjps == 0 and info.nfe <= 200
    a, b = post.sample(n, torch.Generator().manual_seed(1)), post.sample(n, torch.Generator().manual_seed(2))
    floor = sliced_wasserstein(a, b)
    sw = sliced_wasserstein(x, a)
    prior_sw = sliced_wasserstein(prior.sample(n, torch.Generator().manual_seed(3)), a)
    assert sw < 2 * floor < prior_sw


def test_budget_counts_vjps():
    prior, op, y, sy = _gaussian_problem(False)
    x, info = sample(prior.denoiser(PROC), op, y, sy, method="mmps", nfe=100, n=4, iterations=3)
    assert info.vjps == 4 * info.evaluations  # 3 CG iterations + the final VJP per evaluation
    assert info.nfe_equivalents <= 100
    assert torch.isfinite(x).all()
    assert set(methods()) >= {"dps", "pigdm", "mmps", "tmpd", "oracle"}


def test_bad_input_is_a_clear_error():
    prior, op, y, sy = _gaussian_problem(False)
    den = prior.denoiser(PROC)
    with pytest.raises(ValueError, match="measurement shape"):
        sample(den, op, torch.zeros(5, dtype=DT), sy)
    with pytest.raises(ValueError, match="NaN"):
        sample(den, op, torch.full_like(y, float("nan")), sy)
    with pytest.raises(ValueError, match="sigma_y"):
        sample(den, op, y, -0.1)
    with pytest.raises(ValueError, match="unknown inverse method"):
        sample(den, op, y, sy, method="nope")
    with pytest.raises(ValueError, match="does not fit"):
        sample(den, op, y, sy, method="mmps", nfe=5)
    with pytest.raises(ValueError, match="prior"):
        sample(den, op, y, sy, method="oracle")

    def frozen(x, t, **_):
        with torch.no_grad():
            return prior.network(PROC)(x, t)

    with pytest.raises(TypeError, match="gradients"):
        sample(ds.Denoiser(frozen, PROC, "x0", dtype=DT), op, y, sy, method="dps", nfe=20, n=2)


def test_tds_error_falls_with_particles():
    """Sequential Monte Carlo: the posterior-mean error of TDS falls with the particle count (16 -> 1024) with a
    log-log slope <= -0.3, where a guidance method without weights (MMPS) stays at its bias."""
    import numpy as np

    prior, op, y, sy = _mixture_problem(d=8, m=2, sigma_y=0.1)
    mu = ExactPosterior(prior, op, y, sy).mean()
    ns = (16, 64, 256, 1024)
    errs = []
    for n in ns:
        e = [float((sample(prior.denoiser(PROC), op, y, sy, method="tds", nfe=60, n=n,
                           seeds=range(r * 10000, r * 10000 + n))[0].mean(0) - mu).norm()) for r in range(4)]
        errs.append(float(np.sqrt(np.mean(np.square(e)))))
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert slope <= -0.3, (errs, slope)


def test_tds_resamples_and_counts():
    prior, op, y, sy = _mixture_problem(d=8, m=2, sigma_y=0.1)
    x, info = sample(prior.denoiser(PROC), op, y, sy, method="tds", nfe=30, n=64)
    assert info.evaluations == 10 and info.vjps == 10 and info.nfe_equivalents == 30
    assert info.options["resamplings"] >= 1 and torch.isfinite(x).all() and x.shape == (64, 8)


def test_ddrm_posterior_mean_and_its_variance_deficit():
    """DDRM on a standard normal prior with an exact denoiser: the sample mean of 2000 samples matches the exact
    posterior mean within 4 standard errors; its variance falls short of the posterior's, more so with larger eta
    (re-noising with eta * S_s discards part of the posterior spread at finite step sizes: DDRM's known
    under-dispersion), which the ordering pins down."""
    prior, op, y, sy = _gaussian_problem(True, d=6, m=3, sigma_y=0.3)
    post = ExactPosterior(prior, op, y, sy)
    var = torch.diagonal(post.covariance())
    ratios = []
    for eta in (0.5, 0.85, 1.0):
        x, info = sample(prior.denoiser(PROC), op, y, sy, method="ddrm", nfe=50, n=2000, eta=eta)
        assert info.vjps == 0 and info.evaluations == 50
        if eta == 0.85:
            assert torch.all((x.mean(0) - post.mean()).abs() < 4 * (var / x.shape[0]).sqrt())
        ratios.append(float((x.var(0) / var).mean()))
    assert 1.05 > ratios[0] > ratios[1] > ratios[2] > 0.3, ratios


@pytest.mark.parametrize("method", sorted(set(methods())))
def test_every_method_runs_within_its_budget(method):
    from diffsolve.inverse.methods.joint import Mix

    prior, op, y, sy = _mixture_problem(d=8, m=3)
    den, shape = prior.denoiser(PROC), (8,)
    if method == "dpm-encoder":  # encodes an image: the identity and a clean y
        op, y, sy = Identity((8,)), prior.sample(1, torch.Generator().manual_seed(9))[0], 0.0
    elif method == "joint":  # two sources: y = (x1 + x2) / 2 + n
        op, shape = Mix((8,), (0.5, 0.5)), (16,)
        y = op(prior.sample(2, torch.Generator().manual_seed(9)).reshape(1, 16))[0]
    elif method == "mbir":  # volumes of two 8-dim slices
        den.sample_shape = (8,)
        op, shape = Dense.gaussian(5, (2, 8), seed=3), (2, 8)
        y = op(prior.sample(2, torch.Generator().manual_seed(9)).reshape(1, 2, 8))[0]
    x, info = sample(den, op, y, sy, method=method, nfe=40, n=8, prior=prior)
    assert x.shape == (8,) + shape and torch.isfinite(x).all()
    assert info.nfe_equivalents <= 40 and info.evaluations >= 2
    assert info.nfe_equivalents == info.nfe + 2 * info.vjps


def test_daps_samples_the_gaussian_posterior():
    """DAPS with the exact conditional step on a standard normal prior (data_var = 1, so p(x0 | x_t) is exactly
    the Gaussian it assumes): 4000 samples match the exact posterior mean within 4 standard errors and its
    covariance within the Monte-Carlo error; with data_var wrong by 4x the covariance is visibly off."""
    prior, op, y, sy = _gaussian_problem(True, d=6, m=3, sigma_y=0.3)
    post = ExactPosterior(prior, op, y, sy)
    var = torch.diagonal(post.covariance())
    x, info = sample(prior.denoiser(PROC), op, y, sy, method="daps", nfe=40, n=4000, seeds=range(4000))
    assert info.vjps == 0 and info.evaluations == 40
    assert torch.all((x.mean(0) - post.mean()).abs() < 4 * (var / x.shape[0]).sqrt())
    cov_err = float((torch.cov(x.T) - post.covariance()).norm() / post.covariance().norm())
    assert cov_err < 0.08, cov_err
    x4, _ = sample(prior.denoiser(PROC), op, y, sy, method="daps", nfe=40, n=4000, seeds=range(4000), data_var=4.0)
    assert float((torch.cov(x4.T) - post.covariance()).norm() / post.covariance().norm()) > 2 * cov_err
    x2, info2 = sample(prior.denoiser(PROC), op, y, sy, method="daps", nfe=40, n=8, ode_steps=4)
    assert 37 <= info2.evaluations <= 40 and torch.isfinite(x2).all()  # the last point (t_min) needs one
