"""LayerNorm over the last axis, on the output device where the dense activations of a transformer live."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError
from ..parameter import ShardedParameter
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
        """``y`` shaped as ``x`` ``(..., normalized_shape)``, on the output device, in the layer's dtype."""
        x = self._check_features(x, self.normalized_shape, "LayerNorm input")
        out = self.output_device
        (x,) = collectives.to_devices(self.backend, [x], [out], self.dtype)  # (..., H) on the output device
        weight, bias = self.weight.blocks[out], self.bias.blocks[out]
        y, xhat, rstd = self.group.on_device(out, self._forward, x, weight, bias)
        self._keep({"xhat": xhat, "rstd": rstd, "shape": tuple(x.shape)})
        return y

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
        grad = self._check_grad_shape(grad_output, saved["shape"], "LayerNorm")
        out = self.output_device
        (grad,) = collectives.to_devices(self.backend, [grad], [out], self.dtype)  # (..., H)
        dx, dweight, dbias = self.group.on_device(out, self._backward, grad, saved, self.weight.blocks[out])
        self.weight.accumulate(out, dweight)
        self.bias.accumulate(out, dbias)
        return dx

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
