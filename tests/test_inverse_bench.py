"""``diffsolve bench --inverse``: its problems have the protocol's shapes and exact references, its oracle row is
the library's oracle at the Monte-Carlo floor, azula's samplers are driven with counted costs, and a tiny run writes
its report, resumes, and reports bad arguments as errors."""
import json
import os

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import inverse as ib
from diffsolve.inverse import ExactPosterior

DT = torch.float64


@pytest.mark.parametrize("d,d_y", [(8, 1), (8, 4), (80, 2)])
def test_grid_problems_have_the_protocol_shapes_and_closed_forms(d, d_y):
    pb = ib.grid_problem(d, d_y, 0)
    assert pb.op.M.shape == (d_y, d) and pb.y.shape == (d_y,) and pb.seed == ib.problem_seed(d, d_y, 0)
    assert pb.prior.means.shape == (25, d) and torch.allclose(pb.prior.covs[0], torch.eye(d, dtype=DT))
    grid = {(-8.0 * i, -8.0 * j) for i in range(-2, 3) for j in range(-2, 3)}
    assert {tuple(m[:2].tolist()) for m in pb.prior.means} == grid
    assert torch.equal(pb.prior.means[:, 2:4], pb.prior.means[:, :2])  # the pair repeated d/2 times
    s = pb.singular_values
    assert torch.all(s[:-1] >= s[1:]) and float(s.min()) > 0 and float(s.max()) < 1
    assert torch.allclose(torch.linalg.svdvals(pb.op.M), s, atol=1e-12)
    assert 0 < pb.sigma_y < float(s.max())
    # the closed-form models the methods and the oracle see are the dense mixtures' exact denoisers
    x = 10 * torch.randn(16, d, generator=torch.Generator().manual_seed(0), dtype=DT)
    t = torch.tensor(500.0, dtype=DT)
    assert torch.allclose(pb.model.evaluate(x, t, {}).x0, pb.prior.denoiser(ib.PROCESS).evaluate(x, t, {}).x0,
                          atol=1e-10)
    assert torch.allclose(pb.oracle.evaluate(x, t, {}).x0, pb.exact.denoiser(ib.PROCESS).evaluate(x, t, {}).x0,
                          atol=1e-10)
    with pytest.raises(ValueError):
        ib.grid_problem(7, 1, 0)


def test_lowrank_problem_posterior_is_bayes_rule():
    """The Matheron sampler of the low-rank mixture's posterior: weights and component means as the dense
    ExactPosterior, and its sample moments within Monte-Carlo error of the dense mixture's."""
    pb = ib.lowrank_problem(64, 2, 0)
    dense = ExactPosterior(pb.prior, pb.op, pb.y, pb.sigma_y)
    assert torch.allclose(pb.exact.log_weights, dense.mixture.log_weights, atol=1e-9)
    assert torch.allclose(pb.exact.means, dense.mixture.means, atol=1e-9)
    x = pb.exact_sample(20000, torch.Generator().manual_seed(0))
    sd = torch.diagonal(dense.covariance()).sqrt()
    assert float(((x.mean(0) - dense.mean()).abs() / sd).max()) < 5 / 20000**0.5
    assert float((torch.cov(x.T) - dense.covariance()).norm() / dense.covariance().norm()) < 0.05


def test_oracle_row_is_the_library_oracle_and_reaches_the_floor():
    pb = ib.grid_problem(8, 4, 1)
    n = 1000
    x, cost = ib.run_method(pb, "oracle", n, 100, {})
    seeds = [pb.seed * 10_000 + i for i in range(n)]
    lib, info = ds.inverse.sample(pb.model, pb.op, pb.y, pb.sigma_y, method="oracle", nfe=100, n=n, seeds=seeds,
                                  prior=pb.prior)
    assert cost["error"] == "" and cost["nfe"] == info.nfe and float((x - lib).abs().max()) < 1e-8
    ref = ib._reference(pb, n)
    base = ib._baselines(pb, n, ref)
    floor, ignore = ib.sw(base["floor"], ref), ib.sw(base["ignore-y"], ref)
    assert ib.sw(x, ref) < 2 * floor < ignore


def test_azula_peers_run_through_azula_with_counted_costs():
    pytest.importorskip("azula")
    pb = ib.grid_problem(8, 2, 0)
    for name, (calls, vjps) in {"azula:tds": (33, 33), "azula:mmps": (20, 40), "azula:diffpir": (100, 0)}.items():
        x, cost = ib.run_method(pb, name, 64, 100, {})
        assert cost["error"] == "" and x.shape == (64, 8) and torch.isfinite(x).all()
        assert (cost["nfe"], cost["vjps"]) == (calls, vjps) and cost["nfe_eq"] <= 100


def test_a_tiny_run_writes_its_report_and_resumes(tmp_path):
    cfg = ib.InverseBenchConfig(out=str(tmp_path), suites=["grid"], dims=[8], dys=[2], problems=1, samples=64,
                                nfe=30, ours=["tsmc", "dps"], peers=["paper:mcgdiff", "paper:ddrm"], zetas=[0.3, 1.0],
                                tune_problems=1, progress=False)
    res = ib.inverse_bench(cfg)
    md = open(res["files"]["md"]).read()
    assert "tsmc" in md and "paper:mcgdiff" in md and "Target" in md and os.path.getsize(res["files"]["png"]) > 0
    (c,) = res["summary"]
    assert set(c["median"]) >= {"floor", "ignore-y", "oracle", "tsmc", "dps", "paper:mcgdiff", "paper:ddrm"}
    assert c["best_ours"][1] in ("tsmc", "dps") and c["best_peer"][1].startswith("paper:")
    rows = [json.loads(line) for line in open(tmp_path / "inverse_runs.jsonl")]
    assert len({r["key"] for r in rows}) == len(rows) == 2 + 2 + 1 + 4  # dps at 2 step sizes, baselines, oracle, 4
    assert all(r["nfe_eq"] <= 30 for r in rows if r["method"] not in ib.BASELINES)
    again = ib.inverse_bench(cfg)  # resumes: nothing new to run
    assert len(open(tmp_path / "inverse_runs.jsonl").readlines()) == len(rows)
    assert again["summary"][0]["median"] == c["median"]


def test_cli_errors(capsys):
    from diffsolve.cli.main import main

    assert main(["bench", "--inverse", "--suites", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert main(["bench", "--inverse", "--ours", "nope", "--dims", "8"]) == 2
    assert main(["bench", "--inverse", "--option", "tsmc-gamma"]) == 2
