"""Image-restoration metrics (``evaluation.image_quality``) against closed forms, and ``diffsolve restore``."""
import json
import math

import numpy as np
import pytest
import torch

from diffsolve import inverse
from diffsolve.cli import main
from diffsolve.evaluation import image_quality as iq
from diffsolve.evaluation.restore import as_image as _as_image
from diffsolve.evaluation.restore import build_operator as _build_operator
from diffsolve.evaluation.restore import measurement_from_input as _measurement_from_input

SHAPE = (1, 28, 28)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=gen(seed), dtype=torch.float64) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------------------------------------------
def test_psnr_of_a_known_mse():
    ref = rand(3, 1, 8, 8)
    d = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64).reshape(3, 1, 1, 1)
    x = ref + d  # MSE = d^2 exactly
    np.testing.assert_allclose(iq.psnr(x, ref).numpy(), 10 * np.log10(4 / d.flatten().numpy() ** 2), rtol=1e-12)
    np.testing.assert_allclose(iq.psnr(x, ref, data_range=1.0).numpy(), 10 * np.log10(1 / d.flatten().numpy() ** 2),
                               rtol=1e-12)
    assert math.isinf(float(iq.psnr(ref[:1], ref[:1])[0]))
    with pytest.raises(ValueError):
        iq.psnr(x, ref, data_range=0)


def test_reference_broadcasts_over_a_batch():
    ref = rand(1, 1, 8, 8)
    x = rand(4, 1, 8, 8, seed=1)
    assert iq.psnr(x, ref).shape == (4,) and iq.ssim(x, ref).shape == (4,)
    np.testing.assert_allclose(iq.mse(x, ref[0]).numpy(), ((x - ref) ** 2).mean((1, 2, 3)).numpy())


# ---------------------------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------------------------
def direct_ssim(x, y, R=2.0, win=7, sigma=1.5):
    """SSIM by explicit loops over every window position (numpy), per channel, averaged."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if sigma is None:
        w = np.full((win, win), 1.0 / win**2)
    else:
        ax = np.arange(win) - (win - 1) / 2
        w = np.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * sigma**2))
        w /= w.sum()
    c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
    per_channel = []
    for xc, yc in zip(x, y):
        vals = []
        for i in range(xc.shape[0] - win + 1):
            for j in range(xc.shape[1] - win + 1):
                a, b = xc[i:i + win, j:j + win], yc[i:i + win, j:j + win]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cab = (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


def test_ssim_of_an_image_with_itself_is_one():
    x = rand(2, 3, 16, 16)
    np.testing.assert_allclose(iq.ssim(x, x).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(iq.ssim(x, x, sigma=None).numpy(), 1.0, atol=1e-12)


@pytest.mark.parametrize("sigma", [1.5, None])
def test_ssim_matches_a_direct_window_computation(sigma):
    x = rand(2, 2, 10, 12, seed=3)
    y = (x + 0.3 * rand(2, 2, 10, 12, seed=4)).clamp(-1, 1)
    got = iq.ssim(x, y, sigma=sigma).numpy()
    want = [direct_ssim(x[i].numpy(), y[i].numpy(), sigma=sigma) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.3, -0.2
    x, y = torch.full((1, 1, 9, 9), a, dtype=torch.float64), torch.full((1, 1, 9, 9), b, dtype=torch.float64)
    c1 = (0.01 * 2) ** 2
    np.testing.assert_allclose(float(iq.ssim(x, y)[0]), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-10)


def test_ssim_decreases_with_noise():
    from diffsolve.util.datasets import load_dataset

    x = load_dataset("mnist-heldout", limit=4).double()
    n = torch.randn(x.shape, generator=gen(0), dtype=torch.float64)
    vals = [float(iq.ssim((x + s * n).clamp(-1, 1), x).mean()) for s in (0.0, 0.05, 0.2, 0.5, 1.0)]
    assert vals[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    with pytest.raises(ValueError):
        iq.ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))  # a 7x7 window does not fit


# ---------------------------------------------------------------------------------------------------------------
# LeNet-feature distance, spread, coverage, chi^2
# ---------------------------------------------------------------------------------------------------------------
def test_lenet_feature_distance():
    from diffsolve.evaluation.metrics import default_metric
    from diffsolve.util.datasets import load_dataset

    metric = default_metric()
    x = load_dataset("mnist-heldout", limit=20).double()
    d_self = iq.lenet_feature_distance(x, x, metric)
    assert d_self.shape == (20,) and float(d_self.abs().max()) == 0.0
    with torch.no_grad():
        f = metric.net.features(x.float())
    want = ((f[1:] - f[:1]) ** 2).mean(1).double()
    np.testing.assert_allclose(iq.lenet_feature_distance(x[1:], x[:1], metric).numpy(), want.numpy(), rtol=1e-6)
    near = iq.lenet_feature_distance((x + 0.05 * torch.randn(x.shape, generator=gen(1), dtype=torch.float64)), x, metric)
    far = iq.lenet_feature_distance(x.roll(1, 0), x, metric)
    assert float(near.mean()) < float(far.mean())


def test_posterior_std_is_the_unbiased_sample_std():
    s = rand(5, 1, 4, 4)
    np.testing.assert_allclose(iq.posterior_std(s).numpy(), s.numpy().std(0, ddof=1), rtol=1e-12)
    with pytest.raises(ValueError):
        iq.posterior_std(s[:1])


def test_coverage_of_a_calibrated_gaussian_posterior_is_the_level():
    # truth and K samples drawn from the same per-pixel Gaussian N(mu, s^2): the 5-95% interval covers ~90%
    P, K = 20000, 400
    mu, s = rand(P, seed=1), 0.1 + rand(P, seed=2).abs()
    truth = mu + s * torch.randn(P, generator=gen(3), dtype=torch.float64)
    samples = mu + s * torch.randn(K, P, generator=gen(4), dtype=torch.float64)
    c = iq.coverage(samples, truth)
    mc = math.sqrt(0.9 * 0.1 / P)
    assert abs(c - iq.expected_coverage(K)) < 5 * mc + 0.005  # finite-K bias of a Gaussian is < 0.005 here
    assert abs(c - 0.9) < 5 * mc + 0.005 + (0.9 - iq.expected_coverage(K))
    # over-confident samples (a third of the spread) under-cover, under-confident ones over-cover
    assert iq.coverage(mu + (samples - mu) / 3, truth) < 0.5
    assert iq.coverage(mu + (samples - mu) * 3, truth) > 0.99


def test_coverage_at_small_k_matches_the_order_statistic_formula():
    # i.i.d. uniform pixels: E[coverage] = level (K - 1) / (K + 1) exactly
    P = 50000
    for K in (4, 8):
        truth = torch.rand(P, generator=gen(K), dtype=torch.float64)
        samples = torch.rand(K, P, generator=gen(100 + K), dtype=torch.float64)
        c = iq.coverage(samples, truth)
        assert abs(c - iq.expected_coverage(K)) < 5 * math.sqrt(0.25 / P), (K, c)
    assert iq.expected_coverage(8) == pytest.approx(0.7)
    # the truth at the per-pixel median is always inside
    samples = rand(9, 1, 6, 6)
    assert iq.coverage(samples, samples.median(0).values) == 1.0


@pytest.mark.parametrize("make", [lambda: inverse.Mask.box(SHAPE, 14), lambda: inverse.Mask.random(SHAPE, 0.7),
                                  lambda: inverse.Dense.gaussian(200, SHAPE), lambda: inverse.AvgPool(SHAPE, 2)])
def test_chi2_of_the_truth_is_one(make):
    op = make()
    x = rand(16, *SHAPE, seed=5)
    sigma = 0.05
    y = op(x) + sigma * torch.randn((16,) + op.out_shape, generator=gen(6), dtype=torch.float64)
    chi2 = iq.chi2_per_dof(op, x, y, sigma)
    assert chi2.shape == (16,)
    # mean of 16 chi^2_m / m values: 1 ± sqrt(2 / (16 m))
    assert abs(float(chi2.mean()) - 1) < 5 * math.sqrt(2 / (16 * op.out_dim))
    assert float(iq.chi2_per_dof(op, x[0], op(x[:1])[0], sigma)[0]) == pytest.approx(0.0, abs=1e-20)
    with pytest.raises(ValueError):
        iq.chi2_per_dof(op, x, y, 0.0)


def test_restoration_metrics_summary():
    op = inverse.Mask.box(SHAPE, 10)
    truth = rand(1, *SHAPE, seed=7)
    samples = truth + 0.1 * torch.randn((4,) + SHAPE, generator=gen(8), dtype=torch.float64)
    y = op(truth)
    m = iq.restoration_metrics(samples, truth, op, y, 0.1, lenet=True)
    assert m["samples"] == 4 and m["coverage_90_if_calibrated"] == pytest.approx(0.54)
    assert m["psnr_mean"] > m["psnr_samples"]  # averaging removes noise
    assert 0 < m["ssim_samples"] < m["ssim_mean"] < 1
    assert 0.5 < m["chi2_samples"] < 1.5 and m["lenet_feature_distance_mean"] >= 0
    assert set(iq.restoration_metrics(samples)) == {"samples", "mean_std"}


# ---------------------------------------------------------------------------------------------------------------
# diffsolve restore: helpers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, cls, out_shape", [
    ("box:14", inverse.Mask, (28 * 28 - 14 * 14,)), ("random:0.7", inverse.Mask, None),
    ("random:0.5:3", inverse.Mask, None), ("sr:2", inverse.AvgPool, (1, 14, 14)), ("blur:1.0", inverse.GaussianBlur, SHAPE),
    ("blur:1.5:5", inverse.GaussianBlur, SHAPE), ("cs:0.25", inverse.Dense, (196,)), ("denoise", inverse.Identity, SHAPE),
])
def test_operator_specs(spec, cls, out_shape):
    op = _build_operator(spec, SHAPE)
    assert isinstance(op, cls) and op.in_shape == SHAPE
    if out_shape is not None:
        assert op.out_shape == out_shape
    if spec.startswith("random:0.7"):
        assert abs(op.out_dim / 784 - 0.3) < 0.05


def test_image_values_and_shapes():
    a = np.linspace(0, 1, 784).reshape(28, 28)
    want = torch.from_numpy(a * 2 - 1)
    for arr in (a, a[None], a[None, None], a[..., None], (a * 2 - 1)):
        np.testing.assert_allclose(_as_image(arr, SHAPE, "x")[0, 0].numpy(), want.numpy(), atol=1e-12)
    u8 = np.arange(784).reshape(28, 28).astype(np.uint8)
    np.testing.assert_allclose(_as_image(u8, SHAPE, "x")[0, 0].numpy(), u8 / 127.5 - 1)
    op = inverse.Mask.box(SHAPE, 14)
    masked = (a * 2 - 1) * op.mask[0].numpy()
    np.testing.assert_allclose(_measurement_from_input(op, masked, "y").numpy(), op(_as_image(masked, SHAPE, "y")).numpy())
    cs = inverse.Dense.gaussian(50, SHAPE)
    v = np.linspace(-3, 3, 50)
    np.testing.assert_allclose(_measurement_from_input(cs, v, "y")[0].numpy(), v)


# ---------------------------------------------------------------------------------------------------------------
# diffsolve restore: end to end (tiny budget) and bad input
# ---------------------------------------------------------------------------------------------------------------
def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("restore") / "r"
    code = main(["restore", "--heldout", "0", "--operator", "box:14", "--sigma-y", "0.05", "--method", "repaint",
                 "--nfe", "20", "--samples", "2", "--seed", "0", "--out", str(out), "--quiet"])
    return code, out


def test_restore_heldout_end_to_end(heldout_run):
    from diffsolve.util.datasets import load_dataset

    code, out = heldout_run
    assert code == 0
    x, mean, std = np.load(out / "samples.npy"), np.load(out / "mean.npy"), np.load(out / "std.npy")
    assert x.shape == (2, 1, 28, 28) and mean.shape == std.shape == (1, 28, 28) and np.isfinite(x).all()
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(std, x.std(0, ddof=1))
    info = json.loads((out / "info.json").read_text())
    assert info["method"] == "repaint" and info["input"] == "mnist-heldout[0]" and info["input_is"] == "truth"
    assert info["nfe_equivalents"] <= 20 and info["vjps"] == 0 and info["seconds"] > 0 and info["sigma_y"] == 0.05
    assert info["operator"]["spec"] == "box:14" and info["operator"]["measurements"] == 588
    for k in ("psnr_mean", "ssim_mean", "coverage_90", "chi2_mean", "lenet_feature_distance_mean"):
        assert math.isfinite(info["metrics"][k]), k
    for k in ("png", "samples_png"):
        assert (out / info["files"][k].split("/")[-1]).stat().st_size > 0
    # y = A x + 0.05 n for the held-out truth
    truth = load_dataset("mnist-heldout", limit=1).double()
    y = np.load(out / "y.npy")
    r = y - inverse.Mask.box(SHAPE, 14)(truth)[0].numpy()
    assert 0.04 < r.std() < 0.06


def test_restore_png_input_is_measured_like_the_heldout_image(heldout_run, tmp_path, capsys):
    from PIL import Image

    from diffsolve.util.datasets import load_dataset

    truth = load_dataset("mnist-heldout", limit=1)[0, 0].numpy()
    png = tmp_path / "digit.png"
    Image.fromarray(np.round((truth + 1) * 127.5).astype(np.uint8)).save(png)
    out = tmp_path / "p"
    code, stdout, err = run(["restore", "--input", png, "--operator", "box:14", "--nfe", 20, "--samples", 2,
                             "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "PSNR" in stdout
    # the same truth (up to float32 rounding of the stored split) and the same seeded noise
    np.testing.assert_allclose(np.load(out / "y.npy"), np.load(heldout_run[1] / "y.npy"), atol=1e-6)
    assert json.loads((out / "info.json").read_text())["input"] == str(png)


def test_python_one_liner_is_the_command(heldout_run, tmp_path):
    """``ds.restore`` (a model name, an image array, an operator spec) gives the command's measurement and samples."""
    import diffsolve as ds
    from diffsolve.util.datasets import load_dataset

    truth = load_dataset("mnist-heldout", limit=1)[0].double().numpy()
    r = ds.restore("mnist-flow", truth, "box:14", sigma_y=0.05, method="repaint", nfe=20, samples=2, seed=0,
                   out=tmp_path / "py")
    np.testing.assert_allclose(r.y[0].numpy(), np.load(heldout_run[1] / "y.npy"), atol=1e-12)
    np.testing.assert_allclose(r.samples.numpy(), np.load(heldout_run[1] / "samples.npy"), atol=1e-12)
    assert r.samples.shape == (2, 1, 28, 28) and r.info.nfe_equivalents <= 20
    assert (tmp_path / "py" / "restore.png").stat().st_size > 0 and r.metrics["psnr_mean"] > 0
    with pytest.raises(ValueError, match="samples"):
        ds.restore("mnist-flow", truth, "box:14", samples=1)
    with pytest.raises(ValueError, match="unknown inverse method"):
        ds.restore("mnist-flow", truth, "box:14", method="joint")


def bad_npy(tmp_path, arr):
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    return p


@pytest.mark.parametrize("argv, needle", [
    (["--heldout", 0, "--operator", "wavelet:3"], "unknown operator"),
    (["--heldout", 0, "--operator", "box"], "box:S"),
    (["--heldout", 0, "--operator", "box:x"], "numbers"),
    (["--heldout", 0, "--operator", "box:40"], "box size"),
    (["--heldout", 0, "--operator", "random:1.5"], "missing fraction"),
    (["--heldout", 0, "--operator", "sr:3"], "divide"),
    (["--heldout", 0, "--sigma-y", -0.1], "--sigma-y"),
    (["--heldout", 0, "--samples", 1], "--samples"),
    (["--heldout", 0, "--method", "nope"], "unknown inverse method"),
    (["--heldout", 0, "--method", "oracle"], "unknown inverse method"),
    (["--heldout", 500], "--heldout"),
    (["--heldout", 0, "--measured"], "--measured"),
    ([], "exactly one"),
    (["--input", "/no/such/file.png"], "no such file"),
    (["--input", "WRONG_SIZE"], "nothing is resized"),
    (["--input", "OUT_OF_RANGE"], "expected uint8"),
    (["--input", "COLOUR"], "grayscale"),
])
def test_restore_bad_input_exits_2(argv, needle, tmp_path, capsys):
    from PIL import Image

    subst = {"WRONG_SIZE": lambda: bad_npy(tmp_path, np.zeros((32, 32), np.float32)),
             "OUT_OF_RANGE": lambda: bad_npy(tmp_path, np.full((28, 28), 3.0)),
             "COLOUR": lambda: _colour_png(tmp_path, Image)}
    argv = [subst[a]() if a in subst else a for a in argv]
    code, _, err = run(["restore", "--nfe", 20, "--samples", 2, *argv, "--out", tmp_path / "x", "--quiet"], capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "x" / "samples.npy").exists()


def _colour_png(tmp_path, Image):
    p = tmp_path / "colour.png"
    a = np.zeros((28, 28, 3), np.uint8)
    a[..., 0] = 255
    Image.fromarray(a).save(p)
    return p
