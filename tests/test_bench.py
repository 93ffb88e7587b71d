"""The benchmark harness itself (diffsolve.bench): NFE counting on a wrapped model, endpoint detection on
runs whose endpoint is known, the written markdown/CSV/JSON/PNG, and ``--quick``.  Timings are printed by
the benchmark, never asserted here."""
import csv
import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

import diffsolve as ds
from diffsolve.bench import harness as H
from diffsolve.bench import peers as P

LIBS = P.available_libraries()
needs_diffusers = pytest.mark.skipif(LIBS["diffusers"] is not None, reason=str(LIBS["diffusers"]))
needs_kdiff = pytest.mark.skipif(LIBS["k-diffusion"] is not None, reason=str(LIBS["k-diffusion"]))
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def pb():
    """A small exact problem: 16-dim mixture, 8 samples, exact targets."""
    return H.exact_problem(16, 8, seed=3)


def diffusers_cfg(kind, family, variant="", algorithm="", **options):
    return P.PeerConfig("diffusers", family, variant, kind, options, algorithm)


# ----------------------------------------------------------------------------------------
# NFE counting
# ----------------------------------------------------------------------------------------
def test_counting_net_counts_times_and_remembers_the_last_call():
    net = H.CountingNet(lambda x, t: 2 * x)
    for i in range(3):
        net(torch.full((2, 3), float(i)), torch.full((2,), 10.0 * i))
    assert net.calls == 3 and net.times == [0.0, 10.0, 20.0]
    assert net.time > 0 and net.cpu >= 0
    x, t, out = net.last
    assert torch.equal(out, 2 * x) and float(x[0, 0]) == 2.0
    net.reset()
    assert net.calls == 0 and net.last is None


@pytest.mark.parametrize("solver,final,budget,used", [("ddim", "denoise", 7, 7), ("heun", "denoise", 10, 9),
                                                      ("heun", "t_min", 10, 10), ("pndm", "t_min", 6, 6)])
def test_ours_nfe_is_what_the_network_saw(pb, solver, final, budget, used):
    row = H.run_ours(pb, solver, budget, "logsnr", final)
    assert row["error"] == "", row["error"]  # run_ours flags a count that disagrees with sample()'s
    assert row["nfe_used"] == used
    assert row["net_time"] > 0 and row["wall"] >= row["net_time"]


@needs_diffusers
@pytest.mark.parametrize("cfg,budget,used", [
    (diffusers_cfg("DDIMScheduler", "DDIM", clip_sample=False), 7, 7),
    (diffusers_cfg("HeunDiscreteScheduler", "Heun"), 10, 9),  # 2n - 1 calls for n steps
    (diffusers_cfg("PNDMScheduler", "PNDM", skip_prk_steps=True), 8, 8),  # PLMS: n + 1 calls
    (diffusers_cfg("KDPM2DiscreteScheduler", "KDPM2"), 6, 5),
])
def test_peer_nfe_is_counted_not_trusted(pb, cfg, budget, used):
    row = H.run_peer_config(pb, cfg, budget, torch.float32)
    assert row["error"] == "", row["error"]
    assert row["nfe_used"] == used


@needs_diffusers
def test_peer_that_cannot_fit_the_budget_is_recorded_not_run(pb):
    row = H.run_peer_config(pb, diffusers_cfg("PNDMScheduler", "PNDM"), 8)  # PRK warm-up needs 13 NFE
    assert row["error"].startswith("no step count fits") and row["nfe_used"] == ""


@needs_kdiff
def test_kdiffusion_heun_nfe(pb):
    cfg = P.PeerConfig("k-diffusion", "heun", "karras/zero", "sample_heun", {"grid": "karras"})
    row = H.run_peer_config(pb, cfg, 6)
    assert row["error"] == "" and row["nfe_used"] == 5


# ----------------------------------------------------------------------------------------
# endpoint detection
# ----------------------------------------------------------------------------------------
def test_detect_endpoint_on_constructed_runs():
    """Reported last sigma > 0: stopped there.  = 0: a jump if the output is the x0 prediction of the last
    call, else integrated to sigma = 0."""
    proc = ds.VPDiscrete.linear(1000)
    net = H.CountingNet(lambda x, t: torch.full_like(x, 0.5))
    x = torch.randn(4, 6, dtype=torch.float64)
    t = torch.full((4,), 10.0, dtype=torch.float64)
    net(x, t)
    x0 = H.x0_of_call(proc, x, t, torch.full_like(x, 0.5))
    ep, out = H.detect_endpoint(proc, x0.float(), "vp", 0.0, net)  # float32 round-off is still a jump
    assert ep.kind == "jump" and ep.label == "jump"
    s0 = float(proc.sigma_ve(torch.tensor(0.0, dtype=torch.float64)))
    ep, out = H.detect_endpoint(proc, x, "vp", s0 * (1 + 1e-7), net)  # float32 sigma_min snaps to t = 0
    assert ep.kind == "stop" and ep.t == 0.0 and ep.label == "t=0"
    a0 = float(proc.alpha(torch.tensor(0.0, dtype=torch.float64)))
    ep, out = H.detect_endpoint(proc, x, "ve", s0, net)  # a VE-view state comes back as the VP state
    assert torch.allclose(out, x * a0)
    ep, _ = H.detect_endpoint(proc, x, "ve", 0.0, net)
    assert ep.kind == "sigma0"
    ep, _ = H.detect_endpoint(proc, x0, "vp", s0, net)  # lands on the last x0 prediction, but reports t = 0
    assert ep.kind == "stop" and ep.jump_distance < H.JUMP_TOL
    s5 = float(proc.sigma_ve(torch.tensor(5.0, dtype=torch.float64)))
    ep, _ = H.detect_endpoint(proc, x, "vp", s5, net)
    assert ep.kind == "stop" and ep.t == 5.0


def test_ours_denoise_vs_t_min_and_the_matching_target(pb):
    """Our final='denoise' is detected as the jump, final='t_min' as a stop at t = 0; at high NFE each is
    close to its own exact target and far (relative to that) from the other one."""
    jump = H.run_ours(pb, "dpm++3m", 200, "logsnr", "denoise")
    stop = H.run_ours(pb, "dpm++3m", 200, "logsnr", "t_min")
    assert jump["error"] == stop["error"] == ""
    assert jump["endpoint"] == "jump" and stop["endpoint"] == "t=0"
    tg = pb.reference.targets
    gap = float((tg.denoised - tg.at_t_min).pow(2).mean().sqrt())
    assert jump["rmse"] < 0.05 * gap and stop["rmse"] < 0.05 * gap, (jump["rmse"], stop["rmse"], gap)


@needs_diffusers
@pytest.mark.parametrize("alpha_to_one,expected", [(True, "jump"), (False, "t=0")])
def test_diffusers_ddim_endpoint_is_detected(pb, alpha_to_one, expected):
    """DDIM with set_alpha_to_one=True ends with the jump to clean data, with False at timestep 0 (its last
    network call, at t = 0, then changes nothing)."""
    cfg = diffusers_cfg("DDIMScheduler", "DDIM", clip_sample=False, set_alpha_to_one=alpha_to_one,
                        timestep_spacing="trailing")
    row = H.run_peer_config(pb, cfg, 10, torch.float64)
    assert row["error"] == "" and row["endpoint"] == expected
    assert (row["jump_distance"] < H.JUMP_TOL) == alpha_to_one


@needs_kdiff
def test_kdiffusion_lms_integrates_to_sigma_zero_and_dpm_fast_stops_at_t0(pb):
    lms = P.PeerConfig("k-diffusion", "lms", "karras/zero", "sample_lms", {"grid": "karras"})
    fast = P.PeerConfig("k-diffusion", "dpm_fast", "logsnr/sigma_min", "sample_dpm_fast", {})
    assert H.run_peer_config(pb, lms, 10)["endpoint"] == "sigma=0"
    assert H.run_peer_config(pb, fast, 10)["endpoint"] == "t=0"


@needs_diffusers
@needs_kdiff
def test_parity_pairs_agree(pb):
    pairs = {(p.cfg.library, p.cfg.family): p for p in H.parity_pairs(quick=True)}
    r = H.run_parity(pb, pairs["diffusers", "DPMSolverMultistep dpmsolver++ 2M"], 8)
    assert r["error"] == "" and r["rel_diff"] < 1e-4 and r["nfe_peer"] == r["nfe_ours"] == 8
    r = H.run_parity(pb, pairs["k-diffusion", "dpmpp_2m"], 8)
    assert r["error"] == "" and r["rel_diff"] < 1e-10


def test_missing_peer_library_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(P, "available_libraries",
                        lambda: {"diffusers": "diffusers is not installed", "k-diffusion": "not installed"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ds.bench(dims=(8,), nfes=(5,), batch=4, solvers=("ddim",), spacings=("logsnr",), parity=False,
                       overhead=False, progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("skipping diffusers" in m for m in msgs) and any("skipping k-diffusion" in m for m in msgs)
    assert {r["library"] for r in res.rows} == {"diffsolve"}
    assert "diffusers" in res.meta["skipped"]


# ----------------------------------------------------------------------------------------
# outputs and --quick
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # a subprocess: the benchmark sets torch's thread count
    res = subprocess.run([sys.executable, "-m", "diffsolve.bench", "--quick", "--no-progress", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    return out


def test_quick_runs_and_writes_markdown_csv_json_png(quick_out):
    md, csv_path, js, png = (quick_out / f"benchmarks.{e}" for e in ("md", "csv", "json", "png"))
    for f in (md, csv_path, js, png):
        assert f.exists() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| solver |" in text and "**ours**" in text and "**" in text.split("| solver |")[1]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(H.ROW_FIELDS) <= set(rows[0])
    ran = [r for r in rows if not r["error"]]
    assert {r["library"] for r in ran} >= {"diffsolve"}
    for r in ran:
        assert 1 <= int(r["nfe_used"]) <= int(r["nfe_budget"]), r
        assert math.isfinite(float(r["rmse"])) and r["endpoint"], r
        json.loads(r["config"])  # the exact configuration of the run
    data = json.loads(js.read_text())
    assert len(data["rows"]) == len(rows) and data["meta"]["quick"]
    assert {"rows", "parity", "overhead", "targets", "problems"} <= set(data)


@pytest.mark.skipif(any(LIBS.values()), reason="a peer library is missing")
def test_quick_compares_ours_with_both_peers_and_checks_parity(quick_out):
    data = json.loads((quick_out / "benchmarks.json").read_text())
    libs = {r["library"] for r in data["rows"] if not r["error"]}
    assert libs == {"diffsolve", "diffusers", "k-diffusion"}
    assert data["targets"] and all(t["ratio"] is not None for t in data["targets"])
    assert data["parity_summary"] and all(p["match"] for p in data["parity_summary"])
    assert data["overhead"] and all(not o["error"] for o in data["overhead"])


# ----------------------------------------------------------------------------------------
# any model: the reference is a high-NFE solution of the same model
# ----------------------------------------------------------------------------------------
def small_model():
    """A factory for --model: an x0-prediction model (the exact 8-dim mixture) with its data shape."""
    proc = ds.VPDiscrete.linear(1000)
    den = ds.GaussianMixture.random(dim=8, seed=1).denoiser(proc, "x0")
    den.sample_shape = (8,)
    return den


def test_model_factory_is_scored_against_its_own_high_nfe_solution():
    res = ds.bench(model="test_bench:small_model", nfes=(5, 10), batch=4, solvers=("ddim", "dpm++2m"),
                   spacings=("logsnr",), libraries=("diffusers",), quick=False, parity=False, overhead=False,
                   progress=False, ref_nfe=100)
    (pr,) = res.problems
    assert not pr["exact"] and pr["shape"] == [8]
    ours = [r for r in res.rows if r["library"] == "diffsolve" and not r["error"]]
    assert ours and all(math.isfinite(r["rmse"]) and not math.isfinite(float(r["llgap"] or "nan")) for r in ours)
    best = {n: min(r["rmse"] for r in ours if r["family"] == "dpm++2m" and r["nfe_budget"] == n) for n in (5, 10)}
    assert best[10] < best[5]
    if LIBS["diffusers"] is None:  # peers get epsilon through the adapter of the x0 model
        assert any(r["library"] == "diffusers" and not r["error"] for r in res.rows)
