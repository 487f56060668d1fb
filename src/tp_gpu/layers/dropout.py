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
from typing import Any, Hashable, Optional, Sequence, Tuple

import numpy as np

from ..autograd import Context, Function
from ..config import TensorParallelConfig
from ..errors import ConfigError, ShapeError
from ..group import TensorParallelGroup
from ..placements import Split
from ..tensor import Blocks, Tensor, new_tensor, tensor
from .base import ParallelModule, as_array_like, check_seed
from .norm import check_placement, input_blocks, output_placement

__all__ = ["Dropout", "DropoutFunction", "keep_mask"]

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


def _block_mask(xp: Any, p: float, seed: int, step: int, x: Tensor, device: Hashable) -> Any:
    """The keep-mask of ``device``'s block of ``x``: of the whole logical tensor for a whole ``x``;
    for one split on an axis, its workers' slices of the logical mask, side by side."""
    placement, shape = x.placement, x.shape
    if not isinstance(placement, Split):
        return keep_mask(xp, p, seed, step, shape, (Ellipsis,))
    axis = placement.axis
    masks = [
        keep_mask(xp, p, seed, step, shape, (slice(None),) * axis + (s,))
        for s in placement.layout.global_slices(device)
    ]  # each (..., S_w, ...)
    return masks[0] if len(masks) == 1 else xp.concatenate(masks, axis=axis)


def _apply(mask: Any, scale: float, x: Any) -> Any:
    """``x * mask * scale``: (...) * (...) -> (...)."""
    return x * mask * scale


def _check_input(x: Any, what: str) -> Any:
    """``x`` (a Tensor, an array, or anything :func:`as_array_like` reads) if it holds real numbers,
    else ShapeError naming what it holds."""
    if not isinstance(x, Tensor):
        x = as_array_like(x, what)
    dtype = np.dtype(x.dtype)
    if dtype.kind not in "biuf":
        raise ShapeError(
            f"{what} must hold real numbers (float, integer or bool), got dtype {dtype} "
            f"of {type(x).__name__}" + (" (None was passed)" if dtype.kind == "O" and x.shape == () else "")
        )
    return x


class _DropoutContext(Context):
    __slots__ = ("masks", "scale")

    masks: Blocks  # {d: bool, shaped as d's block}
    scale: float


class DropoutFunction(Function):
    """``y = x * keep * scale`` on each device's block of ``x``, with :func:`keep_mask` of ``seed``,
    ``step`` and the block's logical indices. Backward: ``dx = dy * keep * scale``, with the masks kept."""

    ctx_class = _DropoutContext

    @staticmethod
    def forward(
        ctx: _DropoutContext,
        x: Tensor,
        p: float,
        seed: int,
        step: int,
        scale: float,
        group: TensorParallelGroup,
        dtype: np.dtype,
    ) -> Tensor:
        backend = group.backend
        xs = input_blocks(x, group.output_device, backend, dtype)  # {d: (...)}, a host x moved there
        masks: Blocks = {}
        ys: Blocks = {}
        for d, xb in xs.items():
            with backend.device(d):
                masks[d] = _block_mask(backend.xp, p, seed, step, x, d)  # bool, shaped as the block
                ys[d] = _apply(masks[d], scale, xb)
        if ctx.needs_input_grad:
            ctx.masks, ctx.scale = masks, scale
        return new_tensor(ys, output_placement(x, xs), x.shape, dtype, backend, group.comm)

    @staticmethod
    def backward(ctx: _DropoutContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        backend = grad.backend
        assert backend is not None
        dx = {}
        for d, g in grad.blocks.items():
            with backend.device(d):
                dx[d] = _apply(ctx.masks[d], ctx.scale, g)
        return (new_tensor(dx, grad.placement, grad.shape, grad.dtype, backend, grad.comm),) + (None,) * 6


class Dropout(ParallelModule):
    """``y = x * keep / (1 - p)`` in training mode, ``y = x`` in eval mode, where ``x`` lies.

    The mask is :func:`keep_mask` of the module's ``seed``, its ``step``
    counter (advanced by every training-mode forward, and saved with the
    optimizer state by :func:`tp_gpu.save_checkpoint` so that a resumed run
    draws the same masks) and each element's logical index.

    One :class:`DropoutFunction` serves every placement but partial sums: a
    dense input is dropped on its device (a host array on the output device),
    a :class:`~tp_gpu.ShardedTensor` (split on any axis: the sequence, with
    sequence parallelism) where its slices lie. Each device makes the mask of
    its own slices of the logical tensor, so the masks equal those of the
    unsplit tensor, and the output is placed like the input. The masks are
    kept for backward only while the tape records (not under ``no_grad()``).

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

    def forward(self, x: Any) -> Tensor:
        """Drop elements of ``x`` (any shape and placement but partial sums) at random, where it lies
        (a host array on the output device); the identity (``x`` itself) in eval mode or with ``p = 0``."""
        x = _check_input(x, "Dropout input")
        x = x if isinstance(x, Tensor) else tensor(x)
        check_placement(x, "Dropout input")
        if not self.training or self.p == 0.0:
            return x
        y = DropoutFunction.apply(x, self.p, self.seed, self.step, self._scale, self.group, self.dtype)
        self.step += 1  # only once the masks were drawn
        return y
