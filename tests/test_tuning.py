"""ds.tune: a tiny tune writes a profile that ds.sample(profile=...) uses with exactly its NFE; calibration and
evaluation seeds are disjoint; the tuned error is never above the starting configuration's on calibration; a
profile is refused by another model, process, guidance scale or data shape, and when its files are corrupted."""
import json
import math
import time

import pytest
import torch

import diffsolve as ds
from diffsolve import tuning as T
from diffsolve.tuning import Profile, ProfileError, ProfileMismatch
from diffsolve.tuning import budget as B

DT = torch.float64
VP = ds.VPDiscrete.linear(1000)
MIX = ds.GaussianMixture.random(dim=8, seed=0)
NFES = [4, 6]
BUDGET = 12.0


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "prof.json"
    den = MIX.denoiser(VP, "epsilon")
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(B, "MIN_SCREEN", 80)  # the default, the peers' and the named grids, however loaded the machine is
        prof = T.tune(den, NFES, data=MIX, calib_seeds=range(100, 196), eval_seeds=48, stats_K=64, stats_n_lambda=11,
                      time_budget_s=BUDGET, out=out, progress=False)
    return prof, out, time.perf_counter() - t0


def noise(n=16, d=8, seed=7):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_profile_files_and_contents(tuned):
    prof, out, wall = tuned
    assert out.exists() and out.with_suffix(".safetensors").exists()
    body = json.loads(out.read_text())
    assert body["format"] == T.FORMAT and sorted(int(k) for k in body["entries"]) == NFES
    m = body["model"]
    assert m["shape"] == [8] and m["guidance_scale"] == 1.0 and m["process"] == VP.config()
    assert len(m["fingerprint"]) == 16 and m["prediction"] == "epsilon"
    assert body["meta"]["teacher"]["kind"] == "model" and body["meta"]["teacher"]["nfe"] == 100
    assert wall < BUDGET + 15  # the budget bounds the run (plus import / first-call overheads)
    for n, e in prof.entries.items():
        assert e.nfe == n and math.isfinite(e.calib_error) and math.isfinite(e.eval_error)


def test_sample_uses_the_profile_with_exact_nfe(tuned):
    prof, out, _ = tuned
    den = MIX.denoiser(VP, "epsilon")
    z = noise()
    for n in NFES:
        e = prof.entry(n)
        den.nfe = 0
        x, info = ds.sample(den, z, profile=str(out), nfe=n, return_info=True)
        # the profile's check probes the network once per model object (2 calls), then the run uses exactly n
        assert info.nfe == n and den.nfe in (n, n + 2)
        assert info.solver == e.solver and info.ends_clean == (e.final == "denoise")
        assert torch.allclose(info.grid.t[:len(e.t)], torch.tensor(e.t, dtype=DT))
        again = ds.sample(den, z, profile=prof, nfe=n)
        assert torch.equal(x, again)  # the loaded profile samples exactly like the in-memory one
        opts = dict(e.options)
        if e.uses_stats:
            opts["stats"] = prof.stats
        assert torch.equal(x, ds.sample(den, z, e.solver, grid=e.grid(VP), nfe=n, **opts))
    with pytest.raises(ValueError, match="no entry for nfe=5"):
        ds.sample(den, z, profile=prof, nfe=5)
    with pytest.raises(ValueError, match="not both"):
        ds.sample(den, z, profile=prof, nfe=4, grid=[999.0, 500.0, 0.0])


def test_calibration_and_evaluation_seeds_are_disjoint(tuned):
    prof, _, _ = tuned
    cal, ev = prof.meta["calibration"]["seeds"], prof.meta["evaluation"]["seeds"]
    expand = lambda s: set(range(s["start"], s["start"] + s["count"])) if isinstance(s, dict) else set(s)
    assert expand(cal) == set(range(100, 196)) and expand(ev) == set(range(48))
    assert not expand(cal) & expand(ev)
    den = MIX.denoiser(VP, "epsilon")
    with pytest.raises(ValueError, match="disjoint"):
        T.tune(den, [4], data=False, shape=(8,), calib_seeds=range(0, 40), eval_seeds=range(30, 50),
               time_budget_s=2, progress=False)
    # the noise of a seed does not depend on the batch it is drawn in
    assert torch.equal(T.seeded_noise([5, 6], (8,))[1], T.seeded_noise([6], (8,))[0])


def test_tuned_is_never_worse_than_the_start_on_calibration(tuned):
    prof, _, _ = tuned
    for e in prof.entries.values():
        assert e.calib_error <= e.baselines["default"]["calib_error"] + 1e-15
        assert e.calib_error <= e.baselines["best_named"]["calib_error"] + 1e-15
        # and the chosen grid is a valid one: decreasing, in range
        t = torch.tensor(e.t, dtype=DT)
        assert float(t[0]) == VP.t_max and torch.all(t[1:] < t[:-1]) and float(t.min()) >= VP.t_min


def test_profile_refused_by_another_model_process_guidance_or_shape(tuned):
    prof, out, _ = tuned
    z = noise()
    other = ds.GaussianMixture.random(dim=8, seed=1)
    with pytest.raises(ProfileMismatch, match="fingerprint"):
        ds.sample(other.denoiser(VP, "epsilon"), z, profile=out, nfe=4)
    with pytest.raises(ProfileMismatch, match="process"):
        ds.sample(MIX.denoiser(ds.VPDiscrete.cosine(1000), "epsilon"), z, profile=out, nfe=4)
    guided = ds.ClassifierFreeGuidance(ds.Denoiser(MIX.network(VP, "epsilon"), VP, "epsilon", dtype=DT), 3.0,
                                       {"y": torch.zeros(1)})
    with pytest.raises(ProfileMismatch, match="guidance scale"):
        ds.sample(guided, z, profile=out, nfe=4, model_kwargs={"y": torch.ones(16)})
    with pytest.raises(ProfileMismatch, match="data shape"):
        ds.sample(MIX.denoiser(VP, "epsilon"), noise(d=4), profile=out, nfe=4)
    # the same model behind a new adapter object is accepted
    ds.sample(MIX.denoiser(VP, "epsilon"), z, profile=out, nfe=4)


def test_corrupted_profiles_are_refused(tuned, tmp_path):
    prof, out, _ = tuned
    p = Profile.load(out)
    path = p.save(tmp_path / "copy.json")
    text = open(path).read()
    # an edited number in the JSON
    e4 = json.loads(text)["entries"]["4"]
    bad = text.replace(json.dumps(e4["t"][1]), json.dumps(e4["t"][1] * 0.9), 1)
    assert bad != text
    open(path, "w").write(bad)
    with pytest.raises(ProfileError, match="corrupted"):
        Profile.load(path)
    open(path, "w").write(text[: len(text) // 2])  # truncated
    with pytest.raises(ProfileError, match="corrupted JSON"):
        Profile.load(path)
    open(path, "w").write(text)
    Profile.load(path)
    st = tmp_path / "copy.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-3] ^= 0xFF
    st.write_bytes(bytes(raw))
    with pytest.raises(ProfileError, match="sha256"):
        Profile.load(path)
    st.unlink()
    with pytest.raises(ProfileError, match="missing"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="no profile"):
        Profile.load(tmp_path / "nothing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ProfileError, match="not a diffsolve profile"):
        Profile.load(tmp_path / "other.json")


def test_command_line(tmp_path, capsys):
    out = tmp_path / "toy.json"
    rc = T.main(["--reference", "toy2d", "--nfe", "4", "--out", str(out), "--time-budget", "4", "--calib", "64",
                 "--eval", "32", "--no-stats", "--quiet"])
    assert rc == 0 and out.exists()
    assert "| 4 |" in capsys.readouterr().out
    from diffsolve.cli import main as cli
    assert cli(["sample", "--profile", str(out), "--reference", "toy2d", "--nfe", "4", "--n", "8",
                "--out", str(tmp_path / "s")]) == 0
    text = capsys.readouterr().out
    assert "4 NFE" in text and "RMSE vs exact ODE" in text
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["nfe"] == 4 and info["solver"] == Profile.load(out).entry(4).solver
    # another reference model: refused with a clear message, exit code 2
    assert cli(["sample", "--profile", str(out), "--reference", "gmm64", "--nfe", "4", "--n", "8",
                "--out", str(tmp_path / "s2")]) == 2
    assert "does not match" in capsys.readouterr().err
    # an NFE the profile has no entry for
    assert cli(["sample", "--profile", str(out), "--reference", "toy2d", "--nfe", "7", "--n", "8",
                "--out", str(tmp_path / "s3")]) == 2
    assert "no entry for nfe=7" in capsys.readouterr().err


def test_bench_runs_the_profile_on_its_own_model_only(tuned, tmp_path):
    prof, out, _ = tuned
    other = T.tune(ds.GaussianMixture.random(dim=4, seed=0).denoiser(VP, "epsilon"), [4], data=False, shape=(4,),
                   calib_seeds=32, eval_seeds=8, time_budget_s=2, progress=False)
    with pytest.warns(RuntimeWarning, match="matches none of the models"):
        res = ds.bench(dims=(8,), nfes=NFES, batch=16, solvers=["ddim"], spacings=("logsnr",), finals=("denoise",),
                       libraries=["diffusers"], parity=False, overhead=False, progress=False,
                       profiles=[out, other], out=str(tmp_path))
    tuned_rows = [r for r in res.rows if r["family"] == "tuned profile"]
    assert sorted(r["nfe_budget"] for r in tuned_rows) == NFES
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=DT)
    exact = ds.exact_targets(MIX, VP, z)
    for r in tuned_rows:
        assert not r["error"] and r["nfe_used"] == r["nfe_budget"]
        x = ds.sample(MIX.denoiser(VP, "epsilon"), z, profile=prof, nfe=r["nfe_budget"])
        tgt = exact.for_grid(prof.entry(r["nfe_budget"]).final == "denoise")
        assert abs(float(((x - tgt) ** 2).mean().sqrt()) - r["rmse"]) < 1e-6 * r["rmse"] + 1e-9
    # the 4-dim profile belongs to no benchmark model: reported, not run
    assert any(k.startswith("profile") and "matches none" in v for k, v in res.meta["skipped"].items())
    # tuned rows are compared with the best peer separately, and not mixed into "ours"
    t = res.target_ratios(res.nfes, tuned=True)
    assert [x["nfe"] for x in t] == NFES and all(x["ours"]["family"] == "tuned profile" for x in t)
    assert all(x["ours"]["family"] != "tuned profile" for x in res.target_ratios())
    reach = res.tuned_reach(peer_nfe=6)[0]
    best_peer6 = res.best("mixture-8", 6, False)["rmse"]
    expect = [n for n in NFES if res.best("mixture-8", n, True, tuned=True)["rmse"] <= best_peer6]
    assert reach["fewest_nfe"] == (min(expect) if expect else None)
    md = (tmp_path / "benchmarks.md").read_text()
    assert "## Tuned profiles vs the best peer configuration" in md


def test_auto_skips_statistics_the_budget_cannot_make_reliable():
    """With a budget that allows fewer than MIN_AUTO_K data points, method 'auto' does not compute v3 statistics
    (they would be too noisy to win) and says so in the profile; an explicit stats_K keeps them."""
    den = MIX.denoiser(VP, "epsilon")
    prof = T.tune(den, [4], data=MIX, calib_seeds=range(100, 132), eval_seeds=8, time_budget_s=1e-3, progress=False)
    assert "skipped" in prof.meta["statistics"] and prof.stats is None
    assert all(e.solver != "dpm-v3" for e in prof.entries.values())
    assert prof.meta["evaluation"]["n"] == 8
    forced = T.tune(den, [4], data=MIX, calib_seeds=range(100, 132), eval_seeds=8, stats_K=32, stats_n_lambda=5,
                    time_budget_s=1e-3, progress=False)
    assert forced.meta["statistics"] is None or "skipped" not in forced.meta["statistics"]
