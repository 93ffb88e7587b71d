"""Optimised time steps: the five-step spacing, GITS dynamic programming and the evolutionary search return
valid grids (monotone, in range, exact NFE) that are never worse on the calibration set than their start."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.grids import five_step
from diffsolve.tuning.grid_search import Calibration, OptimizedGrid, evolve, gits

DT = torch.float64
REF = ds.GaussianMixture.random(dim=16, seed=0)
VP = ds.VPDiscrete.linear(1000)
PROCESSES = [VP, ds.VPContinuous.cosine(), ds.EDM(), ds.RectifiedFlow()]


def noise(n=32, seed=100):
    return torch.randn(n, REF.dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


def check_valid(res: OptimizedGrid, proc, solver, nfe, opts=None):
    t = res.t
    assert torch.all(t[1:] < t[:-1]) and float(t[0]) == proc.t_max
    assert float(t.min()) >= proc.t_min and float(t.max()) <= proc.t_max
    if res.final == "t_min":
        assert float(t[-1]) == proc.t_min
    den = REF.denoiser(proc, "epsilon")
    _, run = ds.sample(den, noise(2), solver, grid=res.grid(proc), nfe=nfe, return_info=True, **(opts or {}))
    assert run.nfe == res.nfe == den.nfe


@pytest.mark.parametrize("proc", PROCESSES, ids=lambda p: type(p).__name__)
def test_five_step_spacing_is_valid(proc):
    for n in range(1, 13):
        t = five_step(proc, n)
        assert t.numel() == n and float(t[0]) == proc.t_max
        assert torch.all(t[1:] < t[:-1]) and float(t.min()) >= proc.t_min
        full = five_step(proc, n, sigma_min=None)
        if n > 1:
            assert float(full[-1]) == proc.t_min
    top = five_step(proc, 5, sigma_max=10.0)  # truncated top: the first step jumps to sigma/alpha = 10
    assert abs(float(proc.sigma_ve(top[1])) - 10.0) < 1e-6
    bottom = five_step(proc, 5)
    assert abs(float(proc.sigma_ve(bottom[-1])) - 0.2) < 1e-6  # truncated bottom: the jump starts at 0.2


def test_five_step_is_a_named_spacing_and_helps_at_five_nfe():
    den = REF.denoiser(VP, "epsilon")
    z = noise(128, seed=1)
    target = ds.exact_targets(REF, VP, z).denoised
    err = lambda x: float(((x - target) ** 2).mean().sqrt())
    _, run = ds.sample(den, z, "dpm++2m", nfe=5, spacing="five-step", return_info=True)
    assert run.nfe == 5
    assert err(ds.sample(den, z, "dpm++2m", nfe=5, spacing="five-step")) < err(ds.sample(den, z, "dpm++2m", nfe=5))


@pytest.fixture(scope="module")
def cal():
    den = REF.denoiser(VP, "epsilon")
    return {s: Calibration(den, s, 6, noise=noise(), teacher_nfe=100) for s in ("dpm++2m", "unipc-bh2")}


@pytest.mark.parametrize("solver", ["dpm++2m", "unipc-bh2"])
def test_gits_grid_is_valid_and_not_worse(cal, solver):
    den = REF.denoiser(VP, "epsilon")
    res = gits(den, solver, 6, calibration=cal[solver], n_fine=40)
    check_valid(res, VP, solver, 6)
    assert res.error <= res.baseline_error
    assert res.error == cal[solver].error(res.t)


@pytest.mark.parametrize("solver", ["dpm++2m", "unipc-bh2"])
def test_evolution_grid_is_valid_and_not_worse(cal, solver):
    den = REF.denoiser(VP, "epsilon")
    res = evolve(den, solver, 6, calibration=cal[solver], population=8, generations=4, seed=1)
    check_valid(res, VP, solver, 6)
    assert res.error <= res.baseline_error and res.error == cal[solver].error(res.t)
    assert res.history == sorted(res.history, reverse=True)  # elitism: the best never gets worse
    assert res.error < res.baseline_error  # on this model the log-SNR grid is easy to beat


@pytest.mark.parametrize("solver,opts,nfe,final,proc", [
    ("heun", {}, 6, "denoise", VP),  # 2 NFE per step: 3 steps use 5 evaluations, the grid reports that
    ("pndm", {}, 5, "t_min", VP),
    ("dpm-solver-2", {}, 7, "denoise", ds.EDM()),
    ("ghvb", {"beta": 0.8}, 5, "t_min", ds.RectifiedFlow()),
])
def test_searches_work_for_any_solver(solver, opts, nfe, final, proc):
    den = REF.denoiser(proc, "epsilon")
    c = Calibration(den, solver, nfe, noise=noise(16), final=final, teacher_nfe=60, solver_options=opts)
    g = gits(den, solver, nfe, calibration=c, n_fine=24)
    e = evolve(den, solver, nfe, calibration=c, start=g, population=6, generations=2)
    for res in (g, e):
        check_valid(res, proc, solver, nfe, opts)
        assert res.error <= res.baseline_error
    assert e.error <= g.error  # the evolution started from the GITS grid
    expected = {"heun": 5}.get(solver, nfe)
    assert g.nfe == expected


def test_start_grid_is_returned_when_nothing_beats_it(cal):
    """A search that cannot find anything better returns its starting grid itself."""
    den = REF.denoiser(VP, "epsilon")
    first = evolve(den, "dpm++2m", 6, calibration=cal["dpm++2m"], population=8, generations=3)
    again = evolve(den, "dpm++2m", 6, calibration=cal["dpm++2m"], start=first, population=2, generations=1,
                   extra_starts=(), mutation=0.0)
    assert torch.equal(again.t, first.t) and again.error == first.error


def test_result_as_spacing_and_dict_roundtrip(cal):
    den = REF.denoiser(VP, "epsilon")
    res = evolve(den, "dpm++2m", 6, calibration=cal["dpm++2m"], population=6, generations=2)
    z = noise(4)
    a = ds.sample(den, z, "dpm++2m", nfe=6, spacing=res.spacing)
    b = ds.sample(den, z, "dpm++2m", grid=res.grid(VP), nfe=6)
    assert torch.equal(a, b)
    _, run = ds.sample(den, z, "dpm++2m", nfe=9, spacing=res.spacing, return_info=True)  # resampled to 9 points
    assert run.nfe == 9
    back = OptimizedGrid.from_dict(res.to_dict())
    assert torch.equal(back.t, res.t) and back.error == res.error and back.method == "evolution"
    assert math.isfinite(res.improvement) and res.improvement >= 1


def test_search_with_dpm_v3():
    den = REF.denoiser(VP, "epsilon")
    st = ds.compute_statistics(den, lambda n, g: REF.sample(n, g), K=64, n_lambda=25, progress=False)
    c = Calibration(den, "dpm-v3", 6, noise=noise(16), teacher_nfe=60, solver_options={"stats": st})
    res = evolve(den, "dpm-v3", 6, calibration=c, population=6, generations=2)
    check_valid(res, VP, "dpm-v3", 6, {"stats": st})
    assert res.error <= res.baseline_error and "stats" not in res.to_dict()["options"]
