"""ShardedTensor: a logical array kept as per-worker shards split along one axis."""

from __future__ import annotations

import numbers
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from . import collectives
from .comm import LocalComm
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
        One per worker, all of the same rank and dtype, equal on every axis but ``axis``.
    axis : int
        The split axis (negative values count from the end; stored non-negative).
    devices : sequence
        The device of each shard.
    backend : Backend
        The backend that owns the shards.
    comm : Communicator, optional
        With several processes (``comm.size > 1``) this process holds only its
        own workers' shards, a consecutive span of the split axis at
        ``comm.rank * span``; every process holds a span of the same length.
        ``shape`` and :meth:`gather` are then those of the whole logical array.
    """

    def __init__(self, shards: Sequence[Any], axis: int, devices: Sequence[Hashable], backend, comm=None) -> None:
        shards = list(shards)
        if not shards:
            raise ShapeError("a ShardedTensor needs at least one shard, got none")
        if len(devices) != len(shards):
            raise ShapeError(f"got {len(shards)} shards but {len(devices)} devices; expected one device per shard")
        ndim = shards[0].ndim
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
            raise ShapeError(f"axis {axis} is out of range for shards of rank {ndim}")
        axis %= ndim
        for i, (shard, device) in enumerate(zip(shards, devices)):
            if shard.ndim != ndim:
                raise ShapeError(f"shard {i} has rank {shard.ndim} (shape {tuple(shard.shape)}); expected rank {ndim}")
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
                raise ShapeError(f"shard {i} lives on device {backend.device_of(shard)!r}; expected {device!r}")
        self.shards: List[Any] = shards
        self.axis: int = axis
        self.devices: List[Hashable] = list(devices)
        self.backend = backend
        self.comm = LocalComm() if comm is None else comm
        self._blocks: Optional[Dict[Hashable, Any]] = None

    @classmethod
    def from_blocks(cls, blocks: Dict[Hashable, Any], axis: int, layout: BlockLayout, backend, comm=None) -> "ShardedTensor":
        """A ShardedTensor whose shards are views into per-device ``blocks`` laid out as ``layout``."""
        first = next(iter(blocks.values()))
        axis %= first.ndim
        index = (slice(None),) * axis
        shards = [blocks[d][index + (slice(*layout.local[w]),)] for w, d in enumerate(layout.devices)]
        tensor = cls(shards, axis, layout.devices, backend, comm)
        tensor._blocks = dict(blocks)
        return tensor

    @property
    def layout(self) -> BlockLayout:
        """How the split axis lies over the shards' devices (and this process's span of it)."""
        span = sum(self.split_sizes)
        return BlockLayout(self.split_sizes, self.devices, start=self.comm.rank * span, total=span * self.comm.size)

    def device_blocks(self) -> Dict[Hashable, Any]:
        """One contiguous block per device: its shards side by side, in worker order.

        Free for a tensor built from blocks; otherwise the shards that share a
        device are concatenated there.
        """
        if self._blocks is not None:
            return self._blocks
        blocks = {}
        for device, workers in self.layout.groups.items():
            if len(workers) == 1:
                blocks[device] = self.shards[workers[0]]
            else:
                with self.backend.device(device):
                    blocks[device] = self.backend.xp.concatenate([self.shards[w] for w in workers], axis=self.axis)
        return blocks

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of the logical (gathered) array, over every process."""
        shape = list(self.shards[0].shape)
        shape[self.axis] = sum(s.shape[self.axis] for s in self.shards) * self.comm.size
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
        """The full array, a new array on ``device`` (default: the first shard's device).

        With several processes this is collective: every process must call it.
        """
        span = collectives.all_gather(self.backend, self.shards, self.axis, self.devices[0] if device is None else device)
        return span if self.comm.size == 1 else self.comm.allgather(self.backend, span, self.axis)

    def map(self, fn) -> "ShardedTensor":
        """Apply an elementwise ``fn`` to every shard (or block), each under its own device."""
        if self._blocks is not None:
            blocks = {}
            for device, block in self._blocks.items():
                with self.backend.device(device):
                    blocks[device] = fn(block)
            return ShardedTensor.from_blocks(blocks, self.axis, self.layout, self.backend, self.comm)
        out = []
        for shard, device in zip(self.shards, self.devices):
            with self.backend.device(device):
                out.append(fn(shard))
        return ShardedTensor(out, self.axis, self.devices, self.backend, self.comm)

    def __repr__(self) -> str:
        return (
            f"ShardedTensor(shape={self.shape}, axis={self.axis}, dtype={self.dtype}, "
            f"split_sizes={self.split_sizes}, devices={self.devices})"
        )
