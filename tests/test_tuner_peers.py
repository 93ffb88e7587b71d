"""The tuner's search space holds the peers' configurations that our solvers compute (UniPC bh1/bh2 and
DPM-Solver++ 2M/3M on diffusers' linspace, leading and trailing timesteps, Karras and log-SNR grids, both last
steps): the tuned calibration error is never above any of them, each run directly with ``ds.sample`` on the
profile's calibration noise against the profile's teacher; and the index-spacing candidates are the diffusers
schedulers' own runs."""
import math

import numpy as np
import pytest
import torch

import diffsolve as ds
from diffsolve import tuning as T
from diffsolve.evaluation.teacher import ModelTeacher
from diffsolve.reference import ExactTargets
from diffsolve.tuning import budget as B
from diffsolve.tuning.budget import BudgetSearch, _Clock, _Set, peer_candidates
from diffsolve.util import seeding

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
MIX = ds.GaussianMixture.random(dim=8, seed=3)
NFES = [5, 8]
N = VP.num_train_timesteps

# (the peer, our solver, its options, its last steps) -- written out here, not read from the tuner
BOTH, SIGMA_MIN = ("zero", "sigma_min"), ("sigma_min",)  # diffusers' UniPC bh1 fails (NaN) on 'zero'
DIFFUSERS = [
    ("UniPC bh2 order 3", "unipc-bh2", {"order": 3}, BOTH),
    ("UniPC bh1 order 3", "unipc-bh1", {"order": 3}, SIGMA_MIN),
    ("UniPC bh2 order 2", "unipc-bh2", {}, BOTH),
    ("UniPC bh1 order 2", "unipc-bh1", {}, SIGMA_MIN),
    ("DPMSolverMultistep dpmsolver++ 3M", "dpm++3m", {"taylor3": False}, BOTH),
    ("DPMSolverMultistep dpmsolver++ 2M", "dpm++2m", {}, BOTH),
]
K_3M_SDE = ("k-diffusion dpmpp_3m_sde (eta=0)", "dpm++3m", {"taylor3": False, "taylor2": True,
                                                         "lower_order_final": False})


def diffusers_timesteps(spacing, n):
    """diffusers' multistep schedulers' ``set_timesteps(n)`` (UniPC, DPMSolverMultistep), in numpy."""
    if spacing == "linspace":
        return np.linspace(0, N - 1, n + 1).round()[::-1][:-1]
    if spacing == "leading":
        return (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1]
    return np.arange(N, 0, -N / n).round() - 1  # trailing


def peer_configs(nfe):
    """(name, solver, options, times, final) of every peer configuration the tuner must cover at ``nfe``."""
    out = []
    for peer, solver, opts, finals in DIFFUSERS:
        for spacing in ("linspace", "leading", "trailing"):
            ts = torch.from_numpy(diffusers_timesteps(spacing, nfe).copy()).to(DT)
            if "zero" in finals:
                out.append((f"{peer} {spacing}/zero", solver, opts, ts, "denoise"))
            out.append((f"{peer} {spacing}/sigma_min", solver, opts, torch.cat([ts, torch.zeros(1, dtype=DT)]),
                        "t_min"))
        for spacing in ("karras", "logsnr"):  # k-diffusion's Karras / exponential sigmas; diffusers' up to rounding
            if "zero" in finals:
                out.append((f"{peer} {spacing}/zero", solver, opts, ds.grids.SPACINGS[spacing](VP, nfe), "denoise"))
            out.append((f"{peer} {spacing}/sigma_min", solver, opts, ds.grids.SPACINGS[spacing](VP, nfe + 1),
                        "t_min"))
    peer, solver, opts = K_3M_SDE
    for spacing in ("karras", "logsnr"):
        out.append((f"{peer} {spacing}/zero", solver, opts, ds.grids.SPACINGS[spacing](VP, nfe), "denoise"))
    return out


def key(solver, options, t, final):
    return (solver, final, tuple(sorted(options.items())), tuple(np.round(t.numpy(), 9)))


def tune(nfes, peer_share, budget):
    den = MIX.denoiser(VP, "epsilon")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "PEER_SHARE", peer_share)
        mp.setattr(B, "MIN_SCREEN", 10**6)  # every candidate (pre-)screened, however loaded the machine is
        prof = T.tune(den, nfes, method="grids", data=False, shape=(8,), calib_seeds=range(500, 564), eval_seeds=32,
                      time_budget_s=budget, progress=False)
    return den, prof


@pytest.fixture(scope="module")
def tuned():
    """Every peer-equivalent screened on the whole calibration set (whatever the load of the machine)."""
    return tune(NFES, math.inf, 8.0)


def calibration_targets(den, prof):
    meta = prof.meta
    s = meta["calibration"]["seeds"]
    seeds = list(range(s["start"], s["start"] + s["count"])) if isinstance(s, dict) else list(s)
    z = seeding.noise(seeds, prof.shape)
    tch = meta["teacher"]
    teacher = ModelTeacher(den, tch["solver"], tch["nfe"], tch["spacing"])
    return z, teacher.targets(z)


def test_tuned_is_never_worse_than_any_peer_equivalent_on_calibration(tuned):
    den, prof = tuned
    z, tg = calibration_targets(den, prof)
    for nfe in NFES:
        e = prof.entry(nfe)
        ph = e.search["phases"]
        assert ph["peer_screened"] == ph["peer_equivalents"] > 0  # all screened ...
        assert e.search["screen_n"] == e.search["calib_n"]  # ... on the whole calibration set
        keys = {c.key for c, _ in peer_candidates(VP, nfe, prof.meta["solvers"])}
        errors = {}
        for name, solver, opts, t, final in peer_configs(nfe):
            assert key(solver, opts, t, final) in keys, f"{name} is not in the search space"
            errors[name] = calibration_error(den, z, tg, solver, opts, t, final, nfe)
        best = min(errors, key=errors.get)
        assert all(math.isfinite(v) for v in errors.values())
        assert e.calib_error <= errors[best] * (1 + 1e-9), (nfe, e.calib_error, best, errors[best])
        bp = e.baselines["best_peer_equivalent"]
        assert bp["calib_error"] == pytest.approx(errors[best], rel=1e-9)
        assert math.isfinite(bp["eval_error"]) and bp["peer"].startswith(("diffusers", "k-diffusion"))
    assert "| 5 |" in prof.table()  # the report reads the entries with their extra baseline


def test_tuned_is_never_worse_than_the_default_rule_on_calibration(tuned):
    """The tuner's baseline is what ``ds.sample(model, noise, nfe=k)`` runs (the default rule), run directly."""
    from diffsolve.sampling.defaults import default_sampler

    den, prof = tuned
    z, tg = calibration_targets(den, prof)
    for nfe in NFES:
        e = prof.entry(nfe)
        rule = default_sampler(nfe, VP, "epsilon")
        x = ds.sample(den, z, nfe=nfe)  # no options: the rule
        target = tg.denoised if rule.final == "denoise" else tg.at_t_min
        err = float(((x.to(DT) - target) ** 2).flatten(1).mean(1).mean().sqrt())
        assert e.baselines["default"]["calib_error"] == pytest.approx(err, rel=1e-9)
        assert "default rule" in e.baselines["default"]["label"] and rule.solver in e.baselines["default"]["label"]
        assert e.calib_error <= err * (1 + 1e-9)


def calibration_error(den, z, tg, solver, opts, t, final, nfe):
    """The tuner's calibration RMSE of one configuration, run directly: ``tg`` has the teacher's ``at_t_min``
    (the target of runs that stop at t_min) and ``denoised`` (of runs that jump to clean data)."""
    x, info = ds.sample(den, z, solver, grid=ds.explicit(VP, t=t, final=final), nfe=nfe, return_info=True, **opts)
    assert info.nfe == nfe
    target = tg.denoised if final == "denoise" else tg.at_t_min
    return float(((x.to(DT) - target) ** 2).flatten(1).mean(1).mean().sqrt())


def test_prescreened_peer_equivalents_keep_the_best_of_the_prescreen():
    """When screening them all would take too long, every peer-equivalent runs on the first n_pre calibration
    samples and the best go on: the tuned error is not above the full-set error of the pre-screen's best."""
    den, prof = tune([6], 0.0, 3.0)
    e = prof.entry(6)
    ph = e.search["phases"]
    n_pre = ph["peer_prescreen_n"]
    assert n_pre == B.PEER_MIN_PRESCREEN and ph["peer_prescreened"] > B.PEER_PROMOTE
    assert ph["peer_screened"] < ph["peer_equivalents"]
    z, tg = calibration_targets(den, prof)
    head = ExactTargets(VP.t_min, tg.at_t_min[:n_pre], tg.denoised[:n_pre])
    scores = [(calibration_error(den, z[:n_pre], head, c.solver, c.options, c.t, c.final, 6), c)
              for c, _ in peer_candidates(VP, 6, prof.meta["solvers"])]
    best_pre = min(scores, key=lambda r: r[0])[1]
    full = calibration_error(den, z, tg, best_pre.solver, best_pre.options, best_pre.t, best_pre.final, 6)
    bp = e.baselines["best_peer_equivalent"]["calib_error"]
    assert bp <= full * (1 + 1e-9) and e.calib_error <= bp * (1 + 1e-9)


def test_candidates_start_with_unipc_bh2_order3_on_linspace_to_t_min():
    """diffusers' UniPC bh2 order 3 on 'linspace' stopping at sigma_min (the best peer on the shipped MNIST
    model against its converged reference) is screened first: it is the library default up to 10 NFE (the
    default rule), which the tuner scores before anything else, and it is recorded as that peer's equivalent."""
    den = MIX.denoiser(VP, "epsilon")
    z = torch.zeros(4, 8, dtype=DT)
    for nfe in (5, 6, 10):
        bs = BudgetSearch(den, None, _Set(z, z, z), _Set(z, z, z), nfe, ["unipc-bh2", "dpm++3m"], "rmse", 10.0,
                          _Clock(10.0), 0, False)
        bs.candidates()
        c = bs.default
        assert (c.solver, c.options, c.final) == ("unipc-bh2", {"order": 3}, "t_min")
        want = np.concatenate([np.linspace(0, 999, nfe + 1).round()[::-1][:-1], [0.0]])
        assert np.array_equal(c.t.numpy(), want)
        assert bs.peer_of[c.key] == "diffusers UniPC bh2 order 3 linspace/sigma_min"
        assert ds.get_solver(c.solver).steps_for_nfe(nfe, False) == (c.t.numel() - 1, nfe)
    # a statistics-only search has none; a DPM-Solver++-only search has DPM-Solver++'s only
    assert peer_candidates(VP, 5, ["dpm-v3"]) == []
    assert {c.solver for c, _ in peer_candidates(VP, 5, ["dpm++3m"])} == {"dpm++2m", "dpm++3m"}
    # a continuous process has no index timesteps: only the Karras and log-SNR grids remain
    cont = peer_candidates(ds.VPContinuous.linear(), 5, ["unipc-bh2", "dpm++3m"])
    assert cont and all("diffusers-" not in c.label for c, _ in cont)


def test_index_spacing_candidates_are_the_diffusers_runs():
    """Each diffusers-timestep candidate reproduces the diffusers scheduler's pipeline run (float32 schedule), and
    diffusers' UniPC bh1 cannot stop at sigma = 0 (which is why the search has it with sigma_min only)."""
    pytest.importorskip("diffusers")
    import warnings

    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    ref = ds.GaussianMixture.random(dim=16, seed=0)
    kinds = {"UniPC": UniPCMultistepScheduler, "DPMSolverMultistep": DPMSolverMultistepScheduler}
    x_T = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=DT)
    checked = 0
    for nfe in (5, 8):
        proc = ds.VPDiscrete(UniPCMultistepScheduler().alphas_cumprod.to(DT))
        net = ref.network(proc, "epsilon")
        den = ref.denoiser(proc, "epsilon")
        for c, variant in peer_candidates(proc, nfe, ["unipc-bh2", "dpm++3m"]):
            if "diffusers-" not in c.label:
                continue
            peer, grid = variant.rsplit(" ", 1)
            spacing, final = grid.split("/")
            family = peer.split(" ")[1]
            if family == "UniPC":
                kw = {"solver_type": peer.split(" ")[2], "solver_order": int(peer.split(" ")[-1])}
            else:
                kw = {"algorithm_type": "dpmsolver++", "solver_order": int(peer[-2])}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched = kinds[family](timestep_spacing=spacing, final_sigmas_type=final, **kw)
                sched.set_timesteps(nfe)
                times = sched.timesteps.to(DT)
                x = x_T.clone()
                for t in sched.timesteps:
                    x = sched.step(net(x.to(DT), t.to(DT).expand(4)), t, x).prev_sample
            want = times if final == "zero" else torch.cat([times, torch.zeros(1, dtype=DT)])
            assert torch.equal(c.t, want), variant
            ours = ds.sample(den, x_T, c.solver, grid=ds.explicit(proc, t=c.t, final=c.final), nfe=nfe, **c.options)
            assert float((ours - x).norm() / x.norm()) < 1e-5, variant
            checked += 1
    assert checked == 2 * 3 * (4 * 2 + 2 * 1)  # NFEs x index spacings x (the last steps of each peer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = UniPCMultistepScheduler(solver_type="bh1", final_sigmas_type="zero")
        sched.set_timesteps(5)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(net(x.to(DT), t.to(DT).expand(4)), t, x).prev_sample
    assert not torch.isfinite(x).all()


def test_refined_grid_spends_the_larger_budget_and_keeps_the_smaller_grid():
    from diffsolve.tuning.budget import Candidate, refined

    t = ds.grids.SPACINGS["logsnr"](VP, 6)  # unipc-bh2 to t_min: 5 evaluations on 6 points
    c = Candidate("unipc-bh2", t, "t_min", {"order": 3}, "small")
    r = refined(VP, c, 8)
    assert r is not None and r.t.numel() == 9 and r.options == {"order": 3}  # 8 evaluations, then t_min
    assert all(bool((r.t - v).abs().min() < 1e-9) for v in t)  # every old point is kept
    x, info = ds.sample(MIX.denoiser(VP, "epsilon"), torch.zeros(1, 8, dtype=DT), r.solver,
                        grid=ds.explicit(VP, t=r.t, final=r.final), nfe=8, return_info=True, **r.options)
    assert info.nfe == 8
    assert refined(VP, c, 5) is None  # not a larger budget
