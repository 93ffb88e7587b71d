"""Analytic early-step skipping (arXiv:2303.02490): the closed-form Gaussian ODE is exact for Gaussian data, so a run
that jumps over part of the log-SNR range loses nothing there and spends its budget on the rest; on a mixture the
jump's error grows with the skipped range; the tuner can choose the switch point; bad input is a clear error."""
import pytest
import torch

import diffsolve as ds
from diffsolve import tuning as T
from diffsolve.reference import DenseGaussianMixture
from diffsolve.sampling import skipped_fraction, truncated_times

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
GAUSS = ds.GaussianMixture.random(dim=8, n_components=1, seed=4, delta=0.2)
MIX = ds.GaussianMixture.random(dim=8, n_components=4, seed=5, delta=0.2)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def exact_start(ref):
    d = DenseGaussianMixture.from_mixture(ref)
    return ds.GaussianStart.from_moments(d.mean(), d.covariance())


@pytest.mark.parametrize("proc", [VP, ds.EDM(), ds.RectifiedFlow()], ids=["vp", "edm", "flow"])
def test_the_jump_is_the_exact_ode_for_gaussian_data(proc):
    z = randn(16, 8, seed=1)
    st = exact_start(GAUSS)
    x_T = proc.prior_from_noise(z)
    for skip in (0.2, 0.5):
        t_s = st.switch_time(proc, skip)
        assert abs(skipped_fraction(proc, t_s) - skip) < 1e-9
        jump = st.solve(proc, x_T, proc.t_max, t_s)
        assert float((jump - GAUSS.ode_solution(proc, x_T, proc.t_max, t_s)).abs().max()) < 1e-8
    # the solver's whole budget goes to the rest: at 6 NFE, skipping half the range beats not skipping
    den = GAUSS.denoiser(proc, "x0")
    target = ds.exact_targets(GAUSS, proc, x_T).denoised
    err = {s: float((ds.sample(den, z, "dpm++2m", nfe=6, start=st, skip=s) - target).pow(2).mean().sqrt())
           for s in (0.0, 0.5)}
    assert err[0.5] < 0.8 * err[0.0], err


def test_estimated_moments_and_the_mixture():
    """From 20000 samples the start is close to the exact one; on a 4-component mixture the jump's error at the switch
    time grows with the skipped range (the early trajectory is the Gaussian one, the late one is not)."""
    z = randn(32, 8, seed=2)
    x_T = VP.prior_from_noise(z)
    est = ds.GaussianStart.from_data(MIX.sample(20000, torch.Generator().manual_seed(0)))
    st = exact_start(MIX)
    t_s = st.switch_time(VP, 0.3)
    assert float((est.solve(VP, x_T, VP.t_max, t_s) - st.solve(VP, x_T, VP.t_max, t_s)).abs().max()) < 0.05
    errs = []
    for skip in (0.05, 0.2, 0.4, 0.6):
        t_s = st.switch_time(VP, skip)
        errs.append(float((st.solve(VP, x_T, VP.t_max, t_s) - MIX.ode_solution(VP, x_T, VP.t_max, t_s)).abs().max()))
    assert errs == sorted(errs) and errs[0] < 1e-3 < errs[-1], errs


def test_explicit_grid_and_budget_runs_agree():
    """An explicit grid that starts at the switch time is the same run as the budget with skip= on that spacing."""
    st = exact_start(MIX)
    den = MIX.denoiser(VP, "epsilon")
    z = randn(4, 8, seed=3)
    a, info = ds.sample(den, z, "unipc-bh2", nfe=8, start=st, skip=0.25, spacing="logsnr", return_info=True)
    assert info.nfe == 8 and abs(skipped_fraction(VP, float(info.grid.t[0])) - 0.25) < 1e-9
    b = ds.sample(den, z, "unipc-bh2", grid=info.grid, start=st)
    assert torch.equal(a, b)
    # the default rule's index spacing (a discrete process) is laid as the uniform spacing it rounds
    c, rule = ds.sample(den, z, nfe=8, start=st, skip=0.25, return_info=True)
    assert rule.nfe == 8 and torch.allclose(rule.grid.t[1:-1] - rule.grid.t[:-2],
                                            (rule.grid.t[1] - rule.grid.t[0]).expand(rule.grid.t.numel() - 2))
    full = ds.make_grid(VP, 8, "logsnr")
    t = truncated_times(VP, full.t[:-1], st.switch_time(VP, 0.25))
    assert torch.allclose(t, info.grid.t[:-1], rtol=1e-9)


def test_the_tuner_scores_skip_candidates_with_its_start():
    """ds.tune(start=...) adds candidates with the option 'skip' whose grids begin at the switch time; its runner runs
    them with the analytic start (the same run as ds.sample(start=, skip=)), and a profile entry with 'skip' refuses to
    sample without the start.  (That the tuner picks one when it is best is shown in docs/processes.md.)"""
    from diffsolve.sampling.analytic import restricted
    from diffsolve.tuning import budget

    den = GAUSS.denoiser(VP, "epsilon")
    st = exact_start(GAUSS)
    z = randn(6, 8, seed=4)
    c = budget._named(restricted(VP, st.switch_time(VP, 0.2)), "dpm++2m", 4, "quadratic", "denoise")
    c = c.with_(options={"skip": 0.2})
    out = budget._Runner(den, 64, {}, None, start=st).run(c, z, 4)
    assert torch.equal(out, ds.sample(den, z, "dpm++2m", nfe=4, start=st, skip=0.2, spacing="quadratic"))
    assert budget.SKIPS == (0.1, 0.2, 0.3) and set(budget.SKIP_SPACINGS) <= set(ds.grids.SPACINGS)
    entry = T.profile.Entry(4, "dpm++2m", [float(v) for v in c.t], "denoise", {"skip": 0.2})
    with pytest.raises(ValueError, match="start="):
        ds.sample(den, z, "dpm++2m", grid=entry.grid(VP), **entry.options)
    assert torch.equal(ds.sample(den, z, "dpm++2m", grid=entry.grid(VP), start=st, **entry.options), out)


def test_bad_input():
    st = exact_start(GAUSS)
    den = GAUSS.denoiser(VP, "epsilon")
    z = randn(2, 8)
    with pytest.raises(ValueError, match="start="):
        ds.sample(den, z, "dpm++2m", nfe=5, skip=0.2)
    with pytest.raises(ValueError, match="skip="):
        ds.sample(den, z, "dpm++2m", nfe=5, start=st)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="skip must lie"):
            ds.sample(den, z, "dpm++2m", nfe=5, start=st, skip=bad)
    with pytest.raises(ValueError, match="data shape"):
        ds.sample(den, randn(2, 4), "dpm++2m", nfe=5, start=ds.GaussianStart.from_data(randn(10, 4)[:, :3]), skip=.2)
    with pytest.raises(ValueError, match="Gaussian marginals"):
        st.solve(ds.PFGMpp(128), z, 80.0, 10.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        ds.GaussianStart.from_moments(torch.zeros(2), -torch.eye(2))
    with pytest.raises(TypeError, match="GaussianStart"):
        ds.sample(den, z, "dpm++2m", nfe=5, start="gauss", skip=0.2)
