"""Momentum solvers (HB, GHVB): beta = 1 is the base solver, the paper's uniform-step GHVB coefficients,
and the convergence orders (HB: 1; GHVB-k: k)."""
import numpy as np
import pytest
import torch

import diffsolve as ds

DT = torch.float64
REF = ds.GaussianMixture.random(dim=8, n_components=3, seed=1, delta=0.3)
VP = ds.VPDiscrete.linear(1000)


def noise(n=16, seed=0):
    return torch.randn(n, REF.dim, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("proc", [VP, ds.EDM(), ds.RectifiedFlow()], ids=["vp", "edm", "flow"])
@pytest.mark.parametrize("final", ["denoise", "t_min"])
def test_beta_one_is_the_base_solver(proc, final):
    den = REF.denoiser(proc, "epsilon")
    z = noise()
    pairs = [(("dpm++2m-hb", {"beta": 1.0}), ("dpm++2m", {})),
             (("ipndm-hb", {"beta": 1.0}), ("ipndm", {})),
             (("ghvb", {"beta": 1.0}), ("ipndm", {})),
             (("ghvb", {"beta": 1.0, "order": 3, "variable": "lambda"}), ("deis", {"order": 3}))]
    for (name, opts), (base, bopts) in pairs:
        for nfe in (5, 10):
            a = ds.sample(den, z, name, nfe=nfe, final=final, **opts)
            b = ds.sample(den, z, base, nfe=nfe, final=final, **bopts)
            assert torch.allclose(a, b, rtol=0, atol=1e-12), (name, nfe, float((a - b).abs().max()))


def test_momentum_changes_the_sample_and_beta_is_checked():
    den = REF.denoiser(VP, "epsilon")
    z = noise()
    for name in ("dpm++2m-hb", "ipndm-hb", "ghvb"):
        a = ds.sample(den, z, name, nfe=8, beta=0.5)
        b = ds.sample(den, z, name, nfe=8, beta=1.0)
        assert float((a - b).abs().max()) > 1e-4
        with pytest.raises(ValueError, match="beta"):
            ds.sample(den, z, name, nfe=8, beta=0.0)


def test_ghvb_matches_the_papers_uniform_step_coefficients():
    """On a grid uniform in sigma/alpha the variable-step GHVB is the paper's fixed-coefficient GHVB:
    v_n = (1-b) v_{n-1} + b eps_n, x~ += d sigma * prime with prime_2 = ((2+b) v_n - (2-b) v_{n-1}) / (2b),
    prime_3 = ((18+5b) v_n - (24-8b) v_{n-1} + (6-b) v_{n-2}) / (12b) (lower orders while warming up)."""
    proc = ds.EDM()
    den = REF.denoiser(proc, "epsilon")
    sig = torch.linspace(proc.sigma_max, 0.5, 9, dtype=DT)
    grid = ds.explicit(proc, sigmas=sig, final="t_min")
    z = noise()
    for order, b in ((2, 0.5), (3, 0.7)):
        ours = ds.sample(den, z, "ghvb", grid=grid, nfe=None, order=order, beta=b, lower_order_final=False)
        x = z * proc.prior_scale
        vel = []
        for i in range(len(sig) - 1):
            eps = den.predict(x, float(sig[i]))[1]
            vel.append(eps if not vel else (1 - b) * vel[-1] + b * eps)
            k = min(order, len(vel))
            v = vel[::-1]
            if k == 1:
                prime = v[0]
            elif k == 2:
                prime = ((2 + b) * v[0] - (2 - b) * v[1]) / (2 * b)
            else:
                prime = ((18 + 5 * b) * v[0] - (24 - 8 * b) * v[1] + (6 - b) * v[2]) / (12 * b)
            x = x + (sig[i + 1] - sig[i]) * prime
        assert torch.allclose(ours, x, rtol=0, atol=1e-10), float((ours - x).abs().max())


def _slope(name, opts, proc=VP):
    den = REF.denoiser(proc, "x0")
    z = noise()
    target = REF.ode_solution(proc, z * proc.prior_scale, proc.t_max, proc.t_min, rtol=1e-12)
    nfes = [64, 128, 256, 512]
    errs = [float((ds.sample(den, z, name, nfe=n, final="t_min", lower_order_final=False, **opts) - target)
                  .abs().max()) for n in nfes]
    return -np.polyfit(np.log(nfes), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name,opts,order", [
    ("dpm++2m-hb", {"beta": 0.8}, 1), ("dpm++2m-hb", {"beta": 0.5}, 1), ("ipndm-hb", {"beta": 0.8}, 1),
    ("ghvb", {"order": 2, "beta": 0.8}, 2), ("ghvb", {"order": 3, "beta": 0.5}, 3),
])
def test_convergence_orders(name, opts, order):
    """HB lags the direction by (1-beta)/beta steps: first order (the paper's theorem).  GHVB-k keeps order k
    (GHVB-4 at the registry defaults is covered by tests/test_convergence.py)."""
    s, errs = _slope(name, opts)
    assert abs(s - order) <= 0.35, (s, errs)
