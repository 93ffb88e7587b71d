"""Classifier guidance against an exact answer: with the exact noisy classifier p(k | x_t) of a Gaussian mixture's
components and scale 1, the guided score is the score of component k's own marginal, so the guided sampler
draws from that component alone."""
import torch

import diffsolve as ds
from diffsolve.reference import GaussianMixture

DT = torch.float64
PROC = ds.VPDiscrete.linear(1000)


def _noisy_classifier(ref: GaussianMixture):
    def logits(x, t):
        tt = torch.as_tensor(t, dtype=DT)
        a, s = PROC.alpha(tt), PROC.sigma(tt)
        logp, _ = ref._components(x.double().reshape(x.shape[0], -1) / a, (s / a) ** 2)
        return logp + ref.log_weights
    return logits


def test_exact_noisy_classifier_samples_one_component():
    ref = GaussianMixture.random(4, n_components=3, rank=1, delta=0.1, mean_std=1.0, component_std=0.2, seed=3)
    k = 1
    guided = ds.ClassifierGuidance(ref.denoiser(PROC), _noisy_classifier(ref), k, scale=1.0, noisy=True)
    x = ds.sample(guided, torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=DT), "dpm++2m", nfe=60)
    logp, _ = ref._components(x, torch.tensor(0.0, dtype=DT))
    owner = (logp + ref.log_weights).argmax(1)
    assert float((owner == k).double().mean()) > 0.98
    se = 0.5 / 512**0.5 * 4
    assert float((x.mean(0) - ref.means[k]).abs().max()) < se + 0.05
    plain = ds.sample(ref.denoiser(PROC), torch.randn(512, 4, generator=torch.Generator().manual_seed(0), dtype=DT),
                      "dpm++2m", nfe=60)
    lp2, _ = ref._components(plain, torch.tensor(0.0, dtype=DT))
    assert float(((lp2 + ref.log_weights).argmax(1) == k).double().mean()) < 0.7  # without guidance: all components


def test_clean_classifier_needs_gradients_and_counts_vjps():
    ref = GaussianMixture.random(4, n_components=3, seed=3)
    clf = torch.nn.Linear(4, 3).double()
    g = ds.ClassifierGuidance(ref.denoiser(PROC), clf, torch.tensor([0, 1]), scale=2.0)
    x, info = ds.sample(g, torch.randn(2, 4, dtype=DT), "ddim", nfe=5, return_info=True)
    assert torch.isfinite(x).all() and g.vjps == info.nfe
    try:
        ds.ClassifierGuidance(ref.denoiser(PROC), clf, torch.tensor([0, 1, 2]), scale=1.0).evaluate(
            torch.zeros(2, 4, dtype=DT), 500.0)
    except ValueError as e:
        assert "labels" in str(e)
    else:
        raise AssertionError("a label count that does not match the batch must be an error")
