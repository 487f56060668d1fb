"""ShardedTensor: a :class:`~tp_gpu.Tensor` split along one axis, built from per-worker shards."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from . import collectives
from .backends.base import Backend, from_dlpack, is_dlpack_array
from .collectives import Blocks
from .comm import Communicator
from .comm.base import LocalComm
from .errors import ShapeError
from .partition import BlockLayout
from .placements import Split
from .tensor import SPLIT_CLASS, Tensor

__all__ = ["ShardedTensor"]


class ShardedTensor(Tensor):
    """A logical array ``concatenate(shards, axis)`` that is never materialised: a Tensor placed
    ``Split(axis, layout)``.

    Worker ``i``'s shard lives on ``devices[i]``. This is what
    :class:`~tp_gpu.ColumnParallelLinear` returns with ``gather_output=False``,
    and what :class:`~tp_gpu.RowParallelLinear` accepts without re-splitting.

    Parameters
    ----------
    shards : sequence of arrays
        One per worker, all of the same rank and dtype, equal on every axis but ``axis``,
        of any strides. DLPack arrays (PyTorch tensors) are imported without a copy
        (:func:`~tp_gpu.backends.from_dlpack`): host memory as NumPy, GPU memory as CuPy.
    axis : int
        The split axis (negative values count from the end; stored non-negative).
    devices : sequence
        The device of each shard.
    backend : Backend
        The backend that owns the shards.
    comm : Communicator, optional
        With several processes (``comm.size > 1``) this process holds only its
        own workers' shards, a consecutive span of the split axis.
        ``shape`` and :meth:`gather` are then those of the whole logical array.
    """

    __slots__ = ()

    def __init__(
        self,
        shards: Sequence[Any],
        axis: int,
        devices: Sequence[Hashable],
        backend: Backend,
        comm: Optional[Communicator] = None,
    ) -> None:
        shards = [from_dlpack(s) if is_dlpack_array(s) else s for s in shards]
        if not shards:
            raise ShapeError("a ShardedTensor needs at least one shard, got none")
        if len(devices) != len(shards):
            raise ShapeError(
                f"got {len(shards)} shards but {len(devices)} devices; expected one device per shard"
            )
        ndim = shards[0].ndim
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
            raise ShapeError(f"axis {axis} is out of range for shards of rank {ndim}")
        axis %= ndim
        for i, (shard, device) in enumerate(zip(shards, devices)):
            if shard.ndim != ndim:
                raise ShapeError(
                    f"shard {i} has rank {shard.ndim} (shape {tuple(shard.shape)}); expected rank {ndim}"
                )
            other = list(shard.shape)
            first = list(shards[0].shape)
            other[axis] = first[axis] = -1
            if other != first:
                raise ShapeError(
                    f"shard {i} has shape {tuple(shard.shape)}; expected {tuple(shards[0].shape)} "
                    f"on every axis but the split axis {axis}"
                )
            if shard.dtype != shards[0].dtype:
                raise ShapeError(f"shard {i} has dtype {shard.dtype}; expected {shards[0].dtype}")
            if backend.device_of(shard) != device:
                raise ShapeError(
                    f"shard {i} lives on device {backend.device_of(shard)!r}; expected {device!r}"
                )
        comm = LocalComm() if comm is None else comm
        span = sum(s.shape[axis] for s in shards)
        spans = [(r * span, (r + 1) * span) for r in range(comm.size)]
        layout = BlockLayout(
            [s.shape[axis] for s in shards], list(devices), spans[comm.rank][0], span * comm.size, spans
        )
        groups = {d: [shards[w] for w in workers] for d, workers in layout.groups.items()}
        blocks = collectives.on_devices(
            backend,
            lambda parts: parts[0] if len(parts) == 1 else backend.xp.concatenate(parts, axis=axis),
            groups,
        )
        shape = list(shards[0].shape)
        shape[axis] = layout.total
        Tensor.__init__(self, blocks, Split(axis, layout), tuple(shape), shards[0].dtype, backend, comm)

    @classmethod
    def from_blocks(
        cls,
        blocks: Blocks,
        axis: int,
        layout: BlockLayout,
        backend: Backend,
        comm: Optional[Communicator] = None,
    ) -> ShardedTensor:
        """A ShardedTensor whose shards are views into per-device ``blocks`` laid out as ``layout``."""
        first = next(iter(blocks.values()))
        axis %= first.ndim
        shape = list(first.shape)
        shape[axis] = layout.total
        tensor = cls.__new__(cls)
        Tensor.__init__(tensor, dict(blocks), Split(axis, layout), tuple(shape), first.dtype, backend, comm)
        return tensor

    @property
    def axis(self) -> int:
        """The split axis (non-negative)."""
        return self.placement.axis  # type: ignore[attr-defined]  # always a Split

    @property
    def layout(self) -> BlockLayout:
        """How the split axis lies over the shards' devices (and this process's span of it).

        A tensor built from shards with several processes is taken to hold
        spans of equal length on every process.
        """
        return self.placement.layout  # type: ignore[attr-defined]  # always a Split

    @property
    def devices(self) -> List[Hashable]:
        """The device of each shard."""
        return list(self.layout.devices)

    @property
    def shards(self) -> List[Any]:
        """Worker ``i``'s slice, a view into its device's block."""
        index = (slice(None),) * self.axis
        layout = self.layout
        return [self.blocks[d][index + (slice(*layout.local[w]),)] for w, d in enumerate(layout.devices)]

    def device_blocks(self) -> Blocks:
        """One contiguous block per device: its shards side by side, in worker order."""
        return self.blocks

    def blocks_for(
        self, layout: BlockLayout, dtype: Any, shape: Optional[Tuple[int, ...]], what: str, axis: int = -1
    ) -> Blocks:
        """This tensor's blocks as a layer laid out as ``layout`` needs them, in ``dtype``.

        The tensor must be split on ``axis`` (by default its last) with
        ``layout``'s sizes (and have ``shape`` when given), else ShapeError.
        Shards on other devices than ``layout``'s are moved there.
        """
        if (
            (shape is not None and self.shape != shape)
            or self.axis != axis % self.ndim
            or self.split_sizes != layout.sizes
        ):
            expected = f"shape {shape} split" if shape is not None else "split"
            where = "the last axis" if axis == -1 else f"axis {axis}"
            raise ShapeError(
                f"{what} ShardedTensor of shape {self.shape} is split on axis {self.axis} with sizes "
                f"{self.split_sizes}; expected {expected} on {where} with sizes {layout.sizes}"
            )
        assert self.backend is not None
        if self.devices != layout.devices or self.layout.capacities != layout.capacities:
            return collectives.assemble_blocks(self.backend, self.shards, self.axis, layout, dtype)
        blocks = self.blocks
        return dict(
            zip(blocks, collectives.to_devices(self.backend, list(blocks.values()), list(blocks), dtype))
        )

    @property
    def split_sizes(self) -> List[int]:
        """Length of each of this process's shards along the split axis."""
        return self.layout.sizes

    def gather(self, device: Optional[Hashable] = None) -> Any:
        """The full array on ``device`` (default: the first shard's device).

        A new array, except where one device block already is the whole array in order
        (one shard, or workers sharing one device): that block itself is returned, so copy it
        before writing into it.

        With several processes this is collective: every process must call it.
        """
        assert self.backend is not None
        dst = self.devices[0] if device is None else device
        return collectives.gather_blocks(self.backend, self.blocks, self.axis, self.layout, dst, self.comm)

    def map(self, fn: Callable[[Any], Any]) -> ShardedTensor:
        """Apply an elementwise ``fn`` to every device block, each under its own device (not recorded)."""
        assert self.backend is not None
        blocks = collectives.on_devices(self.backend, fn, self.blocks)
        dtypes = {np.dtype(b.dtype) for b in blocks.values()}
        for d, b in blocks.items():
            if tuple(b.shape) != tuple(self.blocks[d].shape) or len(dtypes) > 1:
                raise ShapeError(
                    f"map's fn must be elementwise: device {d!r}'s block became {tuple(b.shape)} "
                    f"{b.dtype}, from {tuple(self.blocks[d].shape)}; expected that shape and one dtype"
                )
        return ShardedTensor.from_blocks(blocks, self.axis, self.layout, self.backend, self.comm)

    def __repr__(self) -> str:
        grad = f", grad_fn={self.grad_fn.name}" if self.grad_fn is not None else ""
        return (
            f"ShardedTensor(shape={self.shape}, axis={self.axis}, dtype={self.dtype}, "
            f"split_sizes={self.split_sizes}, devices={self.devices}{grad})"
        )


SPLIT_CLASS[0] = ShardedTensor
