"""Model adapter: any network parameterisation -> (x0, eps) predictions on any process.

With x_t = alpha x0 + sigma eps the supported outputs convert as
  epsilon:  x0 = (x - sigma eps) / alpha
  x0:       eps = (x - alpha x0) / sigma
  v:        v = alpha eps - sigma x0 (Salimans & Ho 2022) -> x0 = (alpha x - sigma v)/(alpha^2+sigma^2)
  score:    eps = -sigma * score
  velocity: u = alpha' x0 + sigma' eps (= dx/dt, flow matching); solve the 2x2 system
  edm:      raw network F with EDM preconditioning (Karras et al. 2022) in the VE view
            x~ = x/alpha, s = sigma/alpha:  x0 = c_skip x~ + c_out F(c_in x~, c_noise(s))
Classifier-free guidance (Ho & Salimans 2022) mixes conditional and unconditional outputs of
one batched call.  Solver arithmetic is float64; the network runs in its own dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch

from .processes import NoiseProcess

Tensor = torch.Tensor
PREDICTIONS = ("epsilon", "x0", "v", "score", "velocity", "edm")
_ALIASES = {"eps": "epsilon", "noise": "epsilon", "sample": "x0", "data": "x0", "v_prediction": "v",
            "flow": "velocity", "v-prediction": "v"}


class NonFiniteError(ValueError):
    """The network returned NaN or inf."""


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class Denoiser:
    """Wraps ``net(x, t, **kwargs)`` into exact (x0, eps) predictions for ``process``.

    Args:
        net: the frozen network; called as ``net(x, model_time, **model_kwargs)`` with ``x`` in the
            network's dtype and ``model_time`` a float tensor of shape [B].
        process: the noise process the network was trained on.
        prediction: what the network outputs (see module doc).
        model_time: optional map from process time to the network's time input
            (default ``process.model_time``; for ``prediction='edm'`` the default is c_noise = log(s)/4).
        sigma_data: EDM preconditioning's data std (default: ``process.sigma_data`` or 0.5).
        guidance_scale: classifier-free guidance weight w (1 = conditional model only).
        uncond_kwargs: keyword arguments of the unconditional branch (e.g. the null label).
        dtype: dtype the network is called in (default: its first parameter's dtype, else float32).
    """

    def __init__(self, net: Callable[..., Tensor], process: NoiseProcess, prediction: str = "epsilon",
                 model_time: Optional[Callable[[Tensor], Tensor]] = None, sigma_data: Optional[float] = None,
                 guidance_scale: float = 1.0, uncond_kwargs: Optional[Mapping[str, Any]] = None,
                 dtype: Optional[torch.dtype] = None, check_finite: bool = True):
        prediction = _ALIASES.get(prediction, prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a diffsolve NoiseProcess, got {type(process).__name__}")
        if guidance_scale != 1.0 and uncond_kwargs is None:
            raise ValueError("classifier-free guidance needs uncond_kwargs (the unconditional inputs)")
        self.net, self.process, self.prediction = net, process, prediction
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5))
        if model_time is None:
            model_time = (lambda t: torch.log(self.process.sigma_ve(t)) / 4) if prediction == "edm" \
                else process.model_time
        self.model_time = model_time
        self.guidance_scale = float(guidance_scale)
        self.uncond_kwargs = dict(uncond_kwargs or {})
        if dtype is None:
            p = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        self.dtype = dtype
        self.check_finite = check_finite
        self.nfe = 0  # network evaluations since construction (or the last reset)

    # ------------------------------------------------------------------------------
    def _call_net(self, x: Tensor, t: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        """One network evaluation (CFG batched into the same call)."""
        b = x.shape[0]
        tm = torch.as_tensor(self.model_time(t), dtype=torch.float64).to(x.device)
        tm = tm.expand(b) if tm.dim() == 0 else tm
        xin = x.to(self.dtype)
        if self.guidance_scale == 1.0:
            out = self.net(xin, tm.to(self.dtype), **kwargs)
        else:
            kw = {}
            for k in set(kwargs) | set(self.uncond_kwargs):
                c, u = kwargs.get(k), self.uncond_kwargs.get(k)
                if isinstance(c, Tensor) and isinstance(u, Tensor):
                    kw[k] = torch.cat([c, u.expand_as(c) if u.shape[0] == 1 < c.shape[0] else u])
                else:
                    raise ValueError(f"guidance needs tensor conditional and unconditional values for {k!r}")
            both = self.net(torch.cat([xin, xin]), torch.cat([tm, tm]).to(self.dtype), **kw)
            cond, uncond = both[:b], both[b:]
            out = uncond + self.guidance_scale * (cond - uncond)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"network returned shape {got}, expected {tuple(x.shape)} (same as its input)")
        return out

    def predict(self, x: Tensor, t: Union[float, Tensor], **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Return (x0, eps) at state ``x`` (any dtype) and process time ``t`` (scalar or [B])."""
        pred = self.predict_lazy(x.to(_state_dtype(x.device)), t, kwargs)
        return pred.x0, pred.eps

    def predict_lazy(self, x: Tensor, t: Union[float, Tensor], model_kwargs: Mapping[str, Any],
                     coeffs: Optional[tuple] = None) -> "Prediction":
        """One network evaluation as a ``Prediction`` whose x0 / eps are converted on first use.

        ``coeffs`` = (alpha, sigma) floats at a scalar ``t`` when the caller already has them.
        Arithmetic happens in ``x.dtype`` (the solver state); the network runs in ``self.dtype``.
        """
        sd = x.dtype  # the solver's state dtype (float64 unless the caller chose otherwise)
        t = torch.as_tensor(t, dtype=torch.float64)
        p = self.process
        if coeffs is not None and not t.dim():
            a, s = coeffs
        else:
            a = p.alpha(t).to(device=x.device, dtype=sd)
            s = p.sigma(t).to(device=x.device, dtype=sd)
            if t.dim():
                shape = (-1,) + (1,) * (x.dim() - 1)
                a, s = a.reshape(shape), s.reshape(shape)
        if self.prediction == "edm":
            c = edm_coefficients(s / a, self.sigma_data)
            raw = self._call_net(x * (c["c_in"] / a), t, model_kwargs).to(sd)
            self._check(raw, t)
            return Prediction(x, a, s, x0=c["c_skip"] * (x / a) + c["c_out"] * raw)
        out = self._call_net(x, t, model_kwargs).to(sd)
        self._check(out, t)
        if self.prediction == "epsilon":
            return Prediction(x, a, s, eps=out)
        if self.prediction == "x0":
            return Prediction(x, a, s, x0=out)
        x0, eps = self.convert(out, x, t, a, s)
        return Prediction(x, a, s, x0=x0, eps=eps)

    def _check(self, out: Tensor, t: Tensor) -> None:
        # one reduction: NaN and inf propagate into the sum
        if self.check_finite and not torch.isfinite(out.sum()):
            tv = t.flatten()[0].item()
            raise NonFiniteError(f"network output is not finite at t={tv:.6g} (model time "
                                 f"{float(torch.as_tensor(self.model_time(t)).flatten()[0]):.6g})")

    def convert(self, out: Tensor, x: Tensor, t: Tensor, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """Map a raw network output in this adapter's parameterisation to (x0, eps)."""
        pr = self.prediction
        if pr == "epsilon":
            return (x - s * out) / a, out
        if pr == "x0":
            return out, (x - a * out) / s
        if pr == "v":
            n = a * a + s * s
            return (a * x - s * out) / n, (s * x + a * out) / n
        if pr == "score":
            eps = -s * out
            return (x - s * eps) / a, eps
        # velocity u = a' x0 + s' eps
        da, ds_ = self.process.d_alpha(t), self.process.d_sigma(t)
        if isinstance(a, Tensor):
            da, ds_ = da.to(a).reshape(a.shape), ds_.to(a).reshape(a.shape)
        else:  # float coefficients from predict_lazy at a scalar t
            da, ds_ = float(da), float(ds_)
        det = a * ds_ - s * da
        return (ds_ * x - s * out) / det, (a * out - da * x) / det

    def __call__(self, x: Tensor, t, **kwargs) -> Tensor:
        """The denoised estimate x0(x, t)."""
        return self.predict(x, t, **kwargs)[0]


class Prediction:
    """A model evaluation at state x with coefficients (alpha, sigma); x0 and eps are derived lazily
    from whichever the network gave (x = alpha x0 + sigma eps), so solvers pay only for what they use."""

    __slots__ = ("x", "alpha", "sigma", "_x0", "_eps")

    def __init__(self, x: Tensor, alpha, sigma, x0: Optional[Tensor] = None, eps: Optional[Tensor] = None):
        self.x, self.alpha, self.sigma, self._x0, self._eps = x, alpha, sigma, x0, eps

    @property
    def native(self) -> str:
        """'x0' or 'eps': the form that needs no conversion."""
        return "x0" if self._eps is None else "eps"

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._x0 = _affine(self.x, self._eps, -self.sigma, self.alpha)
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._eps = _affine(self.x, self._x0, -self.alpha, self.sigma)
        return self._eps


def _affine(x: Tensor, y: Tensor, c, d) -> Tensor:
    """(x + c y) / d in two passes (c, d floats or broadcastable tensors)."""
    if isinstance(c, Tensor):
        return (x + c * y) / d
    return torch.add(x, y, alpha=c).div_(d)


def outputs_from(x0: Tensor, eps: Tensor, process: NoiseProcess, t: Tensor, prediction: str) -> Tensor:
    """Inverse of ``Denoiser.convert``: what a network of the given parameterisation would output."""
    prediction = _ALIASES.get(prediction, prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = process.alpha(t).to(x0), process.sigma(t).to(x0)
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    if prediction == "velocity":
        return process.d_alpha(t).to(x0) * x0 + process.d_sigma(t).to(x0) * eps
    raise ValueError(f"no closed-form output for prediction {prediction!r}")


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> dict:
    """EDM preconditioning scalars (Karras et al. 2022, Table 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    return {"c_skip": sigma_data**2 / (sigma**2 + sigma_data**2),
            "c_out": sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2),
            "c_in": 1 / torch.sqrt(sigma**2 + sigma_data**2),
            "c_noise": torch.log(sigma) / 4}

