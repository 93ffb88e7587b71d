"""Hallucination scores (Aithal et al. 2024, "Understanding hallucinations in diffusion models through mode
interpolation", arXiv 2406.09358): a sample that ends between modes of the data had an unstable x0 prediction at the
end of its trajectory, so the variance of the predicted x0 over the last k steps,

    Hal(x) = mean over dimensions of Var_{last k steps}[x0_hat],

separates such samples from those that settled into a mode.  The paper records it during ancestral DDPM sampling
(k = 10 of T = 1000 steps) and drops the highest-scoring samples (a fixed number of them in its code).  Here it is an ``after_step`` hook
(``PredictionVariance``), so it runs on every solver; ``hallucination_scores`` samples and scores in one call and
``hallucination_filter`` keeps the samples below a threshold (given, a quantile, or the Otsu split of the log-scores).
For point clouds with known modes, ``mode_distance`` says which samples left the support.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..adapters.denoiser import Model
from ..processes import NoiseProcess
from ..sampling import sample
from ..solvers.drivers import Step
from ..solvers.state import SolverState
from .core import DiagnosticError, check_model

Tensor = torch.Tensor


class PredictionVariance:
    """An ``after_step`` hook that keeps the x0 predictions of the last ``last_k`` steps (None: all) among those that
    start at a noise level sigma / alpha <= ``sigma_below`` (None: every step; needs ``process``) and scores their
    variance (``scores``).  Hooks that reorder the batch (``state.reindex``) must not run in the same call.

    The paper's last 10 of 1000 DDPM steps with betas 0.001..0.2 start at sigma / alpha <= 0.14; on a grid dense
    near t_min (log-SNR, or DDPM's betas 1e-4..0.02) the last 10 steps span far less noise, and a window in
    sigma (``sigma_below``) is what carries over between grids."""

    def __init__(self, last_k: Optional[int] = 10, sigma_below: Optional[float] = None,
                 process: Optional[NoiseProcess] = None):
        if last_k is not None and (not isinstance(last_k, int) or last_k < 2):
            raise DiagnosticError(f"last_k must be an integer >= 2 (a variance needs two predictions), got {last_k!r}")
        if sigma_below is not None and process is None:
            raise DiagnosticError("sigma_below needs the model's process")
        self.last_k, self.sigma_below, self.process = last_k, sigma_below, process
        self.recent: deque = deque(maxlen=last_k)

    def __call__(self, state: SolverState, step: Step) -> None:
        if self.sigma_below is not None and self.process is not None:
            if float(self.process.sigma_ve(torch.tensor(step.t_from, dtype=torch.float64))) > self.sigma_below:
                return
        self.recent.append(step.denoised.detach().clone())

    def scores(self) -> Tensor:
        """Hal per sample [B]: the unbiased variance over the recorded steps, averaged over dimensions."""
        if len(self.recent) < 2:
            raise DiagnosticError(f"only {len(self.recent)} step(s) were recorded; the score needs at least 2 (more "
                                  "steps, a larger sigma_below or a smaller last_k)")
        h = torch.stack(list(self.recent))
        return h.var(0, unbiased=True).flatten(1).mean(1)


@dataclass
class HallucinationRun:
    """Samples [B, *S], their scores [B], and how they were made."""

    samples: Tensor
    scores: Tensor
    steps_scored: int
    info: Dict[str, Any]


def hallucination_scores(model: Model, noise: Optional[Tensor] = None, last_k: Optional[int] = 10,
                         sigma_below: Optional[float] = None, **sample_kwargs: Any) -> HallucinationRun:
    """Sample ``model`` (``ds.sample`` arguments: noise or seeds, solver, nfe, ...) while recording the x0
    predictions of the last ``last_k`` steps below noise level ``sigma_below`` (``PredictionVariance``); returns
    the samples with their hallucination scores."""
    model = check_model(model)
    if "after_step" in sample_kwargs:
        raise DiagnosticError("hallucination_scores installs its own after_step hook")
    hook = PredictionVariance(last_k, sigma_below, model.process)
    out, si = sample(model, noise, after_step=hook, return_info=True, **sample_kwargs)
    info = {"solver": si.solver, "nfe": si.nfe, "steps": si.steps, "last_k": last_k, "sigma_below": sigma_below}
    return HallucinationRun(samples=out, scores=hook.scores(), steps_scored=len(hook.recent), info=info)


def otsu_threshold(values: Tensor, bins: int = 256) -> float:
    """The threshold that best splits ``values`` into two classes (Otsu 1979: the largest between-class variance of
    a histogram)."""
    v = values.double().flatten()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist = torch.histc(v, bins, lo, hi)
    p = hist / hist.sum()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = torch.cumsum(p, 0)
    m0 = torch.cumsum(p * centres, 0)
    mt = m0[-1]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-300)
    between[(w0 <= 0) | (w0 >= 1)] = -1
    i = int(between.argmax())
    return float(lo + (i + 1) * (hi - lo) / bins)


def hallucination_threshold(scores: Tensor, method: str = "quantile", quantile: float = 0.95) -> float:
    """A threshold on the scores: 'quantile' (drop the top 1 - ``quantile``, like the paper's code, which drops a
    fixed number) or 'otsu' (the split of the log-scores' histogram; only when hallucinations are common)."""
    s = scores.double()
    if s.numel() < 2 or not torch.isfinite(s).all():
        raise DiagnosticError("scores must be at least two finite numbers")
    if method == "otsu":
        return float(torch.exp(torch.tensor(otsu_threshold(torch.log(s.clamp_min(1e-300))))))
    if method == "quantile":
        if not 0 < quantile < 1:
            raise DiagnosticError(f"quantile must lie in (0, 1), got {quantile}")
        return float(torch.quantile(s, quantile))
    raise DiagnosticError(f"method must be 'quantile' or 'otsu', got {method!r}")


def hallucination_filter(scores: Tensor, threshold: Optional[float] = None, method: str = "quantile",
                         quantile: float = 0.95) -> Tuple[Tensor, float]:
    """(keep mask [B], the threshold): keep the samples whose score is at most ``threshold`` (default: from
    ``hallucination_threshold(scores, method, quantile)``; calibrate it on other samples of the same model and pass
    it here to filter new ones)."""
    thr = hallucination_threshold(scores, method, quantile) if threshold is None else float(threshold)
    return scores <= thr, thr


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Probability that a positive (e.g. out-of-support) sample scores higher than a negative one (ties count 1/2)."""
    a, b = scores[positive.bool()].double(), scores[~positive.bool()].double()
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    ranks = torch.cat([a, b]).argsort().argsort().double() + 1  # no ties in continuous scores
    return float((ranks[: a.numel()].sum() - a.numel() * (a.numel() + 1) / 2) / (a.numel() * b.numel()))


def mode_distance(x: Tensor, modes: Tensor) -> Tensor:
    """Distance [B] of each sample to its nearest mode ([K, *S])."""
    return torch.cdist(x.flatten(1).double(), modes.flatten(1).double()).min(1).values


def filter_report(out_of_support: Tensor, keep: Tensor) -> Dict[str, Any]:
    """How a filter did against known truth: the hallucination rate before and after, the fraction of out-of-support
    samples removed and of in-support samples kept."""
    oos, keep = out_of_support.bool(), keep.bool()
    n_oos, n_in = int(oos.sum()), int((~oos).sum())
    return {"samples": int(oos.numel()), "hallucinated": n_oos, "rate_unfiltered": n_oos / max(1, oos.numel()),
            "rate_filtered": int((oos & keep).sum()) / max(1, int(keep.sum())),
            "removed_out_of_support": int((oos & ~keep).sum()) / n_oos if n_oos else float("nan"),
            "kept_in_support": int((~oos & keep).sum()) / n_in if n_in else float("nan")}


def support_mask(x: Tensor, modes: Tensor, std: float, k: float = 6.0) -> Tensor:
    """True for samples farther than ``k`` standard deviations from every mode (out of the data's support)."""
    return mode_distance(x, modes) > k * std

