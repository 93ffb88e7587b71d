"""BenchConfig: the typed configuration of ``ds.bench`` -- its defaults, ``quick``, validation, and that a run
from a config is the run from the same keywords."""
import dataclasses
import inspect
import math
import re
import warnings

import pytest
import torch

import diffsolve as ds
import diffsolve.bench as B
from diffsolve.bench import BenchConfig, api
from diffsolve.bench import peers as P


def _bench_signature_before_config(
        out=None, dims=(64, 3072), nfes=(5, 6, 8, 10, 15, 20), batch=None, model=None, checkpoint=None,
        shape=None, solvers=None, spacings=("logsnr", "karras", "uniform", "quadratic"),
        finals=("denoise", "t_min"), stochastic=False, peers=True, libraries=None, peer_dtype=torch.float32,
        parity=True, parity_steps=(5, 10, 20), overhead=True, overhead_dim=3072, overhead_batch=128,
        overhead_nfe=20, overhead_repeats=7, overhead_algorithms=None, quick=False, seed=0, threads=1,
        progress=True, ref_nfe=200, command=None, write=("md", "csv", "json", "png"), name="benchmarks",
        profiles=()):
    """A copy of ``bench``'s keyword parameters and defaults from before BenchConfig."""


OLD_DEFAULTS = {k: p.default for k, p in inspect.signature(_bench_signature_before_config).parameters.items()}
# since then: the model reference is converged (benchmarks/reference_convergence.py): 500 NFE on the fine grid
OLD_DEFAULTS.update(ref_nfe=500, ref_solver="dpm++3m", ref_spacing="auto")
TIMING = {"wall", "net_time", "overhead_per_nfe", "reference_seconds"}


def _untimed(x):
    """Rows/problems/meta without wall-clock values (nan as a string, so equal runs compare equal)."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, (list, tuple)):
        return [_untimed(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


# ----------------------------------------------------------------------------------------
# defaults and quick
# ----------------------------------------------------------------------------------------
def test_fields_and_defaults_are_the_previous_keyword_parameters():
    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    assert set(defaults) == set(OLD_DEFAULTS) and len(defaults) == 33
    assert defaults == OLD_DEFAULTS
    assert dataclasses.asdict(BenchConfig()) == OLD_DEFAULTS
    assert BenchConfig().resolved() == BenchConfig()  # nothing to resolve in the defaults


def test_quick_is_applied_by_resolved_only():
    cfg = BenchConfig(quick=True)
    assert cfg.dims == (64, 3072) and cfg.solvers is None  # the config keeps what was given
    r = cfg.resolved()
    assert r.quick and r.dims == (64,) and r.nfes == (5, 10) and r.batch == 32
    assert r.solvers == api.QUICK_SOLVERS and r.spacings == ("logsnr", "karras") and r.parity_steps == (5,)
    assert (r.overhead_dim, r.overhead_batch, r.overhead_nfe, r.overhead_repeats) == (64, 32, 10, 2)
    assert r.overhead_algorithms == ("ddim", "dpm++2m")
    assert r.finals == api.FINALS and r.seed == 0 and r.threads == 1  # the rest as given
    assert r.resolved() == r


def test_quick_keeps_the_batch_solvers_and_overhead_algorithms_it_is_given():
    r = BenchConfig(quick=True, batch=8, solvers=("ddim",), overhead_algorithms=("heun",), dims=(8,)).resolved()
    assert r.batch == 8 and r.solvers == ("ddim",) and r.overhead_algorithms == ("heun",)
    assert r.dims == (64,)  # quick's sizes replace the given ones, as before


def test_resolved_normalises_values():
    r = BenchConfig(nfes=[10, "5", 8], libraries="diffusers", write="md,csv", solvers=["DDIM"], dims=[8],
                    profiles="p.json").resolved()
    assert r.nfes == (5, 8, 10) and r.libraries == ("diffusers",) and r.write == ("md", "csv")
    assert r.solvers == ("DDIM",) and r.dims == (8,) and r.profiles == ("p.json",)


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(solvers=("ddim", "nope")), "solvers: unknown solver 'nope'"),
    (dict(spacings=("logsnr", "nope")), "unknown spacing 'nope' in spacings"),
    (dict(finals=("end",)), "unknown final 'end' in finals"),
    (dict(nfes=()), "nfes is empty"),
    (dict(nfes=(5, 0)), "nfes must be positive"),
    (dict(nfes=(5, "x")), "nfes: 'x' is not an integer"),
    (dict(nfes=10), "nfes must be a sequence"),
    (dict(dims=()), "dims is empty"),
    (dict(dims=(8, -1)), "dims must be positive"),
    (dict(batch=0), "batch must be positive"),
    (dict(batch=(4, -2)), "batch must be positive"),
    (dict(batch="4"), "batch must be an integer or a sequence"),
    (dict(dims=(8, 16, 32), batch=(4, 4)), "batch needs one value or one per dim"),
    (dict(shape=(3, 0)), "shape must be positive"),
    (dict(ref_nfe=0), "ref_nfe must be positive"),
    (dict(libraries=("diffusers", "comfy")), "unknown peer library 'comfy'"),
    (dict(peer_dtype=torch.int32), "peer_dtype must be a floating torch dtype"),
    (dict(peer_dtype="float32"), "peer_dtype must be a floating torch dtype"),
    (dict(parity_steps=(0,)), "parity_steps must be positive"),
    (dict(overhead_dim=0), "overhead_dim must be positive"),
    (dict(overhead_batch=-1), "overhead_batch must be positive"),
    (dict(overhead_nfe=0), "overhead_nfe must be positive"),
    (dict(overhead_repeats=0), "overhead_repeats must be positive"),
    (dict(overhead_algorithms=("ddim", "nope")), "overhead_algorithms: unknown solver 'nope'"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(threads=-1), "threads must be"),
    (dict(write=("md", "pdf")), "unknown format 'pdf' in write"),
    (dict(name=""), "name must be a non-empty string"),
    (dict(out=3), "out must be a folder path"),
    (dict(profiles=3), "profiles must be a sequence"),
])
def test_bad_values_raise_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BenchConfig(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        ds.bench(progress=False, **kwargs)  # before any work


def test_values_that_were_accepted_before_still_are():
    BenchConfig(solvers=(), libraries=(), write=(), parity_steps=(), threads=0, overhead_algorithms=())
    BenchConfig(solvers=("dpm-v3", "euler-maruyama"), overhead_algorithms=("dpm++2m-sde", "euler"))
    BenchConfig(spacings=("linspace", "trailing", lambda proc, n: None), batch=[4], threads=None)
    BenchConfig(model="pkg.mod:factory", dims=(), batch=())  # a model replaces dims; its batch defaults to 16
    BenchConfig(quick=True, dims=(), nfes=(), batch=0)  # quick replaces them


def test_a_replaced_field_is_checked_again():
    cfg = BenchConfig()
    with pytest.raises(ValueError, match="nfes is empty"):
        dataclasses.replace(cfg, nfes=[])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.nfes = ()


# ----------------------------------------------------------------------------------------
# bench(config, **overrides)
# ----------------------------------------------------------------------------------------
QUICK_OURS = dict(quick=True, peers=False, parity=False, overhead=False, progress=False)


@pytest.fixture(scope="module")
def quick_by_keywords():
    threads = torch.get_num_threads()
    res = ds.bench(**QUICK_OURS)
    assert torch.get_num_threads() == threads  # restored after the run
    return res


def test_a_config_runs_as_its_keywords_do(quick_by_keywords):
    res = ds.bench(BenchConfig(**QUICK_OURS))
    ref = quick_by_keywords
    assert len(res.rows) == 4 * 2 * 2 * 2 and not any(r["error"] for r in res.rows)
    assert _untimed(res.rows) == _untimed(ref.rows)
    assert _untimed(res.problems) == _untimed(ref.problems)
    assert res.nfes == ref.nfes == [5, 10] and res.parity == ref.parity == [] and res.overhead == []
    assert _untimed(res.meta) == _untimed(ref.meta) and res.meta["quick"] is True
    assert res.files == ref.files == {}


def test_keywords_override_a_config(quick_by_keywords, tmp_path):
    base = BenchConfig(quick=True, peers=False, parity=False, overhead=True, progress=False, seed=5)
    res = B(base, overhead=False, seed=0, out=str(tmp_path), write=("csv",))  # the callable module
    assert _untimed(res.rows) == _untimed(quick_by_keywords.rows)
    assert res.files == {"csv": str(tmp_path / "benchmarks.csv")} and (tmp_path / "benchmarks.csv").exists()


def test_the_output_folder_still_works_as_the_first_positional_argument(tmp_path):
    res = api.bench(str(tmp_path), dims=(8,), nfes=(5,), batch=4, solvers=("ddim",), spacings=("logsnr",),
                    finals=("denoise",), peers=False, parity=False, overhead=False, progress=False,
                    write=("csv", "json"), name="tiny")
    assert sorted(res.files) == ["csv", "json"] and (tmp_path / "tiny.json").exists()
    assert len(res.rows) == 1 and not res.rows[0]["error"]


def test_bad_arguments_are_type_errors():
    with pytest.raises(TypeError, match="unexpected keyword argument 'nfe'"):
        ds.bench(nfe=(5,))
    with pytest.raises(TypeError, match="multiple values for argument 'out'"):
        ds.bench("a", out="b")
    with pytest.raises(TypeError, match="takes a BenchConfig or an output folder"):
        ds.bench(5)


def test_skip_warnings_point_at_the_caller(monkeypatch):
    monkeypatch.setattr(P, "available_libraries", lambda: {"diffusers": "not installed", "k-diffusion": None})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = api.bench(BenchConfig(dims=(8,), nfes=(5,), batch=4, solvers=("ddim",), spacings=("logsnr",),
                                    finals=("denoise",), libraries=("diffusers",), parity=False, overhead=False,
                                    progress=False))
    (w,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "skipping diffusers" in str(w.message) and w.filename == __file__
    assert res.meta["skipped"]["diffusers"] == "not installed"
    assert list(res.meta["skipped"])[-1] == "diffusers"  # after our skipped solvers, as before
    assert {r["library"] for r in res.rows} == {"diffsolve"} and res.rows[0]["family"] == "ddim"


def test_command_line_reports_a_bad_value_without_running(capsys):
    assert api.main(["--solvers", "nope", "--no-progress", "--out", "unused"]) == 2
    assert "unknown solver 'nope'" in capsys.readouterr().err
    assert api.main(["--finals", "end", "--no-progress", "--out", "unused"]) == 2
    assert "unknown final 'end'" in capsys.readouterr().err


def test_command_line_arguments_make_the_same_config():
    args = api.build_parser().parse_args(["--quick", "--dims", "8,16", "--batch", "4", "--no-peers",
                                          "--peer-dtype", "float64", "--threads", "2", "--name", "x"])
    cfg = api._config_from_args(args, command="cmd")
    assert cfg.quick and cfg.dims == [8, 16] and cfg.batch == [4] and not cfg.peers
    assert cfg.peer_dtype is torch.float64 and cfg.threads == 2 and cfg.name == "x" and cfg.command == "cmd"
    assert cfg.out == "bench-out" and cfg.write == api.WRITE_FORMATS
    defaults = api._config_from_args(api.build_parser().parse_args([]))
    assert dataclasses.replace(defaults, out=None).resolved() == BenchConfig().resolved()
