"""RMSNorm over the last axis (Zhang & Sennrich, 2019), Llama's and Qwen2's norm, run where its input lies.

As :class:`~tp_gpu.layers.norm.LayerNorm`: on the output device for dense activations, on each device's
slices of a sequence-split (or replicated) activation, with the weight copied beside each block.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..autograd import Function
from ..backends import host_norm
from ..config import TensorParallelConfig, check_positive_int
from ..parameter import ShardedParameter
from ..regions import place_like
from ..tensor import Tensor, tensor
from .base import ParallelModule
from .norm import (
    NormContext,
    check_eps,
    check_placement,
    column_sum,
    compute_dtype,
    normalise_blocks,
    normalise_grads,
    row_mean,
)

__all__ = ["RMSNorm", "RMSNormFunction"]


class RMSNormFunction(Function):
    """``y = xhat * weight``, ``xhat = x * rstd``, ``rstd = 1 / sqrt(mean(x^2) + eps)``, on each device's
    block of ``x`` beside ``weight`` placed there (:func:`~tp_gpu.regions.place_like`).

    ``forward(ctx, x, weight, eps, dtype)``. Statistics are computed in float32 for float16 (else in
    ``dtype``), and ``xhat`` is cast to ``dtype`` before it meets the weight, as transformers'
    ``LlamaRMSNorm`` does. Backward, per device, with ``g = dy * weight``:
    ``dx = rstd * (g - xhat * mean(g * xhat))`` and ``dweight_d = sum(dy * xhat)`` over the block's rows,
    placed like the weight's gradient (``Partial`` for a copied weight: the copy's backward adds them up).
    """

    ctx_class = NormContext

    @staticmethod
    def forward(ctx: NormContext, x: Tensor, weight: Tensor, eps: float, dtype: np.dtype) -> Tensor:
        return normalise_blocks(
            ctx, x, weight, dtype, lambda xp, xb, d: _normalise(xp, xb, weight.blocks[d], eps, dtype)
        )

    @staticmethod
    def backward(ctx: NormContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        return (*normalise_grads(ctx, grad, _normalise_grad), None, None)  # dX, dweight; eps, dtype


def _normalise(xp: Any, x: Any, weight: Any, eps: float, out_dtype: np.dtype):
    """``(y, xhat, rstd)``: the output in ``out_dtype``, what backward needs in the compute dtype; in
    one compiled pass on host float32 and float64 arrays (:mod:`~tp_gpu.backends.host_norm`)."""
    if host_norm.serves(xp, out_dtype, x, weight):
        return host_norm.rms_norm(x, weight, eps)
    dtype = compute_dtype(out_dtype)
    xc = x.astype(dtype)  # (..., H), a new array normalised in place below
    rstd = (row_mean(xp, xc * xc) + dtype.type(eps)) ** -0.5  # (..., 1), of the mean of squares
    xc *= rstd  # xhat (..., H)
    y = xc.astype(out_dtype, copy=False) * weight  # cast first: LlamaRMSNorm's weight * xhat.to(dtype)
    return y, xc, rstd


def _normalise_grad(xp: Any, grad: Any, xhat: Any, rstd: Any, weight: Any, out_dtype: np.dtype):
    """``(dx, dweight)`` from ``dy``: see :class:`RMSNormFunction`."""
    if host_norm.serves(xp, out_dtype, grad, xhat, rstd, weight):
        return host_norm.rms_norm_grad(grad, xhat, rstd, weight)
    dtype = compute_dtype(out_dtype)
    h = xhat.shape[-1]
    dy = grad.astype(dtype, copy=False)  # (..., H)
    dweight = column_sum(xp, dy.reshape(-1, h) * xhat.reshape(-1, h))  # (N, H) -> (H,)
    g = dy * weight.astype(dtype, copy=False)  # (..., H)
    dx = g - xhat * row_mean(xp, g * xhat)
    dx *= rstd
    return dx.astype(out_dtype, copy=False), dweight.astype(out_dtype)


class RMSNorm(ParallelModule):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last axis, as Llama's ``LlamaRMSNorm``.

    ``mean`` is taken over the last axis of size ``hidden``; there is no
    centring and no bias. ``weight`` (ones) is kept whole on the group's
    output device. Statistics are computed in float32 for float16 input, and
    the normalised ``xhat`` is cast back to float16 before it is multiplied
    by the weight (transformers' numerics); float32 and float64 compute in
    their own dtype.

    Backward, with ``xhat = x * rstd`` and ``rstd = 1 / sqrt(mean(x^2) + eps)``:
    ``dweight = sum(dy * xhat)`` over the leading axes and
    ``dx = rstd * (g - xhat * mean(g * xhat))`` with ``g = dy * weight``.

    The layer runs where ``x`` lies (:class:`RMSNormFunction`), as
    :class:`~tp_gpu.LayerNorm` does: a dense ``x`` on its device (a host
    array is moved to the output device), an ``x`` split on any axis but the
    last (the sequence, with sequence parallelism) or replicated on each
    device's block, with ``weight`` copied to each device; the per-device
    ``dweight`` are then reduced onto the output device. The output is placed like ``x``.

    Hugging Face names: ``...input_layernorm.weight``, ``...post_attention_layernorm.weight``
    and ``model.norm.weight`` of a Llama or Qwen2 checkpoint are this layer's ``weight``.

    Parameters
    ----------
    hidden : int
        Size of the last axis.
    config : TensorParallelConfig, optional
        Backend, devices, dtype and output device (default ``TensorParallelConfig()``).
    eps : float
        Added to the mean of squares (1e-6, Llama's ``rms_norm_eps``; Qwen2 uses 1e-6 too).
    """

    weight: ShardedParameter

    def __init__(
        self, hidden: int, config: Optional[TensorParallelConfig] = None, *, eps: float = 1e-6
    ) -> None:
        super().__init__(config)
        self.hidden = check_positive_int(hidden, "hidden")
        self.eps = check_eps(eps)
        self._join_group(hidden=self.hidden, eps=self.eps)
        self._add_parameter("weight", np.ones(self.hidden))

    def load_dense(self, weight: Any) -> None:
        """Overwrite ``weight`` (``(hidden,)``, any array kind), checked first."""
        self.load_state_dict({"weight": weight})

    def forward(self, x: Any) -> Tensor:
        """``y`` shaped as ``x`` ``(..., hidden)``, in the layer's dtype, placed like ``x``
        (on the output device for a host ``x``)."""
        x = self._check_features(x, self.hidden, "RMSNorm input")
        x = x if isinstance(x, Tensor) else tensor(x)
        check_placement(x, "RMSNorm input", last_axis=False)
        weight = place_like(self.weight, x, self.group)  # (H,) beside each block of x
        return RMSNormFunction.apply(x, weight, self.eps, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden}, eps={self.eps}, dtype={self.dtype.name!r}, on={self.output_device!r}"
