"""benchmarks/inverse_protocol.py: the MCGdiff Gaussian-mixture problems have the documented shapes, its closed-form
prior and posterior models equal the library's exact ones, and its oracle equals ``method="oracle"`` and sits
within 2x the Monte-Carlo floor on a d = 8 problem."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import diffsolve as ds

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "inverse_protocol.py"
DT = torch.float64


@pytest.fixture(scope="module")
def ip():
    if not SCRIPT.exists():
        pytest.skip("benchmarks/inverse_protocol.py not present")
    spec = importlib.util.spec_from_file_location("inverse_protocol", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("d,d_y", [(8, 1), (8, 4), (80, 2)])
def test_problem_shapes_and_closed_forms(ip, d, d_y):
    pb = ip.make_problem(d, d_y, ip.problem_seed(d, d_y, 0))
    assert pb.A.shape == (d_y, d) and pb.y.shape == (d_y,) and pb.x_star.shape == (1, d)
    assert pb.prior.means.shape == (25, d) and torch.allclose(pb.prior.covs[0], torch.eye(d, dtype=DT))
    grid = {(-8.0 * i, -8.0 * j) for i in range(-2, 3) for j in range(-2, 3)}
    assert {tuple(m[:2].tolist()) for m in pb.prior.means} == grid
    assert torch.equal(pb.prior.means[:, 2:4], pb.prior.means[:, :2])  # the pair repeated d/2 times
    assert abs(float(pb.weights.sum()) - 1) < 1e-12 and float(pb.weights.min()) >= 0
    s = pb.singular_values
    assert torch.all(s[:-1] >= s[1:]) and float(s.min()) > 0 and float(s.max()) < 1
    assert torch.allclose(torch.linalg.svdvals(pb.A), s, atol=1e-12)
    assert 0 < pb.sigma_y < float(s.max())
    assert pb.exact.sample(5).shape == (5, d)
    x = 10 * torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=DT)
    for sv in (0.0, 0.3, 3.0, torch.linspace(0.1, 20, 16, dtype=DT)):
        assert torch.allclose(pb.prior_cf.denoise_ve(x, sv), pb.prior.denoise_ve(x, sv), atol=1e-10)
        assert torch.allclose(pb.posterior_cf.denoise_ve(x, sv), pb.exact.mixture.denoise_ve(x, sv), atol=1e-10)
        assert torch.allclose(pb.posterior_cf.log_prob_ve(x, sv), pb.exact.mixture.log_prob_ve(x, sv), atol=1e-8)
    with pytest.raises(ValueError):
        ip.make_problem(7, 1, 0)


def test_oracle_is_the_library_oracle_and_reaches_the_floor(ip):
    pb = ip.make_problem(8, 4, ip.problem_seed(8, 4, 1))
    n, seeds = 1000, list(range(1000))
    x, info = ds.inverse.sample(pb.prior_cf.denoiser(ip.PROCESS), pb.op, pb.y, pb.sigma_y, method="oracle", nfe=100,
                                n=n, seeds=seeds, prior=pb.prior)
    r = ip.run_method(pb, "oracle", n, 100, ip.DEFAULT_SOLVER, seeds)
    assert r["error"] == "" and r["nfe"] == info.nfe
    assert float((r["x"] - x).abs().max()) < 1e-8
    a = pb.exact.sample(n, torch.Generator().manual_seed(1))
    floor = ip.sw(pb.exact.sample(n, torch.Generator().manual_seed(2)), a)
    assert ip.sw(x, a) < 2 * floor < ip.sw(pb.prior.sample(n, torch.Generator().manual_seed(3)), a)
