"""Diagnostics against exact answers: the mixture's closed-form log-density, component ranks and bases, a symmetric
(gradient) denoiser Jacobian and a rotated one with a known asymmetry, the heat equation of the exact score, equal
ODE and SDE marginals of the exact model, and the 25-mode toy whose modes are known."""
import math

import pytest
import torch
from conftest import randn

import diffsolve as ds
import diffsolve.diagnostics as dg
from diffsolve.diagnostics.ode import integrate
from diffsolve.util.datasets import GRID25, grid25_modes, grid25_scale

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
FLOW = ds.RectifiedFlow()


def mixture(d, rank=None, delta=0.1, seed=1, k=3):
    return ds.GaussianMixture.random(d, n_components=k, rank=rank, delta=delta, seed=seed)


def exact_prior(mix, proc):
    """log-density of the mixture's exact marginal at t_max, in process units."""
    t = torch.tensor(proc.t_max, dtype=DT)
    a, s = float(proc.alpha(t)), float(proc.sigma_ve(t))
    return lambda x, _t: mix.log_prob_ve(x / a, s) - mix.dim * math.log(a)


# ----------------------------------------------------------------------------------------
# the integrator
# ----------------------------------------------------------------------------------------
def test_dopri5_is_fifth_order_and_adaptive_meets_its_tolerance():
    f = lambda u, y, idx: torch.cos(u)[:, None] * y  # y = y0 exp(sin u)  # noqa: E731
    y0 = torch.ones(3, 1, dtype=DT)
    exact = torch.exp(torch.sin(torch.tensor(3.0, dtype=DT)))
    errs = [float((integrate(f, 0.0, 3.0, y0, steps=n)[0] - exact).abs().max()) for n in (8, 16, 32)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert min(orders) > 4.5, orders
    y, nfe = integrate(f, 0.0, 3.0, y0, rtol=1e-9, atol=1e-9)
    assert float((y - exact).abs().max()) < 1e-7
    assert (nfe == nfe[0]).all()  # identical samples, identical steps


# ----------------------------------------------------------------------------------------
# likelihood
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [8, 64])
def test_likelihood_exact_divergence_matches_the_clean_mixture_density(d):
    mix = mixture(d)
    x = mix.sample(2, torch.Generator().manual_seed(0))
    ll = dg.log_likelihood(mix.denoiser(FLOW, "velocity"), x, divergence="exact", rtol=1e-6, atol=1e-6)
    err = float((ll.log_prob - mix.log_prob(x)).abs().max()) / d
    assert err <= 1e-3, err
    assert ll.divergence == "exact" and (ll.stderr == 0).all()
    assert torch.allclose(ll.bpd, -ll.log_prob / (d * math.log(2)))


def test_likelihood_on_a_discrete_schedule_is_the_density_at_its_smallest_noise_level():
    """DDPM's t_min has sigma/alpha = 0.01: the ODE gives log p of the data smoothed by that much, exactly (with the
    exact prior at t_max); the default N(0, I) prior stays within 1e-3 nats/dim."""
    mix = mixture(8)
    x = mix.sample(3, torch.Generator().manual_seed(1))
    den = mix.denoiser(VP, "epsilon")
    s0 = float(VP.sigma_ve(torch.tensor(0.0, dtype=DT)))
    target = mix.log_prob_ve(x, s0)
    ll = dg.log_likelihood(den, x, divergence="exact", rtol=1e-7, atol=1e-7, prior_log_prob=exact_prior(mix, VP))
    assert float((ll.log_prob - target).abs().max()) / 8 < 1e-5
    plain = dg.log_likelihood(den, x, divergence="exact", rtol=1e-6, atol=1e-6)
    assert float((plain.log_prob - target).abs().max()) / 8 < 1e-3


def test_hutchinson_lies_within_three_standard_errors_of_the_exact_value():
    mix = mixture(8)
    x = mix.sample(4, torch.Generator().manual_seed(2))
    den = mix.denoiser(VP, "epsilon")
    ex = dg.log_likelihood(den, x, divergence="exact", rtol=1e-6, atol=1e-6)
    hu = dg.log_likelihood(den, x, divergence="hutchinson", probes=12, seed=5, rtol=1e-6, atol=1e-6)
    z = (hu.log_prob - ex.log_prob) / hu.stderr
    assert (hu.stderr > 0).all() and float(z.abs().max()) < 3, z
    assert hu.probes == 12 and hu.passes_per_eval == 12


def test_fixed_steps_cost_the_same_for_every_sample_and_do_not_depend_on_the_batch():
    mix = mixture(8)
    x = mix.sample(3, torch.Generator().manual_seed(3))
    den = mix.denoiser(VP, "epsilon")
    kw = dict(divergence="hutchinson", probes=2, seeds=[7, 8, 9], steps=12)
    fixed = dg.log_likelihood(den, x, **kw)
    assert fixed.nfe.tolist() == [6 * 12 + 1] * 3
    alone = dg.log_likelihood(den, x[1:2], divergence="hutchinson", probes=2, seeds=[8], steps=12)
    assert torch.allclose(alone.log_prob, fixed.log_prob[1:2], rtol=0, atol=1e-9)
    adaptive = dg.log_likelihood(den, x, divergence="exact", rtol=1e-6, atol=1e-6)
    close = dg.log_likelihood(den, x, divergence="exact", steps=30)
    assert float((close.log_prob - adaptive.log_prob).abs().max()) / 8 < 1e-3


def test_bits_per_dim_offsets():
    assert dg.offset_bits((-1.0, 1.0)) == 7
    assert dg.offset_bits((0.0, 1.0)) == 8
    assert dg.offset_bits((0.0, 255.0)) == pytest.approx(8 - math.log2(255))
    assert dg.offset_bits((0.0, 1.0), bits=5) == 5


def _grid_data(mix, n, lo, hi):
    """Mixture samples mapped to [lo, hi] and put on the 8-bit grid lo + (hi - lo) k / 255."""
    x = mix.sample(n, torch.Generator().manual_seed(4))
    k = ((x.clamp(-1, 1) + 1) / 2 * 255).round()
    return lo + (hi - lo) * k / 255


def test_bits_per_dim_is_the_same_in_either_data_range_and_matches_the_exact_density():
    """One 8-bit data set, stored in [-1, 1] and in [0, 1], under the same mixture expressed in each range: the
    bits/dim agree (the offsets 7 and 8 absorb the scale), and each equals -(log p + d log Delta) / (d ln 2) of the
    exact density at the dequantised points."""
    d = 4
    m = ds.GaussianMixture.random(d, n_components=2, rank=2, delta=0.2, seed=0, mean_std=0.2, component_std=0.25)
    m01 = ds.GaussianMixture((m.means + 1) / 2, m.bases, m.scales / 2, m.delta / 2, m.log_weights.exp())
    x = _grid_data(m, 3, -1.0, 1.0)
    x01 = (x + 1) / 2
    res = {}
    for name, mix, data, rng in (("pm1", m, x, (-1.0, 1.0)), ("01", m01, x01, (0.0, 1.0))):
        den = mix.denoiser(FLOW, "velocity")
        r = dg.bits_per_dim(den, data, dequantization="uniform", data_range=rng, divergence="exact", rtol=1e-6,
                            atol=1e-6, seed=3)
        width = (rng[1] - rng[0]) / 256
        seeds = [3 * 7919 * 100_003 + i for i in range(3)]  # the seeds bits_per_dim gives sample i (repeat 0)
        xd, _ = dg.dequantize(dg.quantize(data, rng), "uniform", seeds, rng)
        exact = -(mix.log_prob(xd) + d * math.log(width)) / (d * math.log(2))
        assert float((r.bpd - exact).abs().max()) < 2e-3, (name, r.bpd, exact)
        res[name] = r.bpd
    assert torch.allclose(res["pm1"], res["01"], atol=2e-3)


def test_dequantisation_draws_stay_in_their_cells_and_truncnorm_log_q_is_its_density():
    from scipy.stats import truncnorm

    k = torch.tensor([[0, 17, 255]])
    for kind in ("uniform", "truncnorm"):
        x, logq = dg.dequantize(k, kind, [0], (-1.0, 1.0), sigma=0.001)
        cell = ((x + 1) / 2 * 256).floor()
        assert torch.equal(cell.long().clamp(max=255), k)
    width, sigma = 2 / 256, 0.001
    x, logq = dg.dequantize(k, "truncnorm", [0], (-1.0, 1.0), sigma=sigma)
    centre = -1 + width * (k.double() + 0.5)
    tau = width / (2 * sigma)
    ref = truncnorm.logpdf(((x - centre) / sigma).numpy(), -tau, tau).sum() - 3 * math.log(sigma)
    assert float(logq[0]) == pytest.approx(ref, rel=1e-9)


def test_quantize_refuses_data_off_the_grid():
    with pytest.raises(dg.DiagnosticError, match="not 8-bit"):
        dg.quantize(torch.full((1, 4), 0.1234))
    assert dg.quantize(torch.tensor([[-1.0, 1.0]])).tolist() == [[0, 255]]


# ----------------------------------------------------------------------------------------
# local intrinsic dimension and subspaces (MoLRG: rank-8 components in 64 dims, small isotropic part)
# ----------------------------------------------------------------------------------------
MOLRG = ds.GaussianMixture.random(64, n_components=4, rank=8, delta=1e-3, seed=3)


def _points(n, seed=0):
    return MOLRG.sample(n, torch.Generator().manual_seed(seed))


def test_flipd_median_is_the_component_rank():
    r = dg.flipd(MOLRG.denoiser(VP, "epsilon"), _points(16), sigma=0.05)
    med = float(r.lid.median())
    assert 0.9 * 8 <= med <= 1.1 * 8, med
    hu = dg.flipd(MOLRG.denoiser(VP, "epsilon"), _points(16), sigma=0.05, divergence="hutchinson", probes=8)
    assert float(((hu.lid - r.lid) / hu.stderr).abs().max()) < 4.5  # the exact value within the Hutchinson error


def test_normal_bundle_finds_the_rank_on_nine_of_ten_points():
    r = dg.normal_bundle(MOLRG.denoiser(VP, "epsilon"), _points(10, 1), sigma=0.01)
    assert float((r.lid == 8).double().mean()) >= 0.9, r.lid
    assert r.singular_values.shape == (10, 64)


def test_flow_jacobian_lid_is_the_rank():
    r = dg.flow_jacobian(MOLRG.denoiser(VP, "epsilon"), _points(2, 2), sigma_end=0.5, steps=16)
    assert r.lid.tolist() == [8, 8]
    sk = dg.flow_jacobian(MOLRG.denoiser(VP, "epsilon"), _points(2, 2), sigma_end=0.5, steps=16, directions=24)
    assert sk.lid.tolist() == [8, 8]


def test_denoiser_jacobian_rank_and_subspace_match_the_mixture_bases():
    x0 = _points(4, 3)
    rows = dg.jacobian_structure(MOLRG.denoiser(VP, "epsilon"), x0, [0.05, 0.3])
    logp, _ = MOLRG._components(x0, torch.tensor(0.0, dtype=DT))
    comp = logp.argmax(1)
    for row in rows:
        assert row.rank.tolist() == [8] * 4
        for sub, k in zip(row.subspaces, comp):
            assert dg.subspace_distance(sub, MOLRG.bases[k]) < 1e-6
            other = MOLRG.bases[(int(k) + 1) % 4]
            assert dg.subspace_distance(sub, other) > 0.5  # a wrong basis is far


# ----------------------------------------------------------------------------------------
# conservativity
# ----------------------------------------------------------------------------------------
class Rotated(ds.ModelWrapper):
    """The inner model's x0 prediction rotated by Q: a field whose Jacobian Q J is not symmetric."""

    def __init__(self, inner, q):
        super().__init__(inner)
        self.q = q

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        p = self.inner.evaluate(x, t, kwargs or {}, coeffs)
        return ds.Prediction(x, p.alpha, p.sigma, x0=(p.x0.flatten(1) @ self.q.T).reshape(x.shape))


def test_exact_denoiser_is_conservative():
    c = dg.conservativity(MOLRG.denoiser(VP, "epsilon"), _points(4, 4), sigma=0.1, probes=3, noised=True)
    assert c.pooled <= 1e-6 and float(c.asymmetry.max()) <= 1e-6


def test_rotated_field_has_its_analytic_asymmetry():
    """One Gaussian N(0, U diag(s^2) U^T + delta^2 I): J = Sigma (Sigma + s^2 I)^-1, constant.  Rotating the output by
    Q gives J' = Q J with ||Q J - J Q^T||_F / ||J||_F computable in closed form."""
    d = 6
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=DT))[0]
    gm = ds.GaussianMixture(torch.zeros(1, d, dtype=DT), u[None], torch.tensor([[2.0, 1.0, 0.7, 0.4]], dtype=DT), 0.2)
    p = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=DT))[0]
    th = 0.3
    rot = torch.eye(d, dtype=DT) + (math.cos(th) - 1) * (p @ p.T) + math.sin(th) * (p[:, 1:] @ p[:, :1].T
                                                                                     - p[:, :1] @ p[:, 1:].T)
    s = 0.5
    cov = u @ torch.diag(torch.tensor([4.0, 1.0, 0.49, 0.16], dtype=DT)) @ u.T + 0.04 * torch.eye(d, dtype=DT)
    jac = rot @ cov @ torch.linalg.inv(cov + s * s * torch.eye(d, dtype=DT))
    analytic = float(torch.linalg.norm(jac - jac.T) / torch.linalg.norm(jac))
    c = dg.conservativity(Rotated(gm.denoiser(VP, "epsilon"), rot), randn(16, d, seed=1), sigma=s, probes=32)
    assert c.pooled == pytest.approx(analytic, rel=0.05), (c.pooled, analytic)
    assert analytic > 0.1


# ----------------------------------------------------------------------------------------
# Fokker-Planck residual and ODE-SDE gap
# ----------------------------------------------------------------------------------------
def test_exact_score_solves_the_fokker_planck_equation_and_a_rotated_one_does_not():
    mix = mixture(4, k=2)
    x0 = mix.sample(6, torch.Generator().manual_seed(5))
    den = mix.denoiser(VP, "epsilon")
    rows = dg.fokker_planck_residual(den, x0, [0.05, 0.5], divergence="exact")
    assert max(abs(r["relative_residual"]) for r in rows) < 1e-5
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=DT))[0]
    bad = dg.fokker_planck_residual(Rotated(den, q), x0, [0.5], divergence="exact")
    assert abs(bad[0]["relative_residual"]) > 1e-2
    hu = dg.fokker_planck_residual(den, x0, [0.5], divergence="hutchinson", probes=4)
    assert abs(hu[0]["relative_residual"]) < 0.3  # unbiased, noisy


def test_ode_and_sde_of_the_exact_model_agree_to_monte_carlo_noise_and_a_biased_model_does_not():
    mix = mixture(2, k=3, delta=0.05, seed=2)
    den = mix.denoiser(VP, "epsilon")
    den.sample_shape = (2,)
    g = dg.ode_sde_gap(den, n=300, steps=100, sigmas=(0.5,), permutations=60, seed=1)
    for row in g.rows:
        assert row["p_mmd2"] > 0.01 and row["p_sliced_w2"] > 0.01, row
    scaled = Rotated(den, torch.eye(2, dtype=DT) * 0.85)  # shrinks x0: the SDE feels it more than the ODE
    bad = dg.ode_sde_gap(scaled, n=300, steps=100, sigmas=(), permutations=60, seed=1)
    assert bad.rows[-1]["p_mmd2"] < 0.05, bad.rows[-1]


# ----------------------------------------------------------------------------------------
# hallucination
# ----------------------------------------------------------------------------------------
def grid25():
    """The exact 25-mode mixture of the toy data set (isotropic components)."""
    modes = grid25_modes()
    std = GRID25["std"] / grid25_scale()
    return ds.GaussianMixture(modes, torch.zeros(25, 2, 1, dtype=DT).index_fill_(1, torch.tensor([0]), 1.0),
                              torch.zeros(25, 1, dtype=DT), std), modes, std


def test_prediction_variance_hook_runs_on_any_solver():
    mix, modes, std = grid25()
    den = mix.denoiser(VP, "epsilon")
    for solver in ("dpm++2m", "ddpm", "heun"):
        run = dg.hallucination_scores(den, seeds=list(range(8)), shape=(2,), solver=solver, nfe=20, last_k=5)
        assert run.scores.shape == (8,) and run.steps_scored == 5 and (run.scores >= 0).all()
    with pytest.raises(dg.DiagnosticError, match="at least 2"):
        dg.hallucination_scores(den, seeds=[0], shape=(2,), solver="ddim", nfe=1, last_k=3)


def test_exact_denoiser_does_not_hallucinate():
    mix, modes, std = grid25()
    run = dg.hallucination_scores(mix.denoiser(VP, "epsilon"), seeds=list(range(600)), shape=(2,), solver="ddpm",
                                  nfe=200, last_k=None, sigma_below=0.07)
    oos = dg.support_mask(run.samples, modes, std)
    assert int(oos.sum()) == 0


def test_filter_report_counts():
    oos = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    keep = torch.tensor([0, 1, 1, 1, 0], dtype=torch.bool)
    r = dg.filter_report(oos, keep)
    assert r["removed_out_of_support"] == 0.5 and r["kept_in_support"] == pytest.approx(2 / 3)
    assert r["rate_unfiltered"] == 0.4 and r["rate_filtered"] == pytest.approx(1 / 3)
    keep, thr = dg.hallucination_filter(torch.tensor([1e-6, 2e-6, 1.5e-6, 1e-2, 2e-2]), method="otsu")
    assert keep.tolist() == [True, True, True, False, False] and 2e-6 <= thr < 1e-2
    keep, thr = dg.hallucination_filter(torch.arange(100.0), quantile=0.9)
    assert int(keep.sum()) == 90
    assert dg.auroc(torch.tensor([3.0, 4.0, 1.0, 2.0]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert dg.auroc(torch.tensor([3.0, 1.0, 4.0, 2.0]), torch.tensor([1, 1, 0, 0])) == 0.25


def test_the_score_separates_the_trained_toy_models_hallucinations():
    """The shipped MLP (``diffsolve train --dataset gaussian25 --arch mlp``) interpolates between modes; the x0
    variance over the steps below sigma 0.07 ranks its out-of-support samples above the others.  (The calibrated
    filter on 10k + 10k samples: benchmarks/diagnostics.py hallucination, docs/diagnostics.md.)"""
    _, modes, std = grid25()
    run = dg.hallucination_scores(ds.load("gaussian25"), seeds=list(range(1200)), shape=(2,), solver="ddpm", nfe=200,
                                  last_k=None, sigma_below=0.07)
    oos = dg.support_mask(run.samples, modes, std)
    assert int(oos.sum()) >= 5
    assert dg.auroc(run.scores, oos) >= 0.93


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
class NoGrad:
    """A network that runs under torch.no_grad: its predictions have no derivatives."""

    def __call__(self, x, t):
        with torch.no_grad():
            return 0.5 * x


def test_bad_input_gets_clear_errors():
    mix = mixture(8)
    den = mix.denoiser(VP, "epsilon")
    den.sample_shape = (8,)
    x = mix.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(dg.DiagnosticError, match="shape"):
        dg.log_likelihood(den, x[:, :5])
    with pytest.raises(dg.DiagnosticError, match="shape"):  # a model that does not record its sample shape
        dg.flipd(mix.denoiser(VP, "epsilon"), x[:, :5])
    with pytest.raises(dg.DiagnosticError, match="NaN"):
        dg.flipd(den, x.clone().index_fill_(1, torch.tensor([0]), float("nan")))
    with pytest.raises(dg.DiagnosticError, match="batch"):
        dg.conservativity(den, torch.zeros(8))
    with pytest.raises(dg.DiagnosticError, match="divergence"):
        dg.log_likelihood(den, x, divergence="bogus")
    with pytest.raises(dg.DiagnosticError, match="outside"):
        dg.flipd(den, x, sigma=1e5)
    with pytest.raises(dg.DiagnosticError, match="dequantization"):
        dg.bits_per_dim(den, x.clamp(-1, 1), dequantization="gaussian")
    no_grad = ds.Denoiser(NoGrad(), VP, "x0", dtype=DT)
    for fn in (lambda: dg.log_likelihood(no_grad, x, steps=2), lambda: dg.flipd(no_grad, x),
               lambda: dg.conservativity(no_grad, x), lambda: dg.jacobian_structure(no_grad, x, [0.1])):
        with pytest.raises(dg.DiagnosticError, match="derivatives"):
            fn()
    with pytest.raises(dg.DiagnosticError, match="model protocol"):
        dg.flipd(lambda x, t: x, x)


# ----------------------------------------------------------------------------------------
# the command line and the toy training path
# ----------------------------------------------------------------------------------------
def test_diagnose_command_writes_a_report_with_the_exact_answers(tmp_path, capsys):
    import json

    from diffsolve.cli import main

    out = tmp_path / "diag"
    code = main(["diagnose", "--reference", "molrg64", "--n", "2", "--what",
                 "likelihood,lid,conservativity,subspace,fokker_planck", "--nb-points", "2", "--subspace-points", "2",
                 "--sigmas", "0.3", "--rtol", "1e-4", "--out", str(out), "--quiet"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["likelihood"]["continuous"]["abs_error_nats_per_dim"] < 1e-3
    assert rep["lid"]["exact_rank"] == 8 and rep["lid"]["normal_bundle"]["fraction_equal_rank"] == 1.0
    assert all(r["asymmetry_pooled"] < 1e-6 for r in rep["conservativity"]["by_sigma"])
    assert all(r["rank_median"] == 8 for r in rep["subspace"]["by_sigma"])
    for name in ("likelihood", "lid", "conservativity", "subspace", "fokker_planck"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "bpd[continuous]" in capsys.readouterr().out
    code = main(["diagnose", "--reference", "molrg64", "--what", "likelihood,bogus", "--out", str(out)])
    assert code == 2 and "error: unknown diagnostic" in capsys.readouterr().err


def test_an_mlp_trains_on_the_2d_toy_from_the_command_line(tmp_path, capsys):
    from diffsolve.cli import main
    from diffsolve.training import read_log

    out = tmp_path / "toy"
    code = main(["train", "--dataset", "gaussian25", "--arch", "mlp", "--hidden", "32", "--layers", "2", "--steps",
                 "60", "--batch-size", "256", "--lr", "3e-3", "--warmup-steps", "5", "--log-every", "10",
                 "--sample-every", "-1", "--checkpoint-every", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    den = ds.load(out / "model")
    assert den.sample_shape == (2,) and den.config["architecture"]["type"] == "MLP"
    log = read_log(out)
    assert log[-1]["loss"] < log[0]["loss"]
    x = ds.sample(den, torch.randn(16, 2, generator=torch.Generator().manual_seed(0)), nfe=8)
    assert x.shape == (16, 2) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="MLP"):
        from diffsolve.training import TrainConfig, train
        train(TrainConfig(dataset="gaussian25", out_dir=str(tmp_path / "bad"), steps=1, progress=False))
