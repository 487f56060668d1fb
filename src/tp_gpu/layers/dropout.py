"""Dropout whose mask depends on the seed, the step and each element's logical index alone.

Megatron's RNG tracker seeds each tensor-parallel rank differently, so its
masks change with the worker count. Here the mask is a pure function: element
``i`` (its index in the logical, unsharded tensor, in C order) of step ``s`` is
kept when

    u(seed, s, i) = mix(i * 0x9E3779B97F4A7C15 + mix(seed * 0xD1B54A32D192ED03 + s)) / 2^64 >= p

where ``mix`` is SplitMix64's finaliser (Steele, Lea and Flood, 2014), a
bijection of 64-bit integers with full avalanche. It is evaluated with
ordinary unsigned 64-bit array arithmetic, so NumPy and CuPy give the same
bits and a GPU makes its mask on the device. A shard computes exactly the
entries of the mask it holds, so a model trains identically at any worker
count, on any backend.
"""

from __future__ import annotations

import numbers
from typing import Any, Hashable, Optional, Sequence

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig
from ..errors import ConfigError, ShapeError
from ..partition import BlockLayout
from ..sharded import ShardedTensor
from .base import ParallelModule, as_array_like, check_seed

__all__ = ["Dropout", "keep_mask"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SEED_MULTIPLIER = 0xD1B54A32D192ED03
_MASK64 = (1 << 64) - 1


def _mix_int(z: int) -> int:
    """SplitMix64's finaliser on a Python int (the key of a seed and step)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix(z: Any) -> Any:
    """SplitMix64's finaliser on a uint64 array, in place (wrapping arithmetic)."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def keep_mask(xp: Any, p: float, seed: int, step: int, logical_shape: Sequence[int], index: Any) -> Any:
    """Boolean keep-mask for the elements at ``index`` (a tuple of slices of ``logical_shape``).

    The result has the shape of ``np.empty(logical_shape)[index]`` and is made
    on the current device of ``xp``; entry ``i`` is True with probability ``1 - p``.
    """
    key = np.uint64(_mix_int(seed * _SEED_MULTIPLIER + step))
    z = _flat_indices(xp, tuple(int(n) for n in logical_shape), tuple(index)) * _GOLDEN  # a new array
    z += key
    threshold = np.uint64(min(int(p * 2.0**64), _MASK64))
    return _mix(z) >= threshold


def _flat_indices(xp: Any, shape: tuple, index: tuple) -> Any:
    """``arange(prod(shape)).reshape(shape)[index]`` as uint64: the C-order indices of a slice.

    For slices (and one Ellipsis) it is built from one ``arange`` per axis,
    ``sum_k first_k[i_k] * stride_k``, so that a shard's mask costs its own
    size, not the whole tensor's; other indices take the whole ``arange``.
    """
    if not all(isinstance(i, slice) or i is Ellipsis for i in index) or sum(i is Ellipsis for i in index) > 1:
        return xp.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)[index]
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    flat = xp.zeros((), dtype=np.uint64)
    stride = 1
    for axis in reversed(range(len(shape))):
        positions = xp.arange(*index[axis].indices(shape[axis]), dtype=np.uint64) * np.uint64(stride)
        flat = flat + positions.reshape((-1,) + (1,) * (len(shape) - axis - 1))  # broadcast over later axes
        stride *= shape[axis]
    return flat


def _block_mask(
    xp: Any, p: float, seed: int, step: int, shape: tuple, axis: int, layout: BlockLayout, device: Hashable
) -> Any:
    """The keep-mask of ``device``'s block of a tensor of logical ``shape`` split on ``axis`` as
    ``layout`` says: its workers' slices of the logical mask, side by side."""
    masks = [
        keep_mask(xp, p, seed, step, shape, (slice(None),) * axis + (s,))
        for s in layout.global_slices(device)
    ]  # each (..., S_w, ...)
    return masks[0] if len(masks) == 1 else xp.concatenate(masks, axis=axis)


def _apply(mask: Any, scale: float, x: Any) -> Any:
    """``x * mask * scale``: (...) * (...) -> (...)."""
    return x * mask * scale


def _check_input(x: Any, what: str) -> Any:
    """``x`` (an array, or anything :func:`as_array_like` reads) if it holds real numbers, else
    ShapeError naming what it holds; a ShardedTensor passes through after its dtype check."""
    if isinstance(x, ShardedTensor):
        dtype = np.dtype(x.dtype)
    else:
        x = as_array_like(x, what)
        dtype = np.dtype(x.dtype)
    if dtype.kind not in "biuf":
        raise ShapeError(
            f"{what} must hold real numbers (float, integer or bool), got dtype {dtype} "
            f"of {type(x).__name__}" + (" (None was passed)" if dtype.kind == "O" and x.shape == () else "")
        )
    return x


class Dropout(ParallelModule):
    """``y = x * keep / (1 - p)`` in training mode, ``y = x`` in eval mode, on the output device.

    The mask is :func:`keep_mask` of the module's ``seed``, its ``step``
    counter (advanced by every training-mode forward, and saved with the
    optimizer state by :func:`tp_gpu.save_checkpoint` so that a resumed run
    draws the same masks) and each element's logical index.

    A :class:`~tp_gpu.ShardedTensor` input (split on any axis: the sequence,
    with sequence parallelism) is dropped where its slices lie: each device
    makes the mask of its own slices of the logical tensor, so the masks equal
    those of the unsplit tensor, and the output is split alike.

    Parameters
    ----------
    p : float in [0, 1]
        Probability of dropping an element. ``p = 1`` drops every element: the
        output is ``x * 0`` and the input gradient zeros (as ``torch.nn.Dropout(1.0)``).
    config : TensorParallelConfig, optional
        Where the dense activations live (the group's output device).
    seed : int

    An input that does not hold real numbers (None, strings, complex numbers)
    raises :class:`~tp_gpu.errors.ShapeError` before the step advances, in
    training and in eval mode.
    """

    def __init__(
        self, p: float = 0.1, config: Optional[TensorParallelConfig] = None, *, seed: int = 0
    ) -> None:
        super().__init__(config)
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise ConfigError(f"dropout p must be a number in [0, 1], got {p!r}")
        self.p: float = float(p)
        self.seed: int = check_seed(seed)
        self._join_group(p=self.p, seed=self.seed)
        self.step: int = 0

    @property
    def _scale(self) -> float:
        """``1 / (1 - p)``, the factor of a kept element; 0 when ``p = 1`` (nothing is kept, and
        ``y = x * 0``, as torch: zeros, NaN where ``x`` is not finite)."""
        return 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}, step={self.step}"

    def forward(self, x: Any) -> Any:
        """Drop elements of ``x`` (any shape, on the output device) at random; the identity in eval mode."""
        checked = _check_input(x, "Dropout input")
        if not self.training:
            return x
        if self.p == 0.0:  # the identity both ways; backward still needs a forward first
            self._keep({"identity": True})
            return x
        if isinstance(x, ShardedTensor):
            return self._forward_sharded(x)
        out, xp = self.output_device, self.backend.xp
        x = collectives.to_devices(self.backend, [checked], [out], self.dtype)[0]
        mask = self.group.on_device(out, keep_mask, xp, self.p, self.seed, self.step, x.shape, (Ellipsis,))
        self.step += 1
        self._keep({"mask": mask})
        return self.group.on_device(out, _apply, mask, self._scale, x)

    def _forward_sharded(self, x: ShardedTensor) -> ShardedTensor:
        """Each device drops the elements of its block, with its slices of the logical mask."""
        xp, shape, axis, layout = self.backend.xp, x.shape, x.axis, x.layout
        blocks = x.blocks_for(layout, self.dtype, None, "Dropout input", axis)  # {d: (..., S_d, H)}
        masks = {
            d: self.group.on_device(d, _block_mask, xp, self.p, self.seed, self.step, shape, axis, layout, d)
            for d in blocks
        }  # {d: (..., S_d, H)} bool
        self.step += 1
        self._keep({"masks": masks, "sharded": (shape, axis, layout, x.comm)})
        scale = self._scale
        ys = self.group.on_devices(lambda m, b: _apply(m, scale, b), masks, blocks)
        return ShardedTensor.from_blocks(ys, axis, layout, self.backend, x.comm)

    def backward(self, grad_output: Any) -> Any:
        """``dx = dy * keep / (1 - p)`` (split like the forward input for a ShardedTensor input)."""
        saved = self._take_saved()
        if "identity" in saved:
            return grad_output
        if "sharded" in saved:
            shape, axis, layout, comm = saved["sharded"]
            grad = self._check_grad_shape(grad_output, shape, "Dropout", sharded=True)
            if isinstance(grad, ShardedTensor):
                grads = grad.blocks_for(layout, self.dtype, None, "Dropout grad_output", axis)
            else:
                grads = collectives.scatter_blocks(self.backend, grad, axis, layout, self.dtype)
            scale = self._scale
            dxs = self.group.on_devices(lambda m, g: _apply(m, scale, g), saved["masks"], grads)
            return ShardedTensor.from_blocks(dxs, axis, layout, self.backend, comm)
        mask = saved["mask"]
        grad = self._check_grad_shape(grad_output, mask.shape, "Dropout")
        grad = collectives.to_devices(self.backend, [grad], [self.output_device], self.dtype)[0]
        return self.group.on_device(self.output_device, _apply, mask, self._scale, grad)
