"""DPM-Solver-v3: degenerate statistics = DPM-Solver++, closed-form Gaussian statistics vs the estimator,
convergence order against the exact ODE solution, persistence, refusal of foreign statistics, resume."""
import functools
import os

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve.reference import gaussian_statistics
from diffsolve.solvers.dpm_v3 import Statistics, StatisticsMismatch, derivative_weights
from diffsolve.tuning import compute_statistics

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
PROCESSES = {"vp": VP, "edm": ds.EDM(), "flow": ds.RectifiedFlow()}
MIX = ds.GaussianMixture.random(dim=8, n_components=3, seed=1, delta=0.3)
GAUSS = ds.GaussianMixture.random(dim=8, n_components=1, seed=3, delta=0.3)


def noise(n=16, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def gauss_moments(ref):
    U = ref.bases[0]
    return ref.means[0], U @ torch.diag(ref.scales[0] ** 2) @ U.T + ref.delta**2 * torch.eye(ref.dim, dtype=DT)


def lam_span(proc):
    return (float(proc.lam(torch.tensor(proc.t_max, dtype=DT))), float(proc.lam(torch.tensor(proc.t_min, dtype=DT))))


@functools.lru_cache(maxsize=None)
def exact_stats(pname, n=81):
    lo, hi = lam_span(PROCESSES[pname])
    lam = torch.linspace(lo, hi, n, dtype=DT)
    return Statistics(lam, *gaussian_statistics(*gauss_moments(GAUSS), lam), {"model": None})


@functools.lru_cache(maxsize=None)
def estimated(K, n_lambda=41):
    den = GAUSS.denoiser(VP, "epsilon")
    return compute_statistics(den, lambda n, g: GAUSS.sample(n, g), K=K, n_lambda=n_lambda, progress=False,
                              batch_size=4096)


# ----------------------------------------------------------------------------------------
# degenerate statistics
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pname", list(PROCESSES))
@pytest.mark.parametrize("final", ["denoise", "t_min"])
def test_degenerate_statistics_reproduce_dpmpp(pname, final):
    """(l, s, b) = (1, 0, 0): v3 is DPM-Solver++ multistep with Taylor coefficients (order 2: diffusers' 'heun'
    variant, ``taylor2=True``; order 3: our ``dpm++3m``), to float64 rounding, on any grid."""
    proc = PROCESSES[pname]
    den = MIX.denoiser(proc, "x0")
    st = Statistics.degenerate()
    z = noise()
    for order in (1, 2, 3):
        for nfe in (6, 10):
            v3 = ds.sample(den, z, "dpm-v3", nfe=nfe, final=final, stats=st, order=order, corrector=False,
                           predictor_pseudo=False)
            pp = ds.sample(den, z, "dpm++3m", nfe=nfe, final=final, order=order, taylor2=True)
            assert torch.allclose(v3, pp, rtol=0, atol=1e-12), (order, nfe, float((v3 - pp).abs().max()))
    # the midpoint variant of dpm++2m is a different (equally 2nd-order) method
    mid = ds.sample(den, z, "dpm++2m", nfe=10, final=final)
    v3 = ds.sample(den, z, "dpm-v3", nfe=10, final=final, stats=st, order=2, corrector=False)
    assert float((v3 - mid).abs().max()) > 1e-6


def test_pseudo_order_weights():
    """Pseudo-order derivatives are k! times Newton divided differences; the full ones fit all nodes."""
    nodes = [0.0, -0.3, -0.7]
    g = lambda x: 1.0 + 2.0 * x + 3.0 * x**2
    vals = np.array([g(x) for x in nodes])
    full = derivative_weights(nodes, pseudo=False) @ vals
    assert np.allclose(full, [2.0, 6.0])  # g'(0), g''(0)
    pseudo = derivative_weights(nodes, pseudo=True) @ vals
    assert np.isclose(pseudo[0], (g(0) - g(-0.3)) / 0.3) and np.isclose(pseudo[1], 6.0)


# ----------------------------------------------------------------------------------------
# statistics: closed form for a Gaussian, estimator convergence
# ----------------------------------------------------------------------------------------
def test_estimator_converges_to_gaussian_closed_form():
    """For N(mu, C) data and the exact denoiser, l = diag P, s and b follow from P = (e^{2 lam} C + I)^{-1}
    (``gaussian_statistics``).  The JVP estimator approaches them as K grows."""
    errs = {}
    for K in (256, 4096):
        st = estimated(K)
        ex = gaussian_statistics(*gauss_moments(GAUSS), st.lam)
        errs[K] = [float((a - e).abs().mean() / e.abs().mean()) for a, e in zip((st.l, st.s, st.b), ex)]
    small, big = errs[256], errs[4096]
    for name, e_small, e_big in zip("lsb", small, big):
        assert e_big < 0.75 * e_small, (name, errs)
    assert big[0] < 2e-3 and big[1] < 1e-2 and big[2] < 5e-3, errs


def test_statistics_are_process_independent_for_the_same_data():
    """In the VE view the statistics are functions of lambda only: VP and flow estimates agree."""
    lam = (-3.0, 4.0)
    common = dict(K=512, n_lambda=9, lam_range=lam, progress=False, batch_size=4096)
    data = lambda n, g: GAUSS.sample(n, g)
    a = compute_statistics(GAUSS.denoiser(VP, "epsilon"), data, **common)
    b = compute_statistics(GAUSS.denoiser(ds.RectifiedFlow(), "velocity"), data, **common)
    for x, y in ((a.l, b.l), (a.s, b.s), (a.b, b.b)):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------
# convergence order against the exact ODE solution
# ----------------------------------------------------------------------------------------
def slope(nfes, errs):
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0]


@pytest.mark.parametrize("pname", list(PROCESSES))
def test_convergence_order_with_exact_statistics(pname):
    proc = PROCESSES[pname]
    den = GAUSS.denoiser(proc, "epsilon")
    z = noise()
    target = GAUSS.gaussian_ode_solution(proc, z * proc.prior_scale, proc.t_max, proc.t_min)
    nfes = [32, 64, 128, 256]
    errs = [float((ds.sample(den, z, "dpm-v3", nfe=n, final="t_min", stats=exact_stats(pname), order=3,
                             corrector=False, predictor_pseudo=False, lower_order_final=False) - target).abs().max())
            for n in nfes]
    assert abs(slope(nfes, errs) - 3) <= 0.35, errs
    # exact statistics beat DPM-Solver++(3M) at small NFE on this Gaussian
    v3 = ds.sample(den, z, "dpm-v3", nfe=10, final="t_min", stats=exact_stats(pname))
    pp = ds.sample(den, z, "dpm++3m", nfe=10, final="t_min")
    assert float((v3 - target).abs().max()) < 0.5 * float((pp - target).abs().max())


def test_convergence_order_with_estimated_statistics_and_corrector():
    """Estimated statistics (any smooth l, s, b keep the method consistent): predictor order 3; the corrector
    of the same order adds one order (UniC-style)."""
    den = GAUSS.denoiser(VP, "epsilon")
    z = noise()
    target = GAUSS.gaussian_ode_solution(VP, z, VP.t_max, VP.t_min)
    st = estimated(1024)
    nfes = [32, 64, 128, 256]
    run = lambda n, **o: float((ds.sample(den, z, "dpm-v3", nfe=n, final="t_min", stats=st, order=3,
                                          predictor_pseudo=False, lower_order_final=False, **o) - target).abs().max())
    pred = [run(n, corrector=False) for n in nfes]
    corr = [run(n, corrector=True) for n in nfes]
    assert abs(slope(nfes, pred) - 3) <= 0.35, pred
    assert slope(nfes, corr) >= 3.4 and corr[-1] < pred[-1], corr


def test_grids_off_the_statistics_grid_are_interpolated_not_snapped():
    """Moving the grid by less than the statistics' spacing changes the sample smoothly (no snapping), and
    coarser statistics of the same functions give nearly the same sample."""
    den = GAUSS.denoiser(VP, "epsilon")
    z = noise()
    fine, coarse = exact_stats("vp", 161), exact_stats("vp", 41)
    grid = ds.make_grid(VP, 8, "logsnr")
    lam = grid.lam[:-1].clone()
    shifted = lam.clone()
    shifted[1:] += 1e-4  # far below the statistics' spacing (~0.24)
    a = ds.sample(den, z, "dpm-v3", grid=ds.explicit(VP, lambdas=lam), nfe=None, stats=coarse)
    b = ds.sample(den, z, "dpm-v3", grid=ds.explicit(VP, lambdas=shifted), nfe=None, stats=coarse)
    d = float((a - b).abs().max())
    assert 0 < d < 1e-3
    c = ds.sample(den, z, "dpm-v3", grid=ds.explicit(VP, lambdas=lam), nfe=None, stats=fine)
    assert float((a - c).abs().max()) < 1e-3


# ----------------------------------------------------------------------------------------
# persistence, metadata, refusal
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_stats(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3") / "stats.safetensors"
    den = MIX.denoiser(VP, "epsilon")
    st = compute_statistics(den, lambda n, g: MIX.sample(n, g), K=64, n_lambda=13, path=path, progress=False)
    return st, path


def test_save_load_roundtrip(small_stats):
    st, path = small_stats
    back = Statistics.load(path)
    for a, b in ((st.lam, back.lam), (st.l, back.l), (st.s, back.s), (st.b, back.b), (st.probe, back.probe)):
        assert torch.equal(a, b)
    m = back.meta
    assert m["K"] == 64 and m["shape"] == [8] and m["model"]["guidance_scale"] == 1.0
    assert m["model"]["process"] == VP.config() and len(m["model"]["fingerprint"]) == 16
    assert m["lam_range"] == list(st.lam_range)
    den = MIX.denoiser(VP, "epsilon")
    z = noise()
    assert torch.equal(ds.sample(den, z, "dpm-v3", nfe=6, stats=st), ds.sample(den, z, "dpm-v3", nfe=6, stats=back))
    assert not os.path.exists(str(path) + ".partial")


def test_foreign_statistics_are_refused(small_stats):
    st, _ = small_stats
    z = noise()
    other = ds.GaussianMixture.random(dim=8, n_components=3, seed=2, delta=0.3)
    with pytest.raises(StatisticsMismatch, match="fingerprint"):
        ds.sample(other.denoiser(VP, "epsilon"), z, "dpm-v3", nfe=6, stats=st)
    with pytest.raises(StatisticsMismatch, match="process"):
        ds.sample(MIX.denoiser(ds.VPDiscrete.cosine(1000), "epsilon"), z, "dpm-v3", nfe=6, stats=st)
    guided = ds.ClassifierFreeGuidance(ds.Denoiser(MIX.network(VP, "epsilon"), VP, "epsilon", dtype=DT), 3.0,
                                       {"y": torch.zeros(1)})
    with pytest.raises(StatisticsMismatch, match="guidance scale"):
        ds.sample(guided, z, "dpm-v3", nfe=6, stats=st, model_kwargs={"y": torch.ones(16)})
    with pytest.raises(StatisticsMismatch, match="data shape"):
        ds.sample(MIX.denoiser(VP, "epsilon"), noise(d=4), "dpm-v3", nfe=6, stats=st)
    with pytest.raises(ValueError, match="needs stats="):
        ds.sample(MIX.denoiser(VP, "epsilon"), z, "dpm-v3", nfe=6)
    # the same model (a new adapter object) is accepted
    ds.sample(MIX.denoiser(VP, "epsilon"), z, "dpm-v3", nfe=6, stats=st)


def test_grid_outside_the_statistics_range_is_refused():
    den = MIX.denoiser(VP, "epsilon")
    st = compute_statistics(den, lambda n, g: MIX.sample(n, g), K=32, n_lambda=5, lam_range=(-2.0, 2.0),
                            progress=False)
    with pytest.raises(StatisticsMismatch, match="outside the statistics' range"):
        ds.sample(den, noise(), "dpm-v3", nfe=6, stats=st)
    inside = ds.explicit(VP, lambdas=[-2.0, -1.0, 0.0, 1.0, 2.0], final="t_min")
    assert torch.isfinite(ds.sample(den, noise(), "dpm-v3", grid=inside, nfe=None, stats=st)).all()


def test_computation_resumes_after_a_kill(tmp_path):
    den = MIX.denoiser(VP, "epsilon")
    data = lambda n, g: MIX.sample(n, g)
    kw = dict(K=48, n_lambda=12, chunk=3, progress=False, batch_size=40)
    full = compute_statistics(den, data, **kw)

    class Kill(Exception):
        pass

    def kill_after_two(done, total):
        if done == 2:
            raise Kill

    path = tmp_path / "s.safetensors"
    with pytest.raises(Kill):
        compute_statistics(den, data, path=path, on_chunk=kill_after_two, **kw)
    part = str(path) + ".partial"
    assert sorted(os.listdir(part)) == ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    assert not path.exists()
    seen = []
    nfe0 = den.nfe
    resumed = compute_statistics(den, data, path=path, on_chunk=lambda d, t: seen.append(d), **kw)
    assert seen == [3, 4]  # only the missing chunks were computed
    assert den.nfe - nfe0 == 2 * 4 * 2  # 2 chunks x 4 batches of <= 40 rows x 2 JVPs
    for a, b in ((full.l, resumed.l), (full.s, resumed.s), (full.b, resumed.b)):
        assert torch.equal(a, b)
    assert path.exists() and not os.path.exists(part)


def test_progress_bar_and_statistics_from_model_samples(capsys):
    """Without data the statistics use the model's own samples; the progress bar reports rows."""
    den = MIX.denoiser(VP, "epsilon")
    st = compute_statistics(den, None, shape=(8,), K=32, n_lambda=5, progress=True, data_nfe=20)
    assert st.shape == (8,) and torch.isfinite(st.s).all()
    assert "dpm-v3 statistics" in capsys.readouterr().err
