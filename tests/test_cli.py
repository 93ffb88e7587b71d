"""The command line: ``diffsolve solvers | sample | demo`` (fast settings only)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import diffsolve as ds
from diffsolve.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_solvers_lists_every_solver(capsys):
    code, out, _ = run(["solvers"], capsys)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines()[2:]}
    assert listed == {s.name for s in ds.solvers()}


def test_solvers_markdown_table(capsys):
    code, out, _ = run(["solvers", "--markdown"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "| name | order | NFE rule | paper |"
    assert len(lines) == 2 + len(ds.solvers())
    for s in ds.solvers():
        assert f"| `{s.name}` |" in out


def test_sample_toy2d_writes_npy_json_png(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, _ = run(["sample", "--solver", "dpm++2m", "--nfe", 8, "--n", 64, "--out", out, "--quiet"], capsys)
    assert code == 0, stdout
    x = np.load(out / "samples.npy")
    assert x.shape == (64, 2) and np.isfinite(x).all()
    info = json.loads((out / "info.json").read_text())
    assert info["solver"] == "dpm++2m" and info["nfe"] <= 8 and info["nfe_budget"] == 8
    assert info["exact_samples"] == 64 and info["exact_target"] == "denoised"
    assert 0 < info["rmse_vs_exact_ode"] < 0.5
    assert info["config"]["process"] == "vp-linear"
    assert info["grid_t"][-1] is None  # the clean end point (t = nan) is written as null
    assert (out / "samples.png").stat().st_size > 0


def test_sample_nfe_used_never_exceeds_budget(tmp_path, capsys):
    # heun spends 2 per step and 1 on the jump to clean data: a budget of 6 buys 5
    out = tmp_path / "h"
    code, _, _ = run(["sample", "--solver", "heun", "--nfe", 6, "--n", 8, "--process", "edm", "--out", out,
                      "--quiet"], capsys)
    assert code == 0
    info = json.loads((out / "info.json").read_text())
    assert info["nfe"] == 5 and info["steps"] == 3


def test_sample_image_shape_writes_png_grid(tmp_path, capsys):
    out = tmp_path / "img"
    code, _, _ = run(["sample", "--reference", "image", "--solver", "unipc-bh2", "--nfe", 5, "--n", 4,
                      "--exact-samples", 1, "--out", out, "--quiet"], capsys)
    assert code == 0
    assert np.load(out / "samples.npy").shape == (4, 3, 32, 32)
    info = json.loads((out / "info.json").read_text())
    assert info["nfe"] <= 5 and info["exact_samples"] == 1 and info["shape"] == [3, 32, 32]
    assert math.isfinite(info["rmse_vs_exact_ode"])
    assert (out / "samples.png").stat().st_size > 0


def test_sample_t_min_and_other_processes(tmp_path, capsys):
    for proc in ("flow", "ve", "vp-continuous"):
        out = tmp_path / proc
        code, _, err = run(["sample", "--process", proc, "--final", "t_min", "--prediction", "epsilon",
                            "--solver", "dpm++3m", "--nfe", 10, "--n", 16, "--out", out, "--quiet"], capsys)
        assert code == 0, err
        info = json.loads((out / "info.json").read_text())
        assert info["exact_target"] == "at_t_min" and not info["ends_clean"]
        assert info["rmse_vs_exact_ode"] < 0.5


def test_sample_every_prediction_gives_the_same_samples(tmp_path, capsys):
    # the exact model in each parameterisation, converted back by the adapter (velocity: the flow's u)
    got = {}
    for pred in ("x0", "epsilon", "v", "score", "velocity"):
        code, _, err = run(["sample", "--process", "flow", "--prediction", pred, "--nfe", 6, "--n", 8,
                            "--exact-samples", 0, "--out", tmp_path / pred, "--quiet"], capsys)
        assert code == 0, err
        got[pred] = np.load(tmp_path / pred / "samples.npy")
    for pred, x in got.items():
        np.testing.assert_allclose(x, got["x0"], atol=1e-8, err_msg=pred)


def test_sample_stochastic_is_batch_size_independent(tmp_path, capsys):
    for n in (3, 5):
        code, _, _ = run(["sample", "--solver", "ddpm", "--nfe", 6, "--n", n, "--exact-samples", 0,
                          "--out", tmp_path / str(n), "--quiet"], capsys)
        assert code == 0
    a, b = np.load(tmp_path / "3" / "samples.npy"), np.load(tmp_path / "5" / "samples.npy")
    np.testing.assert_array_equal(a, b[:3])
    info = json.loads((tmp_path / "3" / "info.json").read_text())
    assert "rmse_vs_exact_ode" not in info and info["exact_samples"] == 0


def test_sample_solver_options(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run(["sample", "--solver", "deis", "--option", "order=2", "--option", "variable=t",
                        "--nfe", 6, "--n", 8, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((out / "info.json").read_text())["options"] == {"order": 2, "variable": "t"}


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--solver", "no-such-solver"], "valid names"),
    (["sample", "--model", "no/such/ckpt"], "no/such/ckpt"),
    (["sample", "--nfe", "0"], "nfe"),
    (["sample", "--n", "0"], "--n"),
    (["sample", "--option", "order"], "KEY=VALUE"),
    (["sample", "--option", "bogus=1"], "no option"),
    (["demo", "--toy", "--solvers", "ddim", "nope"], "valid names"),
])
def test_bad_input_exits_2_with_message(argv, needle, tmp_path, capsys):
    code, _, err = run(argv + ["--out", tmp_path / "x", "--quiet"], capsys)
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert not (tmp_path / "x" / "samples.npy").exists()


def test_bad_solver_lists_valid_names_without_traceback():
    r = subprocess.run([sys.executable, "-m", "diffsolve", "sample", "--solver", "dpm++9m", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: unknown solver 'dpm++9m'")
    for s in ds.solvers():
        assert s.name in r.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--process", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, _ = run(["demo", "--toy", "--n", 200, "--nfe", 5, 8, "--solvers", "ddim", "dpm++2m", "heun",
                           "--out", out, "--quiet"], capsys)
    assert code == 0
    assert (out / "toy.png").stat().st_size > 0
    res = json.loads((out / "toy.json").read_text())
    assert res["n"] == 200 and len(res["runs"]) == 6
    for r in res["runs"]:
        assert r["nfe"] <= r["nfe_budget"]
        assert r["solver"] in stdout
    ddim = {r["nfe_budget"]: r["rmse_vs_exact_ode"] for r in res["runs"] if r["solver"] == "ddim"}
    assert ddim[8] < ddim[5]


def test_sample_shipped_model_writes_image_metric(tmp_path, capsys):
    out = tmp_path / "m"
    code, stdout, _ = run(["sample", "--model", "mnist", "--nfe", 3, "--n", 4, "--reference-nfe", 6,
                           "--out", out, "--quiet"], capsys)
    assert code == 0, stdout
    info = json.loads((out / "info.json").read_text())
    assert info["nfe"] <= 3 and info["shape"] == [1, 28, 28]
    assert info["rmse_vs_reference"] > 0 and info["image_metric"]["fd_lenet"] > 0
    assert (out / "samples.png").exists()


def test_sample_missing_model_is_a_clear_error(tmp_path, capsys):
    code, _, stderr = run(["sample", "--model", str(tmp_path / "nowhere"), "--out", tmp_path / "x"], capsys)
    assert code == 2 and "error:" in stderr


def test_delegated_commands_have_help(capsys):
    for cmd in ("bench", "train"):
        with pytest.raises(SystemExit) as e:
            run([cmd, "--help"], capsys)
        assert e.value.code == 0


def test_model_demo_writes_grid_and_metrics(tmp_path, capsys):
    code, stdout, _ = run(["demo", "--images", 4, "--nfe", 3, "--restore-images", 2, "--out", tmp_path], capsys)
    assert code == 0, stdout
    res = json.loads((tmp_path / "demo.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in res["runs"]] == [("default", 3), ("previous default", 3),
                                                              ("reference", 60)]
    assert all(r["fd_lenet"] > 0 for r in res["runs"]) and (tmp_path / "demo.png").stat().st_size > 0
    rest = res["restoration"]  # box inpainting of held-out digits 0 and 1, two posterior samples each
    assert rest["labels"] == [0, 1] and len(rest["psnr"]) == 2 and all(len(p) == 2 for p in rest["psnr"])
    assert all(5 < v < 40 for p in rest["psnr"] for v in p) and (tmp_path / "restore.png").stat().st_size > 0
