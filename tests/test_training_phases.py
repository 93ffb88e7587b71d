"""Training objectives from the parameterisation table, and the phases of a run."""
import importlib

import pytest
import torch
from safetensors.torch import load_file

from diffsolve.adapters.parameterisation import PARAMETERISATIONS
from diffsolve.training import TrainConfig, loop, read_log, train, training_pair
from diffsolve.training.objectives import make_process, resolved_model_time, sample_times

train_module = importlib.import_module("diffsolve.training.train")

PROCESSES = {"VPDiscrete": {"schedule": "cosine", "num_train_timesteps": 100}, "VPContinuous": {},
             "RectifiedFlow": {}}
TINY = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": False, "groups": 4}
DATA = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ----------------------------------------------------------------------------------------
# objectives
# ----------------------------------------------------------------------------------------
def test_objectives_are_the_table_less_score():
    assert train_module.OBJECTIVES == ("epsilon", "x0", "v", "velocity", "edm")
    assert set(train_module.OBJECTIVES) == set(PARAMETERISATIONS) - {"score", "residual"}


@pytest.mark.parametrize("alias, name", [("eps", "epsilon"), ("noise", "epsilon"), ("v_prediction", "v"),
                                         ("flow", "velocity"), ("flow_matching", "velocity"), ("sample", "x0"),
                                         ("edm", "edm"), ("x0", "x0")])
def test_objective_aliases(alias, name):
    assert TrainConfig(objective=alias).objective == name


def test_untrainable_and_unknown_objectives():
    with pytest.raises(ValueError, match=r"objective 'score' cannot be trained.*epsilon, x0, v, velocity, edm"):
        TrainConfig(objective="score")
    with pytest.raises(ValueError, match=r"unknown objective 'nope'; choose one of epsilon, x0, v, velocity, edm"):
        TrainConfig(objective="nope")


def _old_x0_gain(objective, proc, t):
    """The per-objective |d x0 / d output| as training computed it before it read the table."""
    a, s = proc.alpha(t), proc.sigma(t)
    if objective == "epsilon":
        return s / a
    if objective == "x0":
        return torch.ones_like(a)
    if objective == "v":
        return s / (a**2 + s**2)
    return s / (a * proc.d_sigma(t) - s * proc.d_alpha(t))


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("objective", ["epsilon", "x0", "v", "velocity"])
def test_edm_loss_weight_matches_the_per_objective_formula(process, objective):
    cfg = TrainConfig(process=process, process_kwargs=PROCESSES[process], objective=objective,
                      loss_weighting="edm", t_sampling="uniform")
    proc = make_process(cfg)
    gen = torch.Generator().manual_seed(7)
    t = sample_times(cfg, proc, 256, gen)
    x0, eps = torch.randn(256, 1, 4, 4, generator=gen), torch.randn(256, 1, 4, 4, generator=gen)
    *_, w = training_pair(cfg, proc, resolved_model_time(cfg, proc), x0, eps, t)
    sve = proc.sigma(t) / proc.alpha(t)
    sd = float(getattr(proc, "sigma_data", 0.5))
    old = (sve**2 + sd**2) / (sve * sd) ** 2 * _old_x0_gain(objective, proc, t) ** 2
    assert w.dtype == torch.float32 and w.shape == (256,)
    torch.testing.assert_close(w.double(), old, rtol=1e-6, atol=0)
    # no weighting: ones
    *_, w1 = training_pair(TrainConfig(**{**cfg.to_dict(), "loss_weighting": "none"}), proc,
                           resolved_model_time(cfg, proc), x0, eps, t)
    assert torch.equal(w1, torch.ones(256))


@pytest.mark.parametrize("loss_weighting", ["none", "edm"])
def test_preconditioned_objective_sees_edm_inputs(loss_weighting):
    cfg = TrainConfig(process="VPContinuous", objective="edm", loss_weighting=loss_weighting)
    proc = make_process(cfg)
    assert cfg.parameterisation.preconditioned and resolved_model_time(cfg, proc) == "log_sigma"
    gen = torch.Generator().manual_seed(0)
    t = sample_times(cfg, proc, 32, gen)
    x0, eps = torch.randn(32, 1, 4, 4, generator=gen), torch.randn(32, 1, 4, 4, generator=gen)
    xin, tin, target, w = training_pair(cfg, proc, "log_sigma", x0, eps, t)
    s = (proc.sigma(t) / proc.alpha(t)).float()
    torch.testing.assert_close(tin, torch.log(s) / 4)
    assert torch.equal(w, torch.ones(32))  # lambda(sigma) * c_out^2 = 1
    # the table's conversion of the target back to x0 is the data
    sd = 0.5
    x_tilde = (xin * torch.sqrt(s**2 + sd**2).reshape(-1, 1, 1, 1))
    x0_hat = sd**2 / (s**2 + sd**2).reshape(-1, 1, 1, 1) * x_tilde \
        + (s * sd / torch.sqrt(s**2 + sd**2)).reshape(-1, 1, 1, 1) * target
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------
# the phases
# ----------------------------------------------------------------------------------------
def test_public_names():
    import diffsolve.training as training

    for name in ("train", "TrainConfig", "training_pair", "read_log"):
        assert getattr(training, name) is getattr(train_module, name)
    for name in ("build_parser", "config_from_args", "main", "OBJECTIVES", "STATE_FILE", "ONLINE_FILE", "DataOrder",
                 "lr_at", "ema_decay_at", "sample_times", "make_process", "resolved_model_time",
                 "default_time_scale", "latest_checkpoint"):
        assert hasattr(train_module, name), name


def _cfg(out, **kw):
    base = dict(out_dir=str(out), steps=4, batch_size=8, model=dict(TINY), checkpoint_every=2, keep_checkpoints=0,
                sample_every=-1, log_every=1, progress=False, warmup_steps=1)
    return TrainConfig(**{**base, **kw})


def test_phases_compose_to_train(tmp_path):
    ref = train(_cfg(tmp_path / "a"), data=DATA)
    run = loop.setup(_cfg(tmp_path / "b"), DATA)
    assert run.dataset == "in-memory" and run.sample_shape == [1, 8, 8] and run.model_time == "process"
    assert loop.resume(run) == 0
    loop.prepare(run)
    assert run.forward is run.net_train and run.params
    assert loop.run_steps(run, 0) == 4
    final = loop.export(run, 4)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda log: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in log]
    assert strip(read_log(tmp_path / "a")) == strip(read_log(tmp_path / "b"))
    cfg = loop.model_config(run, 4)
    assert cfg["prediction"] == "epsilon" and cfg["training_steps"] == 4 and cfg["dataset"] == "in-memory"
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_resume_phase_continues_from_the_checkpoint(tmp_path):
    full = train(_cfg(tmp_path / "full", objective="velocity", process="RectifiedFlow"), data=DATA)
    run = loop.setup(_cfg(tmp_path / "r", objective="velocity", process="RectifiedFlow",
                          resume=str(tmp_path / "full" / "checkpoints" / "step_0000002")), DATA)
    assert loop.resume(run) == 2
    loop.prepare(run)
    final = loop.export(run, loop.run_steps(run, 2))
    a, b = load_file(str(full / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
