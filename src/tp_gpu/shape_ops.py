"""Reshapes, transposes, indexing and concatenation of tensors, run per device and recorded on the tape.

===================  ======================================  ===========================================
operation            placements                               backward
===================  ======================================  ===========================================
``t.reshape(s)``     Dense, Replicated, Partial               ``dY`` reshaped back
``t.transpose(a)``   any; a split axis moves with its data    ``dY`` transposed by the inverse permutation
``t[index]``         Dense, Replicated (basic indexing:       ``dY`` written into zeros at ``index``
                     ints, slices, None, ``...``)
``cat(ts, axis)``    equal placements, ``axis`` not split     ``dY`` cut into the pieces
===================  ======================================  ===========================================

A reshape of a split tensor would move elements across workers, so it raises
a ShapeError: gather it (a region) first.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np

from .autograd import Context, Function
from .errors import ShapeError
from .placements import Dense, Replicated, Split
from .tensor import Blocks, Tensor, new_tensor

__all__ = ["reshape", "transpose", "getitem", "cat"]


def _per_device(t: Tensor, fn: Any, *others: Blocks) -> Blocks:
    out = {}
    for d, block in t.blocks.items():
        if t.backend is None:
            out[d] = fn(block, *(o[d] for o in others))
        else:
            with t.backend.device(d):
                out[d] = fn(block, *(o[d] for o in others))
    return out


def _like(t: Tensor, blocks: Blocks, shape: Tuple[int, ...], placement: Any = None) -> Tensor:
    return new_tensor(
        blocks, t.placement if placement is None else placement, shape, t.dtype, t.backend, t.comm
    )


class _ShapeContext(Context):
    __slots__ = ("shape", "axes", "index", "sizes", "axis")

    shape: Tuple[int, ...]
    axes: Tuple[int, ...]
    index: Any
    sizes: List[int]
    axis: int


class Reshape(Function):
    """``Y = X`` in a new shape, per device. Backward: ``dX = dY`` in ``X``'s shape."""

    ctx_class = _ShapeContext

    @staticmethod
    def forward(ctx: _ShapeContext, x: Tensor, shape: Tuple[int, ...]) -> Tensor:
        ctx.shape = x.shape
        out = _per_device(x, lambda b: b.reshape(shape))
        return _like(x, out, tuple(next(iter(out.values())).shape))

    @staticmethod
    def backward(ctx: _ShapeContext, grad: Tensor) -> Tuple[Tensor, None]:
        return _like(grad, _per_device(grad, lambda g: g.reshape(ctx.shape)), ctx.shape), None


def reshape(x: Tensor, shape: Sequence[int]) -> Tensor:
    """``x`` in ``shape`` (one entry may be -1). Not for a split tensor (ShapeError)."""
    if isinstance(x.placement, Split):
        raise ShapeError(
            f"reshape of a tensor placed {x.placement!r} (shape {x.shape}) to {tuple(shape)}: a split "
            "tensor cannot be reshaped in place; gather it first (tp_gpu.regions.gather_from_region)"
        )
    try:
        target = np.empty(x.shape, dtype=np.bool_).reshape(tuple(shape)).shape
    except ValueError as exc:
        raise ShapeError(f"cannot reshape a tensor of shape {x.shape} to {tuple(shape)}: {exc}") from None
    return Reshape.apply(x, tuple(target))


class Transpose(Function):
    """``Y = X`` with axes permuted; a split axis moves with its data. Backward: the inverse permutation."""

    ctx_class = _ShapeContext

    @staticmethod
    def forward(ctx: _ShapeContext, x: Tensor, axes: Tuple[int, ...]) -> Tensor:
        ctx.axes = axes
        placement = x.placement
        if isinstance(placement, Split):
            placement = Split(axes.index(placement.axis), placement.layout)
        out = _per_device(x, lambda b: b.transpose(axes))
        return _like(x, out, tuple(x.shape[a] for a in axes), placement)

    @staticmethod
    def backward(ctx: _ShapeContext, grad: Tensor) -> Tuple[Tensor, None]:
        inverse = tuple(int(i) for i in np.argsort(ctx.axes))
        return Transpose.forward(ctx.__class__(), grad, inverse), None


def transpose(x: Tensor, axes: Sequence[int] = ()) -> Tensor:
    """``x`` with its axes permuted as ``axes`` (reversed when empty), as ``numpy.transpose``."""
    n = x.ndim
    perm = (
        tuple(reversed(range(n))) if not axes else tuple(int(a) % n if -n <= int(a) < n else -1 for a in axes)
    )
    if sorted(perm) != list(range(n)):
        raise ShapeError(
            f"transpose axes {tuple(axes)} are not a permutation of the {n} axes of shape {x.shape}"
        )
    return Transpose.apply(x, perm)


class GetItem(Function):
    """``Y = X[index]`` (basic indexing), per device. Backward: zeros with ``dY`` at ``index``."""

    ctx_class = _ShapeContext

    @staticmethod
    def forward(ctx: _ShapeContext, x: Tensor, index: Any) -> Tensor:
        ctx.index, ctx.shape = index, x.shape
        out = _per_device(x, lambda b: b[index])
        return _like(x, out, tuple(next(iter(out.values())).shape))

    @staticmethod
    def backward(ctx: _ShapeContext, grad: Tensor) -> Tuple[Tensor, None]:
        xp = np if grad.backend is None else grad.backend.xp

        def scatter(g: Any) -> Any:
            full = xp.zeros(ctx.shape, dtype=g.dtype)
            full[ctx.index] = g
            return full

        return _like(grad, _per_device(grad, scatter), ctx.shape), None


def _is_basic(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in items)


def getitem(x: Tensor, index: Any) -> Tensor:
    """``x[index]`` for a Dense or Replicated ``x`` and basic indexing (ints, slices, None, ``...``)."""
    if not isinstance(x.placement, (Dense, Replicated)):
        raise ShapeError(
            f"indexing a tensor placed {x.placement!r}: gather it first (only Dense or Replicated)"
        )
    if not _is_basic(index):
        raise ShapeError(f"tensor indexing takes ints, slices, None and ..., got {index!r}")
    try:
        np.empty(x.shape, dtype=np.bool_)[index]
    except IndexError as exc:
        raise ShapeError(f"index {index!r} does not fit shape {x.shape}: {exc}") from None
    return GetItem.apply(x, index)


class Concatenate(Function):
    """``Y = concat(X_1, ..., X_k)`` along ``axis``, per device. Backward: ``dY`` cut into the pieces."""

    ctx_class = _ShapeContext

    @staticmethod
    def forward(ctx: _ShapeContext, axis: int, *xs: Tensor) -> Tensor:
        first = xs[0]
        ctx.axis, ctx.sizes = axis, [x.shape[axis] for x in xs]
        xp = np if first.backend is None else first.backend.xp
        out = _per_device(first, lambda *bs: xp.concatenate(bs, axis=axis), *(x.blocks for x in xs[1:]))
        shape = list(first.shape)
        shape[axis] = sum(ctx.sizes)
        return _like(first, out, tuple(shape))

    @staticmethod
    def backward(ctx: _ShapeContext, grad: Tensor) -> Tuple[Any, ...]:
        pieces: List[Tensor] = []
        start = 0
        for size in ctx.sizes:
            index = (slice(None),) * ctx.axis + (slice(start, start + size),)
            shape = list(grad.shape)
            shape[ctx.axis] = size
            pieces.append(_like(grad, _per_device(grad, lambda g, i=index: g[i]), tuple(shape)))
            start += size
        return (None, *pieces)


def cat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """The ``tensors`` concatenated along ``axis``; they must share a placement, not split on ``axis``."""
    if not tensors:
        raise ShapeError("cat needs at least one tensor, got none")
    first = tensors[0]
    axis = _axis(axis, first.ndim)
    for i, t in enumerate(tensors):
        if t.placement != first.placement or t.ndim != first.ndim:
            raise ShapeError(
                f"cat: tensor {i} is placed {t.placement!r} with shape {t.shape}; expected "
                f"{first.placement!r} and rank {first.ndim} like tensor 0"
            )
        other = [n for k, n in enumerate(t.shape) if k != axis]
        if other != [n for k, n in enumerate(first.shape) if k != axis]:
            raise ShapeError(f"cat: tensor {i} has shape {t.shape}; expected {first.shape} off axis {axis}")
    if isinstance(first.placement, Split) and first.placement.axis == axis:
        raise ShapeError(f"cat along the split axis {axis} of {first.placement!r}: gather the tensors first")
    return Concatenate.apply(axis, *tensors)


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for rank {ndim}")
    return axis % ndim
