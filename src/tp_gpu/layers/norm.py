"""LayerNorm over the last axis, run where its input lies: on the output device for the dense
activations of a transformer, on each device's slices of a sequence-parallel activation."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Hashable, Optional, Tuple

import numpy as np

from .. import collectives
from ..autograd import Context, Function
from ..backends import host_norm
from ..backends.base import Backend
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..parameter import ShardedParameter
from ..placements import HOST, Dense, Partial, Placement, Replicated, Split
from ..regions import place_like
from ..tensor import Blocks, Tensor, new_tensor, tensor
from .base import ParallelModule

__all__ = [
    "LayerNorm",
    "LayerNormFunction",
    "check_eps",
    "compute_dtype",
    "input_blocks",
    "row_mean",
    "column_sum",
    "normalise_blocks",
    "normalise_grads",
]


def check_eps(eps: Any) -> float:
    """Return ``eps`` as a float if it is a positive finite real number, else raise ConfigError."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype that statistics and softmaxes are computed in: float32 for float16, else ``dtype``."""
    dtype = dtype if isinstance(dtype, np.dtype) else np.dtype(dtype)
    return _FLOAT32 if dtype == np.float16 else dtype


_FLOAT32 = np.dtype(np.float32)


def input_blocks(x: Tensor, home: Hashable, backend: Backend, dtype: Any) -> Blocks:
    """The blocks an elementwise layer computes on, as ``dtype``: ``x``'s own, each where it lies; a
    host array's (``Dense`` on the host) moved to ``home``."""
    p = x.placement
    devices = [home] if isinstance(p, Dense) and p.device == HOST else list(x.blocks)
    return dict(zip(devices, collectives.to_devices(backend, list(x.blocks.values()), devices, dtype)))


def output_placement(x: Tensor, blocks: Blocks) -> Placement:
    """Where an elementwise layer's output of ``blocks`` lies: as ``x``, or beside a host ``x``'s block."""
    return Dense(next(iter(blocks))) if isinstance(x.placement, Dense) else x.placement


def check_placement(x: Tensor, what: str, last_axis: bool = True) -> None:
    """ShapeError unless ``x`` is whole (``Dense``, ``Replicated``) or split (on any axis but the last
    when not ``last_axis``): an elementwise layer of partial sums would be wrong."""
    p = x.placement
    if isinstance(p, Partial) or (not last_axis and isinstance(p, Split) and p.axis == x.ndim - 1):
        where = "any axis" if last_axis else "any axis but the last"
        raise ShapeError(f"{what} must be whole or split on {where}; got shape {x.shape} placed {p!r}")


class NormContext(Context):
    """What the backward of a normalisation (LayerNorm, RMSNorm) keeps: per device ``xhat`` and ``rstd``."""

    __slots__ = ("xhat", "rstd", "weight", "dtype")

    xhat: Blocks  # {d: (..., H)} in the compute dtype
    rstd: Blocks  # {d: (..., 1)}
    weight: Tensor  # placed beside the blocks
    dtype: np.dtype  # of the output


def normalise_blocks(
    ctx: NormContext, x: Tensor, weight: Tensor, dtype: np.dtype, kernel: Callable
) -> Tensor:
    """The forward of a normalisation: ``kernel(xp, block, d) -> (y, xhat, rstd)`` on each device's
    block of ``x`` (a host ``x`` moved beside ``weight``), ``xhat`` and ``rstd`` kept on ``ctx`` when a
    gradient is needed; ``y`` placed like ``x``."""
    backend = weight.backend
    assert backend is not None
    xs = input_blocks(x, next(iter(weight.blocks)), backend, dtype)  # {d: (..., H)}
    ys, xhats, rstds = {}, {}, {}
    for d, xb in xs.items():
        with backend.device(d):
            ys[d], xhats[d], rstds[d] = kernel(backend.xp, xb, d)
    if ctx.needs_input_grad:
        ctx.xhat, ctx.rstd, ctx.weight, ctx.dtype = xhats, rstds, weight, dtype
    return new_tensor(ys, output_placement(x, xs), x.shape, dtype, backend, weight.comm)


def normalise_grads(ctx: NormContext, grad: Tensor, kernel: Callable) -> Tuple[Optional[Tensor], ...]:
    """The backward of a normalisation: ``kernel(xp, dy, xhat, rstd, weight, dtype) -> (dx, dparam,
    ...)`` on each device's block of ``dy``; returns ``dX`` placed like ``dy``, then each parameter's
    gradient placed like the weight's (each only where needed, as ``ctx.needs_input_grad`` says)."""
    weight, dtype = ctx.weight, ctx.dtype
    backend = weight.backend
    assert backend is not None
    needs = ctx.needs_input_grad
    parts = {}
    for d, g in grad.blocks.items():
        with backend.device(d):
            parts[d] = kernel(backend.xp, g, ctx.xhat[d], ctx.rstd[d], weight.blocks[d], dtype)
    dx, *params = (dict(zip(parts, column)) for column in zip(*parts.values()))  # {d: block} each
    grad_x = new_tensor(dx, grad.placement, grad.shape, dtype, backend, grad.comm) if needs[0] else None
    return (grad_x, *(param_grad(weight, blocks, needs[k]) for k, blocks in enumerate(params, start=1)))


class LayerNormFunction(Function):
    """``y = xhat * weight + bias`` on each device's block of ``x``, beside ``weight`` and ``bias``
    placed there (:func:`~tp_gpu.regions.place_like`).

    Backward, per device, with ``g = dy * weight``: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``,
    ``dweight_d = sum(dy * xhat)`` and ``dbias_d = sum(dy)`` over the block's rows, placed like the
    weight's gradient (``Partial`` for a copied weight: the copy's backward adds them up).
    """

    ctx_class = NormContext

    @staticmethod
    def forward(
        ctx: NormContext, x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: np.dtype
    ) -> Tensor:
        return normalise_blocks(
            ctx,
            x,
            weight,
            dtype,
            lambda xp, xb, d: _normalise(xp, xb, weight.blocks[d], bias.blocks[d], eps, dtype),
        )

    @staticmethod
    def backward(ctx: NormContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        return (*normalise_grads(ctx, grad, _normalise_grad), None, None)  # dX, dweight, dbias; eps, dtype


def param_grad(placed: Tensor, blocks: Blocks, needed: bool) -> Optional[Tensor]:
    """A parameter's per-device gradient ``blocks``: ``Partial`` for a copy on each device, else as the
    parameter (``Dense`` on its device)."""
    if not needed:
        return None
    p = Partial(tuple(blocks)) if isinstance(placed.placement, Replicated) else placed.placement
    return new_tensor(blocks, p, placed.shape, placed.dtype, placed.backend, placed.comm)


def row_mean(xp: Any, a: Any) -> Any:
    """``mean(a, axis=-1, keepdims=True)`` ``(..., 1)``.

    On the host it is one BLAS product with a cached column of ``1/H``: at a few rows a NumPy
    ``mean`` costs more in its Python wrapper than in its sum. Elsewhere it is ``a.mean``.
    """
    if xp is not np:
        return a.mean(axis=-1, keepdims=True)
    return a @ _averaging_column(a.shape[-1], a.dtype)  # (..., H) @ (H, 1) -> (..., 1)


@functools.lru_cache(maxsize=64)
def _averaging_column(h: int, dtype: np.dtype) -> np.ndarray:
    """``(H, 1)`` of ``1/H`` in ``dtype``, read only."""
    column = np.full((h, 1), 1.0 / h, dtype=dtype)
    column.flags.writeable = False
    return column


def _normalise(xp: Any, x: Any, weight: Any, bias: Any, eps: float, out_dtype: np.dtype):
    """``(y, xhat, rstd)``: the output in ``out_dtype``, what backward needs in the compute dtype; in
    one compiled pass on host float32 and float64 arrays (:mod:`~tp_gpu.backends.host_norm`)."""
    if host_norm.serves(xp, out_dtype, x, weight, bias):
        return host_norm.layer_norm(x, weight, bias, eps)
    dtype = compute_dtype(out_dtype)
    xc = _as(x, dtype)  # (..., H)
    xc = xc - row_mean(xp, xc)  # a new array, normalised in place below
    rstd = (row_mean(xp, xc * xc) + dtype.type(eps)) ** -0.5  # (..., 1), of the variance biased as torch
    xc *= rstd  # xhat (..., H)
    y = xc * _as(weight, dtype)
    y += _as(bias, dtype)
    return _as(y, out_dtype), xc, rstd


def _as(a: Any, dtype: np.dtype) -> Any:
    """``a`` in ``dtype``: itself when it already is (a call of ``astype`` costs more at a few rows)."""
    return a if a.dtype == dtype else a.astype(dtype)


def _normalise_grad(xp: Any, grad: Any, xhat: Any, rstd: Any, weight: Any, out_dtype: np.dtype):
    """``(dx, dweight, dbias)`` from ``dy``: see :class:`LayerNormFunction`."""
    if host_norm.serves(xp, out_dtype, grad, xhat, rstd, weight):
        return host_norm.layer_norm_grad(grad, xhat, rstd, weight)
    dtype = compute_dtype(out_dtype)
    h = xhat.shape[-1]
    dy = _as(grad, dtype)
    dy_xhat = dy * xhat  # (..., H)
    dweight = column_sum(xp, dy_xhat.reshape(-1, h))  # (H,)
    dbias = column_sum(xp, dy.reshape(-1, h))  # (H,)
    w = _as(weight, dtype)
    g = dy * w  # (..., H)
    dy_xhat *= w  # g * xhat
    dx = g - row_mean(xp, g)
    dx -= xhat * row_mean(xp, dy_xhat)
    dx *= rstd
    return _as(dx, out_dtype), _as(dweight, out_dtype), _as(dbias, out_dtype)


def column_sum(xp: Any, a: Any) -> Any:
    """``a.sum(axis=0)`` of an ``(N, H)`` array, ``(H,)``; on the host as ``np.add.reduce``, without
    ``sum``'s Python wrapper."""
    return np.add.reduce(a, axis=0) if xp is np else a.sum(axis=0)


class LayerNorm(ParallelModule):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis (Ba et al., 2016).

    ``mean`` and the biased ``var`` are taken over the last axis of size
    ``normalized_shape``, as ``torch.nn.LayerNorm(normalized_shape, eps)``
    computes them. The parameters ``weight`` (ones) and ``bias`` (zeros) are
    kept whole on the group's output device, where the dense activations
    between tensor-parallel blocks live. Statistics are computed in float32
    for float16 input, else in the input dtype.

    Backward, with ``xhat = (x - mean) * rstd`` and ``rstd = 1 / sqrt(var + eps)``:
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over the leading axes, and
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * weight``.

    The layer runs where ``x`` lies (:class:`LayerNormFunction`): a dense ``x``
    on the output device (a host array is moved there), an ``x`` split on any
    axis but the last (the sequence, with sequence parallelism) on each
    device's rows, with ``weight`` and ``bias`` copied to each device
    (:func:`~tp_gpu.regions.place_like`); the per-device sums of ``dweight``
    and ``dbias`` are then reduced (over every process too) onto the output
    device, where the parameters live. The output is placed like ``x``.

    Hugging Face names: a BERT ``...LayerNorm.weight`` / ``.bias`` (``gamma`` /
    ``beta`` in old checkpoints) is this layer's ``weight`` / ``bias``.

    Parameters
    ----------
    normalized_shape : int
        Size of the last axis.
    config : TensorParallelConfig, optional
        Backend, devices, dtype and output device (default ``TensorParallelConfig()``).
    eps : float
        Added to the variance (1e-5 as PyTorch; BERT uses 1e-12).
    """

    weight: ShardedParameter
    bias: ShardedParameter

    def __init__(
        self, normalized_shape: int, config: Optional[TensorParallelConfig] = None, *, eps: float = 1e-5
    ) -> None:
        super().__init__(config)
        self.normalized_shape = check_positive_int(normalized_shape, "normalized_shape")
        self.eps = check_eps(eps)
        self._join_group(normalized_shape=self.normalized_shape, eps=self.eps)
        self._add_parameter("weight", np.ones(self.normalized_shape))
        self._add_parameter("bias", np.zeros(self.normalized_shape))

    def load_dense(self, weight: Any, bias: Any) -> None:
        """Overwrite ``weight`` and ``bias`` (each ``(normalized_shape,)``, any array kind), checked first."""
        self.load_state_dict({"weight": weight, "bias": bias})

    def forward(self, x: Any) -> Tensor:
        """``y`` shaped as ``x`` ``(..., normalized_shape)``, in the layer's dtype, placed like ``x``
        (on the output device for a dense or host ``x``)."""
        x = self._check_features(x, self.normalized_shape, "LayerNorm input")
        x = x if isinstance(x, Tensor) else tensor(x)
        check_placement(x, "LayerNorm input", last_axis=False)
        weight = place_like(self.weight, x, self.group)  # (H,) beside each block of x
        bias = place_like(self.bias, x, self.group)
        return LayerNormFunction.apply(x, weight, bias, self.eps, self.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, dtype={self.dtype.name!r}, on={self.output_device!r}"
        )
