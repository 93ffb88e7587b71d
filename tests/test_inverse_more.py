"""The second set of inverse methods against exact answers: RePaint (azula's step, resampling towards the exact
posterior), FlowChef (the paper's update, data consistency), the joint two-prior posterior (product mixture, exact
moments), the slice-wise TV solver (closed-form prox), the DPM-Encoder (round trip to float precision), precision
weighting (reduces to its inner method), and their errors."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.evaluation.distances import sliced_wasserstein
from diffsolve.grids import explicit, make_grid
from diffsolve.guidance import PrecisionWeighted
from diffsolve.inverse import Dense, ExactPosterior, Function, Identity, Mask, guided_model, sample
from diffsolve.inverse.methods.dpm_encoder import decode, encode
from diffsolve.inverse.methods.joint import Mix, Product, product_mixture, split
from diffsolve.inverse.methods.mbir import Volume, diff_z, diff_z_adjoint, tv_prox
from diffsolve.inverse.methods.repaint import repaint_schedule
from diffsolve.reference import DenseGaussianMixture, GaussianMixture
from diffsolve.solvers.state import Noise

DT = torch.float64
PROC = ds.VPDiscrete.linear(1000)
PROCESSES = {"vp": lambda: ds.VPDiscrete.linear(1000), "ve": lambda: ds.VE(), "flow": lambda: ds.RectifiedFlow()}


def _gaussian(d=6, seed=0, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    L = scale * torch.randn(d, d, generator=g, dtype=DT)
    C, mu = L @ L.T + 0.1 * torch.eye(d, dtype=DT), 0.5 * torch.randn(1, d, generator=g, dtype=DT)
    return DenseGaussianMixture(mu, C[None])


def _masked(prior, sigma_y=0.05, seed=1):
    d = prior.dim
    m = torch.zeros(d, dtype=torch.bool)
    m[: d // 2] = True
    op = Mask(m)
    g = torch.Generator().manual_seed(seed)
    y = op(prior.sample(1, g)) + sigma_y * torch.randn(1, op.out_dim, generator=g, dtype=DT)
    return op, y[0]


# ---------------------------------------------------------------------------------------------------------------
# RePaint
# ---------------------------------------------------------------------------------------------------------------
def test_repaint_schedule():
    assert repaint_schedule(3, 1, 0) == [0, 1, 2, 3]
    assert repaint_schedule(2, 1, 1) == [0, 1, 0, 1, 2, 1, 2]
    assert repaint_schedule(3, 2, 1) == [0, 1, 2, 0, 1, 2, 3, 2, 3]
    # every step is taken resample + 1 times: the NFE of the plan
    assert sum(1 for i, j in zip(repaint_schedule(10, 3, 2)[:-1], repaint_schedule(10, 3, 2)[1:]) if j > i) == 30


@pytest.mark.parametrize("kind", ["vp", "ve"])
@pytest.mark.parametrize("resample", [0, 2])
def test_repaint_step_matches_azula(kind, resample):
    """One RePaint step t -> s (resample + 1 passes) on a mask with sigma_y = 0 is azula's RePaintSampler step
    with iterations = resample + 1 (same global-generator draws; ours returns the x0 prediction at s, compared with
    azula's denoiser at its x_s)."""
    azula = pytest.importorskip("azula", reason="azula is not installed")
    from azula.guidance import RePaintSampler
    from test_inverse_parity import GaussianDenoiser

    process = PROCESSES[kind]()
    prior = GaussianMixture.random(8, n_components=3, rank=2, seed=0)
    model = prior.denoiser(process)
    m = torch.zeros(8, dtype=torch.bool)
    m[::2] = True
    op = Mask(m)
    y = op(prior.sample(1, torch.Generator().manual_seed(1)))[0]
    den = GaussianDenoiser(model)
    sampler = RePaintSampler(den, op.adjoint(y[None]).expand(3, 8), m.expand(3, 8), iterations=resample + 1, eta=1.0)
    method = ds.inverse.METHODS["repaint"].build(model, op, y, 0.0, resample=resample, jump=1, eta=1.0)
    assert azula is not None
    for f_t, f_s in ((0.9, 0.7), (0.5, 0.4), (0.2, 0.05)):
        t = process.t_min + f_t * (process.t_max - process.t_min)
        s = process.t_min + f_s * (process.t_max - process.t_min)
        g = torch.Generator().manual_seed(int(100 * f_t))
        x_t = process.alpha(torch.tensor(t)) * prior.sample(3, g) + process.sigma(torch.tensor(t)) * torch.randn(
            3, 8, generator=g, dtype=DT)
        torch.manual_seed(5)
        theirs = den(sampler.step(x_t, torch.tensor(t, dtype=DT), torch.tensor(s, dtype=DT)),
                     torch.tensor(s, dtype=DT)).mean
        torch.manual_seed(5)
        ours = method.run(x_t / process.prior_scale, explicit(process, t=[t, s], final="t_min"), Noise(None), None)
        assert float((ours - theirs).norm() / theirs.norm()) <= 1e-10


def test_repaint_resampling_approaches_the_posterior():
    """Replacement alone (resample = 0) conditions the unseen part on a noised measurement and stays biased as the
    steps grow; resampling lets it settle, and the posterior-mean error falls well below the replacement's."""
    prior = _gaussian()
    op, y = _masked(prior)
    post = ExactPosterior(prior, op, y, 0.05)
    den = prior.denoiser(PROC)
    err = {}
    for r in (0, 3):
        x, info = sample(den, op, y, 0.05, method="repaint", nfe=400, n=500, resample=r)
        assert info.vjps == 0 and info.nfe <= 400
        err[r] = float((x.mean(0) - post.mean()).norm())
    noise_floor = float(post.covariance().diagonal().sum().sqrt()) / math.sqrt(500)
    assert err[3] < 0.4 * err[0], err  # measured: 0.046 against 0.26
    assert err[3] < 2 * noise_floor, (err, noise_floor)  # Monte-Carlo scale of a mean of 500 samples: 0.059


# ---------------------------------------------------------------------------------------------------------------
# FlowChef
# ---------------------------------------------------------------------------------------------------------------
def test_flowchef_is_the_papers_update_on_a_flow():
    """On a rectified flow with the Euler solver, one steered step is the paper's: z <- z - zeta grad L(x0_hat),
    then z + v dt with the velocity of the unsteered state (no second evaluation, no VJP)."""
    process = ds.RectifiedFlow()
    prior = _gaussian(d=6)
    model = prior.denoiser(process)
    op, y = _masked(prior)
    zeta = 0.7
    wrapped = guided_model(model, op, y, 0.05, "flowchef", zeta=zeta)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=DT)
    t, s = 0.8, 0.6
    out = ds.sample(wrapped, z, "euler", grid=[t, s], final="t_min", scale_noise=False,
                    after_step=wrapped.after_step)
    pred = model.evaluate(z, torch.tensor(t, dtype=DT), {})
    v = pred.eps - pred.x0  # velocity of x_t = (1 - t) x0 + t eps
    x0_hat = z - t * v
    grad = op.adjoint(op(x0_hat) - y)  # of ||A x0_hat - y||^2 / 2
    paper = (z - zeta * grad) + v * (s - t)
    assert torch.allclose(out, paper, atol=1e-12)


def test_flowchef_fits_the_measurement_without_vjps():
    prior = _gaussian(d=6)
    op, y = _masked(prior, sigma_y=0.01)
    den = prior.denoiser(ds.RectifiedFlow())
    x, info = sample(den, op, y, 0.01, method="flowchef", nfe=50, n=200, zeta=1.0)
    x0, _ = sample(den, op, y, 0.01, method="flowchef", nfe=50, n=200, zeta=1e-9)
    assert info.vjps == 0 and info.nfe == 50
    fit, free = float((op(x) - y).pow(2).mean().sqrt()), float((op(x0) - y).pow(2).mean().sqrt())
    assert fit < 0.1 * free, (fit, free)


# ---------------------------------------------------------------------------------------------------------------
# joint two-prior separation
# ---------------------------------------------------------------------------------------------------------------
def test_mix_operator_algebra():
    op = Mix((2, 3), (0.5, 1.5))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 3, generator=g, dtype=DT)
    y = torch.randn(3, 2, 3, generator=g, dtype=DT)
    x1, x2 = split(z)
    assert torch.allclose(op(z), 0.5 * x1 + 1.5 * x2)
    assert torch.allclose((op(z) * y).sum(), (z * op.adjoint(y)).sum())
    M = op.matrix()
    U, S, V = op.svd()
    assert torch.allclose(U @ torch.diag(S) @ V.T, M, atol=1e-12)
    rho = 0.3
    ref = torch.linalg.solve(M.T @ M + rho * torch.eye(12, dtype=DT), (y.reshape(3, -1) @ M + rho * z.reshape(3, -1)).T).T
    assert torch.allclose(op.prox(z, y, rho).reshape(3, -1), ref, atol=1e-10)
    assert torch.allclose(op(op.pinv(y)), y, atol=1e-12)


def _separation(sigma_y=0.1):
    p1, p2 = _gaussian(d=4, seed=0), _gaussian(d=4, seed=7, scale=0.6)
    pm = product_mixture(p1, p2)
    op = Mix((4,), (0.5, 0.5))
    g = torch.Generator().manual_seed(2)
    y = op(pm.sample(1, g)) + sigma_y * torch.randn(1, 4, generator=g, dtype=DT)
    return p1, p2, pm, op, y[0], sigma_y


def test_product_prior_is_the_pair_of_denoisers_on_any_two_processes():
    """The product model's x0 is [D1(x1); D2(x2)]; a second model on another process (VE) is evaluated at the same
    log-SNR and gives the same E[x0 | x_t] as the second prior's VP denoiser; and it is the exact denoiser of the
    product mixture."""
    p1, p2, pm, _, _, _ = _separation()
    vp, ve = ds.VPDiscrete.linear(1000), ds.VE()
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    for t in (0.2, 0.6, 0.95):
        tt = torch.tensor(t * vp.t_max, dtype=DT)
        a = Product(p1.denoiser(vp), p2.denoiser(vp)).evaluate(z, tt).x0
        b = Product(p1.denoiser(vp), p2.denoiser(ve)).evaluate(z, tt).x0
        c = pm.denoiser(vp).evaluate(z, tt, {}).x0
        assert torch.allclose(a, b, atol=1e-9) and torch.allclose(a, c, atol=1e-9)


def test_joint_mmps_gives_the_exact_separation_posterior():
    """MMPS with the exact Jacobian is exact for a Gaussian prior; on the product of two Gaussians the probability-
    flow ODE from the exact p_T(z | y) reproduces the posterior mean and covariance of the pair (as for one prior
    in test_inverse.py)."""
    p1, p2, pm, op, y, sy = _separation()
    post = ExactPosterior(pm, op, y, sy)
    from test_inverse import assert_ode_moments_exact

    assert_ode_moments_exact(guided_model(Product(p1.denoiser(PROC), p2.denoiser(PROC)), op, y, sy, "mmps",
                                          iterations=4), post)


def test_joint_method_reaches_the_floor_with_the_oracle_and_counts_both_networks():
    p1, p2, pm, op, y, sy = _separation()
    post = ExactPosterior(pm, op, y, sy)
    n = 1000
    x, info = sample(p1.denoiser(PROC), op, y, sy, method="joint", second=p2.denoiser(PROC), inner="oracle",
                     nfe=200, n=n, prior=pm)
    assert x.shape == (n, 8) and info.method == "joint:oracle" and info.nfe == 200 and info.evaluations == 100
    a, b = post.sample(n, torch.Generator().manual_seed(1)), post.sample(n, torch.Generator().manual_seed(2))
    assert sliced_wasserstein(x, a) < 2 * sliced_wasserstein(a, b)
    xp, info = sample(p1.denoiser(PROC), op, y, sy, method="joint", second=p2.denoiser(PROC), nfe=100, n=n)
    assert info.method == "joint:repaint" and info.nfe <= 100
    prior_sw = sliced_wasserstein(pm.sample(n, torch.Generator().manual_seed(3)), a)
    assert sliced_wasserstein(xp, a) < 0.3 * prior_sw


# ---------------------------------------------------------------------------------------------------------------
# slice-wise prior + TV across slices
# ---------------------------------------------------------------------------------------------------------------
def test_tv_prox_of_two_slices_is_the_closed_form():
    """A = I, two slices: the mean of each pixel's pair stays at m = (y + rho x0) / (1 + rho) and the difference
    shrinks by 2 tv / (1 + rho) (soft thresholding)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 5, generator=g, dtype=DT)
    y = torch.randn(1, 2, 5, generator=g, dtype=DT)
    op = Identity((2, 5))
    rho, tv = 0.7, 0.2
    out = tv_prox(op, y, x0, rho, tv, iterations=300, cg_iterations=10)
    m = (y + rho * x0) / (1 + rho)
    d = m[:, 1] - m[:, 0]
    d_new = torch.sign(d) * (d.abs() - 2 * tv / (1 + rho)).clamp_min(0)
    mid = 0.5 * (m[:, 0] + m[:, 1])
    assert torch.allclose(out[:, 0], mid - d_new / 2, atol=1e-6) and torch.allclose(out[:, 1], mid + d_new / 2, atol=1e-6)
    assert torch.allclose(tv_prox(op, y, x0, rho, 0.0), m)


def test_diff_z_adjoint():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, generator=g, dtype=DT), torch.randn(2, 3, 3, generator=g, dtype=DT)
    assert torch.allclose((diff_z(x) * v).sum(), (x * diff_z_adjoint(v)).sum())


def test_mbir_without_tv_is_diffpir_on_each_slice():
    prior = GaussianMixture.random(6, n_components=2, rank=2, seed=0)
    den = prior.denoiser(PROC)
    den.sample_shape = (6,)
    vol = prior.sample(3, torch.Generator().manual_seed(1)).reshape(1, 3, 6)
    op = Dense.gaussian(9, (3, 6), seed=2)
    y = op(vol)[0]
    a, info = sample(den, op, y, 0.05, method="mbir", nfe=20, n=2, tv=0.0)
    b, _ = sample(Volume(den, 3), op, y, 0.05, method="diffpir", nfe=20, n=2)
    assert a.shape == (2, 3, 6) and info.vjps == 0
    assert torch.allclose(a, b, atol=1e-10)
    c, _ = sample(den, op, y, 0.05, method="mbir", nfe=20, n=2, tv=5.0)
    assert float(diff_z(c).abs().sum()) < float(diff_z(a).abs().sum())  # TV pulls the slices together


# ---------------------------------------------------------------------------------------------------------------
# DPM-Encoder
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PROCESSES))
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_dpm_encoder_round_trip_is_exact(kind, eta):
    process = PROCESSES[kind]()
    prior = GaussianMixture.random(8, n_components=3, rank=2, seed=0)
    den = prior.denoiser(process)
    x = prior.sample(5, torch.Generator().manual_seed(1))
    grid = make_grid(process, 12, "logsnr", "t_min")
    z = encode(den, x, grid, eta)
    assert z.eps.shape == (12, 5, 8)
    assert float((decode(den, z) - x).abs().max()) < 1e-12
    other = GaussianMixture.random(8, n_components=3, rank=2, seed=5).denoiser(process)
    assert float((decode(other, z) - x).abs().max()) > 1e-2  # another model translates x


def test_dpm_encoder_method_round_trip_on_the_shipped_flow():
    den = ds.load("mnist-flow")
    from diffsolve.util.datasets import load_dataset

    x = load_dataset("mnist-heldout", limit=1).double()[0]
    out, info = sample(den, Identity(x.shape), x, 0.0, method="dpm-encoder", nfe=6, n=2, t0=0.5)
    assert info.nfe == 6 and out.shape == (2, 1, 28, 28)
    assert float((out - x).abs().max()) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# precision weighting
# ---------------------------------------------------------------------------------------------------------------
def test_precision_weighting_with_power_zero_is_its_inner_method():
    prior = GaussianMixture.random(8, n_components=3, rank=2, seed=0)
    op = Dense.gaussian(3, (8,), seed=1)
    y = op(prior.sample(1, torch.Generator().manual_seed(2)))[0]
    den = prior.denoiser(PROC)
    a, ia = sample(den, op, y, 0.1, method="precision", nfe=30, n=4, power=0.0)
    b, ib = sample(den, op, y, 0.1, method="dps-x0", nfe=30, n=4)
    assert torch.equal(a, b) and ia.vjps == ib.vjps == 10
    c, _ = sample(den, op, y, 0.1, method="precision", nfe=30, n=4, power=1.0)
    assert not torch.allclose(a, c)


def test_precision_weights_follow_the_unpredictable_coordinates():
    """For a diagonal Gaussian prior, while the noise is above the data scale the x0 predictions move most where
    the prior variance is largest (x0_hat ~ v x / s^2): there the weights are largest; they average 1 per sample."""
    var = torch.tensor([0.01, 0.04, 1.0, 4.0], dtype=DT)
    prior = DenseGaussianMixture(torch.zeros(1, 4, dtype=DT), torch.diag(var)[None])
    op = Dense(torch.ones(1, 4, dtype=DT))
    den = prior.denoiser(PROC)
    pw = PrecisionWeighted(guided_model(den, op, torch.zeros(1, dtype=DT), 0.5, "dps-x0"), window=4)
    lam = torch.linspace(float(PROC.lam(torch.tensor(PROC.t_max))), -math.log(5.0), 8, dtype=DT)  # s_t: 150 -> 5
    ds.sample(pw, torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=DT), "ddim",
              grid=PROC.t_of_lam(lam), final="t_min")
    w = pw.weights()
    assert w is not None and torch.allclose(w.mean(1), torch.ones(64, dtype=DT))
    order = w.mean(0).argsort()
    assert order.tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_input_of_the_new_methods():
    prior = _gaussian(d=6)
    op, y = _masked(prior)
    den = prior.denoiser(PROC)
    f = Function(lambda x: x[:, :3] ** 2, (6,), (3,))
    with pytest.raises(TypeError, match="linear"):
        sample(den, f, y, 0.05, method="repaint")
    with pytest.raises(ValueError, match="resample"):
        sample(den, op, y, 0.05, method="repaint", resample=-1)
    with pytest.raises(ValueError, match="jump"):
        sample(den, op, y, 0.05, method="repaint", jump=0)
    with pytest.raises(ValueError, match="zeta"):
        sample(den, op, y, 0.05, method="flowchef", zeta=0.0)
    with pytest.raises(ValueError, match="inner"):
        sample(den, Mix((6,)), y.repeat(2), 0.05, method="joint", inner="nope")
    with pytest.raises(ValueError, match="inner"):
        sample(den, op, y, 0.05, method="precision", inner="ddrm")
    with pytest.raises(ValueError, match="volumes"):
        sample(den, op, y, 0.05, method="mbir")
    with pytest.raises(TypeError, match="Identity"):
        sample(den, op, y, 0.05, method="dpm-encoder")
    with pytest.raises(ValueError, match="eta"):
        sample(den, Identity((6,)), torch.zeros(6, dtype=DT), 0.0, method="dpm-encoder", eta=0.0)
    with pytest.raises(ValueError, match="process"):
        sample(den, Identity((6,)), torch.zeros(6, dtype=DT), 0.0, method="dpm-encoder",
               decoder=prior.denoiser(ds.VE()))
    with pytest.raises(ValueError, match="NaN"):
        sample(den, op, torch.full_like(y, float("nan")), 0.05, method="repaint")
    with pytest.raises(ValueError, match="weights"):
        Mix((3,), (0.0, 0.0))
    with pytest.raises(ValueError, match="window"):
        PrecisionWeighted(guided_model(den, op, y, 0.05, "dps-x0"), window=1)


def test_one_measurement_per_sample_equals_separate_calls():
    """y [n, *out]: n problems in one call; each sample equals the call for its own measurement and seed, for every
    method whose samples are independent; methods that couple them refuse."""
    prior = GaussianMixture.random(8, n_components=3, rank=2, seed=0)
    den = prior.denoiser(PROC)
    op = Dense.gaussian(3, (8,), seed=1)
    ys = op(prior.sample(3, torch.Generator().manual_seed(2)))
    for m in ds.inverse.methods():
        spec = ds.inverse.METHODS[m]
        if spec.coupled or spec.composite or m in ("mbir", "dpm-encoder"):
            continue
        xb, _ = sample(den, op, ys, 0.1, method=m, nfe=30, seeds=[5, 6, 7])
        xs = torch.cat([sample(den, op, ys[i], 0.1, method=m, nfe=30, seeds=[5 + i])[0] for i in range(3)])
        assert torch.allclose(xb, xs, atol=1e-10), m
    with pytest.raises(ValueError, match="couples"):
        sample(den, op, ys, 0.1, method="tds", nfe=30, seeds=[5, 6, 7])
    with pytest.raises(ValueError, match="3 measurements for 2 samples"):
        sample(den, op, ys, 0.1, method="dps", nfe=30, seeds=[5, 6])
