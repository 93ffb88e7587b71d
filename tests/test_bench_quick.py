"""Smoke test of benchmarks/error_vs_nfe.py in --quick mode."""
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "error_vs_nfe.py"


@pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/error_vs_nfe.py not present")
def test_error_vs_nfe_quick(tmp_path):
    # a subprocess, so the benchmark's torch.set_num_threads does not leak into other tests
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    md, csv_path, png = (tmp_path / f"error_vs_nfe.{ext}" for ext in ("md", "csv", "png"))
    for f in (md, csv_path, png):
        assert f.exists() and f.stat().st_size > 0, f
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| solver |" in text and "overhead" in text.lower()

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for col in ("dim", "solver", "spacing", "final", "nfe_budget", "nfe_used", "rmse", "llgap", "wall", "net_time"):
        assert col in rows[0], col
    ran = [r for r in rows if not r["error"]]
    assert len(ran) >= len(rows) // 2
    deterministic = [r for r in ran if r["stochastic"] == "0"]
    stochastic = [r for r in ran if r["stochastic"] == "1"]
    assert deterministic and stochastic
    for r in ran:
        assert 1 <= int(r["nfe_used"]) <= int(r["nfe_budget"]), r
        assert math.isfinite(float(r["llgap"])), r
        wall, net = float(r["wall"]), float(r["net_time"])
        assert 0 < net <= wall, r
    for r in deterministic:
        rmse = float(r["rmse"])
        assert math.isfinite(rmse) and 0 < rmse < 10, r
    # a second-order multistep solver beats first-order DDIM at 10 NFE on its best configuration
    best = {s: min(float(r["rmse"]) for r in deterministic if r["solver"] == s and r["nfe_budget"] == "10")
            for s in ("ddim", "dpm++2m")}
    assert best["dpm++2m"] < best["ddim"]
