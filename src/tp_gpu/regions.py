"""The communication regions of Megatron's tensor parallelism, each forward beside its backward twin.

A layer enters and leaves a tensor-parallel region through one of four
conjugate pairs (Shoeybi et al., 2019; the names are Megatron-core's):

==============================================  =======================  ==========================
region                                          forward                  backward
==============================================  =======================  ==========================
``copy_to_region``                              copy X to every device   sum the partial dX
``reduce_from_region``                          sum the partial Y        copy dY to every device
``scatter_to_region``                           split X by columns       gather dX
``gather_from_region``                          gather Y                 split dY by columns
``gather_from_sequence_parallel_region``        all-gather X's rows      reduce-scatter partial dX
``reduce_scatter_to_sequence_parallel_region``  reduce-scatter partial   all-gather dY's rows
                                                Y into rows
``scatter_to_sequence_parallel_region``         split X by rows          gather dX
==============================================  =======================  ==========================

Inside a region each device holds one *block* (``{device: array}``): its
workers' slices side by side. Column-parallel then row-parallel needs no
region in between: that is the point of the scheme.

With sequence parallelism (Korthikanti et al., 2022) the activations between
the tensor-parallel regions are split along the sequence axis (axis -2 of
``(B, S, H)``; "rows" above), one slice per worker, and the all-reduce of the
row-parallel layer becomes a reduce-scatter into those slices, with the
all-gather moved in front of the next column-parallel layer. Each moves half
of what an all-reduce moves, so the communication volume is unchanged while
LayerNorm, dropout and the residuals hold ``1/p`` of the activations.

Every region takes the layers' :class:`~tp_gpu.group.TensorParallelGroup`
and moves arrays only through :mod:`tp_gpu.collectives`.
"""

from __future__ import annotations

from typing import Any, Sequence

from . import collectives
from .collectives import Blocks
from .group import TensorParallelGroup
from .partition import BlockLayout

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
    "sequence_layout",
]

#: The sequence axis of activations, ``(B, S, H)`` or ``(S, H)``.
SEQUENCE_AXIS = -2


class _CopyToRegion:
    """Forward: ``X`` copied once to each device. Backward: ``dX = sum_d dX_d`` on the output device."""

    @staticmethod
    def forward(group: TensorParallelGroup, x: Any, dtype: Any) -> Blocks:
        return collectives.broadcast(group.backend, x, group.devices, dtype)

    @staticmethod
    def backward(group: TensorParallelGroup, partials: Blocks) -> Any:
        return collectives.reduce_sum(group.backend, partials, group.output_device, group.comm)


class _ReduceFromRegion:
    """Forward: ``Y = sum_d Y_d`` on the output device. Backward: ``dY`` copied to each device."""

    @staticmethod
    def forward(group: TensorParallelGroup, partials: Blocks) -> Any:
        return collectives.reduce_sum(group.backend, partials, group.output_device, group.comm)

    @staticmethod
    def backward(group: TensorParallelGroup, grad: Any, dtype: Any, also: Sequence[Any] = ()) -> Blocks:
        """``dY`` on every worker's device, and on the devices ``also`` (the output device for a bias)."""
        return collectives.broadcast(group.backend, grad, [*group.devices, *also], dtype)


class _ScatterToRegion:
    """Forward: ``X`` split along ``axis`` into each device's block. Backward: the blocks of ``dX``
    gathered."""

    @staticmethod
    def forward(
        group: TensorParallelGroup, x: Any, layout: BlockLayout, dtype: Any, axis: int = -1
    ) -> Blocks:
        return collectives.scatter_blocks(group.backend, x, axis, layout, dtype)

    @staticmethod
    def backward(group: TensorParallelGroup, grads: Blocks, layout: BlockLayout, axis: int = -1) -> Any:
        return collectives.gather_blocks(group.backend, grads, axis, layout, group.output_device, group.comm)


class _GatherFromRegion:
    """Forward: the blocks of ``Y`` gathered on the output device. Backward: ``dY`` split into blocks."""

    @staticmethod
    def forward(group: TensorParallelGroup, blocks: Blocks, layout: BlockLayout, axis: int = -1) -> Any:
        return collectives.gather_blocks(group.backend, blocks, axis, layout, group.output_device, group.comm)

    @staticmethod
    def backward(
        group: TensorParallelGroup, grad: Any, layout: BlockLayout, dtype: Any, axis: int = -1
    ) -> Blocks:
        return collectives.scatter_blocks(group.backend, grad, axis, layout, dtype)


copy_to_region = _CopyToRegion()
reduce_from_region = _ReduceFromRegion()
scatter_to_region = _ScatterToRegion()
gather_from_region = _GatherFromRegion()


def sequence_layout(group: TensorParallelGroup, seq: int) -> BlockLayout:
    """How a sequence of ``seq`` positions is split over ``group``'s workers: balanced contiguous
    slices (the first ``seq % p`` one longer), one block per device, this process's span of it."""
    return group.split(seq, what="sequence length")


class _GatherFromSequenceParallelRegion:
    """Forward: ``X = concat_w X_w`` along the sequence, whole on every device (all-gather).
    Backward: each device's partial ``dX_d`` (a column layer's ``dY_d A_d^T``) summed and split:
    device ``d`` gets its slices of ``sum_e dX_e`` (reduce-scatter)."""

    @staticmethod
    def forward(
        group: TensorParallelGroup, blocks: Blocks, layout: BlockLayout, axis: int = SEQUENCE_AXIS
    ) -> Blocks:
        return collectives.all_gather_blocks(group.backend, blocks, axis, layout, group.comm)

    @staticmethod
    def backward(
        group: TensorParallelGroup, partials: Blocks, layout: BlockLayout, axis: int = SEQUENCE_AXIS
    ) -> Blocks:
        return collectives.reduce_scatter_blocks(group.backend, partials, axis, layout, group.comm)


class _ReduceScatterToSequenceParallelRegion:
    """Forward: each device's partial ``Y_d`` (a row layer's ``X_d A_d``) summed and split along the
    sequence: device ``d`` gets its slices of ``sum_e Y_e`` (reduce-scatter). Backward: the
    slices of ``dY`` all-gathered, whole on every device. The conjugate of the all-gather region:
    its forward is that region's backward, and the other way round."""

    forward = staticmethod(_GatherFromSequenceParallelRegion.backward)
    backward = staticmethod(_GatherFromSequenceParallelRegion.forward)


class _ScatterToSequenceParallelRegion:
    """Forward: a dense ``X`` split along the sequence, each device receiving only its slices.
    Backward: the slices of ``dX`` gathered into one dense array on the output device."""

    @staticmethod
    def forward(
        group: TensorParallelGroup, x: Any, layout: BlockLayout, dtype: Any, axis: int = SEQUENCE_AXIS
    ) -> Blocks:
        return collectives.scatter_blocks(group.backend, x, axis, layout, dtype)

    @staticmethod
    def backward(
        group: TensorParallelGroup, grads: Blocks, layout: BlockLayout, axis: int = SEQUENCE_AXIS
    ) -> Any:
        return collectives.gather_blocks(group.backend, grads, axis, layout, group.output_device, group.comm)


gather_from_sequence_parallel_region = _GatherFromSequenceParallelRegion()
reduce_scatter_to_sequence_parallel_region = _ReduceScatterToSequenceParallelRegion()
scatter_to_sequence_parallel_region = _ScatterToSequenceParallelRegion()
