"""Quantisation (formats, time bins, packed checkpoints, learned rounding, real-kernel backends), LoRA and feature
reuse, on a tiny random UNet (fast) with exact checks where the answer is known."""
import json

import pytest
import torch

import diffsolve as ds
from diffsolve.compression import (
    Calibration,
    add_lora,
    feature_reuse,
    flops,
    get_format,
    load_adapter,
    load_packed,
    merge_lora,
    quantize,
    record_inputs,
    save_adapter,
    save_packed,
)
from diffsolve.compression.packed import PACKED, pack_codes, unpack_codes
from diffsolve.compression.quantize import TimeBins
from diffsolve.models import UNet, UNetConfig
from diffsolve.solvers import SOLVERS

SHAPE = (1, 8, 8)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    net = UNet(UNetConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention=True, groups=4,
                          attention_heads=2))
    with torch.no_grad():  # a random network whose layers all matter (the zero-initialised ones included)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.eval().requires_grad_(False)
    proc = ds.VPDiscrete.linear(1000)
    cfg = {"architecture": {"type": "UNet", **net.config.to_dict()}, "process": proc.config(),
           "prediction": "epsilon", "model_time": "process", "sample_shape": list(SHAPE)}
    return ds.Denoiser(net, proc, prediction="epsilon", sample_shape=SHAPE, config=cfg)


@pytest.fixture(scope="module")
def den():
    return tiny_model()


@pytest.fixture(scope="module")
def calib(den):
    return record_inputs(den, Calibration(samples=4, nfe=6, bins=8))


def noise(n=4, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------
def test_format_tables_are_exact():
    assert get_format("fp4").grid.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    e4m3 = get_format("fp8_e4m3").grid
    assert e4m3.numel() == 253 and float(e4m3.max()) == 448 and float(e4m3[e4m3 > 0].min()) == 2.0 ** -9
    assert float(get_format("e5m2").grid.max()) == 57344
    assert get_format("int4").grid.tolist() == list(range(-8, 8))
    v = torch.tensor([0.26, -0.74, 1.24, 2.6, 5.1, 7.0, -9.0])
    assert get_format("fp4").quantize(v, torch.tensor(1.0)).tolist() == [0.5, -0.5, 1.0, 3.0, 6.0, 6.0, -6.0]
    assert get_format("int4").quantize(v * 3, torch.tensor(1.0)).tolist() == [1, -2, 4, 7, 7, 7, -8]


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_codes_decode_to_the_quantised_values(name):
    f = get_format(name)
    w = torch.randn(16, 9)
    s = w.abs().amax(1, keepdim=True) / f.qmax
    assert torch.equal(f.decode(f.encode(w, s), s), f.quantize(w, s))
    if f.torch_dtype is not None:  # the simulation is the cast
        assert torch.equal(f.quantize(w, s), (w / s).to(f.torch_dtype).float() * s)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (7, 3, 3)).to(torch.int16)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (codes.numel() + 1) // 2 if bits == 4 else True
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)


# ----------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------
def test_quantised_model_is_a_model_and_8bit_is_close(den, calib):
    z = noise()
    ref = ds.sample(den, z, "dpm++2m", nfe=8)
    for kw in (dict(weights="int8"), dict(weights="int8", activations="int8"), dict(weights="fp8_e4m3")):
        q = quantize(den, calibration=calib, **kw)
        assert isinstance(q, ds.Denoiser) and q.net is not den.net
        x = ds.sample(q, z, "dpm++2m", nfe=8)
        err = float((x - ref).square().mean().sqrt() / ref.square().mean().sqrt())
        assert err < 0.05, (kw, err)
    w4 = quantize(den, weights="int4")
    e4 = float((ds.sample(w4, z, "dpm++2m", nfe=8) - ref).square().mean().sqrt())
    e8 = float((ds.sample(quantize(den, weights="int8"), z, "dpm++2m", nfe=8) - ref).square().mean().sqrt())
    assert e8 < e4  # more bits, less error


def test_per_channel_weights_hold_their_grid(den):
    q = quantize(den, weights="int4", granularity="channel")
    layer = q.net.quant_layers()["conv_in"]
    w = den.net.conv_in.weight
    s = w.abs().flatten(1).amax(1) / 7
    assert torch.allclose(layer.scale.flatten(), s)
    assert torch.equal(layer.weight, torch.clamp(torch.round(w / s[:, None, None, None]), -8, 7) * s[:, None, None, None])
    t = quantize(den, weights="int4", granularity="tensor").net.quant_layers()["conv_in"]
    assert t.scale.numel() == 1 and len(torch.unique(t.weight / t.scale)) <= 16


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_quantised_model_samples_with_every_solver(den, calib, solver):
    q = quantize(den, weights="int8", activations="int8", calibration=calib)
    opts = {"stats": ds.dpm_v3.Statistics.degenerate()} if "stats" in SOLVERS[solver].requires else {}
    x = ds.sample(q, noise(2), solver, nfe=6, seeds=[0, 1], **opts)
    assert x.shape == (2, *SHAPE) and torch.isfinite(x).all()


def test_activation_ranges_are_per_time_bin(den, calib):
    q = quantize(den, weights="int8", activations="int8", calibration=calib)
    qnet = q.net
    assert qnet.spec["float_input_layers"] == ["conv_in"]  # the network input stays float
    layer = qnet.quant_layers()["down.0.0.conv1"]
    bins = qnet.time_bins.index(calib.t)
    for b in torch.unique(bins).tolist():  # a calibrated bin holds exactly the range of its inputs
        xs = []
        h = den.net.down[0][0].conv1.register_forward_pre_hook(lambda m, i: xs.append(i[0]))
        with torch.no_grad():
            den.net(calib.x[bins == b], calib.t[bins == b])
        h.remove()
        assert float(layer.act_lo[b]) == pytest.approx(float(xs[0].min()), rel=1e-6)
        assert float(layer.act_hi[b]) == pytest.approx(float(xs[0].max()), rel=1e-6)
    assert torch.isfinite(layer.act_lo).all() and len(torch.unique(layer.act_hi)) > 1  # empty bins filled


def test_time_bins_are_uniform_in_log_snr(den):
    bins = TimeBins.for_model(den, 8)
    lam = den.process.lam(bins.edges.double())
    d = lam[1:] - lam[:-1]
    assert bins.n == 8 and torch.allclose(d, d.mean().expand_as(d), rtol=1e-3)


@pytest.mark.parametrize("kw", [dict(weights="int8", activations="int8"), dict(weights="int4"),
                                dict(weights="fp4_e2m1", activations="fp8_e4m3"), dict(weights="fp8_e5m2")])
def test_packed_round_trip_is_bit_exact(den, calib, tmp_path, kw):
    q = quantize(den, calibration=calib, **kw)
    folder = save_packed(q, tmp_path / "q")
    back = load_packed(folder)
    z = noise()
    assert torch.equal(ds.sample(q, z, "dpm++2m", nfe=6), ds.sample(back, z, "dpm++2m", nfe=6))
    nq = sum(m.codes.numel() for m in q.net.quant_layers().values())
    bits = get_format(kw["weights"]).bits
    size = (folder / PACKED).stat().st_size
    assert size < 4 * nq * 0.3 + 40_000 if bits == 4 else size < 4 * nq * 0.3 + 60_000


def test_corrupt_packed_files_give_clear_errors(den, tmp_path):
    folder = save_packed(quantize(den, weights="int4"), tmp_path / "q")
    data = bytearray((folder / PACKED).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / PACKED).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_packed(folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization"]["sha256"]
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / PACKED).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_packed(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_packed(folder)
    with pytest.raises(ValueError, match="missing"):
        load_packed(tmp_path / "nowhere")


@pytest.mark.parametrize("kw,match", [
    (dict(weights="int3"), "unknown number format"), (dict(weights="int8", activations="int4"), "activations"),
    (dict(weights="int8", granularity="group"), "granularity"), (dict(weights="int8", backend="tensorrt"), "backend"),
    (dict(weights="int8", rounding="stochastic"), "rounding"),
    (dict(weights="int4", backend="quanto"), "quanto"), (dict(weights="fp4", backend="torchao"), "torchao"),
])
def test_bad_settings_give_clear_errors(den, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize(den, calibration=Calibration(samples=1, nfe=2), **kw)


def test_learned_rounding_beats_round_to_nearest(den, calib):
    held = record_inputs(den, Calibration(samples=2, nfe=6, seed=7))  # trajectory inputs it was not fitted on

    def output_error(q):
        with torch.no_grad():
            a, b = den.net(held.x, held.t), q.net(held.x, held.t)
        return float((b - a).norm() / a.norm())

    for fmt in ("int4", "fp4_e2m1"):
        rtn = quantize(den, weights=fmt)
        learned = quantize(den, weights=fmt, calibration=calib, rounding="learned",
                           rounding_options=dict(samples=24, iters=40, batch=12, progress=False))
        w = learned.net.quant_layers()["down.0.0.conv1"]
        assert torch.equal(w.weight, get_format(fmt).decode(w.codes, w.scale))  # hard-rounded codes
        e_rtn, e_learned = output_error(rtn), output_error(learned)
        print(fmt, e_rtn, e_learned)
        assert e_learned < 0.95 * e_rtn


@pytest.mark.parametrize("backend,kw", [("quanto", dict(weights="int8", activations="int8")),
                                        ("quanto", dict(weights="fp8_e4m3")),
                                        ("torchao", dict(weights="int8", activations="int8"))])
def test_real_kernel_backends_sample_close_to_float(den, calib, backend, kw):
    pytest.importorskip({"quanto": "optimum.quanto", "torchao": "torchao"}[backend])
    q = quantize(den, calibration=calib, backend=backend, **kw)
    z = noise()
    ref = ds.sample(den, z, "dpm++2m", nfe=6)
    x = ds.sample(q, z, "dpm++2m", nfe=6)
    assert float((x - ref).square().mean().sqrt() / ref.square().mean().sqrt()) < 0.1


# ----------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------
def test_lora_merge_is_exact_and_adapter_file_is_small(den, tmp_path):
    pytest.importorskip("peft")
    import copy
    net = add_lora(copy.deepcopy(den.net), rank=2)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, t = torch.randn(3, *SHAPE), torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        assert float((net(x, t) - den.net(x, t)).abs().max()) <= 1e-6  # B = 0: unchanged until trained
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
        adapted = net(x, t)
    path = save_adapter(net, tmp_path / "adapter.safetensors")
    merged = merge_lora(copy.deepcopy(net))
    assert type(merged) is UNet and sum(p.numel() for p in merged.parameters()) == \
        sum(p.numel() for p in den.net.parameters())
    with torch.no_grad():
        assert float((merged(x, t) - adapted).abs().max()) <= 1e-6
        assert float((merged(x, t) - den.net(x, t)).abs().max()) > 1e-4
    again = load_adapter(copy.deepcopy(den.net), path)
    with torch.no_grad():
        assert torch.equal(again(x, t), adapted)
    ds.save_model(tmp_path / "model", den.net, den.config)
    assert path.stat().st_size <= 0.2 * (tmp_path / "model" / "model.safetensors").stat().st_size
    with pytest.raises(ValueError, match="no LoRA"):
        save_adapter(copy.deepcopy(den.net), tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------------------
# feature reuse
# ----------------------------------------------------------------------------------------
def test_feature_reuse_saves_flops_and_interval_one_is_exact(den):
    z = noise()
    assert torch.equal(ds.sample(feature_reuse(den, interval=1), z, "dpm++2m", nfe=6),
                       ds.sample(den, z, "dpm++2m", nfe=6))
    f_full, x_full = flops(lambda: ds.sample(den, z, "dpm++2m", nfe=10))
    r = feature_reuse(den, depth=1, interval=2)
    f_reuse, x_reuse = flops(lambda: ds.sample(r, z, "dpm++2m", nfe=10))
    assert r.net.calls == 10 and r.net.full_calls == 5
    assert f_reuse < 0.9 * f_full and torch.isfinite(x_reuse).all()
    # a second trajectory starts afresh with a full call
    ds.sample(r, z, "dpm++2m", nfe=10)
    assert r.net.full_calls == 10
    with pytest.raises(ValueError, match="depth"):
        feature_reuse(den, depth=2)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------
def test_quantize_command_writes_a_packed_file_and_a_report(den, tmp_path, capsys):
    from diffsolve.cli.main import main
    ckpt = ds.save_model(tmp_path / "model", den.net, den.config)
    rc = main(["quantize", "--model", str(ckpt), "--weights", "int4", "--out", str(tmp_path / "q"), "--report",
               "--images", "4", "--nfe", "3", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["samples"]) == {"3"} and rep["samples"]["3"]["rmse"] > 0 and rep["bytes"]["ratio"] < 0.5
    assert rep["per_t"] and all(r["rel_err"] > 0 for r in rep["per_t"])
    assert "sample RMSE" in capsys.readouterr().out
    assert isinstance(load_packed(tmp_path / "q"), ds.Denoiser)
    assert main(["quantize", "--model", str(ckpt), "--weights", "int3"]) == 2
    assert "error: unknown number format" in capsys.readouterr().err
