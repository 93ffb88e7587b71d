"""Measurement operators y = A(x) + sigma_y n for inverse problems.

An ``Operator`` maps a batch x [B, *in_shape] to y [B, *out_shape].  Linear operators also give the adjoint
A^T, the pseudo-inverse A^+, the prox of the data term and, when asked, their dense matrix and SVD (computed
once from the matrix for small problems; structured operators override them with closed forms).  Non-linear
operators (``Function``) give A only: the gradient-based methods differentiate through them with autograd.

==================  ===========================================  ================================================
operator            A                                            closed forms
==================  ===========================================  ================================================
``Identity``        x (denoising)                                all
``Mask``            keep the pixels where mask = 1 (inpainting)  A^T, A^+, prox, SVD (0/1 singular values)
``Dense``           M x, M [m, d] (compressed sensing, ...)      from M (SVD by ``torch.linalg.svd``)
``AvgPool``         mean over f x f blocks (super-resolution)    A^T, A^+ (A A^T = I / f^2), prox
``GaussianBlur``    circular convolution with a Gaussian kernel  A^T, prox (FFT-diagonal); A^+ with a cut-off
``Function``        any differentiable callable                  none (non-linear)
==================  ===========================================  ================================================
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
DT = torch.float64


class Operator:
    """A forward operator between data [*in_shape] and measurements [*out_shape] (batched on the first axis)."""

    linear: bool = True

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        self.in_shape, self.out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
        self._svd: Optional[Tuple[Tensor, Tensor, Tensor]] = None

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    def __call__(self, x: Tensor) -> Tensor:
        self._check(x, self.in_shape, "x")
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """A^T y (by autograd of <A x, y> for operators without a closed form)."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is non-linear: it has no adjoint")
        self._check(y, self.out_shape, "y")
        x = torch.zeros((y.shape[0],) + self.in_shape, dtype=y.dtype, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad((self.forward(x) * y).sum(), x)
        return g

    def matrix(self) -> Tensor:
        """The dense matrix [out_dim, in_dim] (float64), from A applied to the unit vectors."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is non-linear: it has no matrix")
        eye = torch.eye(self.in_dim, dtype=DT).reshape((self.in_dim,) + self.in_shape)
        return self.forward(eye).reshape(self.in_dim, self.out_dim).T.contiguous()

    def svd(self) -> Tuple[Tensor, Tensor, Tensor]:
        """(U [m, r], S [r], V [d, r]) with A = U diag(S) V^T, singular values > 0 only, descending."""
        if self._svd is None:
            U, S, Vh = torch.linalg.svd(self.matrix(), full_matrices=False)
            keep = S > S.max().clamp_min(1e-300) * 1e-10 if S.numel() else S > 0
            self._svd = (U[:, keep], S[keep], Vh[keep].T)
        return self._svd

    def _svd_for(self, what: str) -> Tuple[Tensor, Tensor, Tensor]:
        """The SVD, or a clear error naming what needed it."""
        try:
            return self.svd()
        except (NotImplementedError, TypeError, RuntimeError) as e:
            raise TypeError(f"{type(self).__name__} gives no SVD, which {what} needs: {e}") from e

    def pinv(self, y: Tensor) -> Tensor:
        """The pseudo-inverse A^+ y (least-norm least-squares), by the SVD unless overridden."""
        self._check(y, self.out_shape, "y")
        U, S, V = self._svd_for("the pseudo-inverse A^+")
        yf = y.reshape(y.shape[0], -1).to(DT)
        return (((yf @ U) / S) @ V.T).reshape((y.shape[0],) + self.in_shape).to(y.dtype)

    def prox(self, x0: Tensor, y: Tensor, rho: float | Tensor) -> Tensor:
        """argmin_x ||y - A x||^2 + rho ||x - x0||^2 = (A^T A + rho I)^{-1} (A^T y + rho x0), by the SVD."""
        U, S, V = self._svd_for("the prox of the data term")
        b = (self.adjoint(y) + _bcast(rho, x0) * x0).reshape(x0.shape[0], -1).to(DT)
        r = torch.as_tensor(rho, dtype=DT).reshape(-1, 1)
        bv = b @ V
        out = (b - bv @ V.T) / r + (bv / (S**2 + r)) @ V.T
        return out.reshape(x0.shape).to(x0.dtype)

    def _check(self, v: Tensor, shape: Tuple[int, ...], name: str) -> None:
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
        if tuple(v.shape[1:]) != shape:
            raise ValueError(f"{type(self).__name__}: {name} must be [B, {', '.join(map(str, shape))}], "
                             f"got {list(v.shape)}")


def _bcast(v, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, dtype=like.dtype)
    return v.reshape((-1,) + (1,) * (like.dim() - 1)) if v.dim() else v


class Identity(Operator):
    """A = I: denoising."""

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape, shape)

    def forward(self, x):
        return x

    def adjoint(self, y):
        return y

    def pinv(self, y):
        return y

    def prox(self, x0, y, rho):
        r = _bcast(rho, x0)
        return (y + r * x0) / (1 + r)

    def svd(self):
        n = self.in_dim
        return torch.eye(n, dtype=DT), torch.ones(n, dtype=DT), torch.eye(n, dtype=DT)


class Mask(Operator):
    """Inpainting: y = the entries of x where ``mask`` is True (a flat vector of the observed entries)."""

    def __init__(self, mask: Tensor):
        m = torch.as_tensor(mask).bool()
        self.mask = m
        self.index = torch.nonzero(m.flatten()).flatten()
        if self.index.numel() == 0:
            raise ValueError("the inpainting mask observes nothing")
        super().__init__(m.shape, (int(self.index.numel()),))

    @classmethod
    def box(cls, shape: Sequence[int], size: int, center: Optional[Tuple[int, int]] = None) -> "Mask":
        """Hide a size x size box (default: the centre) of images [C, H, W]."""
        C, H, W = shape
        if not 0 < size < min(H, W):
            raise ValueError(f"box size must be in (0, {min(H, W)}), got {size}")
        cy, cx = center if center is not None else (H // 2, W // 2)
        m = torch.ones(C, H, W, dtype=torch.bool)
        y0, x0 = max(0, cy - size // 2), max(0, cx - size // 2)
        m[:, y0:y0 + size, x0:x0 + size] = False
        return cls(m)

    @classmethod
    def random(cls, shape: Sequence[int], missing: float, seed: int = 0) -> "Mask":
        """Hide a random ``missing`` fraction of the entries (the same for every channel of an image)."""
        if not 0 <= missing < 1:
            raise ValueError(f"missing fraction must be in [0, 1), got {missing}")
        g = torch.Generator().manual_seed(seed)
        plane = tuple(shape[1:]) if len(shape) == 3 else tuple(shape)
        keep = torch.rand(plane, generator=g) >= missing
        return cls(keep.expand(tuple(shape)).clone() if len(shape) == 3 else keep)

    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, self.index]

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        x = torch.zeros((y.shape[0], self.in_dim), dtype=y.dtype)
        x[:, self.index] = y
        return x.reshape((y.shape[0],) + self.in_shape)

    def pinv(self, y):
        return self.adjoint(y)

    def prox(self, x0, y, rho):
        r = _bcast(rho, x0)
        m = self.mask.to(x0.dtype)
        return (self.adjoint(y) + r * x0) / (m + r)

    def svd(self):
        d, m = self.in_dim, self.out_dim
        V = torch.zeros(d, m, dtype=DT)
        V[self.index, torch.arange(m)] = 1.0
        return torch.eye(m, dtype=DT), torch.ones(m, dtype=DT), V


class Dense(Operator):
    """y = M x for a matrix M [m, d] (x flattened), e.g. compressed sensing."""

    def __init__(self, M: Tensor, in_shape: Optional[Sequence[int]] = None):
        M = torch.as_tensor(M, dtype=DT)
        if M.dim() != 2:
            raise ValueError(f"Dense needs a matrix [m, d], got shape {list(M.shape)}")
        if not torch.isfinite(M).all():
            raise ValueError("the operator matrix has non-finite entries")
        shape = tuple(in_shape) if in_shape is not None else (M.shape[1],)
        if math.prod(shape) != M.shape[1]:
            raise ValueError(f"in_shape {shape} does not have {M.shape[1]} entries")
        self.M = M
        super().__init__(shape, (M.shape[0],))

    @classmethod
    def gaussian(cls, m: int, in_shape: Sequence[int], seed: int = 0) -> "Dense":
        """Compressed sensing: i.i.d. N(0, 1/m) entries."""
        d = math.prod(in_shape)
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(m, d, generator=g, dtype=DT) / math.sqrt(m), in_shape)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self.M.T.to(x.dtype)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return (y @ self.M.to(y.dtype)).reshape((y.shape[0],) + self.in_shape)

    def matrix(self):
        return self.M


class AvgPool(Operator):
    """Super-resolution: the mean over f x f blocks of images [C, H, W] (H, W divisible by f)."""

    def __init__(self, shape: Sequence[int], factor: int):
        C, H, W = shape
        if factor < 1 or H % factor or W % factor:
            raise ValueError(f"factor {factor} must divide the image size {H}x{W}")
        self.f = int(factor)
        super().__init__(shape, (C, H // factor, W // factor))

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, self.f)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return y.repeat_interleave(self.f, -2).repeat_interleave(self.f, -1) / self.f**2

    def pinv(self, y):  # A A^T = I / f^2
        return self.adjoint(y) * self.f**2

    def prox(self, x0, y, rho):  # (A^T A + rho)^{-1} b with A^T A = P / f^2, P the block-mean projector
        r = _bcast(rho, x0)
        b = self.adjoint(y) + r * x0
        pb = self.adjoint(self.forward(b)) * self.f**2
        return (b - pb) / r + pb / (1.0 / self.f**2 + r)


class GaussianBlur(Operator):
    """Circular convolution of images [C, H, W] with a normalised Gaussian kernel (``size`` x ``size``,
    std ``sigma``); diagonal in the 2-D Fourier basis."""

    def __init__(self, shape: Sequence[int], sigma: float = 1.0, size: int = 7):
        C, H, W = shape
        if sigma <= 0 or size < 1 or size > min(H, W):
            raise ValueError(f"blur needs sigma > 0 and 1 <= size <= {min(H, W)}")
        ax = torch.arange(size, dtype=DT) - (size - 1) / 2
        k1 = torch.exp(-ax**2 / (2 * sigma**2))
        k = torch.outer(k1, k1)
        k = k / k.sum()
        pad = torch.zeros(H, W, dtype=DT)
        pad[:size, :size] = k
        pad = torch.roll(pad, (-(size // 2), -(size // 2)), (0, 1))  # centred at (0, 0)
        self.kernel = k
        self.otf = torch.fft.fft2(pad)
        super().__init__(shape, shape)

    def _apply(self, x: Tensor, otf: Tensor) -> Tensor:
        return torch.fft.ifft2(torch.fft.fft2(x.to(DT)) * otf).real.to(x.dtype)

    def forward(self, x):
        return self._apply(x, self.otf)

    def adjoint(self, y):
        self._check(y, self.out_shape, "y")
        return self._apply(y, self.otf.conj())

    def pinv(self, y, cutoff: float = 1e-3):
        self._check(y, self.out_shape, "y")
        mag2 = self.otf.abs() ** 2
        inv = torch.where(mag2 > cutoff**2, self.otf.conj() / mag2.clamp_min(1e-300), torch.zeros_like(self.otf))
        return self._apply(y, inv)

    def prox(self, x0, y, rho):
        r = torch.as_tensor(rho, dtype=DT)
        if r.dim():
            r = r.reshape(-1, 1, 1, 1)
        b = torch.fft.fft2(self.adjoint(y).to(DT) + r * x0.to(DT))
        return torch.fft.ifft2(b / (self.otf.abs() ** 2 + r)).real.to(x0.dtype)


class Function(Operator):
    """A non-linear (or matrix-free) differentiable operator ``fn(x [B, *in_shape]) -> [B, *out_shape]``."""

    linear = False

    def __init__(self, fn: Callable[[Tensor], Tensor], in_shape: Sequence[int], out_shape: Sequence[int],
                 linear: bool = False):
        super().__init__(in_shape, out_shape)
        self.fn, self.linear = fn, bool(linear)

    def forward(self, x):
        y = self.fn(x)
        if tuple(y.shape) != (x.shape[0],) + self.out_shape:
            raise ValueError(f"the operator returned {list(y.shape)}, expected [B, {', '.join(map(str, self.out_shape))}]")
        return y
