"""Image-restoration quality: PSNR, SSIM, a LeNet-feature distance, posterior spread and coverage, and the
measurement chi^2 of a reconstruction.

Images are batches [B, C, H, W] (a single [C, H, W] image is treated as B = 1); per-image metrics return a
tensor [B] (float64).  Posterior samples of one measurement are [K, C, H, W].

==========================  ========================================================================
metric                      definition
==========================  ========================================================================
``psnr``                    10 log10(R^2 / MSE), MSE the mean over pixels and channels, R the data range
``ssim``                    Wang et al. (2004), 7x7 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03
``lenet_feature_distance``  mean over the 84 features of (phi(x) - phi(x_true))^2, phi the shipped LeNet's
                            penultimate layer -- *not* LPIPS (no LPIPS weights can be loaded offline)
``posterior_std``           per-pixel standard deviation over K samples (unbiased, K - 1)
``coverage``                fraction of pixels whose truth lies in the per-pixel [5%, 95%] quantile
                            interval of the K samples (linear interpolation, ``torch.quantile``)
``chi2_per_dof``            ||y - A x||^2 / (m sigma_y^2), m the number of measurements
==========================  ========================================================================
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from ..inverse.operators import Operator

Tensor = torch.Tensor
DT = torch.float64
K1, K2 = 0.01, 0.03  # Wang et al. 2004
SSIM_WINDOW, SSIM_SIGMA = 7, 1.5


def _batch(x: Tensor, name: str = "x") -> Tensor:
    x = torch.as_tensor(x).detach().to("cpu", DT)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"{name} must be images [B, C, H, W] or [C, H, W], got shape {list(x.shape)}")
    return x


def _pair(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    x, ref = _batch(x), _batch(ref, "ref")
    if ref.shape[0] == 1 and x.shape[0] > 1:
        ref = ref.expand_as(x)
    if x.shape != ref.shape:
        raise ValueError(f"x {list(x.shape)} and ref {list(ref.shape)} must have the same shape")
    return x, ref


def mse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image mean squared error [B] (``ref`` [1, ...] is broadcast over the batch)."""
    x, ref = _pair(x, ref)
    return ((x - ref) ** 2).flatten(1).mean(1)


def psnr(x: Tensor, ref: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB, per image: 10 log10(R^2 / MSE(x, ref)); R = 2 for data in [-1, 1].

    Infinite where x equals ref."""
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return 10 * torch.log10(data_range**2 / mse(x, ref))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The normalised 2-D Gaussian window w[i, j] ∝ exp(-(i^2 + j^2) / (2 sigma^2)), centred, sum 1."""
    ax = torch.arange(size, dtype=DT) - (size - 1) / 2
    g = torch.exp(-ax**2 / (2 * sigma**2))
    w = torch.outer(g, g)
    return w / w.sum()


def ssim(x: Tensor, ref: Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW,
         sigma: Optional[float] = SSIM_SIGMA) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image [B], averaged over window positions and channels.

    With w the window (Gaussian of std ``sigma`` truncated to ``window`` x ``window`` and normalised, or uniform
    when ``sigma`` is None), local statistics mu = w * x, s_x^2 = w * x^2 - mu_x^2, s_xy = w * (x y) - mu_x mu_y
    (no N/(N-1) correction) at every position where the window fits inside the image ("valid", no padding):

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    C1 = (0.01 R)^2, C2 = (0.03 R)^2, R the data range.  SSIM(x, x) = 1.
    """
    x, ref = _pair(x, ref)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    b, c, h, w_ = x.shape
    if window < 1 or window > min(h, w_):
        raise ValueError(f"the SSIM window {window} does not fit images {h}x{w_}")
    win = gaussian_window(window, sigma) if sigma is not None else torch.full((window, window), 1.0 / window**2,
                                                                              dtype=DT)
    kernel = win.expand(c, 1, window, window)

    def filt(v: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(v, kernel, groups=c)

    mx, my = filt(x), filt(ref)
    sxx, syy, sxy = filt(x * x) - mx**2, filt(ref * ref) - my**2, filt(x * ref) - mx * my
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return smap.mean((2, 3)).mean(1)


def lenet_feature_distance(x: Tensor, ref: Tensor, metric=None) -> Tensor:
    """Per image: (1/84) ||phi(x) - phi(ref)||^2, phi the 84-dim penultimate layer of the LeNet-5 shipped with the
    MNIST model (``metrics.default_metric()``; images [B, 1, 28, 28] in [-1, 1], clamped).

    A perceptual-style distance for MNIST only.  It is NOT LPIPS: LPIPS needs pretrained AlexNet/VGG weights
    that cannot be loaded offline, and the two are not comparable."""
    from .metrics import default_metric

    x, ref = _pair(x, ref)
    net = (metric if metric is not None else default_metric()).net
    with torch.no_grad():
        fx = net.features(x.float().clamp(-1, 1)).to(DT)
        fr = net.features(ref.float().clamp(-1, 1)).to(DT)
    return ((fx - fr) ** 2).mean(1)


def _samples(samples: Tensor) -> Tensor:
    s = torch.as_tensor(samples).detach().to("cpu", DT)
    if s.dim() < 2:
        raise ValueError(f"samples must be [K, ...] with K >= 2, got shape {list(s.shape)}")
    if s.shape[0] < 2:
        raise ValueError("a posterior spread needs at least 2 samples")
    return s


def posterior_std(samples: Tensor) -> Tensor:
    """Per-pixel posterior spread [...]: sqrt(sum_k (x_k - mean)^2 / (K - 1)) over the K samples [K, ...]."""
    return _samples(samples).std(0, correction=1)


def quantile_interval(samples: Tensor, level: float = 0.9) -> tuple[Tensor, Tensor]:
    """The per-pixel central interval [q_(1-level)/2, q_(1+level)/2] of the samples [K, ...] (linear interpolation
    between order statistics, as ``torch.quantile``)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = _samples(samples)
    q = torch.quantile(s, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=DT), dim=0)
    return q[0], q[1]


def coverage(samples: Tensor, truth: Tensor, level: float = 0.9) -> float:
    """Fraction of pixels whose truth lies in the per-pixel ``level`` quantile interval of the K samples [K, ...]
    (default the 5%-95% interval): mean over pixels of 1[q_lo <= truth <= q_hi].

    A calibrated posterior gives about ``expected_coverage(K, level)``, which is below ``level`` for small K
    (the interval between sample quantiles is narrower than the true one): 0.70 at K = 8, 0.87 at K = 64."""
    lo, hi = quantile_interval(samples, level)
    t = torch.as_tensor(truth).detach().to("cpu", DT).reshape(lo.shape)
    return float(((t >= lo) & (t <= hi)).to(DT).mean())


def expected_coverage(k: int, level: float = 0.9) -> float:
    """The expected ``coverage`` when the truth and the K samples are i.i.d. from one continuous distribution:
    (h_hi - h_lo) / (K + 1), h = (K - 1) q the interpolated order-statistic positions, = level (K - 1) / (K + 1).
    Exact for uniform pixels, approximate otherwise (Gaussian pixels cover about 0.02 more at K = 8)."""
    if k < 2:
        raise ValueError("coverage needs at least 2 samples")
    return level * (k - 1) / (k + 1)


def chi2_per_dof(operator: Operator, x: Tensor, y: Tensor, sigma_y: float) -> Tensor:
    """Measurement chi^2 per degree of freedom, per image [B]: ||y - A x||^2 / (m sigma_y^2), m = dim(y).

    About 1 (± sqrt(2/m)) when x is the truth and y = A x + sigma_y n; much above 1: x does not explain y; much
    below 1: x over-fits the noise."""
    if not (math.isfinite(sigma_y) and sigma_y > 0):
        raise ValueError(f"chi^2 needs sigma_y > 0, got {sigma_y}")
    xb = torch.as_tensor(x).detach().to("cpu", DT)
    if tuple(xb.shape) == operator.in_shape:
        xb = xb[None]
    yb = torch.as_tensor(y).detach().to("cpu", DT)
    if tuple(yb.shape) == operator.out_shape:
        yb = yb[None]
    with torch.no_grad():
        r = (yb - operator(xb)).flatten(1)
    return (r**2).sum(1) / (operator.out_dim * sigma_y**2)


def restoration_metrics(samples: Tensor, truth: Optional[Tensor] = None, operator: Optional[Operator] = None,
                        y: Optional[Tensor] = None, sigma_y: Optional[float] = None, level: float = 0.9,
                        data_range: float = 2.0, lenet: Union[bool, object] = False) -> Dict[str, float]:
    """The summary of K posterior samples [K, C, H, W] of one measurement: quality of the posterior mean and
    of the samples (mean over samples) against ``truth``, spread, coverage, and measurement chi^2.

    ``lenet``: also the LeNet-feature distance (True: the shipped LeNet; or an ``FDLeNet``)."""
    s = _samples(samples)
    mean = s.mean(0, keepdim=True)
    out: Dict[str, float] = {"samples": int(s.shape[0]), "mean_std": float(posterior_std(s).mean())}
    if truth is not None:
        t = _batch(truth, "truth")
        out.update({
            "psnr_mean": float(psnr(mean, t, data_range)[0]),
            "psnr_samples": float(psnr(s, t, data_range).mean()),
            "ssim_mean": float(ssim(mean, t, data_range)[0]),
            "ssim_samples": float(ssim(s, t, data_range).mean()),
            "rmse_mean": float(mse(mean, t).sqrt()[0]),
            f"coverage_{round(100 * level)}": coverage(s, t, level),
            f"coverage_{round(100 * level)}_if_calibrated": expected_coverage(int(s.shape[0]), level),
        })
        if lenet is not False and s.shape[1:] == (1, 28, 28):
            metric = None if lenet is True else lenet
            out["lenet_feature_distance_mean"] = float(lenet_feature_distance(mean, t, metric)[0])
            out["lenet_feature_distance_samples"] = float(lenet_feature_distance(s, t, metric).mean())
    if operator is not None and y is not None and sigma_y is not None and sigma_y > 0:
        out["chi2_mean"] = float(chi2_per_dof(operator, mean, y, sigma_y)[0])
        out["chi2_samples"] = float(chi2_per_dof(operator, s, y, sigma_y).mean())
    return out
