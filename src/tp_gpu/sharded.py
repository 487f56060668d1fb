"""ShardedTensor: a logical array kept as per-worker shards split along one axis."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Hashable, List, Optional, Sequence, Tuple

from . import collectives
from .backends.base import from_dlpack, is_dlpack_array
from .collectives import Blocks
from .comm import Communicator, LocalComm
from .errors import ShapeError
from .partition import BlockLayout

__all__ = ["ShardedTensor"]


class ShardedTensor:
    """A logical array ``concatenate(shards, axis)`` that is never materialised.

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

    def __init__(
        self,
        shards: Sequence[Any],
        axis: int,
        devices: Sequence[Hashable],
        backend: Any,
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
        self.shards: List[Any] = shards
        self.axis: int = axis
        self.devices: List[Hashable] = list(devices)
        self.backend: Any = backend
        self.comm: Communicator = LocalComm() if comm is None else comm
        self._blocks: Optional[Blocks] = None
        self._layout: Optional[BlockLayout] = None

    @classmethod
    def from_blocks(
        cls, blocks: Blocks, axis: int, layout: BlockLayout, backend: Any, comm: Optional[Communicator] = None
    ) -> ShardedTensor:
        """A ShardedTensor whose shards are views into per-device ``blocks`` laid out as ``layout``."""
        first = next(iter(blocks.values()))
        axis %= first.ndim
        index = (slice(None),) * axis
        shards = [blocks[d][index + (slice(*layout.local[w]),)] for w, d in enumerate(layout.devices)]
        tensor = cls(shards, axis, layout.devices, backend, comm)
        tensor._blocks = dict(blocks)
        tensor._layout = layout
        return tensor

    @property
    def layout(self) -> BlockLayout:
        """How the split axis lies over the shards' devices (and this process's span of it).

        A tensor built from shards with several processes is taken to hold
        spans of equal length on every process.
        """
        if self._layout is None:
            span = sum(self.split_sizes)
            spans = [(r * span, (r + 1) * span) for r in range(self.comm.size)]
            start = spans[self.comm.rank][0]
            self._layout = BlockLayout(self.split_sizes, self.devices, start, span * self.comm.size, spans)
        return self._layout

    def device_blocks(self) -> Blocks:
        """One contiguous block per device: its shards side by side, in worker order.

        Free for a tensor built from blocks; otherwise the shards that share a
        device are concatenated there.
        """
        if self._blocks is None:
            xp, axis = self.backend.xp, self.axis
            shards = {d: [self.shards[w] for w in workers] for d, workers in self.layout.groups.items()}
            self._blocks = collectives.on_devices(
                self.backend,
                lambda parts: parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=axis),
                shards,
            )
        return self._blocks

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
        if self.devices != layout.devices or self.layout.capacities != layout.capacities:
            return collectives.assemble_blocks(self.backend, self.shards, self.axis, layout, dtype)
        blocks = self.device_blocks()
        return dict(
            zip(blocks, collectives.to_devices(self.backend, list(blocks.values()), list(blocks), dtype))
        )

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the logical (gathered) array, over every process."""
        shape = list(self.shards[0].shape)
        shape[self.axis] = self.layout.total
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return self.shards[0].ndim

    @property
    def dtype(self):
        return self.shards[0].dtype

    @property
    def split_sizes(self) -> List[int]:
        """Length of each of this process's shards along the split axis."""
        return [s.shape[self.axis] for s in self.shards]

    def gather(self, device: Optional[Hashable] = None) -> Any:
        """The full array on ``device`` (default: the first shard's device).

        A new array, except where one device block already is the whole array in order
        (one shard, or workers sharing one device): that block itself is returned, so copy it
        before writing into it.

        With several processes this is collective: every process must call it.
        """
        dst = self.devices[0] if device is None else device
        return collectives.gather_blocks(
            self.backend, self.device_blocks(), self.axis, self.layout, dst, self.comm
        )

    def map(self, fn: Callable[[Any], Any]) -> ShardedTensor:
        """Apply an elementwise ``fn`` to every device block, each under its own device."""
        blocks = collectives.on_devices(self.backend, fn, self.device_blocks())
        return ShardedTensor.from_blocks(blocks, self.axis, self.layout, self.backend, self.comm)

    def __repr__(self) -> str:
        return (
            f"ShardedTensor(shape={self.shape}, axis={self.axis}, dtype={self.dtype}, "
            f"split_sizes={self.split_sizes}, devices={self.devices})"
        )
