"""The communication regions of Megatron's tensor parallelism, as tape functions that change a placement.

A layer enters and leaves a tensor-parallel region through conjugate pairs
(Shoeybi et al., 2019; the names are Megatron-core's). Each is a
:class:`~tp_gpu.Function` from one placement (:mod:`tp_gpu.placements`) to
another, its backward the conjugate move:

==============================================  ==================================  ==========================
region                                          forward                             backward
==============================================  ==================================  ==========================
``copy_to_region``                              ``Dense`` -> ``Replicated``         sum the ``Partial`` dX
``reduce_from_region``                          ``Partial`` -> ``Dense`` (sum)      copy dY to every device
``scatter_to_region``                           ``Dense`` -> ``Split(axis)``        gather dX
``gather_from_region``                          ``Split(axis)`` -> ``Dense``        split dY
``gather_from_sequence_parallel_region``        ``Split(S)`` -> ``Replicated``      reduce-scatter the
                                                (all-gather)                        ``Partial`` dX
``reduce_scatter_to_sequence_parallel_region``  ``Partial`` -> ``Split(S)``         all-gather dY
``scatter_to_sequence_parallel_region``         ``Dense`` -> ``Split(S)``           gather dX
==============================================  ==================================  ==========================

``Dense`` is whole on the group's output device; ``Split(S)`` is split along
the sequence axis (-2 of ``(B, S, H)``). Inside a region each device holds
one block: its workers' slices side by side. Column-parallel then
row-parallel needs no region in between: that is the point of the scheme.

With sequence parallelism (Korthikanti et al., 2022) the activations between
the regions are ``Split(S)``, the all-reduce of the row-parallel layer becomes
a reduce-scatter into those slices, and the all-gather moves in front of the
next column-parallel layer. Each moves half of what an all-reduce moves, so
the communication volume is unchanged while LayerNorm, dropout and the
residuals hold ``1/p`` of the activations. A layer does not ask which
placement its input has: :func:`replicate` and :func:`split` pick the region
for it, and the all-gather's output remembers its slices, so a consumer that
saves it for backward keeps ``1/p`` of it and gathers again there.

Every region takes the layers' :class:`~tp_gpu.group.TensorParallelGroup`
and moves arrays only through :mod:`tp_gpu.collectives`.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from . import collectives
from .autograd import Context, Function, is_grad_enabled
from .errors import ShapeError
from .group import TensorParallelGroup
from .partition import BlockLayout
from .placements import HOST, Dense, Partial, Replicated, Split
from .tensor import Blocks, Tensor, new_tensor, tensor

__all__ = [
    "Blocks",
    "SEQUENCE_AXIS",
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "replicate",
    "split",
    "place_like",
    "sequence_layout",
]

#: The sequence axis of activations, ``(B, S, H)`` or ``(S, H)``.
SEQUENCE_AXIS = -2


def sequence_layout(group: TensorParallelGroup, seq: int) -> BlockLayout:
    """How a sequence of ``seq`` positions is split over ``group``'s workers: balanced contiguous
    slices (the first ``seq % p`` one longer), one block per device, this process's span of it."""
    return group.split(seq, what="sequence length")


def _devices(group: TensorParallelGroup) -> Tuple[Any, ...]:
    return group.distinct_devices


def _dense_value(x: Any) -> Any:
    """The one block of a Dense tensor, or a raw array as it is."""
    return next(iter(x.blocks.values())) if isinstance(x, Tensor) else x


class _RegionContext(Context):
    __slots__ = ("group", "layout", "axis", "placement", "dtype")

    group: TensorParallelGroup
    layout: BlockLayout
    axis: int
    placement: Any  # the input's placement (a Split or a Partial)
    dtype: Any


def _dense(group: TensorParallelGroup, array: Any, shape: Tuple[int, ...]) -> Tensor:
    return Tensor({group.output_device: array}, group.dense, shape, array.dtype, group.backend, group.comm)


class CopyToRegion(Function):
    """``Dense X -> Replicated``: ``X`` copied once to each device. Backward: ``dX = sum_d dX_d``."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Any, group: TensorParallelGroup, dtype: Any) -> Tensor:
        ctx.group = group
        blocks = collectives.broadcast(group.backend, _dense_value(x), group.distinct_devices, dtype)
        return Tensor(blocks, group.replicated, tuple(x.shape), dtype, group.backend, group.comm)

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None, None]:
        group = ctx.group
        total = collectives.reduce_sum(group.backend, dict(grad.blocks), group.output_device, group.comm)
        return _dense(group, total, grad.shape), None, None


class ReduceFromRegion(Function):
    """``Partial -> Dense``: ``Y = sum_d Y_d`` on the output device (all-reduce). Backward: ``dY`` to
    every device (``Replicated``)."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Tensor, group: TensorParallelGroup) -> Tensor:
        ctx.group, ctx.placement = group, x.placement
        total = collectives.reduce_sum(group.backend, dict(x.blocks), group.output_device, group.comm)
        return _dense(group, total, x.shape)

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None]:
        group, devices = ctx.group, ctx.placement.devices
        blocks = collectives.broadcast(group.backend, _dense_value(grad), devices, grad.dtype)
        return new_tensor(
            blocks, Replicated(devices), grad.shape, grad.dtype, group.backend, group.comm
        ), None


class ScatterToRegion(Function):
    """``Dense X -> Split(axis)``: each device receives its workers' slices. Backward: the blocks of
    ``dX`` gathered on the output device."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(
        ctx: _RegionContext, x: Any, group: TensorParallelGroup, layout: BlockLayout, axis: int, dtype: Any
    ) -> Tensor:
        array = _dense_value(x)
        ctx.group, ctx.layout, ctx.axis = group, layout, axis % array.ndim
        blocks = collectives.scatter_blocks(group.backend, array, ctx.axis, layout, dtype)
        return new_tensor(
            blocks, Split(ctx.axis, layout), tuple(array.shape), dtype, group.backend, group.comm
        )

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None, None, None, None]:
        group = ctx.group
        dx = collectives.gather_blocks(
            group.backend, grad.blocks, ctx.axis, ctx.layout, group.output_device, group.comm
        )
        return _dense(group, dx, grad.shape), None, None, None, None


class GatherFromRegion(Function):
    """``Split(axis) -> Dense``: the blocks gathered on the output device. Backward: ``dY`` split again."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Tensor, group: TensorParallelGroup) -> Tensor:
        placement = x.placement
        assert isinstance(placement, Split)
        ctx.group, ctx.placement = group, placement
        y = collectives.gather_blocks(
            group.backend, x.blocks, placement.axis, placement.layout, group.output_device, group.comm
        )
        return _dense(group, y, x.shape)

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None]:
        p, group = ctx.placement, ctx.group
        blocks = collectives.scatter_blocks(group.backend, _dense_value(grad), p.axis, p.layout, grad.dtype)
        return new_tensor(blocks, p, grad.shape, grad.dtype, group.backend, group.comm), None


class Relayout(Function):
    """``Split -> Split`` with the same sizes on other devices (or block capacities): each worker's slice
    moved. Backward: the slices of ``dX`` moved back."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Tensor, layout: BlockLayout, dtype: Any) -> Tensor:
        ctx.placement, ctx.dtype = x.placement, x.dtype
        blocks = x.blocks_for(layout, dtype, None, "input", x.placement.axis)  # type: ignore[attr-defined]
        assert x.backend is not None
        return new_tensor(blocks, Split(x.placement.axis, layout), x.shape, dtype, x.backend, x.comm)  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None, None]:
        p = ctx.placement
        blocks = grad.blocks_for(p.layout, ctx.dtype, None, "gradient", p.axis)  # type: ignore[attr-defined]
        assert grad.backend is not None
        return new_tensor(blocks, p, grad.shape, ctx.dtype, grad.backend, grad.comm), None, None


class GatherFromSequenceParallelRegion(Function):
    """``Split(S) -> Replicated``: ``X = concat_w X_w`` whole on every device (all-gather). Backward:
    each device's partial ``dX_d`` (a column layer's ``dY_d A_d^T``) summed and split: device ``d``
    gets its slices of ``sum_e dX_e`` (reduce-scatter)."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Tensor, group: TensorParallelGroup, keep_slices: bool) -> Tensor:
        p = x.placement
        assert isinstance(p, Split)
        ctx.group, ctx.placement = group, p
        backend, comm, devices = group.backend, group.comm, tuple(p.layout.groups)
        slices = x.blocks

        def gather() -> Tensor:
            blocks = collectives.all_gather_blocks(backend, slices, p.axis, p.layout, comm)
            return new_tensor(blocks, Replicated(devices), x.shape, x.dtype, backend, comm)

        out = gather()
        if keep_slices:
            out.recompute = gather
        return out

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None, None]:
        p, group = ctx.placement, ctx.group
        blocks = collectives.reduce_scatter_blocks(
            group.backend, dict(grad.blocks), p.axis, p.layout, group.comm
        )
        return new_tensor(blocks, p, grad.shape, grad.dtype, group.backend, group.comm), None, None


class ReduceScatterToSequenceParallelRegion(Function):
    """``Partial -> Split(S)``: each device's partial ``Y_d`` summed and split along the sequence
    (reduce-scatter). Backward: the slices of ``dY`` all-gathered, whole on every device."""

    ctx_class = _RegionContext

    @staticmethod
    def forward(ctx: _RegionContext, x: Tensor, group: TensorParallelGroup) -> Tensor:
        if x.ndim < 2:
            raise ShapeError(f"a sequence-parallel reduce-scatter needs a sequence axis, got shape {x.shape}")
        axis = x.ndim + SEQUENCE_AXIS
        layout = sequence_layout(group, x.shape[axis])
        ctx.group, ctx.placement = group, x.placement
        ctx.layout, ctx.axis = layout, axis
        blocks = collectives.reduce_scatter_blocks(group.backend, dict(x.blocks), axis, layout, group.comm)
        return new_tensor(blocks, Split(axis, layout), x.shape, x.dtype, group.backend, group.comm)

    @staticmethod
    def backward(ctx: _RegionContext, grad: Tensor) -> Tuple[Tensor, None]:
        group = ctx.group
        blocks = collectives.all_gather_blocks(group.backend, grad.blocks, ctx.axis, ctx.layout, group.comm)
        devices = ctx.placement.devices
        return new_tensor(
            blocks, Replicated(devices), grad.shape, grad.dtype, group.backend, group.comm
        ), None


# ---------------------------------------------------------------------- what layers call


def _as_input(x: Any) -> Tensor:
    """A Tensor as it is; a raw array (NumPy, CuPy, DLPack, nested lists) as a Dense constant."""
    return x if isinstance(x, Tensor) else tensor(x)


def copy_to_region(x: Any, group: TensorParallelGroup, dtype: Any = None) -> Tensor:
    """``Dense X`` (or a raw array) copied once to each of ``group``'s devices, as ``dtype``."""
    if not isinstance(x, Tensor) and not hasattr(x, "shape"):
        x = _as_input(x)
    return CopyToRegion.apply(x, group, np.dtype(x.dtype if dtype is None else dtype))


def reduce_from_region(x: Tensor, group: TensorParallelGroup) -> Tensor:
    """``Partial`` sums added (over every process too) on the output device."""
    _expect(x, Partial, "reduce_from_region")
    return ReduceFromRegion.apply(x, group)


def scatter_to_region(
    x: Any, group: TensorParallelGroup, layout: BlockLayout, dtype: Any = None, axis: int = -1
) -> Tensor:
    """``X`` split along ``axis`` as ``layout`` says: a Dense ``X`` is scattered."""
    x = _as_input(x)
    return ScatterToRegion.apply(x, group, layout, axis, np.dtype(x.dtype if dtype is None else dtype))


def gather_from_region(x: Tensor, group: TensorParallelGroup) -> Tensor:
    """A ``Split`` tensor gathered, whole, on the output device."""
    _expect(x, Split, "gather_from_region")
    return GatherFromRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: Tensor, group: TensorParallelGroup) -> Tensor:
    """A sequence-split tensor all-gathered, whole on every device; a consumer that saves the result
    for backward keeps only the slices (see :meth:`tp_gpu.autograd.Context.save_for_backward`)."""
    _expect(x, Split, "gather_from_sequence_parallel_region")
    return GatherFromSequenceParallelRegion.apply(x, group, is_grad_enabled())


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: TensorParallelGroup) -> Tensor:
    """``Partial`` sums added and split along the sequence axis (-2) over the workers."""
    _expect(x, Partial, "reduce_scatter_to_sequence_parallel_region")
    return ReduceScatterToSequenceParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: Any, group: TensorParallelGroup, dtype: Any = None) -> Tensor:
    """``X`` ``(..., S, H)`` split along the sequence: a Dense ``X`` scattered, a sequence-split one
    moved to the group's layout if it lies elsewhere."""
    x = _as_input(x)
    if x.ndim < 2:
        raise ShapeError(f"sequence parallelism needs a sequence axis: shape (..., S, H), got {x.shape}")
    return split(x, group, sequence_layout(group, x.shape[SEQUENCE_AXIS]), dtype, SEQUENCE_AXIS)


def _expect(x: Any, placement: type, what: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(x.placement, placement):
        got = x.placement if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{what} takes a {placement.__name__} tensor, got {got!r}")


def replicate(x: Any, group: TensorParallelGroup, dtype: Any, what: str = "input") -> Tensor:
    """``X`` whole on every device of ``group``, as ``dtype``: what a column-parallel layer multiplies.

    A Dense ``X`` (or raw array) is copied (:func:`copy_to_region`); a
    sequence-split one is all-gathered
    (:func:`gather_from_sequence_parallel_region`). Any other placement is a ShapeError.
    """
    if not isinstance(x, Tensor):
        return copy_to_region(x, group, dtype)  # a raw array: a Dense constant
    p = x.placement
    if isinstance(p, Dense):
        return copy_to_region(x, group, dtype)
    if isinstance(p, Replicated) and p.devices == _devices(group) and x.dtype == dtype:
        return x
    if isinstance(p, Split) and x.ndim >= 2 and p.axis == x.ndim + SEQUENCE_AXIS:
        x = split(x, group, sequence_layout(group, x.shape[p.axis]), dtype, SEQUENCE_AXIS, what)
        return gather_from_sequence_parallel_region(x, group)
    raise ShapeError(
        f"{what} is placed {p!r} (shape {x.shape}, dtype {x.dtype}); expected a Dense tensor, one split "
        f"along the sequence (axis {x.ndim + SEQUENCE_AXIS}), or one replicated in {np.dtype(dtype)}"
    )


def split(
    x: Any,
    group: TensorParallelGroup,
    layout: BlockLayout,
    dtype: Any = None,
    axis: int = -1,
    what: str = "input",
) -> Tensor:
    """``X`` split along ``axis`` as ``layout`` says: a Dense ``X`` scattered
    (:func:`scatter_to_region`), a split one used as it lies (moved where ``layout``'s devices differ).
    A tensor split otherwise is a ShapeError naming both splits."""
    x = _as_input(x)
    p = x.placement
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    if isinstance(p, Dense):
        return scatter_to_region(x, group, layout, dtype, axis)
    if isinstance(p, Split) and p.axis == axis % x.ndim and p.layout.sizes == layout.sizes:
        if p.layout == layout and x.dtype == dtype:
            return x
        return Relayout.apply(x, layout, dtype)
    raise ShapeError(
        f"{what} of shape {x.shape} is placed {p!r}; expected it Dense or split on axis "
        f"{axis % x.ndim} with sizes {layout.sizes}"
    )


def place_like(param: Tensor, x: Tensor, group: TensorParallelGroup) -> Tensor:
    """A ``Dense`` parameter (LayerNorm's weight) where an elementwise layer meets ``x``: the parameter
    itself beside a ``Dense`` ``x`` on its device (or on the host: the layer moves ``x`` there), else
    copied to each of ``group``'s devices (:func:`copy_to_region`; backward sums the ``Partial``
    gradient onto the parameter's device) beside an ``x`` split, replicated or whole on some of them."""
    p, devices = x.placement, set(_devices(group))
    if isinstance(p, Dense) and p.device in (HOST, *param.blocks):
        return param
    on = set(p.layout.devices if isinstance(p, Split) else getattr(p, "devices", [getattr(p, "device", 0)]))
    if isinstance(p, Partial) or not on <= devices:
        raise ShapeError(
            f"cannot place a parameter beside an input of shape {x.shape} placed {p!r}; expected the "
            f"input Dense, or split or replicated over the group's devices {sorted(devices, key=str)}"
        )
    return copy_to_region(param, group)
