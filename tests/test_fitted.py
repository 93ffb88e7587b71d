"""The fitted non-stationary solver: a coefficient matrix read off any linear solver reproduces it, refitting it
against the exact trajectory lowers the error on noise it was not fitted to, the teachers' trajectories are the
exact ODE's, and bad coefficients are refused."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.evaluation.teacher import ExactTeacher, ModelTeacher
from diffsolve.solvers.fitted import coefficient_matrix, ddim_matrix
from diffsolve.tuning.fitted import fit_coefficients, fit_solver, linear_coefficients, linear_solver
from diffsolve.util import seeding

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
MIX = ds.GaussianMixture.random(dim=8, seed=3)

LINEAR = [("ddim", {}), ("dpm++2m", {}), ("dpm++3m", {}), ("dpm-solver-2m", {}), ("unipc-bh1", {"order": 3}),
          ("unipc-bh2", {"order": 2}), ("unipc-bh2", {"order": 3}), ("deis", {}), ("ipndm", {}), ("dpm++2m-hb", {}),
          ("ghvb", {})]


def noise(n, start=0, shape=(8,)):
    return seeding.noise(range(start, start + n), shape)


@pytest.mark.parametrize("final", ["t_min", "denoise"])
@pytest.mark.parametrize("solver,opts", LINEAR, ids=lambda v: v if isinstance(v, str) else "")
def test_coefficient_matrix_reproduces_every_linear_solver(solver, opts, final):
    den = MIX.denoiser(VP, "epsilon")
    grid = ds.make_grid(VP, 7, "logsnr", final)
    C = linear_coefficients(VP, solver, grid, **opts)
    assert C.shape == (grid.steps, grid.steps + 1) and torch.equal(C, torch.tril(C, diagonal=1))
    z = noise(6)
    a = ds.sample(den, z, solver, grid=grid, nfe=None, **opts)
    b = ds.sample(den, z, "fitted", grid=grid, nfe=None, coefficients=C)
    assert float((a - b).abs().max()) < 1e-9


def test_fitted_without_coefficients_is_ddim():
    den = MIX.denoiser(ds.EDM(), "x0")
    grid = ds.make_grid(den.process, 9, "karras", "t_min")
    assert torch.allclose(ddim_matrix(grid), linear_coefficients(den.process, "ddim", grid), atol=1e-12)
    z = noise(5)
    assert float((ds.sample(den, z, "ddim", nfe=8) - ds.sample(den, z, "fitted", nfe=8)).abs().max()) < 1e-12


def test_only_linear_one_evaluation_solvers_have_a_matrix():
    assert linear_solver("unipc-bh2") and linear_solver("dpm++3m") and linear_solver("fitted")
    for s in ("heun", "dpm-solver-2", "ddpm", "euler-maruyama", "dpm-v3", "pndm"):
        assert not linear_solver(s)
        with pytest.raises(ValueError, match="not a linear"):
            linear_coefficients(VP, s, ds.make_grid(VP, 5, "logsnr", "t_min"))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(4, 6), "do not fit"),
    (torch.full((5, 6), math.nan), "NaN"),
    (torch.ones(5, 6), "lower-triangular"),
    ("abc", "matrix of numbers"),
])
def test_bad_coefficients_are_refused(bad, match):
    den = MIX.denoiser(VP, "epsilon")
    with pytest.raises(ValueError, match=match):
        ds.sample(den, noise(2), "fitted", nfe=5, final="t_min", coefficients=bad)
    with pytest.raises(ValueError, match=match):
        coefficient_matrix(bad, 5)


def test_exact_teacher_trajectory_is_the_exact_ode():
    teach = ExactTeacher(MIX, VP)
    z = noise(4)
    times = [999.0, 700.0, 250.5, 10.0, 0.0]
    traj = teach.trajectory(z, times)
    for t, x in zip(times, traj):
        assert torch.allclose(x, teach.state_at(z, t), atol=1e-8)
    assert torch.allclose(teach.dense(z).at(times[2:3])[0], traj[2])
    with pytest.raises(ValueError, match="decreasing"):
        teach.trajectory(z, [10.0, 20.0])
    with pytest.raises(ValueError, match="leave"):
        teach.trajectory(z, [2000.0])


def test_dense_model_trajectory_matches_the_exact_ode():
    """A recorded 100-NFE run read between its points is as close to the exact ODE as the run itself is."""
    den = MIX.denoiser(VP, "epsilon")
    teach = ModelTeacher(den, "dpm++3m", 100, "logsnr")
    z = noise(8)
    dense = teach.dense(z)
    exact = ExactTeacher(MIX, VP)
    times = [999.0, 640.3, 300.0, 31.7, 2.5, 0.0]
    got, want = dense.at(times), exact.trajectory(z, times)
    for t, a, b in zip(times, got, want):
        assert float((a - b).pow(2).mean().sqrt()) < 2e-3, t
    tg = teach.targets(z)
    assert torch.equal(dense.targets().at_t_min, tg.at_t_min)
    assert torch.allclose(dense.targets().denoised, tg.denoised, atol=1e-6)


def test_refitting_lowers_the_error_on_unseen_noise():
    """Refit UniPC-3 at 5 NFE against the exact trajectory on 64 noises: on 64 other noises the fitted solver is
    closer to the exact ODE solution than UniPC itself, and mu = inf keeps UniPC exactly."""
    den = MIX.denoiser(VP, "epsilon")
    exact = ExactTeacher(MIX, VP)
    grid = ds.make_grid(VP, 6, "linspace", "t_min")
    start = linear_coefficients(VP, "unipc-bh2", grid, order=3)
    zc, ze = noise(64, 1000), noise(64)
    targets = exact.trajectory(zc, grid.t[1:].tolist())
    same, _ = fit_coefficients(den, grid, start, zc, targets, math.inf)
    assert torch.equal(same, start)
    fit = fit_solver(den, grid, start, zc, targets)
    assert set(fit.cv) == {1e-4, 1e-3, 1e-2, 1e-1, math.inf} and fit.rmse == pytest.approx(fit.cv[fit.mu])
    assert fit.cv[fit.mu] < fit.cv[math.inf]
    end = exact.trajectory(ze, [VP.t_min])[0]
    err = lambda x: float((x - end).pow(2).mean().sqrt())
    base = err(ds.sample(den, ze, "unipc-bh2", grid=grid, nfe=None, order=3))
    tuned = err(ds.sample(den, ze, "fitted", grid=grid, nfe=None, coefficients=fit.coefficients))
    assert tuned < 0.8 * base, (tuned, base)
