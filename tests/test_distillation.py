"""Distillation: resumable runs (a killed run ends with the same weights as an uninterrupted one), budgets, students
as normal checkpoints, the MMD estimator, and the consistency sampler (tiny models, fast)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import diffsolve as ds
from diffsolve.distillation import distill, mmd2_unbiased
from diffsolve.distillation.run import STUDENT_FILE
from diffsolve.models import UNet, UNetConfig

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention=False, groups=4))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5).add_(0.02 * torch.randn_like(p))
    net.eval().requires_grad_(False)
    proc = ds.VPDiscrete.linear(1000)
    cfg = {"architecture": {"type": "UNet", **net.config.to_dict()}, "process": proc.config(),
           "prediction": "epsilon", "model_time": "process", "sample_shape": list(SHAPE), "dataset": "digits"}
    return ds.Denoiser(net, proc, prediction="epsilon", sample_shape=SHAPE, config=cfg)


def features(x):  # a fixed feature map for MMD on 8x8 images: pooled pixels
    return torch.nn.functional.avg_pool2d(x, 2).flatten(1)


METHOD_OPTIONS = {
    "reflow": dict(nfe=2, pairs=24, chunk=8, pair_nfe=3),
    "mmd": dict(nfe=2, data="digits", real_batch=32, features=features),
    "consistency": dict(nfe=2, data="digits", skip=100),
}


def run(teacher, out, method, steps=6, **kw):
    opts = dict(METHOD_OPTIONS[method])
    opts.update(kw)
    return distill(teacher, method=method, out_dir=str(out), steps=steps, batch_size=8, lr=1e-3,
                   checkpoint_every=3, progress=False, **opts)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["reflow", "mmd", "consistency"])
def test_killed_run_resumes_to_the_same_weights(teacher, tmp_path, method, monkeypatch):
    full = run(teacher, tmp_path / "full", method)
    # a hard kill after the step-3 checkpoint: only what was on disk then survives
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_0000003", killed / "checkpoints" / "step_0000003")
    if (tmp_path / "full" / "pairs").exists():
        shutil.copytree(tmp_path / "full" / "pairs", killed / "pairs")
    resumed = run(teacher, killed, method)
    assert same(weights(full), weights(resumed))
    # an interrupt (Ctrl-C) at step 4 checkpoints there; running again finishes the same
    from diffsolve.distillation import api
    cls = api.METHODS[method]
    orig = cls.loss

    def interrupt(self, r, step):
        if step == 4:
            raise KeyboardInterrupt
        return orig(self, r, step)

    monkeypatch.setattr(cls, "loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, tmp_path / "ctrl_c", method)
    monkeypatch.setattr(cls, "loss", orig)
    assert (tmp_path / "ctrl_c" / "checkpoints" / "step_0000004" / STUDENT_FILE).exists()
    assert same(weights(full), weights(run(teacher, tmp_path / "ctrl_c", method)))
    # the student is a normal checkpoint that samples with its recorded sampler
    student = ds.load(full)
    info = student.config["distillation"]
    assert info["method"] == method and info["steps"] == 6 and info["cpu_minutes"] >= 0
    x = ds.sample(student, torch.randn(3, *SHAPE, dtype=torch.float64), seeds=[0, 1, 2], **info["sampler"])
    assert x.shape == (3, *SHAPE) and torch.isfinite(x).all()
    assert not same(weights(full), {k: v for k, v in teacher.net.state_dict().items()})


def test_budget_stops_and_is_recorded(teacher, tmp_path):
    path = run(teacher, tmp_path / "b", "consistency", steps=1000, budget_minutes=1e-4)
    info = ds.load(path).config["distillation"]
    assert info["stopped_by_budget"] and info["steps"] < 1000


def test_bad_input_gives_clear_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="unknown distillation method"):
        distill(teacher, method="progressive", out_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown reflow option"):
        distill(teacher, method="reflow", out_dir=str(tmp_path / "x"), pairz=3, progress=False)
    with pytest.raises(ValueError, match="budget_minutes"):
        distill(teacher, method="reflow", out_dir=str(tmp_path / "x"), budget_minutes=0)
    run(teacher, tmp_path / "p", "reflow", steps=1)
    with pytest.raises(ValueError, match="holds pairs made with"):
        run(teacher, tmp_path / "p", "reflow", steps=2, pair_nfe=4)


def test_mmd_estimator_is_unbiased_and_zero_for_equal_laws():
    g = torch.Generator().manual_seed(0)
    vals = [float(mmd2_unbiased(torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)))
            for _ in range(200)]
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    assert abs(mean) < 3 * sd / len(vals) ** 0.5  # unbiased: zero in expectation for the same law
    shifted = float(mmd2_unbiased(torch.randn(256, 4, generator=g) + 1.0, torch.randn(256, 4, generator=g)))
    assert shifted > 10 * sd


def test_consistency_sampler_renoises_to_the_exact_marginal():
    proc = ds.VPDiscrete.linear(1000)
    c = 0.3

    def net(x, t):  # a model whose clean estimate is the constant c everywhere
        a, s = proc.alpha(t.double()).float().reshape(-1, 1), proc.sigma(t.double()).float().reshape(-1, 1)
        return (x - a * c) / s

    den = ds.Denoiser(net, proc, prediction="epsilon")
    n = 4000
    states = []
    x, info = ds.sample(den, torch.randn(n, 2, dtype=torch.float64), "consistency", nfe=3, seeds=range(n),
                        callback=lambda d: states.append((d["t"], d["x"].clone())), return_info=True)
    assert torch.allclose(x, torch.full_like(x, c), atol=1e-5) and info.nfe == 3
    t, xs = states[0]
    a, s = float(proc.alpha(torch.tensor(t))), float(proc.sigma(torch.tensor(t)))
    assert abs(float(xs.mean()) - a * c) < 4 * s / (2 * n) ** 0.5
    assert abs(float(xs.std()) - s) < 0.05 * s


def test_distill_command(teacher, tmp_path, capsys):
    from diffsolve.cli.main import main
    ckpt = ds.save_model(tmp_path / "teacher", teacher.net, teacher.config)
    args = ["distill", "--teacher", str(ckpt), "--method", "reflow", "--nfe", "1", "--steps", "2", "--batch-size",
            "4", "--out", str(tmp_path / "run"), "--no-progress", "--option", "pairs=8", "--option", "chunk=8",
            "--option", "pair_nfe=2"]
    assert main(args) == 0
    assert ds.load(tmp_path / "run" / "model").config["distillation"]["steps"] == 2
    assert main(["distill", "--teacher", str(ckpt), "--out", str(tmp_path / "x"), "--option", "bogus=1",
                 "--no-progress"]) == 2
    assert "error: unknown reflow option" in capsys.readouterr().err


def test_reflow_mlp_student_on_an_exact_mixture_learns_the_ode_map(tmp_path):
    from diffsolve.models.mlp import MLP, MLPConfig
    ref = ds.GaussianMixture.random(4, n_components=2, seed=0)
    proc = ds.VPDiscrete.linear(1000)
    teacher = ref.denoiser(proc, "x0")
    teacher.sample_shape = (4,)
    torch.manual_seed(0)
    student = MLP(MLPConfig(dim=4, hidden=64, layers=2))
    path = distill(teacher, method="reflow", nfe=1, out_dir=str(tmp_path / "r"), steps=400, batch_size=128, lr=3e-3,
                   checkpoint_every=0, progress=False, student=student, pairs=1024, chunk=1024, pair_solver="dpm++3m",
                   pair_nfe=40, p_grid=1.0)
    st = ds.load(path)
    assert type(st.net).__name__ == "MLP" and st.config["distillation"]["nfe"] == 1
    z = torch.randn(512, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # held-out noise
    exact = ds.exact_targets(ref, proc, proc.prior_from_noise(z)).denoised
    x1 = ds.sample(st, z, **st.config["distillation"]["sampler"])
    x_ddim = ds.sample(teacher, z, "ddim", nfe=1)  # the teacher's own one-step jump: the posterior mean at x_T
    err = float((x1 - exact).square().mean().sqrt())
    assert err < 0.5 * float((x_ddim - exact).square().mean().sqrt()), err
