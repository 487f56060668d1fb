"""LayerNorm over the last axis: on the output device where the dense activations of a transformer
live, or on each device's slice of a sequence-parallel activation."""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..parameter import ShardedParameter
from ..sharded import ShardedTensor
from .base import ParallelModule

__all__ = ["LayerNorm", "check_eps", "compute_dtype"]


def check_eps(eps: Any) -> float:
    """Return ``eps`` as a float if it is a positive finite real number, else raise ConfigError."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype that statistics and softmaxes are computed in: float32 for float16, else ``dtype``."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


class LayerNorm(ParallelModule):
    """``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` over the last axis (Ba et al., 2016).

    ``mean`` and the biased ``var`` are taken over the last axis of size
    ``normalized_shape``, as ``torch.nn.LayerNorm(normalized_shape, eps)``
    computes them. The parameters ``weight`` (ones) and ``bias`` (zeros) are
    kept whole on the group's output device, where the dense activations
    between tensor-parallel blocks live; the layer runs there. Statistics are
    computed in float32 for float16 input, else in the input dtype.

    Backward, with ``xhat = (x - mean) * rstd`` and ``rstd = 1 / sqrt(var + eps)``:
    ``dweight = sum(dy * xhat)``, ``dbias = sum(dy)`` over the leading axes, and
    ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * weight``.

    A :class:`~tp_gpu.ShardedTensor` input split on any axis but the last (the
    sequence, with sequence parallelism) is normalised where its slices lie:
    ``weight`` and ``bias`` are copied to each device per forward, each device
    computes its rows, and the output is a ShardedTensor split alike. The
    per-device partial sums of ``dweight`` and ``dbias`` are reduced (over
    every process too) onto the output device, where the parameters live.

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

    def forward(self, x: Any) -> Any:
        """``y`` shaped as ``x`` ``(..., normalized_shape)``, on the output device, in the layer's dtype
        (a ShardedTensor split like ``x`` for a ShardedTensor ``x``)."""
        if isinstance(x, ShardedTensor):
            return self._forward_sharded(x)
        x = self._check_features(x, self.normalized_shape, "LayerNorm input")
        out = self.output_device
        (x,) = collectives.to_devices(self.backend, [x], [out], self.dtype)  # (..., H) on the output device
        weight, bias = self.weight.blocks[out], self.bias.blocks[out]
        y, xhat, rstd = self.group.on_device(out, self._forward, x, weight, bias)
        self._keep({"xhat": xhat, "rstd": rstd, "shape": tuple(x.shape)})
        return y

    def _forward_sharded(self, x: ShardedTensor) -> ShardedTensor:
        """Each device normalises the rows of its block of ``x`` with its own copy of the parameters."""
        real = np.dtype(x.dtype).kind in "iuf"
        if x.shape[-1] != self.normalized_shape or x.axis == x.ndim - 1 or not real:
            raise ShapeError(
                f"LayerNorm takes a ShardedTensor of shape (..., {self.normalized_shape}) of real numbers, "
                f"split on any axis but the last; got {x!r}"
            )
        blocks = x.blocks_for(x.layout, self.dtype, None, "LayerNorm input", x.axis)  # {d: (..., S_d, H)}
        out = self.output_device
        weights = collectives.broadcast(self.backend, self.weight.blocks[out], list(blocks), self.dtype)
        biases = collectives.broadcast(self.backend, self.bias.blocks[out], list(blocks), self.dtype)
        results = self.group.on_devices(self._forward, blocks, weights, biases)  # {d: (y, xhat, rstd)}
        self._keep(
            {
                "xhat": {d: xhat for d, (_, xhat, _) in results.items()},  # {d: (..., S_d, H)}
                "rstd": {d: rstd for d, (_, _, rstd) in results.items()},  # {d: (..., S_d, 1)}
                "shape": x.shape,
                "sharded": (x.axis, x.layout, x.comm),
            }
        )
        ys = {d: y for d, (y, _, _) in results.items()}
        return ShardedTensor.from_blocks(ys, x.axis, x.layout, self.backend, x.comm)

    def _forward(self, x: Any, weight: Any, bias: Any):
        """``(y, xhat, rstd)``: the output in the layer's dtype, what backward needs in the compute dtype."""
        xp, dtype = self.backend.xp, compute_dtype(self.dtype)
        xc = x.astype(dtype, copy=False)  # (..., H)
        xc = xc - xc.mean(axis=-1, keepdims=True)  # a new array, normalised in place below
        var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1), biased as torch
        rstd = 1.0 / xp.sqrt(var + dtype.type(self.eps))  # (..., 1)
        xc *= rstd  # xhat (..., H)
        y = xc * weight.astype(dtype, copy=False)
        y += bias.astype(dtype, copy=False)
        return y.astype(self.dtype, copy=False), xc, rstd

    def backward(self, grad_output: Any) -> Any:
        """Accumulate ``dweight``, ``dbias`` and return ``dx`` of the input's shape, on the output device."""
        saved = self._take_saved()
        if "sharded" in saved:
            return self._backward_sharded(grad_output, saved)
        grad = self._check_grad_shape(grad_output, saved["shape"], "LayerNorm")
        out = self.output_device
        (grad,) = collectives.to_devices(self.backend, [grad], [out], self.dtype)  # (..., H)
        dx, dweight, dbias = self.group.on_device(out, self._backward, grad, saved, self.weight.blocks[out])
        self.weight.accumulate(out, dweight)
        self.bias.accumulate(out, dbias)
        return dx

    def _backward_sharded(self, grad_output: Any, saved: Dict[str, Any]) -> ShardedTensor:
        """``dx`` split like the forward input; ``dweight = sum_d dweight_d`` (and ``dbias``) reduced
        onto the output device. ``grad_output`` is a ShardedTensor split alike, or a dense array."""
        axis, layout, comm = saved["sharded"]
        grad = self._check_grad_shape(grad_output, saved["shape"], "LayerNorm", sharded=True)
        if isinstance(grad, ShardedTensor):
            grads = grad.blocks_for(layout, self.dtype, None, "LayerNorm grad_output", axis)
        else:
            grads = collectives.scatter_blocks(self.backend, grad, axis, layout, self.dtype)
        out = self.output_device
        weights = collectives.broadcast(self.backend, self.weight.blocks[out], list(grads), self.dtype)
        results = self.group.on_devices(
            lambda g, xhat, rstd, w: self._backward(g, {"xhat": xhat, "rstd": rstd}, w),
            grads,
            saved["xhat"],
            saved["rstd"],
            weights,
        )  # {d: (dx_d, dweight_d, dbias_d)}
        for i, param in ((1, self.weight), (2, self.bias)):
            partials = {d: r[i] for d, r in results.items()}  # {d: (H,)}
            param.accumulate(out, collectives.reduce_sum(self.backend, partials, out, comm))
        dxs = {d: r[0] for d, r in results.items()}  # {d: (..., S_d, H)}
        return ShardedTensor.from_blocks(dxs, axis, layout, self.backend, comm)

    def _backward(self, grad: Any, saved: dict, weight: Any):
        """``(dx, dweight, dbias)`` from ``dy``: see the class docstring."""
        dtype = compute_dtype(self.dtype)
        xhat, rstd = saved["xhat"], saved["rstd"]
        dy = grad.astype(dtype, copy=False)
        dy2 = dy.reshape(-1, self.normalized_shape)  # (N, H)
        dweight = (dy2 * xhat.reshape(-1, self.normalized_shape)).sum(axis=0)  # (H,)
        dbias = dy2.sum(axis=0)  # (H,)
        g = dy * weight.astype(dtype, copy=False)  # (..., H)
        dx = g - g.mean(axis=-1, keepdims=True)
        dx -= xhat * (g * xhat).mean(axis=-1, keepdims=True)
        dx *= rstd
        return dx.astype(self.dtype, copy=False), dweight.astype(self.dtype), dbias.astype(self.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, dtype={self.dtype.name!r}, on={self.output_device!r}"
        )
