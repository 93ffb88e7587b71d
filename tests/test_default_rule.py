"""The default sampler rule (``diffsolve.sampling.defaults``): a pure, documented function of (NFE, process,
parameterisation) that ``ds.sample`` and ``DiffsolveScheduler`` follow when no solver is given."""
import inspect
from pathlib import Path

import pytest
import torch

import diffsolve as ds
from diffsolve.adapters.parameterisation import PARAMETERISATIONS
from diffsolve.grids import FINALS, SPACINGS
from diffsolve.processes import PROCESSES
from diffsolve.sampling import defaults
from diffsolve.sampling.defaults import DefaultSampler, default_sampler, process_kind
from diffsolve.solvers import SOLVERS

DT = torch.float64
MIX = ds.GaussianMixture.random(dim=4, seed=3)
NFES = range(2, 51)
DOC = Path(__file__).resolve().parents[1] / "docs" / "default_rule.md"


def make_process(name):
    if name == "PFGMpp":
        return ds.PFGMpp(128.0)
    return ds.VPDiscrete.linear(1000) if name == "VPDiscrete" else PROCESSES[name]()


def noise(n=2, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


class Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        return self.net(x, t, **kw)


# ----------------------------------------------------------------------------------------
# a pure function
# ----------------------------------------------------------------------------------------
def test_same_inputs_same_choice_and_fresh_options():
    a = default_sampler(8, ds.VPDiscrete.linear(1000), "epsilon")
    a.options["order"] = 99  # the caller's copy: the rule is not changed by it
    b = default_sampler(8, ds.VPDiscrete.linear(1000), "epsilon")
    assert isinstance(b, DefaultSampler) and b.options.get("order") != 99
    assert b == default_sampler(8, ds.VPDiscrete.linear(1000), "epsilon")
    for n in NFES:  # call order does not matter
        assert default_sampler(n, "VPDiscrete", "epsilon") == default_sampler(n, "VPDiscrete", "epsilon")


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_depends_on_the_process_kind_only(name):
    """A process instance and its class name give the same choice; other instances of the class (other
    schedules and ranges) too; aliases of a parameterisation give the same choice as its name."""
    variants = {"VPDiscrete": [ds.VPDiscrete.linear(1000), ds.VPDiscrete.cosine(1000), ds.VPDiscrete.linear(500)],
                "VPContinuous": [ds.VPContinuous(), ds.VPContinuous.linear()],
                "VE": [ds.VE(), ds.VE(0.02, 80.0)], "EDM": [ds.EDM(), ds.EDM(0.01, 40.0)],
                "RectifiedFlow": [ds.RectifiedFlow(), ds.RectifiedFlow(1e-2, 0.99)]}[name]
    for n in (2, 5, 10, 20, 50):
        want = default_sampler(n, name, "epsilon")
        for p in variants:
            assert default_sampler(n, p, "epsilon") == want
            assert default_sampler(n, p, "eps") == default_sampler(n, p, "noise") == want


def test_unknown_inputs_are_errors():
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match="nfe"):
            default_sampler(bad, "VPDiscrete", "epsilon")
    with pytest.raises(ValueError, match="prediction"):
        default_sampler(8, "VPDiscrete", "banana")


def test_the_model_object_is_not_read_beyond_process_and_prediction():
    """Two different models (other data, another network) with the same process and prediction get the same
    choice, and so does a wrapper around one (classifier-free guidance)."""
    VP = ds.VPDiscrete.linear(1000)
    a = ds.GaussianMixture.random(dim=4, seed=1).denoiser(VP, "epsilon")
    b = ds.GaussianMixture.random(dim=4, seed=2, n_components=7).denoiser(VP, "epsilon")
    guided = ds.ClassifierFreeGuidance(a, scale=1.0, uncond_kwargs={})
    runs = [ds.sample(m, noise(), nfe=9, return_info=True)[1] for m in (a, b, guided)]
    for r in runs[1:]:
        assert (r.solver, r.options, r.grid.t.tolist(), r.ends_clean) == \
               (runs[0].solver, runs[0].options, runs[0].grid.t.tolist(), runs[0].ends_clean)
    assert defaults.model_parameterisation(guided) == "epsilon"


# ----------------------------------------------------------------------------------------
# coverage: every process, parameterisation and NFE 2..50
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_process_parameterisation_and_nfe_has_a_valid_choice(name):
    proc = make_process(name)
    for pred in PARAMETERISATIONS:
        for n in NFES:
            c = default_sampler(n, proc, pred)
            info = SOLVERS[c.solver]
            assert (c.spacing in SPACINGS or isinstance(c.spacing, (defaults.PowerSpacing, defaults.KarrasSpacing))) \
                and c.final in FINALS
            assert set(c.options) <= set(inspect.signature(info.fn).parameters)
            assert not info.stochastic and not info.requires


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_every_choice_spends_exactly_the_budget(name):
    """ds.sample with the rule uses exactly ``nfe`` network evaluations (counted at the network) for NFE 2..50."""
    proc = make_process(name)
    net = Counting(MIX.network(proc, "epsilon"))
    den = ds.Denoiser(net, proc, "epsilon", dtype=DT)
    z = noise(1)
    for n in NFES:
        net.calls = 0
        x, info = ds.sample(den, z, nfe=n, return_info=True)
        assert info.nfe == n == net.calls, (name, n, info.nfe, net.calls)
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", sorted(PROCESSES))
@pytest.mark.parametrize("pred", sorted(PARAMETERISATIONS))
def test_every_parameterisation_samples_with_the_rule(name, pred):
    """A plain finite network (0.1 x) under every parameterisation: the rule's run is well defined and spends its
    budget (the mixture's exact networks do not take EDM's preconditioned inputs)."""
    proc = make_process(name)
    kw = {}
    if PARAMETERISATIONS[pred].needs_offset:  # the residual y - x0: on the process with an offset y
        proc, kw = ds.Shifted(proc, lambda t: 0.5 * torch.ones_like(t)), {"y": noise(1)}
    den = ds.Denoiser(lambda x, t, **_: 0.1 * x, proc, pred, dtype=DT)
    for n in (2, 5, 13, 50):
        x, info = ds.sample(den, noise(1), nfe=n, return_info=True, model_kwargs=kw)
        assert info.nfe == n and torch.isfinite(x).all()


def test_parameterisations_of_an_exact_model_give_the_same_sample():
    """The rule gives every parameterisation the same choice; with exact networks of one mixture they all
    describe the same ODE, so the samples agree (the epsilon MNIST and the v digits-v models want the same choice:
    docs/real_models.md)."""
    VP = ds.VPDiscrete.linear(1000)
    z = noise(3)
    xs = {p: ds.sample(MIX.denoiser(VP, p), z, nfe=8) for p in ("epsilon", "x0", "v", "score")}
    for p, x in xs.items():
        assert float((x - xs["epsilon"]).norm() / xs["epsilon"].norm()) < 1e-8, p


# ----------------------------------------------------------------------------------------
# ds.sample follows it; explicit arguments keep their meaning
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_sample_without_options_equals_the_rules_explicit_choice(name):
    proc = make_process(name)
    den = MIX.denoiser(proc, "epsilon")
    z = noise(3, seed=1)
    for n in (2, 3, 5, 6, 8, 10, 15, 20, 50):
        c = default_sampler(n, proc, "epsilon")
        a, ia = ds.sample(den, z, nfe=n, return_info=True)
        b, ib = ds.sample(den, z, c.solver, nfe=n, spacing=c.spacing, final=c.final, return_info=True, **c.options)
        assert torch.equal(a, b) and ia.solver == ib.solver and ia.options == ib.options
        assert torch.equal(ia.grid.t, ib.grid.t)
    c = default_sampler(10, proc, "epsilon")  # neither nfe nor grid: a budget of 10, as before
    assert torch.equal(ds.sample(den, z), ds.sample(den, z, c.solver, nfe=10, spacing=c.spacing, final=c.final,
                                                     **c.options))


def test_explicit_arguments_keep_their_meaning():
    VP = ds.VPDiscrete.linear(1000)
    den = MIX.denoiser(VP, "epsilon")
    z = noise(3, seed=2)
    rule = default_sampler(8, VP, "epsilon")
    # an explicit solver: the previous spacing and last step (logsnr, denoise)
    assert torch.equal(ds.sample(den, z, "ddim", nfe=8), ds.sample(den, z, "ddim", nfe=8, spacing="logsnr",
                                                                    final="denoise"))
    _, info = ds.sample(den, z, "dpm++2m", nfe=8, return_info=True)
    assert info.ends_clean and info.solver == "dpm++2m"
    # the previous default, reachable explicitly
    old, info = ds.sample(den, z, solver="dpm++2m", nfe=8, spacing="logsnr", final="denoise", return_info=True)
    assert info.solver == "dpm++2m" and info.ends_clean and info.nfe == 8
    assert torch.equal(info.grid.t[:-1], ds.grids.logsnr(VP, 8))
    # no solver, some parts given: the given parts replace the rule's
    a = ds.sample(den, z, nfe=8, final="denoise")
    assert torch.equal(a, ds.sample(den, z, rule.solver, nfe=8, spacing=rule.spacing, final="denoise", **rule.options))
    a = ds.sample(den, z, nfe=8, spacing="karras", order=2)
    assert torch.equal(a, ds.sample(den, z, rule.solver, nfe=8, spacing="karras", final=rule.final,
                                    **{**rule.options, "order": 2}))
    # an explicit grid without a solver: dpm++2m, the grid's own last step (denoise for a list of times)
    t = [999.0, 700.0, 400.0, 100.0]
    _, info = ds.sample(den, z, grid=t, return_info=True)
    assert info.solver == "dpm++2m" and info.ends_clean
    # a profile's entry still sets everything (tests/test_tuning.py covers that path)


# ----------------------------------------------------------------------------------------
# documented
# ----------------------------------------------------------------------------------------
def test_the_choice_is_documented():
    """The table in the module docstring is the rule itself (``rule_table()``), and docs/default_rule.md
    shows the same table: for every process kind and NFE, its row says what default_sampler returns."""
    table = defaults.rule_table()
    assert table in defaults.__doc__
    lines = table.splitlines()
    kinds = {"discrete": "VPDiscrete", "VPContinuous": "VPContinuous", "RectifiedFlow": "RectifiedFlow",
             "EDM": "EDM", "VE": "VE", "PFGMpp": "PFGMpp"}
    for kind, name in kinds.items():
        group = defaults.GROUP_OF_KIND[kind]
        for n in NFES:
            c = default_sampler(n, make_process(name), "epsilon")
            row = next(line for line in lines[2:] if f"`{kind}`" in line.split(" | ")[0]
                       and line.split(" | ")[1] == defaults.band_label(n, group))
            cells = row.split(" | ")
            opts = ", ".join(f"{k}={v}" for k, v in c.options.items()) or "-"
            spacing = (f"power {c.spacing.p:g}" if isinstance(c.spacing, defaults.PowerSpacing) else
                       f"`karras` rho {c.spacing.rho:g}" if isinstance(c.spacing, defaults.KarrasSpacing) else
                       "`karras` rho 7" if c.spacing == "karras" else f"`{c.spacing}`")
            assert cells[2] == f"`{c.solver}`" and cells[3] == opts and cells[4] == spacing, (kind, n, row)
            assert cells[5].rstrip(" |") == f"`{c.final}`"
    doc = DOC.read_text()
    assert table in doc
    assert "python benchmarks/default_rule.py" in doc


def test_process_kinds():
    assert process_kind(ds.VPDiscrete.linear(1000)) == "discrete"
    assert process_kind(ds.Shifted(ds.VPDiscrete.linear(1000), lambda t: t * 0)) == "VPDiscrete"
    assert process_kind(ds.EDM()) == "EDM" and process_kind("EDM") == "EDM"
    assert process_kind(ds.AffineInterpolant(lambda t: 1 - t, lambda t: t, 1e-3, 1 - 1e-3)) == "AffineInterpolant"
    assert process_kind("SomethingElse") == "other"


# ----------------------------------------------------------------------------------------
# DiffsolveScheduler follows the rule by default
# ----------------------------------------------------------------------------------------
def test_diffusers_scheduler_defaults_follow_the_rule():
    pytest.importorskip("diffusers")
    from diffsolve.integrations.diffusers import DiffsolveScheduler

    sched = DiffsolveScheduler()
    assert (sched.config.solver, sched.config.spacing, sched.config.final) == ("auto", "auto", "auto")
    den = MIX.denoiser(sched.process, "epsilon")
    net = MIX.network(sched.process, "epsilon")
    z = noise(3, seed=4)
    for n in (5, 8, 20):
        sched.set_timesteps(n)
        x = z.clone()
        for t in sched.timesteps:
            x = sched.step(net(x, torch.full((3,), float(t), dtype=DT)), t, x).prev_sample
        want, info = ds.sample(den, z, nfe=n, return_info=True)
        c = default_sampler(n, sched.process, "epsilon")
        assert sched.resolved(n)[:3] == (c.solver, c.spacing, c.final)
        assert len(sched.timesteps) == info.nfe == n
        # the pipeline's timesteps are float32: the network sees the power grid's fractional times rounded
        assert (x - want).abs().max() <= 1e-7 * want.abs().max(), float((x - want).abs().max())
    old = DiffsolveScheduler(solver="dpm++2m", spacing="logsnr", final="denoise")
    assert old.resolved(8) == ("dpm++2m", "logsnr", "denoise", {})
    assert DiffsolveScheduler(solver="ddim").resolved(8)[:3] == ("ddim", "logsnr", "denoise")
    assert DiffsolveScheduler().resolved(None)[:3] == ("dpm++2m", "logsnr", "denoise")  # explicit timesteps
    with pytest.raises(ValueError, match="spacing"):
        DiffsolveScheduler(spacing="nope")


def test_guided_models_get_the_guided_choice():
    """A model under classifier-free guidance (scale > 1; read from its identity) gets second order up to 10 NFE on
    a discrete schedule; guidance 1 is the unguided model's choice; ds.sample follows it."""
    from diffsolve.sampling.defaults import model_guidance

    VP = ds.VPDiscrete.linear(1000)
    assert default_sampler(8, VP, "epsilon", 3.0) == DefaultSampler("unipc-bh2", {"order": 2}, "linspace", "t_min")
    assert default_sampler(8, VP, "epsilon", 1.0) == default_sampler(8, VP, "epsilon")
    assert default_sampler(20, VP, "epsilon", 3.0) == default_sampler(20, VP, "epsilon")
    assert default_sampler(8, ds.EDM(), "edm", 3.0) == default_sampler(8, ds.EDM(), "edm")  # no measured change

    def net(x, t, c=None):
        return 0.1 * x + (0.0 if c is None else 0.01 * c.to(x.dtype).reshape(-1, 1))

    den = ds.Denoiser(net, VP, "epsilon", dtype=DT)
    g = ds.ClassifierFreeGuidance(den, 3.0, {"c": torch.tensor([0])})
    assert model_guidance(g) == 3.0 and model_guidance(den) in (None, 1.0)
    kw = {"model_kwargs": {"c": torch.tensor([1, 2])}}
    x = ds.sample(g, noise(2), nfe=8, **kw)
    want = ds.sample(g, noise(2), "unipc-bh2", nfe=8, spacing="linspace", final="t_min", order=2, **kw)
    assert torch.equal(x, want)
