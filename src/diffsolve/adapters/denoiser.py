"""Model adapter: any network parameterisation -> (x0, eps) predictions on any process, and the model protocol.

``Denoiser(net, process, prediction)`` wraps ``net(x, model_time, **kwargs)``; the conversions come from the
parameterisation table (``adapters.parameterisation``).  Solver arithmetic is float64; the network runs in its
own dtype.  Anything with the ``Model`` protocol (a ``process``, ``evaluate`` returning a lazy ``Prediction``,
and ``identity``) samples like a ``Denoiser``: guidance is written as a wrapper (``ModelWrapper``) around one.

For a process with an offset (x_t = alpha x0 + b(t) y + sigma eps), solvers work in the standard frame
x - b(t) y: ``evaluate`` takes that state, calls the network at x + b(t) y with y from the model keyword
``process.offset_key``, and converts in the standard frame.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Tuple, Union, runtime_checkable

import torch

from ..processes import NoiseProcess
from .parameterisation import Coeffs, edm_coefficients, edm_noise_time, get_parameterisation

Tensor = torch.Tensor


class NonFiniteError(ValueError):
    """The network returned NaN or inf."""


def state_dtype(device: torch.device) -> torch.dtype:
    """The dtype of solver states: float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


class Prediction:
    """A model evaluation at state x with coefficients (alpha, sigma); x0 and eps are derived lazily
    from whichever the network gave (x = alpha x0 + sigma eps), so solvers pay only for what they use.
    ``net_input`` is (network input, network time) when the model knows them (for calibration hooks)."""

    __slots__ = ("x", "alpha", "sigma", "_x0", "_eps", "net_input")

    def __init__(self, x: Tensor, alpha, sigma, x0: Optional[Tensor] = None, eps: Optional[Tensor] = None,
                 net_input: Optional[Tuple[Tensor, Tensor]] = None):
        self.x, self.alpha, self.sigma, self._x0, self._eps = x, alpha, sigma, x0, eps
        self.net_input = net_input

    @property
    def native(self) -> str:
        """'x0' or 'eps': the form that needs no conversion."""
        return "x0" if self._eps is None else "eps"

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._x0 = _affine(self.x, self._eps, -self.sigma, self.alpha)  # type: ignore[arg-type]
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._eps = _affine(self.x, self._x0, -self.alpha, self.sigma)  # type: ignore[arg-type]
        return self._eps


def _affine(x: Tensor, y: Tensor, c, d) -> Tensor:
    """(x + c y) / d in two passes (c, d floats or broadcastable tensors)."""
    if isinstance(c, Tensor):
        return (x + c * y) / d
    return torch.add(x, y, alpha=c).div_(d)


@runtime_checkable
class Model(Protocol):
    """What samplers, the tuner and the bench need of a model.

    * ``process``: the noise process it was trained on;
    * ``evaluate(x, t, kwargs, coeffs)``: one evaluation at state ``x`` (solver dtype) and process time ``t``
      (float or [B]) as a lazy ``Prediction``; ``coeffs`` = (alpha, sigma) floats at a scalar ``t`` when known;
    * ``identity()``: a JSON-able description (process, prediction, guidance scale, ...) that profiles and
      statistics are checked against.
    """

    process: NoiseProcess

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Mapping[str, Any],
                 coeffs: Optional[Tuple[float, float]] = None) -> Prediction: ...

    def identity(self) -> Dict[str, Any]: ...


def coefficients(process: NoiseProcess, x: Tensor, t: Tensor, coeffs: Optional[tuple] = None):
    """(alpha, sigma) at ``t`` in ``x``'s dtype: floats for a scalar t with known ``coeffs``, else tensors
    broadcastable against x."""
    if coeffs is not None and not t.dim():
        return coeffs[0], coeffs[1]
    a = process.alpha(t).to(device=x.device, dtype=x.dtype)
    s = process.sigma(t).to(device=x.device, dtype=x.dtype)
    if t.dim():
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = a.reshape(shape), s.reshape(shape)
    return a, s


class Denoiser:
    """Wraps ``net(x, t, **kwargs)`` into exact (x0, eps) predictions for ``process``.

    Args:
        net: the frozen network; called as ``net(x, model_time, **model_kwargs)`` with ``x`` in the
            network's dtype and ``model_time`` a float tensor of shape [B].
        process: the noise process the network was trained on.
        prediction: what the network outputs (``ds.adapters.PREDICTIONS``).
        model_time: optional map from process time to the network's time input
            (default ``process.model_time``; for ``prediction='edm'`` the default is c_noise = log(s)/4).
        sigma_data: EDM preconditioning's data std (default: ``process.sigma_data`` or 0.5).
        dtype: dtype the network is called in (default: its first parameter's dtype, else float32).
        sample_shape: the shape of one sample, when known (checkpoints set it).
        config: the checkpoint's configuration, when loaded from one.

    Classifier-free guidance is a wrapper: ``ds.ClassifierFreeGuidance(den, scale, uncond_kwargs)``.
    ``nfe`` counts network calls.  Gradients: the network runs under the caller's grad mode (``ds.sample``
    runs without graphs unless ``grad=True``; gradient-based wrappers enable them locally).
    """

    def __init__(self, net: Callable[..., Tensor], process: NoiseProcess, prediction: str = "epsilon",
                 model_time: Optional[Callable[[Tensor], Tensor]] = None, sigma_data: Optional[float] = None,
                 dtype: Optional[torch.dtype] = None, check_finite: bool = True,
                 sample_shape: Optional[Tuple[int, ...]] = None, config: Optional[Dict[str, Any]] = None):
        param = get_parameterisation(prediction)
        if not isinstance(process, NoiseProcess):
            raise TypeError(f"process must be a diffsolve NoiseProcess, got {type(process).__name__}")
        if param.needs_offset and process.offset_key is None:
            raise ValueError(f"prediction {param.name!r} needs a process with an offset (x_t = a x0 + b y + c eps: "
                             f"ds.Shifted, MeanReverting, RDDM, ResShift), not {process!r}")
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t, **kwargs), got {type(net).__name__}")
        self.net, self.process, self.param = net, process, param
        self.prediction = param.name
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(process, "sigma_data", 0.5))
        if model_time is None:
            model_time = (lambda t: edm_noise_time(self.process.sigma_ve(t))) if param.preconditioned \
                else process.model_time
        self.model_time = model_time
        if dtype is None:
            p = next(iter(net.parameters()), None) if isinstance(net, torch.nn.Module) else None
            dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        self.dtype = dtype
        self.check_finite = check_finite
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else None
        self.config: Dict[str, Any] = dict(config or {})
        self.nfe = 0  # network calls made through this adapter

    # ------------------------------------------------------------------------------
    def identity(self) -> Dict[str, Any]:
        return {"process": self.process.config(), "prediction": self.prediction, "guidance_scale": 1.0}

    def call_network(self, x: Tensor, t: Tensor, kwargs: Mapping[str, Any]) -> Tuple[Tensor, Tensor]:
        """One network call at network input ``x`` (any dtype) and process time ``t``; returns
        (raw output, network time)."""
        b = x.shape[0]
        tm = torch.as_tensor(self.model_time(t), dtype=torch.float64).to(x.device)
        tm = tm.expand(b) if tm.dim() == 0 else tm
        out = self.net(x.to(self.dtype), tm.to(self.dtype), **kwargs)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"network returned shape {got}, expected {tuple(x.shape)} (same as its input)")
        return out, tm

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        """One network evaluation as a ``Prediction`` whose x0 / eps are converted on first use.

        Arithmetic happens in ``x.dtype`` (the solver state); the network runs in ``self.dtype``.
        """
        kwargs = kwargs if kwargs is not None else {}
        sd = x.dtype
        t = torch.as_tensor(t, dtype=torch.float64)
        p = self.process
        a, s = coefficients(p, x, t, coeffs)
        x_net = x
        y = None
        if p.offset_key is not None:
            y = kwargs.get(p.offset_key)
            if y is None:
                raise ValueError(f"the process has an offset: pass its conditioning as model_kwargs[{p.offset_key!r}]")
            y = y.to(x)
            b_t = p.offset(t)
            b: Any = float(b_t) if not t.dim() else b_t.to(x).reshape((-1,) + (1,) * (x.dim() - 1))
            x_net = x + b * y
        c = Coeffs(a, s, sigma_data=self.sigma_data, y=y)
        if self.param.needs_rates:
            da: Any = p.d_alpha(t)
            ds_: Any = p.d_sigma(t)
            if isinstance(a, Tensor):
                da, ds_ = da.to(a).reshape(a.shape), ds_.to(a).reshape(a.shape)
            else:
                da, ds_ = float(da), float(ds_)
            c = c._replace(d_alpha=da, d_sigma=ds_)
        if self.param.preconditioned:
            x_net = x_net * (edm_coefficients(torch.as_tensor(s / a), self.sigma_data)["c_in"] / a)
        raw, tm = self.call_network(x_net, t, kwargs)
        out = raw.to(sd)
        self._check(out, t)
        inputs = (x_net, tm)
        if self.param.native == "eps":
            return Prediction(x, a, s, eps=out, net_input=inputs)
        if self.param.native == "x0":
            return Prediction(x, a, s, x0=out, net_input=inputs)
        x0, eps = self.param.to_x0_eps(out, x, c)
        return Prediction(x, a, s, x0=x0, eps=eps, net_input=inputs)

    def predict_lazy(self, x: Tensor, t: Union[float, Tensor], model_kwargs: Mapping[str, Any],
                     coeffs: Optional[tuple] = None) -> Prediction:
        """``evaluate`` under its former name."""
        return self.evaluate(x, t, model_kwargs, coeffs)

    def predict(self, x: Tensor, t: Union[float, Tensor], **kwargs: Any) -> Tuple[Tensor, Tensor]:
        """Return (x0, eps) at state ``x`` (any dtype) and process time ``t`` (scalar or [B])."""
        pred = self.evaluate(x.to(state_dtype(x.device)), t, kwargs)
        return pred.x0, pred.eps

    def _check(self, out: Tensor, t: Tensor) -> None:
        # one reduction: NaN and inf propagate into the sum
        if self.check_finite and not torch.isfinite(out.sum()):
            tv = t.flatten()[0].item()
            raise NonFiniteError(f"network output is not finite at t={tv:.6g} (model time "
                                 f"{float(torch.as_tensor(self.model_time(t)).flatten()[0]):.6g})")

    def convert(self, out: Tensor, x: Tensor, t: Tensor, a: Tensor, s: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Map a raw network output in this adapter's parameterisation to (x0, eps)."""
        c = Coeffs(a, s, self.process.d_alpha(t).to(a), self.process.d_sigma(t).to(a), self.sigma_data)
        return self.param.to_x0_eps(out, x, c)

    def __call__(self, x: Tensor, t, **kwargs) -> Tensor:
        """The denoised estimate x0(x, t)."""
        return self.predict(x, t, **kwargs)[0]

    def __repr__(self) -> str:
        return f"Denoiser({type(self.net).__name__}, {self.process!r}, prediction={self.prediction!r})"


class ModelWrapper:
    """Base of models built on another model (guidance, quantisation, ...): everything but ``evaluate`` is the
    inner model's; ``identity`` adds this wrapper's ``describe()``."""

    def __init__(self, inner: Model):
        if not isinstance(inner, Model):
            raise TypeError(f"expected a model (process, evaluate, identity), got {type(inner).__name__}")
        self.inner = inner

    @property
    def process(self) -> NoiseProcess:  # type: ignore[override]
        return self.inner.process

    def describe(self) -> Dict[str, Any]:
        return {"kind": type(self).__name__}

    def identity(self) -> Dict[str, Any]:
        ident = dict(self.inner.identity())
        ident["wrappers"] = list(ident.get("wrappers", [])) + [self.describe()]
        return ident

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        return self.inner.evaluate(x, t, kwargs if kwargs is not None else {}, coeffs)

    def predict(self, x: Tensor, t: Union[float, Tensor], **kwargs: Any) -> Tuple[Tensor, Tensor]:
        pred = self.evaluate(x.to(state_dtype(x.device)), t, kwargs)
        return pred.x0, pred.eps

    def __call__(self, x: Tensor, t, **kwargs) -> Tensor:
        return self.predict(x, t, **kwargs)[0]

    def __getattr__(self, name: str) -> Any:  # sample_shape, config, nfe, dtype, net ... of the inner model
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class Conditioned(ModelWrapper):
    """``model`` with fixed keyword inputs (class labels, a text embedding) bound to it, so that anything that
    calls a model without kwargs (a teacher, a peer's loop, the tuner) evaluates the conditional model.

    A bound tensor of batch 1 is broadcast; a bound tensor of batch B pairs its rows with the first rows of the
    state (an evaluation on the first n samples uses the first n values).  Inputs passed at call time win."""

    def __init__(self, inner: Model, kwargs: Mapping[str, Any]):
        super().__init__(inner)
        self.bound = dict(kwargs)

    def describe(self) -> Dict[str, Any]:
        return {"kind": "conditioned", "inputs": sorted(self.bound)}

    def _kwargs(self, b: int, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in self.bound.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] != 1:
                if v.shape[0] < b:
                    raise ValueError(f"bound input {k!r} has {v.shape[0]} rows, the state {b}")
                v = v[:b]
            elif isinstance(v, Tensor) and v.dim() > 0:
                v = v.expand(b, *v.shape[1:])
            out[k] = v
        out.update(kwargs)
        return out

    def evaluate(self, x: Tensor, t: Union[float, Tensor], kwargs: Optional[Mapping[str, Any]] = None,
                 coeffs: Optional[tuple] = None) -> Prediction:
        return self.inner.evaluate(x, t, self._kwargs(x.shape[0], kwargs or {}), coeffs)


def base_model(model: Model) -> Model:
    """The innermost model under any wrappers."""
    while isinstance(model, ModelWrapper):
        model = model.inner
    return model


def outputs_from(x0: Tensor, eps: Tensor, process: NoiseProcess, t: Tensor, prediction: str,
                 sigma_data: float = 0.5, y: Optional[Tensor] = None) -> Tensor:
    """Inverse of the conversion: what a network of the given parameterisation would output (``y``: the
    conditioning of a process with an offset, for the residual prediction)."""
    param = get_parameterisation(prediction)
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = process.alpha(t).to(x0), process.sigma(t).to(x0)
    c = Coeffs(a, s, process.d_alpha(t).to(x0), process.d_sigma(t).to(x0), sigma_data,
               y.to(x0) if y is not None else None)
    x = a * x0 + s * eps
    return param.from_x0_eps(x0, eps, x, c)


def with_network(model: Model, wrap: Callable[[Callable[..., Tensor]], Callable[..., Tensor]]) -> Model:
    """A copy of ``model`` (wrappers included) whose base ``Denoiser`` calls ``wrap(net)`` instead of ``net``
    (counting, timing, quantised networks)."""
    import copy

    if isinstance(model, ModelWrapper):
        out = copy.copy(model)
        out.inner = with_network(model.inner, wrap)
        return out
    if not isinstance(model, Denoiser):
        raise TypeError(f"with_network needs a Denoiser at the base, got {type(model).__name__}")
    out = copy.copy(model)
    out.net = wrap(model.net)
    out.nfe = 0
    return out
