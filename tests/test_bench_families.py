"""The bench's peers on flow-matching and EDM models, its guided-model specs and its default-rule rows.

The peers' loops call the model through ``peers.PeerModel``, which must answer each scheduler's convention
(flow velocity at timestep 1000 sigma; EDM's raw output F at c_in x and c_noise).  The proof is against the exact
answer: on an exact Gaussian mixture, a high-order peer run with many steps lands on the exact probability-flow
ODE state where it stops; a wrong convention (sign, time scale, preconditioning) is off by O(1).
"""
import pytest
import torch

import diffsolve as ds
from diffsolve.bench import harness as H
from diffsolve.bench import peers as P
from diffsolve.bench.models import class_labels, load_spec, parse_spec
from diffsolve.evaluation.teacher import ExactTeacher, ModelTeacher, make_teacher

DT = torch.float64
MIX = ds.GaussianMixture.random(dim=6, seed=2)
pytestmark = pytest.mark.skipif(not P.have_diffusers(), reason="diffusers is not installed")


def _noise(n=8, seed=0):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _rmse(a, b):
    return float((a.to(DT) - b.to(DT)).pow(2).mean().sqrt())


def test_families():
    assert P.peer_family(ds.VPDiscrete.linear(1000)) == "ddpm"
    assert P.peer_family(ds.RectifiedFlow()) == "flow"
    assert P.peer_family(ds.EDM()) == "edm"
    assert P.peer_family(ds.VE()) is None
    flow = {c.kind for c in P.peer_configs(False, ["diffusers"], "flow")}
    assert {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler"} <= flow
    edm = {c.kind for c in P.peer_configs(False, ["diffusers"], "edm")}
    assert edm == {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}


@pytest.mark.parametrize("pred", ["velocity", "epsilon", "x0"])
def test_flow_peer_lands_on_the_exact_ode_state(pred):
    proc = ds.RectifiedFlow(1e-3, 1 - 1e-7)  # the peers start at sigma = 1: ours within 1e-7 of it
    den = MIX.denoiser(proc, pred)
    z = _noise()
    cfg = P.PeerConfig("diffusers", "DPM++3M flow", "flow/sigma_min", "DPMSolverMultistepScheduler",
                       {"use_flow_sigmas": True, "flow_shift": 1.0, "prediction_type": "flow_prediction",
                        "algorithm_type": "dpmsolver++", "solver_order": 3, "final_sigmas_type": "sigma_min"})
    out = P.run_peer(cfg, P.PeerModel(den), proc, z, 200, DT)
    t_stop = out.last_sigma / (1 + out.last_sigma)  # sigma/alpha -> flow t
    exact = ExactTeacher(MIX, proc).state_at(z, t_stop)
    assert out.view == "vp" and 0 < t_stop < 0.02
    assert _rmse(out.x, exact) < 2e-3


def test_flow_match_euler_converges_at_first_order():
    """FlowMatchEuler (ends with the jump to clean data): the error to the exact answer halves with twice the
    steps (a log-log slope of ~1), which a wrong time scale or sign would not give."""
    proc = ds.RectifiedFlow(1e-3, 1 - 1e-7)
    den = MIX.denoiser(proc, "velocity")
    z = _noise()
    cfg = P.PeerConfig("diffusers", "FlowMatchEuler", "default", "FlowMatchEulerDiscreteScheduler", {"shift": 1.0})
    errs = []
    for n in (50, 100, 200):
        pm = P.PeerModel(den)
        out = P.run_peer(cfg, pm, proc, z, n, DT)
        exact = ExactTeacher(MIX, proc).state_at(z, 1e-3)  # the state at the last sigma (1/1000) ...
        x0 = den.evaluate(exact, torch.full((8,), 1e-3, dtype=DT), {}).x0  # ... and its jump to clean data
        errs.append(_rmse(out.x, x0))
    slopes = [torch.log2(torch.tensor(errs[i] / errs[i + 1])) for i in range(2)]
    assert all(0.7 < float(s) < 1.3 for s in slopes), errs


@pytest.mark.parametrize("pred", ["edm", "epsilon"])
def test_edm_peers_land_on_the_exact_ode_state(pred):
    proc = ds.EDM()
    den = MIX.denoiser(proc, pred)
    z = _noise()
    exact = ExactTeacher(MIX, proc).state_at(z, proc.sigma_min)
    x0 = den.evaluate(exact, torch.full((8,), proc.sigma_min, dtype=DT), {}).x0  # the jump from sigma_min
    for cfg in (P.PeerConfig("diffusers", "EDMDPMSolverMultistep 3M", "karras/zero", "EDMDPMSolverMultistepScheduler",
                             {"sigma_schedule": "karras", "final_sigmas_type": "zero", "solver_order": 3}),
                P.PeerConfig("diffusers", "EDMEuler", "karras/zero", "EDMEulerScheduler", {"sigma_schedule": "karras"})):
        out = P.run_peer(cfg, P.PeerModel(den), proc, z, 400 if "Euler" in cfg.kind else 100, DT)
        assert out.last_sigma == 0.0
        assert _rmse(out.x, x0) < (2e-2 if "Euler" in cfg.kind else 2e-3), cfg.kind
    if P.have_k_diffusion():  # k-diffusion's own samplers on the same model, in its VE view
        k = P.PeerConfig("k-diffusion", "dpmpp_2m", "karras/zero", "sample_dpmpp_2m", {"grid": "karras"})
        out = P.run_peer(k, P.PeerModel(den), proc, z, 100, DT)
        assert _rmse(out.x, x0) < 2e-3


def test_bench_scores_flow_and_edm_models_and_the_default_rule():
    """A model problem on a flow model: ours, the default rule and a peer are scored against the reference of
    the same model, with endpoints read off the model's own x0 predictions (any parameterisation)."""
    for proc, pred in ((ds.RectifiedFlow(), "velocity"), (ds.EDM(), "edm")):
        den = MIX.denoiser(proc, pred)
        den.sample_shape = (6,)
        pb = H.model_problem(den, 8, 0, None, 60)
        assert pb.family == P.peer_family(proc) and pb.peers_ok is None
        r = H.run_default(pb, 8)
        assert not r["error"] and r["family"] == H.DEFAULT and r["nfe_used"] == 8
        r = H.run_ours(pb, "dpm++2m", 10, "logsnr", "denoise")
        assert not r["error"] and r["endpoint"] == "jump"
        for c in P.peer_configs(True, ["diffusers"], pb.family):
            r = H.run_peer_config(pb, c, 10, torch.float32)
            assert not r["error"] and r["nfe_used"] <= 10 and r["rmse"] < 1.0


def test_model_specs():
    assert parse_spec("mnist") == ("mnist", None)
    assert parse_spec("mnist-cfg@1.5") == ("mnist-cfg", 1.5)
    with pytest.raises(ValueError, match="number"):
        parse_spec("mnist-cfg@high")
    with pytest.raises(ValueError, match="class-conditional"):
        load_spec("mnist-cfg", 4)
    with pytest.raises(ValueError, match="not class-conditional"):
        load_spec("mnist@2", 4)
    model, den = load_spec("mnist-cfg@3", 12)
    assert isinstance(den, ds.Denoiser) and model.process is den.process
    z = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0), dtype=DT)
    g = ds.ClassifierFreeGuidance(den, 3.0, {"class_labels": torch.tensor([den.config["null_label"]])})
    want = g.evaluate(z, 500.0, {"class_labels": class_labels(3, 10)}).x0
    assert torch.equal(model.evaluate(z, 500.0).x0, want)  # bound labels 0, 1, 2 = the first rows


def test_conditioned_binds_inputs():
    seen = []

    def net(x, t, c=None):
        seen.append(c)
        return torch.zeros_like(x)

    den = ds.Denoiser(net, ds.VPDiscrete.linear(1000), "epsilon", dtype=DT)
    m = ds.Conditioned(den, {"c": torch.arange(5)})
    m.evaluate(torch.zeros(3, 2, dtype=DT), 10.0)
    assert torch.equal(seen[-1], torch.arange(3))  # the first rows
    m.evaluate(torch.zeros(2, 2, dtype=DT), 10.0, {"c": torch.tensor([7, 7])})
    assert torch.equal(seen[-1], torch.tensor([7, 7]))  # a call's own input wins
    one = ds.Conditioned(den, {"c": torch.tensor([4])})
    one.evaluate(torch.zeros(3, 2, dtype=DT), 10.0)
    assert torch.equal(seen[-1], torch.tensor([4, 4, 4]))  # batch 1 is broadcast
    with pytest.raises(ValueError, match="rows"):
        m.evaluate(torch.zeros(6, 2, dtype=DT), 10.0)
    assert m.identity()["wrappers"][-1] == {"kind": "conditioned", "inputs": ["c"]}


def test_teacher_spec_names_its_grid():
    den = MIX.denoiser(ds.VPDiscrete.linear(1000), "epsilon")
    t = make_teacher("dpm++3m:40:uniform", den)
    assert isinstance(t, ModelTeacher) and (t.solver, t.nfe, t.spacing) == ("dpm++3m", 40, "uniform")
    assert make_teacher("dpm++2m:30", den).spacing == "logsnr"
    with pytest.raises(ValueError, match="integer"):
        make_teacher("dpm++3m:many", den)


def test_bench_command_runs_the_family_peers_of_a_shipped_model(tmp_path):
    """`diffsolve bench --model digits-edm` runs diffusers' EDM schedulers (not the DDPM ones) beside ours."""
    from diffsolve.bench.api import main

    code = main(["--model", "digits-edm", "--quick", "--batch", "4", "--nfes", "5", "--ref-nfe", "20", "--no-parity",
                 "--no-overhead", "--no-progress", "--libraries", "diffusers", "--out", str(tmp_path)])
    assert code == 0
    import csv
    rows = list(csv.DictReader(open(tmp_path / "benchmarks.csv")))
    kinds = {json_kind(r["config"]) for r in rows if r["library"] == "diffusers"}
    assert kinds == {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
    assert all(not r["error"] for r in rows if r["library"] == "diffusers")


def json_kind(config: str) -> str:
    import ast
    import json
    try:
        return json.loads(config)["kind"]
    except Exception:
        return ast.literal_eval(config)["kind"]
