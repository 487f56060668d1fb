"""Arithmetic between tensors, run per device: ``+ - * /`` and the sum of all elements.

Two tensors combine block by block when their placements agree, with no
copy: ``Dense`` on one device, ``Split`` alike, ``Replicated`` alike, or
``Partial`` alike for ``+`` and ``-`` (a sum of partial sums is one). A
``Replicated`` operand also combines with a ``Split`` one when it broadcasts
over the split axis (a bias ``(n,)`` added to sequence slices ``(B, S_d, n)``);
its gradient is then ``Partial``, one part per device. A host array (a user's
NumPy input) is moved where the other operand lives. Any other pair raises a
:class:`~tp_gpu.errors.ShapeError` that names both placements: a layout is
changed only by a region (:mod:`tp_gpu.regions`), never silently.

Operands broadcast as NumPy's do; backward sums each gradient over the axes
its operand was broadcast along (``unbroadcast``).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Hashable, Optional, Tuple

import numpy as np

from . import collectives
from .autograd import Context, Function
from .backends.base import as_array
from .errors import ShapeError
from .gradients import filled_like, grad_placement, like, on_device
from .placements import HOST, Dense, Partial, Placement, Replicated, Split
from .tensor import Blocks, Tensor, new_tensor, tensor

__all__ = [
    "add",
    "sub",
    "mul",
    "div",
    "total",
    "on_blocks",
]


def on_blocks(t: Tensor, fn: Callable[..., Any], *others: Blocks, keys: Any = None) -> Blocks:
    """``{d: fn(t.blocks[d], others[0][d], ...)}`` under each device ``d`` (of ``keys``, default ``t``'s)."""
    if t.backend is None:
        return {d: fn(b, *(o[d] for o in others)) for d, b in t.blocks.items()}
    return collectives.on_devices(t.backend, fn, t.blocks, *others, keys=keys)


# ---------------------------------------------------------------------- moving a host operand


class _PlaceContext(Context):
    __slots__ = ("device",)

    device: Hashable


class PlaceHostArray(Function):
    """A host tensor copied where ``like`` lives: its device (``Dense``) or each of its devices.

    Backward: a ``Dense`` gradient stays where it is; ``Partial`` parts are summed on the first device.
    """

    ctx_class = _PlaceContext

    @staticmethod
    def forward(ctx: _PlaceContext, x: Tensor, like: Tensor) -> Tensor:
        backend = like.backend
        assert backend is not None
        (array,) = x.blocks.values()
        dtype = like.dtype if array.dtype.kind == "f" and like.dtype.kind == "f" else array.dtype
        devices = list(like.blocks)
        ctx.device = devices[0]
        placement: Placement = (
            like.placement if isinstance(like.placement, Dense) else Replicated(tuple(devices))
        )
        blocks = collectives.broadcast(backend, array, devices, dtype)
        return new_tensor(blocks, placement, x.shape, dtype, backend, like.comm)

    @staticmethod
    def backward(ctx: _PlaceContext, grad: Tensor) -> Tuple[Tensor, None]:
        if isinstance(grad.placement, Partial):
            assert grad.backend is not None
            total_ = collectives.reduce_sum(grad.backend, dict(grad.blocks), ctx.device, grad.comm)
            return like(grad, {ctx.device: total_}, Dense(ctx.device)), None
        return grad, None


def _is_host(t: Tensor) -> bool:
    return isinstance(t.placement, Dense) and t.placement.device == HOST


def _operands(a: Any, b: Any, op: str) -> Tuple[Any, Any]:
    """``a`` and ``b`` as tensors (or Python scalars) whose placements combine, else ShapeError."""
    if not isinstance(a, Tensor) and not _is_scalar(a):
        a = tensor(_array(a, op))
    if not isinstance(b, Tensor) and not _is_scalar(b):
        b = tensor(_array(b, op))
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if _is_host(a) and not _is_host(b):
            a = PlaceHostArray.apply(a, b)
        elif _is_host(b) and not _is_host(a):
            b = PlaceHostArray.apply(b, a)
    return a, b


def _is_scalar(x: Any) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _array(x: Any, op: str) -> Any:
    try:
        return as_array(x)
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"{op}: cannot combine a tensor with a {type(x).__name__} ({exc})") from exc


def _output_placement(a: Any, b: Any, op: str) -> Placement:
    """Where ``a op b`` lives, or ShapeError naming both placements."""
    if not isinstance(b, Tensor):
        pa: Placement = a.placement
        if isinstance(pa, Partial) and op in "+-":
            raise ShapeError(f"{op}: cannot add a scalar to partial sums ({pa!r}); reduce them first")
        return pa
    if not isinstance(a, Tensor):
        pb: Placement = b.placement
        if isinstance(pb, Partial) and op != "*":
            raise ShapeError(f"{op}: a scalar {op} partial sums ({pb!r}) is not linear; reduce them first")
        return pb
    pa, pb = a.placement, b.placement
    if pa == pb and (not isinstance(pa, Partial) or op in "+-"):
        return pa
    for split, rep in ((a, b), (b, a)):
        sp, rp = split.placement, rep.placement
        if isinstance(sp, Split) and isinstance(rp, Replicated) and set(rp.devices) == set(sp.layout.groups):
            from_end = split.ndim - sp.axis
            if rep.ndim < from_end or rep.shape[-from_end] == 1:
                return sp
    raise ShapeError(
        f"{op}: the operands are placed differently: {pa!r} (shape {a.shape}) and {pb!r} (shape {b.shape}); "
        "expected equal placements (or a Replicated operand that broadcasts over a Split one's split "
        "axis): change one with a region of tp_gpu.regions first"
    )


def _broadcast_shape(a: Any, b: Any, op: str) -> Tuple[int, ...]:
    shapes = [x.shape for x in (a, b) if isinstance(x, Tensor)]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"{op}: shapes {shapes[0]} and {shapes[1]} do not broadcast") from None


def unbroadcast(xp: Any, grad: Any, shape: Tuple[int, ...]) -> Any:
    """``grad`` summed over the axes along which an operand of block shape ``shape`` was broadcast."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    )
    return xp.sum(grad, axis=axes, keepdims=False).reshape(shape)


class _ElementwiseContext(Context):
    __slots__ = ("op", "a", "b", "a_placement", "b_placement", "a_shapes", "b_shapes", "a_shape", "b_shape")

    op: str
    a: Any  # the operands, kept for * and /
    b: Any
    a_placement: Any
    b_placement: Any
    a_shapes: Any  # {device: block shape}, None for a scalar
    b_shapes: Any
    a_shape: Any
    b_shape: Any


_FORWARD = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.true_divide}


class Elementwise(Function):
    """``a op b`` for ``op`` in ``+ - * /``, per device.

    Backward: ``d(a+b) = (dY, dY)``, ``d(a-b) = (dY, -dY)``, ``d(a*b) = (dY b, dY a)``,
    ``d(a/b) = (dY / b, -dY a / b^2)``, each summed over its operand's broadcast axes.
    """

    ctx_class = _ElementwiseContext

    @staticmethod
    def forward(
        ctx: _ElementwiseContext, a: Any, b: Any, op: str, placement: Placement, shape: Any
    ) -> Tensor:
        fn = _FORWARD[op]
        t = a if isinstance(a, Tensor) else b
        ablocks = a.blocks if isinstance(a, Tensor) else None
        bblocks = b.blocks if isinstance(b, Tensor) else None
        keys = list(t.blocks) if not isinstance(placement, Split) else list(placement.layout.groups)
        out = {}
        for d in keys:
            x = ablocks[d] if ablocks is not None else a
            y = bblocks[d] if bblocks is not None else b
            if t.backend is None:
                out[d] = fn(x, y)
            else:
                with t.backend.device(d):
                    out[d] = fn(x, y)
        ctx.op = op
        ctx.a, ctx.b = (a, b) if op in "*/" else (None, None)
        ctx.a_placement = a.placement if isinstance(a, Tensor) else None
        ctx.b_placement = b.placement if isinstance(b, Tensor) else None
        ctx.a_shapes = {d: v.shape for d, v in ablocks.items()} if ablocks is not None else None
        ctx.b_shapes = {d: v.shape for d, v in bblocks.items()} if bblocks is not None else None
        ctx.a_shape = a.shape if isinstance(a, Tensor) else None
        ctx.b_shape = b.shape if isinstance(b, Tensor) else None
        return like(t, out, placement, shape)

    @staticmethod
    def backward(ctx: _ElementwiseContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        op, a, b = ctx.op, ctx.a, ctx.b
        needs = ctx.needs_input_grad
        xp = np if grad.backend is None else grad.backend.xp
        ga = gb = None
        if needs[0]:
            if op in "+-":
                da = grad.blocks
            elif op == "*":
                da = on_blocks(grad, lambda g, y: g * y, _blocks_or_scalar(b, grad))
            else:
                da = on_blocks(grad, lambda g, y: g / y, _blocks_or_scalar(b, grad))
            ga = _operand_grad(grad, da, ctx.a_placement, ctx.a_shapes, ctx.a_shape, xp)
        if needs[1]:
            if op == "+":
                db = grad.blocks
            elif op == "-":
                db = on_blocks(grad, lambda g: -g)
            elif op == "*":
                db = on_blocks(grad, lambda g, x: g * x, _blocks_or_scalar(a, grad))
            else:
                db = on_blocks(
                    grad,
                    lambda g, x, y: -g * x / (y * y),
                    _blocks_or_scalar(a, grad),
                    _blocks_or_scalar(b, grad),
                )
            gb = _operand_grad(grad, db, ctx.b_placement, ctx.b_shapes, ctx.b_shape, xp)
        return ga, gb, None, None, None


def _blocks_or_scalar(x: Any, grad: Tensor) -> Blocks:
    if isinstance(x, Tensor):
        return x.blocks
    return dict.fromkeys(grad.blocks, x)


def _operand_grad(
    grad: Tensor, blocks: Blocks, placement: Placement, shapes: Blocks, shape: Any, xp: Any
) -> Tensor:
    """An operand's gradient from the output's per-device ``blocks``, summed to its block ``shapes``;
    ``Partial`` for a Replicated operand of a Split output."""
    out = {d: on_device(grad.backend, d, unbroadcast, xp, g, shapes[d]) for d, g in blocks.items()}
    target = grad_placement(placement) if not isinstance(grad.placement, Partial) else grad.placement
    if isinstance(placement, Replicated) and isinstance(grad.placement, Split):
        target = Partial(tuple(out))
    return new_tensor(out, target, shape, next(iter(out.values())).dtype, grad.backend, grad.comm)


#: The NumPy ufuncs that are these operations, for ``array + tensor``.
ELEMENTWISE_UFUNCS = {np.add: "+", np.subtract: "-", np.multiply: "*", np.true_divide: "/"}


def elementwise(a: Any, b: Any, op: str) -> Tensor:
    """``a op b`` for ``op`` in ``+ - * /``, with the placement rules above."""
    return _binary(a, b, op)


def _binary(a: Any, b: Any, op: str) -> Tensor:
    if isinstance(a, Tensor) and not isinstance(a.placement, Partial):
        if type(b) is float or type(b) is int:  # the common cases first: a tensor and a number,
            return Elementwise.apply(a, b, op, a.placement, a.shape)
        if isinstance(b, Tensor) and b.shape == a.shape and b.placement == a.placement:  # or alike
            return Elementwise.apply(a, b, op, a.placement, a.shape)
    a, b = _operands(a, b, op)
    placement = _output_placement(a, b, op)
    return Elementwise.apply(a, b, op, placement, _broadcast_shape(a, b, op))


def add(a: Any, b: Any) -> Tensor:
    """``a + b`` per device (see the module's placement rules)."""
    return _binary(a, b, "+")


def sub(a: Any, b: Any) -> Tensor:
    """``a - b`` per device."""
    return _binary(a, b, "-")


def mul(a: Any, b: Any) -> Tensor:
    """``a * b`` per device."""
    return _binary(a, b, "*")


def div(a: Any, b: Any) -> Tensor:
    """``a / b`` per device."""
    return _binary(a, b, "/")


# ---------------------------------------------------------------------- the sum of all elements


class _TotalContext(Context):
    __slots__ = ("x", "device")

    x: Tensor
    device: Hashable


def _logical_block_sum(x: Tensor, block: Any, device: Hashable) -> Any:
    """The sum of a block's logical elements (a padded split's padding left out)."""
    p = x.placement
    if isinstance(p, Split) and p.layout.padded:
        index = (slice(None),) * p.axis
        parts = [block[index + (slice(*p.layout.local[w]),)] for w in p.layout.groups[device]]
        return sum(_scalar_sum(part) for part in parts)
    return _scalar_sum(block)


def _scalar_sum(block: Any) -> Any:
    """``sum(block)`` as a 0-d array on the block's device (not a NumPy scalar)."""
    return block.sum(keepdims=True).reshape(())


class Total(Function):
    """``sum(X)`` over every element, a scalar on the first device. Backward: ``dX = dY`` everywhere."""

    ctx_class = _TotalContext

    @staticmethod
    def forward(ctx: _TotalContext, x: Tensor) -> Tensor:
        ctx.x = Tensor({}, x.placement, x.shape, x.dtype, x.backend, x.comm)  # placement only: no blocks kept
        ctx.device = device = next(iter(x.blocks))
        if isinstance(x.placement, (Dense, Replicated)):
            value = on_device(x.backend, device, _scalar_sum, x.blocks[device])
        else:
            assert x.backend is not None
            parts = {d: on_device(x.backend, d, _logical_block_sum, x, v, d) for d, v in x.blocks.items()}
            value = collectives.reduce_sum(x.backend, parts, device, x.comm)
        return new_tensor({device: value}, Dense(device), (), value.dtype, x.backend, x.comm)

    @staticmethod
    def backward(ctx: _TotalContext, grad: Tensor) -> Tensor:
        return filled_like(ctx.x, grad.blocks[next(iter(grad.blocks))])


def total(x: Tensor) -> Tensor:
    """The sum of every element of ``x``, a scalar ``Dense`` tensor."""
    return Total.apply(x)
