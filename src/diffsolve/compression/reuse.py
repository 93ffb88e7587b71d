"""Feature reuse across adjacent sampling steps, training-free (A-SDM's feature inheritance, arXiv:2406.00210;
DeepCache, arXiv:2312.00858; diffusers' cache hooks do the same for transformers).

``feature_reuse(model, depth=1, interval=2)`` returns a copy of the model whose UNet computes its deep levels only
on every ``interval``-th call of a trajectory and, in between, reuses the deep feature of the last full call: only
the ``depth`` shallowest down and up levels run (``models.FeatureCache``).  A trajectory is recognised by its times
falling from call to call; a call at a later time than the previous one, or with another batch size, starts afresh
with a full call.  ``flops`` counts the network's floating-point operations of a sampling run (torch's
``FlopCounterMode``), so the saving is measured, not estimated.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch import nn

from ..adapters.denoiser import Model, base_model, with_network
from ..models.unet import FeatureCache, UNet

Tensor = torch.Tensor


class ReusingUNet(nn.Module):
    """A UNet that reuses its deep features on all but every ``interval``-th call of a trajectory."""

    def __init__(self, net: UNet, depth: int = 1, interval: int = 2):
        super().__init__()
        if not isinstance(net, UNet):
            raise TypeError(f"feature reuse needs a diffsolve UNet, got {type(net).__name__}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 1 <= depth < len(net.config.channel_mult):
            raise ValueError(f"depth must lie in 1 .. {len(net.config.channel_mult) - 1} for this UNet, got {depth}")
        self.net, self.interval = net, int(interval)
        self.cache = FeatureCache(depth)
        self.calls, self.full_calls = 0, 0
        self._k = 0
        self._last_t = float("inf")

    @property
    def config(self):
        return self.net.config

    def reset(self) -> None:
        self._k, self._last_t, self.cache.feature = 0, float("inf"), None

    def forward(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        tv = float(torch.as_tensor(t).reshape(-1)[0])
        if tv > self._last_t or (self.cache.feature is not None and self.cache.feature.shape[0] != x.shape[0]):
            self.reset()
        self._last_t = tv
        self.cache.reuse = self._k % self.interval != 0
        self._k += 1
        self.calls += 1
        self.full_calls += int(not self.cache.reuse or self.cache.feature is None)
        return self.net(x, t, *args, cache=self.cache, **kwargs)


def feature_reuse(model: Model, depth: int = 1, interval: int = 2) -> Model:
    """A copy of ``model`` whose UNet reuses deep features between adjacent calls (see the module doc)."""
    net = getattr(base_model(model), "net", None)
    if not isinstance(net, nn.Module):
        raise TypeError("feature reuse needs a model whose base is a ds.Denoiser over a UNet")
    wrapped = ReusingUNet(net, depth, interval)
    return with_network(model, lambda _: wrapped)


def flops(run: Callable[[], Any]) -> Tuple[int, Any]:
    """(floating-point operations counted while ``run()`` executes, its result)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = run()
    return int(counter.get_total_flops()), out
