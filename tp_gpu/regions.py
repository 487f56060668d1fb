"""The communication regions of Megatron's tensor parallelism, each forward beside its backward twin.

A layer enters and leaves a tensor-parallel region through one of four
conjugate pairs (Shoeybi et al., 2019; the names are Megatron-core's):

==========================  =======================  ========================
region                      forward                  backward
==========================  =======================  ========================
``copy_to_region``          copy X to every device   sum the partial dX
``reduce_from_region``      sum the partial Y        copy dY to every device
``scatter_to_region``       split X by columns       gather dX
``gather_from_region``      gather Y                 split dY by columns
==========================  =======================  ========================

Inside a region each device holds one *block* (``{device: array}``): its
workers' slices side by side. Column-parallel then row-parallel needs no
region in between: that is the point of the scheme. The sequence-parallel
pair (reduce-scatter / all-gather along the sequence axis) joins these.

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
    "copy_to_region",
    "reduce_from_region",
    "scatter_to_region",
    "gather_from_region",
]


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
