"""Denoising MCMC (arXiv:2209.14593): the exact p(sigma | x) of a mixture against Bayes' rule, the Langevin-Gibbs chain
plus an integrator reaches the exact distribution (sliced Wasserstein at the Monte-Carlo floor), every network
evaluation is accounted for, chains are seeded per sample, the noise-level classifier trains and round-trips, and
bad input is a clear error."""
import math

import pytest
import torch

import diffsolve as ds
from diffsolve.evaluation.distances import sliced_wasserstein
from diffsolve.models import NoiseLevelClassifier
from diffsolve.sampling.dmcmc import NoiseLevels, dmcmc
from diffsolve.training.noise_level import noise_levels, train_noise_classifier

DT = torch.float64
MIX = ds.GaussianMixture.random(dim=8, n_components=4, seed=3, delta=0.1)
EDM = ds.EDM()
LEVELS = NoiseLevels.exact(MIX, torch.logspace(-1.3, 0.7, 24, dtype=DT))


def test_exact_noise_level_posterior_is_bayes_rule():
    g = ds.GaussianMixture.random(dim=3, n_components=1, seed=1, delta=0.3)
    cov = g.bases[0] @ torch.diag(g.scales[0] ** 2) @ g.bases[0].T + 0.09 * torch.eye(3, dtype=DT)
    sig = torch.tensor([0.1, 0.5, 2.0], dtype=DT)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    prior = torch.log(torch.tensor([0.2, 0.3, 0.5], dtype=DT))
    got = torch.softmax(NoiseLevels.exact(g, sig, prior).logits(x), 1)
    lp = torch.stack([torch.distributions.MultivariateNormal(g.means[0], cov + s**2 * torch.eye(3, dtype=DT))
                      .log_prob(x) for s in sig], 1) + prior
    assert torch.allclose(got, torch.softmax(lp, 1), atol=1e-12)


class RowCounter:
    """The exact x0 network, counting evaluated rows (per-sample NFE)."""

    def __init__(self, ref, proc):
        self.net, self.rows = ref.network(proc, "x0"), 0

    def __call__(self, x, t, **kw):
        self.rows += x.shape[0]
        return self.net(x, t, **kw)


def test_exact_gibbs_chain_and_integrator_reach_the_exact_distribution():
    """With the exact sigma posterior sampled (a true Gibbs step) and each chain's last state integrated, 600
    independent chains give samples at the Monte-Carlo floor of the sliced Wasserstein distance to exact samples."""
    den = MIX.denoiser(EDM, "x0")
    x, info = dmcmc(den, LEVELS, seeds=range(600), shape=(8,), rounds=1, chain_steps=4, nfe=16, solver="unipc-bh2",
                    sigma_step="sample", keep="last", step_size=0.1, burn_in=50)
    n = x.shape[0]
    exact = MIX.sample(n, torch.Generator().manual_seed(1))
    floor = sliced_wasserstein(MIX.sample(n, torch.Generator().manual_seed(2)), exact, directions=200)
    assert sliced_wasserstein(x, exact, directions=200) < 1.15 * floor
    # the chains sit at intermediate noise: the integrator starts there, not at sigma_max
    assert 0.1 < float(info.sigmas.median()) < 2.0


def test_every_evaluation_is_accounted_for():
    net = RowCounter(MIX, EDM)
    den = ds.Denoiser(net, EDM, "x0", dtype=DT)
    chains, rounds = 40, 3
    x, info = dmcmc(den, LEVELS, seeds=range(chains), shape=(8,), rounds=rounds, chain_steps=4, nfe=6,
                    solver="unipc-bh2")
    assert x.shape == (chains * rounds, 8) and torch.isfinite(x).all()
    assert info.nfe_per_sample == 10 and info.integrator_nfe == 6 and info.sigmas.shape == (chains * rounds,)
    assert net.rows == chains * (info.start_nfe + info.burn_in) + chains * rounds * info.nfe_per_sample
    assert info.amortised_nfe == pytest.approx(10 + (10 + 20) / 3)


def test_chains_are_seeded_per_sample():
    den = MIX.denoiser(EDM, "x0")
    kw = dict(shape=(8,), rounds=2, chain_steps=3, nfe=6, burn_in=5)
    full, _ = dmcmc(den, LEVELS, seeds=[4, 5, 6], **kw)
    one, _ = dmcmc(den, LEVELS, seeds=[5], **kw)
    assert torch.equal(full[[1, 4]], one)


def test_noise_level_classifier_trains_saves_and_loads(tmp_path):
    out = train_noise_classifier("digits-edm", str(tmp_path / "clf"), levels=16, steps=80, batch_size=64,
                                 progress=False, checkpoint_every=50)
    clf = NoiseLevelClassifier.load(out)
    assert clf.shape == (1, 8, 8) and clf.sigmas.numel() == 16
    assert torch.allclose(clf.sigmas, noise_levels(EDM, 16))
    # it reads the level: within two levels of the truth for most digits at every level
    from diffsolve.util.datasets import load_dataset
    x0 = load_dataset("digits").double()[:256]
    k = torch.arange(256) % 16
    x = x0 + clf.sigmas[k].reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0),
                                                               dtype=DT)
    assert float(((clf.logits(x).argmax(1) - k).abs() <= 2).double().mean()) > 0.6
    levels = NoiseLevels(clf.sigmas, clf.logits)
    assert levels.logits(x).shape == (256, 16)
    (out / "noise_level.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="checksum"):
        NoiseLevelClassifier.load(out)


def test_bad_input():
    den = MIX.denoiser(EDM, "x0")
    with pytest.raises(ValueError, match="increasing"):
        NoiseLevels(torch.tensor([1.0, 0.5]), lambda x: x)
    with pytest.raises(ValueError, match="leave the process"):
        dmcmc(den, NoiseLevels.exact(MIX, torch.tensor([1e-4, 1.0])), seeds=[0], shape=(8,))
    with pytest.raises(ValueError, match="sigma_step"):
        dmcmc(den, LEVELS, seeds=[0], shape=(8,), sigma_step="max")
    with pytest.raises(ValueError, match="keep"):
        dmcmc(den, LEVELS, seeds=[0], shape=(8,), keep="first")
    with pytest.raises(ValueError, match="Gaussian marginals"):
        pc = ds.reference.PointCloud(MIX.sample(10), D=128.0)
        dmcmc(pc.denoiser(ds.PFGMpp(128), "x0"), LEVELS, seeds=[0], shape=(8,))
    bad = NoiseLevels(LEVELS.sigmas, lambda x: torch.zeros(x.shape[0], 3))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        dmcmc(den, bad, seeds=[0], shape=(8,), start_nfe=5, burn_in=1)
    assert math.isfinite(float(LEVELS.sigmas.sum()))
