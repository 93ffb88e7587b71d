"""The seams between layers, checked against exact answers: the model protocol (duck-typed models, guidance and
other wrappers), the step and call hooks, the gradient policy, the one seeding convention, profile NFE accounting,
process capabilities (non-Gaussian processes, offsets) and the diffusers scheduler."""
import json
import threading

import numpy as np
import pytest
import torch
from conftest import randn

import diffsolve as ds
from diffsolve.adapters import derivatives
from diffsolve.solvers.drivers import Call, Step
from diffsolve.util import seeding

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
MIX = ds.GaussianMixture.random(dim=8, n_components=3, seed=0)
V3 = ds.dpm_v3.Statistics.degenerate()
STOCHASTIC = {s.name for s in ds.solvers() if s.stochastic}


def solver_opts(name):
    """The options a solver must be given (dpm-v3: model-independent statistics)."""
    return {"stats": V3} if name == "dpm-v3" else {}


def seeds_for(name, n):
    return list(range(10, 10 + n)) if name in STOCHASTIC else None


class Duck:
    """A model by the protocol alone (no Denoiser, no ModelWrapper): it holds an exact Denoiser by composition
    and rebuilds each Prediction from the inner one's native output."""

    def __init__(self, den):
        self._den = den
        self.process = den.process

    def evaluate(self, x, t, kwargs, coeffs=None):
        p = self._den.evaluate(x, t, kwargs, coeffs)
        if p.native == "eps":
            return ds.Prediction(x, p.alpha, p.sigma, eps=p.eps)
        return ds.Prediction(x, p.alpha, p.sigma, x0=p.x0)

    def identity(self):
        return {"process": self.process.config(), "prediction": "duck", "guidance_scale": 1.0}


# ----------------------------------------------------------------------------------------
# 1. a duck-typed model samples with every solver exactly like the Denoiser it wraps
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [s.name for s in ds.solvers()])
def test_duck_typed_model_samples_like_the_wrapped_denoiser(name):
    den = MIX.denoiser(VP, "epsilon")
    duck = Duck(den)
    assert isinstance(duck, ds.Model) and not isinstance(duck, (ds.Denoiser, ds.ModelWrapper))
    z = randn(3, 8, seed=1)
    kw = dict(nfe=7, seeds=seeds_for(name, 3), return_info=True, **solver_opts(name))
    a, ia = ds.sample(duck, z, name, **kw)
    n0 = den.nfe
    b, ib = ds.sample(den, z, name, **kw)
    assert ia.nfe == ib.nfe == den.nfe - n0 and 1 <= ia.nfe <= 7
    assert torch.isfinite(a).all() and a.shape == z.shape
    assert (a - b).abs().max() <= 1e-12
    if name in STOCHASTIC:  # the seeds really drive the solver: other seeds, another sample
        c = ds.sample(duck, z, name, nfe=7, seeds=[20, 21, 22], **solver_opts(name))
        assert (c - a).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------
# 2. classifier-free guidance equals the hand-fused outputs in one network call; wrappers compose
# ----------------------------------------------------------------------------------------
def conditional_net(prediction):
    """A label-conditional network in ``prediction`` form: the exact output plus a label-dependent term."""
    exact = MIX.network(VP, prediction)

    def net(x, t, y):
        yy = y.to(x).reshape(-1, 1)
        return exact(x, t) * (1 + 0.3 * yy) + 0.2 * yy * torch.sin(3 * x)

    return net


class ShiftX0(ds.ModelWrapper):
    """A small wrapper: moves every x0 prediction by a constant."""

    def __init__(self, inner, c):
        super().__init__(inner)
        self.c = float(c)

    def describe(self):
        return {"kind": "shift-x0", "c": self.c}

    def evaluate(self, x, t, kwargs=None, coeffs=None):
        p = self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)
        return ds.Prediction(x, p.alpha, p.sigma, x0=p.x0 + self.c)


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
def test_cfg_equals_hand_fused_outputs_in_one_call(prediction):
    w = 2.5
    net = conditional_net(prediction)
    den = ds.Denoiser(net, VP, prediction, dtype=DT)
    cfg = ds.ClassifierFreeGuidance(den, w, {"y": torch.zeros(1, dtype=DT)})
    y = torch.tensor([1.0, 2.0, -1.0], dtype=DT)

    def fused(x, t, y):
        u = net(x, t, torch.zeros_like(y))
        return u + w * (net(x, t, y) - u)

    ref = ds.Denoiser(fused, VP, prediction, dtype=DT)
    x = randn(3, 8, seed=2)
    for t in (900.0, 350.0, 20.0):
        n0 = den.nfe
        got = cfg.evaluate(x, t, {"y": y})
        assert den.nfe - n0 == 1  # both branches in one batched network call
        want = ref.evaluate(x, t, {"y": y})
        assert torch.allclose(got.x0, want.x0, rtol=1e-12, atol=1e-12)
        assert torch.allclose(got.eps, want.eps, rtol=1e-12, atol=1e-12)
    # a whole run: the guided model samples like the fused network, one network call per evaluation
    z = randn(3, 8, seed=3)
    n0 = den.nfe
    a, info = ds.sample(cfg, z, "dpm++2m", nfe=6, model_kwargs={"y": y}, return_info=True)
    assert den.nfe - n0 == info.nfe == 6
    b = ds.sample(ref, z, "dpm++2m", nfe=6, model_kwargs={"y": y})
    assert (a - b).abs().max() <= 1e-10
    # another wrapper composes with guidance, outside or inside it
    c = 0.125
    outer = ShiftX0(cfg, c)
    inner = ds.ClassifierFreeGuidance(ShiftX0(den, c), w, {"y": torch.zeros(1, dtype=DT)})
    base = cfg.evaluate(x, 500.0, {"y": y}).x0
    for m in (outer, inner):
        n0 = den.nfe
        got = m.evaluate(x, 500.0, {"y": y}).x0
        assert den.nfe - n0 == 1
        assert torch.allclose(got, base + c, rtol=1e-12, atol=1e-12)
    io, ii = outer.identity(), inner.identity()
    assert io["wrappers"] == [{"kind": "cfg", "scale": w}, {"kind": "shift-x0", "c": c}]
    assert ii["wrappers"] == [{"kind": "shift-x0", "c": c}, {"kind": "cfg", "scale": w}]
    assert io["guidance_scale"] == ii["guidance_scale"] == w
    assert io["prediction"] == prediction and io["process"] == VP.config()


# ----------------------------------------------------------------------------------------
# 3. after_step: replacing x, reindexing the batch, resetting the history
# ----------------------------------------------------------------------------------------
HOOK_SOLVERS = ["ddim", "dpm++2m", "unipc-bh2", "heun", "dpm-solver-3", "pndm", "ipndm-hb", "ghvb", "dpm++2m-sde",
                "euler-maruyama", "dpm-v3"]
#: solvers whose steps do not use past evaluations or solver extras (a history reset changes nothing)
MEMORYLESS = {"ddim", "heun", "dpm-solver-3", "euler-maruyama"}
TIMES = ds.make_grid(VP, 6, "logsnr", final="t_min").t  # six evaluation times; the grids below add the jump to clean data


def hook_opts(name):
    o = solver_opts(name)
    if name == "dpm-v3":  # pin the step-count-dependent defaults, so a shorter grid runs the same method
        o.update(predictor_pseudo=False, corrector=True)
    return o


def run(name, z, t=TIMES, seeds=None, generators=None, **kw):
    grid = ds.explicit(VP, t=t, final="denoise")
    seeds = seeds if generators is None else None
    return ds.sample(MIX.denoiser(VP, "epsilon"), z, name, grid=grid, seeds=seeds, generators=generators,
                     return_info=True, **hook_opts(name), **kw)


@pytest.mark.parametrize("name", HOOK_SOLVERS)
def test_after_step_replacing_x(name):
    z = randn(4, 8, seed=4)
    seeds = seeds_for(name, 4)
    plain, info = run(name, z, seeds=seeds)
    # a hook that hands back the state unchanged (in place or as the returned object) changes nothing
    same, _ = run(name, z, seeds=seeds, after_step=lambda st, step: None)
    again, _ = run(name, z, seeds=seeds, after_step=lambda st, step: st)
    assert torch.equal(same, plain) and torch.equal(again, plain)
    # replacing x after step k (and forgetting the history) is a fresh start from that tensor on the rest of the grid
    k = 1
    fixed = 0.7 * randn(4, 8, seed=5)
    saved = {}

    def replace(st, step):
        if step.i == k:
            st.x = fixed.clone()
            st.reset_history()
            if st.noise.generators is not None:
                saved["g"] = [g.get_state() for g in st.noise.generators]

    hooked, hinfo = run(name, z, seeds=seeds, after_step=replace)
    gens = None
    if name in STOCHASTIC:
        gens = [torch.Generator() for _ in saved["g"]]
        for g, s in zip(gens, saved["g"]):
            g.set_state(s)
    restart, rinfo = run(name, fixed, t=TIMES[k + 1:], generators=gens, scale_noise=False)
    if name == "pndm":
        # PNDM's Heun-like first step belongs to step 0 of a run; after a reset it warms up with order 1
        # (so a fresh run from `fixed` is not the exact answer here); the run keeps its NFE and stays finite
        assert hinfo.nfe == info.nfe and torch.isfinite(hooked).all()
    else:
        assert (hooked - restart).abs().max() <= 1e-12, float((hooked - restart).abs().max())
        assert hinfo.nfe == info.nfe
    assert (hooked - plain).abs().max() > 1e-6


@pytest.mark.parametrize("name", HOOK_SOLVERS)
def test_after_step_reindex_moves_history_and_streams(name):
    z = randn(4, 8, seed=6)
    seeds = seeds_for(name, 4)
    plain, _ = run(name, z, seeds=seeds)
    idx = [2, 2, 0, 1]

    def resample(st, step):
        if step.i == 1:
            return st.reindex(idx)

    out, _ = run(name, z, seeds=seeds, after_step=resample)
    # each particle keeps its history, extras and random stream: row j is the plain run's row idx[j]
    assert (out - plain[idx]).abs().max() <= 1e-10, float((out - plain[idx]).abs().max())
    if name in STOCHASTIC:  # the duplicated particle got a copy of its stream: the two copies stay equal
        assert torch.equal(out[0], out[1])
        assert (out[0] - out[2]).abs().max() > 1e-3


def test_reindex_moves_per_sample_model_kwargs():
    """Per-sample model keywords move with their rows: guidance labels, and an offset's y (which the run also
    adds back at the end when it stops at t_min)."""
    idx = [2, 2, 0, 1]
    hook = lambda st, step: st.reindex(idx) if step.i == 1 else None
    z = randn(4, 8, seed=16)
    den = ds.Denoiser(conditional_net("epsilon"), VP, "epsilon", dtype=DT)
    cfg = ds.ClassifierFreeGuidance(den, 2.0, {"y": torch.zeros(1, dtype=DT)})
    labels = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=DT)
    for name in ("dpm++2m", "dpm++2m-sde"):
        kw = dict(nfe=6, model_kwargs={"y": labels}, seeds=seeds_for(name, 4))
        plain = ds.sample(cfg, z, name, **kw)
        assert (ds.sample(cfg, z, name, after_step=hook, **kw) - plain[idx]).abs().max() <= 1e-10
    b = lambda t: 1 - VP.alpha(t)
    proc = ds.Shifted(VP, b, key="y")
    net = lambda x, t, y: MIX.posterior(x - b(t.to(DT)).reshape(-1, 1) * y, VP, t)[1]
    sden = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    y = randn(4, 8, seed=17)
    for final in ("denoise", "t_min"):
        kw = dict(nfe=6, model_kwargs={"y": y}, final=final)
        plain = ds.sample(sden, z, "unipc-bh2", **kw)
        assert (ds.sample(sden, z, "unipc-bh2", after_step=hook, **kw) - plain[idx]).abs().max() <= 1e-10


@pytest.mark.parametrize("name", HOOK_SOLVERS)
def test_after_step_reset_history_and_step_fields(name):
    z = randn(4, 8, seed=7)
    seeds = seeds_for(name, 4)
    plain, info = run(name, z, seeds=seeds)
    grid = info.grid
    seen, calls = [], []

    def reset(st, step):
        assert isinstance(step, Step) and st.i == step.i + 1
        assert step.clean == (step.i == grid.steps - 1) and (step.t_to is None) == step.clean
        assert step.t_from == float(grid.t[step.i])
        if not step.clean:
            assert step.t_to == float(grid.t[step.i + 1])
        assert step.denoised.shape == z.shape and torch.isfinite(step.denoised).all()
        seen.append(step.i)
        if step.i in (1, 3):
            st.reset_history()

    out, rinfo = run(name, z, seeds=seeds, after_step=reset, on_call=calls.append)
    assert seen == list(range(grid.steps))
    assert len(calls) == rinfo.nfe == info.nfe and torch.isfinite(out).all()
    if name in MEMORYLESS:
        assert torch.equal(out, plain)
    else:  # order > 1 multistep methods (and momentum) lose their history: another (lower-order) result
        assert (out - plain).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------
# 4. on_call sees every model evaluation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [s.name for s in ds.solvers()])
def test_on_call_sees_exactly_the_nfe(name):
    den = MIX.denoiser(VP, "epsilon")
    calls = []
    z = randn(2, 8, seed=8)
    out, info = ds.sample(den, z, name, nfe=8, seeds=seeds_for(name, 2), on_call=calls.append, return_info=True,
                          **solver_opts(name))
    assert len(calls) == info.nfe == den.nfe and info.nfe <= 8
    assert [c.index for c in calls] == list(range(info.nfe))
    steps = [c.step for c in calls]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == info.steps - 1
    for c in calls:
        assert isinstance(c, Call) and c.prediction.net_input is not None
        x_net, tm = c.prediction.net_input
        assert torch.equal(x_net.to(DT), c.x) and torch.allclose(tm.to(DT), torch.full((2,), c.t, dtype=DT))
        assert torch.allclose(c.prediction.eps, MIX.posterior(c.x, VP, c.t)[1], atol=1e-9)


# ----------------------------------------------------------------------------------------
# 5. gradient policy through a diffusers-loaded model
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_model(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler, UNet2DModel

    from diffsolve.integrations.diffusers import load_diffusers
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    path = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon").save_pretrained(path)
    return load_diffusers(path), unet


def test_gradient_policy_on_a_diffusers_model(diffusers_model):
    den, unet = diffusers_model
    x = randn(2, 1, 8, 8, seed=9)
    t = 500.0
    y, g = derivatives.vjp(derivatives.prediction_fn(den, t, {}, "x0"), x, torch.ones_like(x))
    assert torch.isfinite(g).all() and g.abs().max() > 0 and y.grad_fn is None
    # exact: x0 = (x - sigma eps(x)) / alpha, so the VJP with ones is (1 - sigma J^T 1) / alpha
    a, s = float(VP.alpha(torch.tensor(t, dtype=DT))), float(VP.sigma(torch.tensor(t, dtype=DT)))
    with torch.enable_grad():
        xf = x.float().requires_grad_(True)
        (jt1,) = torch.autograd.grad(unet(xf, torch.full((2,), t)).sample.sum(), xf)
    want = (1 - s * jt1.double()) / a
    assert torch.allclose(g, want, rtol=1e-4, atol=1e-5)
    # sampling builds no graph unless asked, even from noise that requires grad
    z = randn(2, 1, 8, 8, seed=10)
    out = ds.sample(den, z, "ddim", nfe=3)
    assert out.requires_grad is False and out.grad_fn is None
    zg = z.clone().requires_grad_()
    out = ds.sample(den, zg, "ddim", nfe=3)
    assert out.requires_grad is False and out.grad_fn is None
    out = ds.sample(den, zg, "ddim", nfe=3, grad=True)
    assert out.grad_fn is not None
    out.sum().backward()
    assert zg.grad is not None and torch.isfinite(zg.grad).all() and zg.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------
# 6. one seeding convention
# ----------------------------------------------------------------------------------------
def test_one_seed_one_sample_everywhere(tmp_path, capsys):
    from diffsolve import tuning
    from diffsolve.cli.main import main

    shape = (8,)
    n3 = seeding.noise([3], shape)
    assert torch.equal(n3, tuning.seeded_noise([3], shape))
    assert torch.equal(n3[0], torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=DT))
    assert torch.equal(seeding.noise(seeding.run_seeds(0, 1, start=3), shape), n3)
    assert seeding.run_seeds(0, 4)[3] == 3 and seeding.run_seeds(1, 2) == [2**31, 2**31 + 1]
    den = MIX.denoiser(VP, "epsilon")
    a = ds.sample(den, None, "ddpm", nfe=5, seeds=[3], shape=shape)
    b = ds.sample(den, seeding.noise([3], shape), "ddpm", nfe=5, seeds=[3])
    assert torch.equal(a, b)
    # sample i of a batch does not depend on the batch it is drawn in (noise and solver stream)
    big = ds.sample(den, None, "ddpm", nfe=5, seeds=[5, 3, 7], shape=shape)
    assert (big[1] - a[0]).abs().max() <= 1e-12 and (big[0] - a[0]).abs().max() > 1e-3
    # the command line: --seed 0 --n 4 names sample seeds 0..3; --seed 1 names 2**31 + i
    toy = ds.GaussianMixture.toy2d().denoiser(VP, "x0")
    for seed, n, row, sample_seed in ((0, 4, 3, 3), (1, 2, 0, 2**31)):
        out = tmp_path / f"s{seed}"
        code = main(["sample", "--solver", "ddpm", "--nfe", "5", "--n", str(n), "--seed", str(seed),
                     "--exact-samples", "0", "--out", str(out), "--quiet"])
        capsys.readouterr()
        assert code == 0
        cli = torch.from_numpy(np.load(out / "samples.npy"))
        info = json.loads((out / "info.json").read_text())
        assert info["solver"] == "ddpm" and info["nfe"] == 5
        mine = ds.sample(toy, seeding.noise([sample_seed], (2,)), "ddpm", nfe=5, seeds=[sample_seed])
        assert (cli[row] - mine[0]).abs().max() <= 1e-12


# ----------------------------------------------------------------------------------------
# 7. profile-guided runs account for the fingerprint check's network calls
# ----------------------------------------------------------------------------------------
def test_profile_run_reports_check_calls():
    from diffsolve import tuning
    exact = MIX.network(VP, "epsilon")
    count = {"n": 0}

    def net(x, t, **kw):
        count["n"] += 1
        return exact(x, t)

    prof = tuning.tune(ds.Denoiser(net, VP, "epsilon", dtype=DT), [4], data=False, shape=(8,),
                       calib_seeds=range(0, 24), eval_seeds=range(24, 32), time_budget_s=2, progress=False)
    den = ds.Denoiser(net, VP, "epsilon", dtype=DT)  # a model object the profile has not verified yet
    z = randn(3, 8, seed=11)
    results = []
    for expect_check in (len(prof.model["probe_lambdas"]), 0):
        c0, d0 = count["n"], den.nfe
        x, info = ds.sample(den, z, profile=prof, nfe=4, return_info=True)
        results.append(x)
        assert info.check_calls == expect_check and info.nfe <= 4
        assert count["n"] - c0 == info.nfe + info.check_calls  # every network call is reported
        assert den.nfe - d0 == info.nfe  # the counter leaves the check out (documented: Profile.check)
    assert len(prof.model["probe_lambdas"]) == 2
    assert torch.equal(results[0], results[1])


# ----------------------------------------------------------------------------------------
# 8. process capabilities: Gaussian marginals, offsets
# ----------------------------------------------------------------------------------------
class NonGaussianVP(ds.VPDiscrete):
    gaussian = False


def test_sde_solvers_refuse_non_gaussian_processes():
    proc = NonGaussianVP(VP.alphas_cumprod)
    den = ds.Denoiser(MIX.network(VP, "epsilon"), proc, "epsilon", dtype=DT)
    z = randn(2, 8, seed=12)
    assert STOCHASTIC == {"ddpm", "euler-maruyama", "dpm++2m-sde", "consistency"}
    for name in sorted(STOCHASTIC):
        assert "gaussian" in ds.get_solver(name).needs
        with pytest.raises(ValueError, match="gaussian"):
            ds.sample(den, z, name, nfe=5, seeds=[0, 1])
    # ODE solvers need no such capability: same answer as on the Gaussian process
    a = ds.sample(den, z, "dpm++2m", nfe=5)
    assert torch.equal(a, ds.sample(MIX.denoiser(VP, "epsilon"), z, "dpm++2m", nfe=5))


def test_shifted_process_samples_in_the_standard_frame():
    b = lambda t: 1 - VP.alpha(t)
    proc = ds.Shifted(VP, b, key="y")

    def net(x, t, y):  # exact eps of the shifted process: the base posterior at x - b(t) y
        bt = b(t.to(DT)).reshape(-1, 1)
        return MIX.posterior(x - bt * y, VP, t)[1]

    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    z = randn(4, 8, seed=13)
    y = 2.0 * randn(4, 8, seed=14)
    assert torch.equal(proc.prior_from_noise(z), VP.prior_from_noise(z))
    exact = ds.exact_targets(MIX, VP, z)
    base = MIX.denoiser(VP, "epsilon")
    rmse = lambda a, b: float((a - b).pow(2).mean().sqrt())
    errs = {}
    for nfe in (40, 80):
        out, info = ds.sample(den, z, "dpm++3m", nfe=nfe, model_kwargs={"y": y}, return_info=True)
        # the offset only changes the frame: the run is the base process's run from the same noise ...
        assert info.nfe == nfe and (out - ds.sample(base, z, "dpm++3m", nfe=nfe)).abs().max() <= 1e-12
        errs[nfe] = rmse(out, exact.denoised)  # ... and converges to the standard frame's exact ODE solution
    assert errs[40] < 1e-2 and errs[80] < 2e-3 and errs[80] < errs[40] / 4, errs
    # ending at t_min returns x_t itself, offset included
    out_t = ds.sample(den, z, "dpm++3m", nfe=40, final="t_min", model_kwargs={"y": y})
    b_end = float(b(torch.tensor(VP.t_min, dtype=DT)))
    base_t = ds.sample(base, z, "dpm++3m", nfe=40, final="t_min")
    assert b_end > 0 and (out_t - b_end * y - base_t).abs().max() <= 1e-12
    assert rmse(out_t - b_end * y, exact.at_t_min) < 1e-2
    # the reverse SDE with zero extra noise: deterministic whatever the seeds, finite, close to the ODE
    e1 = ds.sample(den, z, "euler-maruyama", nfe=40, model_kwargs={"y": y}, seeds=[0, 1, 2, 3],
                   diffusion=lambda t: 0 * t)
    e2 = ds.sample(den, z, "euler-maruyama", nfe=40, model_kwargs={"y": y}, seeds=[4, 5, 6, 7],
                   diffusion=lambda t: 0 * t)
    assert torch.isfinite(e1).all() and torch.equal(e1, e2)
    assert float((e1 - exact.denoised).pow(2).mean().sqrt()) < 0.1


# ----------------------------------------------------------------------------------------
# 9. the diffusers scheduler: no threads, same result as ds.sample
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dpm++2m", "heun", "ddpm"])
def test_diffusers_scheduler_runs_inline_and_matches_sample(name):
    pytest.importorskip("diffusers")
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    before = threading.active_count()
    sched = DiffsolveScheduler(solver=name, spacing="trailing")
    sched.set_timesteps(7)
    den = MIX.denoiser(sched.process, "epsilon")
    net = MIX.network(sched.process, "epsilon")
    z = randn(3, 8, seed=15)
    x = z.clone()
    gen = torch.Generator().manual_seed(123) if name in STOCHASTIC else None
    for t in sched.timesteps:
        assert threading.active_count() == before
        out = net(x, torch.full((3,), float(t), dtype=DT))
        x = sched.step(out, t, x, generator=gen).prev_sample
    assert threading.active_count() == before
    if name in STOCHASTIC:  # the scheduler shares the pipeline's one generator across the batch
        g = torch.Generator().manual_seed(123)
        want, info = ds.sample(den, z, name, nfe=7, spacing="trailing", generators=[g] * 3, return_info=True)
    else:
        want, info = ds.sample(den, z, name, nfe=7, spacing="trailing", return_info=True)
    assert len(sched.timesteps) == info.nfe
    assert (x - want).abs().max() <= 1e-10, float((x - want).abs().max())
