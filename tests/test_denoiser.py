import math

import pytest
import torch
from conftest import randn

import diffsolve as ds

DT = torch.float64
REF = ds.GaussianMixture.random(dim=6, n_components=3, seed=3)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v", "score", "velocity"])
def test_conversions_are_exact(process, prediction):
    den = ds.Denoiser(REF.network(process, prediction), process, prediction, dtype=DT)
    x = randn(5, 6, seed=1)
    for frac in (0.05, 0.5, 0.95):
        t = torch.tensor(process.t_min + frac * (process.t_max - process.t_min), dtype=DT)
        x0, eps = den.predict(x, t)
        ex0, eeps = REF.posterior(x, process, t)
        assert torch.allclose(x0, ex0, rtol=1e-9, atol=1e-9)
        assert torch.allclose(eps, eeps, rtol=1e-9, atol=1e-9)


def test_per_sample_times():
    proc = ds.VPDiscrete.linear(1000)
    den = REF.denoiser(proc, "epsilon")
    x = randn(3, 6)
    t = torch.tensor([10.0, 400.5, 990.0], dtype=DT)
    x0, _ = den.predict(x, t)
    for i in range(3):
        assert torch.allclose(x0[i], den.predict(x[i:i + 1], t[i])[0][0])


def test_edm_coefficients_formula():
    c = ds.edm_coefficients(torch.tensor(1.0, dtype=DT), sigma_data=0.5)
    assert math.isclose(float(c["c_skip"]), 0.25 / 1.25, rel_tol=1e-14)
    assert math.isclose(float(c["c_out"]), 0.5 / math.sqrt(1.25), rel_tol=1e-14)
    assert math.isclose(float(c["c_in"]), 1 / math.sqrt(1.25), rel_tol=1e-14)
    assert float(c["c_noise"]) == 0.0


@pytest.mark.parametrize("proc", [ds.EDM(sigma_data=0.5), ds.VPDiscrete.linear(1000)])
def test_edm_preconditioning(proc):
    """A raw network F built from the exact denoiser: D = c_skip x~ + c_out F(c_in x~, c_noise) must be exact."""
    sd = 0.5
    seen = {}

    def raw(xin, c_noise):
        s = torch.exp(4 * c_noise.to(DT))[0]  # c_noise = log(sigma)/4
        c = ds.edm_coefficients(s, sd)
        xt = xin.to(DT) / c["c_in"]
        seen.update(xin=xin.clone(), c_noise=c_noise.clone(), s=s)
        return (REF.denoise_ve(xt, s) - c["c_skip"] * xt) / c["c_out"]

    den = ds.Denoiser(raw, proc, prediction="edm", sigma_data=sd, dtype=DT)
    x = randn(4, 6, seed=2)
    t = torch.tensor(0.3 * proc.t_max + 0.7 * proc.t_min, dtype=DT)
    x0, _ = den.predict(x, t)
    assert torch.allclose(x0, REF.posterior(x, proc, t)[0], atol=1e-10)
    s = proc.sigma_ve(t)
    assert torch.allclose(seen["c_noise"], torch.log(s).expand(4) / 4)
    assert torch.allclose(seen["xin"], x / proc.alpha(t) / torch.sqrt(s**2 + sd**2))


class LabelNet(torch.nn.Module):
    """eps = x * 0.1 + label embedding; counts calls."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10)
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        return 0.1 * x + self.emb[labels]


def test_cfg_scale_one_is_conditional_and_batched():
    proc = ds.VPDiscrete.linear(1000)
    net = LabelNet()
    x = randn(2, 4)
    labels = torch.tensor([0, 1])
    cond = ds.Denoiser(net, proc, "epsilon")
    g1 = ds.ClassifierFreeGuidance(ds.Denoiser(net, proc, "epsilon"), 1.0, {"labels": torch.tensor([2])})
    e_c = cond.predict(x, 500.0, labels=labels)[1]
    assert torch.allclose(g1.predict(x, 500.0, labels=labels)[1], e_c)
    g3 = ds.ClassifierFreeGuidance(ds.Denoiser(net, proc, "epsilon"), 3.0, {"labels": torch.tensor([2])})
    before = net.calls
    e_g = g3.predict(x, 500.0, labels=labels)[1]
    assert net.calls == before + 1  # one batched call
    e_u = cond.predict(x, 500.0, labels=torch.tensor([2, 2]))[1]
    assert torch.allclose(e_g, e_u + 3.0 * (e_c - e_u), atol=1e-6)


def test_network_dtype_and_float64_state():
    proc = ds.VPDiscrete.linear(1000)
    net = LabelNet()
    seen = {}

    def wrapped(x, t, labels=None):
        seen["dtype"] = x.dtype
        return net(x, t, labels)

    den = ds.Denoiser(wrapped, proc, "epsilon", dtype=torch.float32)
    x0, eps = den.predict(randn(2, 4), 10.0, labels=torch.tensor([0, 1]))
    assert seen["dtype"] == torch.float32 and x0.dtype == torch.float64
    assert ds.Denoiser(net, proc).dtype == torch.float32  # taken from the module's parameters


def test_bad_adapter_input():
    proc = ds.VPDiscrete.linear(1000)
    with pytest.raises(ValueError, match="prediction"):
        ds.Denoiser(lambda x, t: x, proc, prediction="banana")
    with pytest.raises(ValueError, match="uncond"):
        ds.ClassifierFreeGuidance(ds.Denoiser(lambda x, t: x, proc), 2.0, None)
    with pytest.raises(TypeError):
        ds.Denoiser(lambda x, t: x, "vp")
    den = ds.Denoiser(lambda x, t: x[:, :2], proc)
    with pytest.raises(ValueError, match="shape"):
        den.predict(randn(2, 4), 10.0)
