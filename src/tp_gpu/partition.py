"""How a split dimension is cut over workers, and where each worker's slice lies on its device.

A dimension of ``size`` split over ``p`` workers is cut into balanced,
contiguous, half-open ranges ``[first, last)``, as ``np.array_split`` cuts it:
the first ``size % p`` workers get one more. With ``unit > 1`` the cut keeps
units of ``unit`` consecutive indices whole (attention heads of ``head_dim``
columns), and the units are balanced instead: 12 heads over 8 workers give
2, 2, 2, 2, 1, 1, 1, 1 heads. Workers may get nothing when there are more of
them than units; an empty shard is a valid shard.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from .config import check_positive_int
from .errors import ConfigError
from .placement import workers_by_device

__all__ = ["BlockLayout", "padded_split_sizes", "split_ranges", "split_sizes"]


def split_sizes(size: int, parts: int, unit: int = 1, what: str = "size") -> list[int]:
    """Balanced sizes of ``parts`` contiguous pieces of ``size`` indices, in whole ``unit`` s.

    >>> split_sizes(10, 4)
    [3, 3, 2, 2]
    >>> split_sizes(12 * 64, 8, unit=64)  # 12 heads of 64 columns on 8 workers
    [128, 128, 128, 128, 64, 64, 64, 64]
    """
    size = check_positive_int(size, what)
    parts = check_positive_int(parts, "n_workers")
    unit = check_positive_int(unit, f"unit of {what}")
    if size % unit:
        raise ConfigError(
            f"{what} ({size}) is not a whole number of units of {unit}; expected a multiple of {unit}"
        )
    base, extra = divmod(size // unit, parts)
    return [(base + (i < extra)) * unit for i in range(parts)]


def split_ranges(size: int, parts: int, unit: int = 1, what: str = "size") -> list[tuple[int, int]]:
    """The half-open ``[first, last)`` of each piece of :func:`split_sizes`, in worker order."""
    ranges, first = [], 0
    for piece in split_sizes(size, parts, unit, what):
        ranges.append((first, first + piece))
        first += piece
    return ranges


def padded_split_sizes(size: int, parts: int, multiple: int, what: str = "size") -> tuple[list[int], int]:
    """Megatron's padded split: ``(logical sizes, capacity)`` of ``parts`` equal shards of ``capacity``.

    The dimension is padded to a multiple of ``parts * multiple`` and cut into
    equal shards of ``capacity`` (a multiple of ``multiple``); the padding
    falls at the end, so the last shards hold fewer logical indices (possibly
    none). ``padded_split_sizes(50257, 4, 64)`` gives shards of 12,608 and
    logical sizes 12,608, 12,608, 12,608 and 12,433.
    """
    size = check_positive_int(size, what)
    parts = check_positive_int(parts, "n_workers")
    multiple = check_positive_int(multiple, "pad_to_multiple_of")
    capacity = -(-size // (parts * multiple)) * multiple
    return [max(0, min(capacity, size - i * capacity)) for i in range(parts)], capacity


def _local_ranges(capacities: Sequence[int], sizes: Sequence[int], groups: dict[Hashable, list[int]]):
    """Where each worker's slice sits inside its device's block (workers side by side, in order),
    and each block's length. A worker takes ``capacities[w]`` places of which the first ``sizes[w]``
    hold its logical slice; the rest is padding."""
    local = [(0, 0)] * len(sizes)
    lengths = {}
    for device, workers in groups.items():
        offset = 0
        for w in workers:
            local[w] = (offset, offset + sizes[w])
            offset += capacities[w]
        lengths[device] = offset
    return local, lengths


class BlockLayout:
    """Where each worker's slice of a split dimension lives: its device and its place in that device's block.

    The workers placed on one device keep their slices side by side, in worker
    order, in one contiguous *block* per device, so that a device runs one GEMM
    (or one lookup) for all of its workers. Worker ``i`` owns the global range
    ``ranges[i] = [first, last)`` and sits at ``local[i]`` inside the block of
    ``devices[i]``.

    When several processes share the dimension, this process's workers own the
    *span* ``[start, start + size)`` of a dimension of ``total``; ``ranges``
    are global indices and ``spans`` lists every process's span, in rank order.

    Example: 10 columns on 3 workers placed on devices ``[0, 1, 0]`` give
    ``ranges = [(0, 4), (4, 7), (7, 10)]``, blocks of 7 columns on device 0
    (workers 0 and 2) and 3 on device 1, and ``local = [(0, 4), (0, 3), (4, 7)]``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        devices: Sequence[Hashable],
        start: int = 0,
        total: int | None = None,
        spans: Sequence[tuple[int, int]] | None = None,
        capacities: Sequence[int] | None = None,
    ) -> None:
        if len(sizes) != len(devices):
            raise ConfigError(
                f"got {len(sizes)} split sizes for {len(devices)} workers; expected one per worker"
            )
        #: Places each worker takes in its device's block: its size, or more with padding.
        self.capacities: list[int] = list(sizes) if capacities is None else list(capacities)
        starts = [start]
        for s in sizes:
            starts.append(starts[-1] + s)
        self.start: int = start
        self.size: int = starts[-1] - start
        self.total: int = starts[-1] if total is None else total
        self.spans: list[tuple[int, int]] = [(start, start + self.size)] if spans is None else list(spans)
        self.ranges: list[tuple[int, int]] = list(zip(starts[:-1], starts[1:]))
        self.devices: list[Hashable] = list(devices)
        self.groups: dict[Hashable, list[int]] = workers_by_device(self.devices)
        self.local, self.block_lengths = _local_ranges(self.capacities, self.sizes, self.groups)
        #: True when some worker's block holds padding after its logical slice.
        self.padded: bool = self.capacities != self.sizes

    @classmethod
    def split(
        cls,
        size: int,
        devices: Sequence[Hashable],
        rank: int = 0,
        world_size: int = 1,
        unit: int = 1,
        what: str = "size",
        pad_to_multiple_of: int | None = None,
    ) -> BlockLayout:
        """``size`` split over ``len(devices) * world_size`` workers, of which this process
        (``rank``) holds the consecutive ``len(devices)`` placed on ``devices``.

        The split is :func:`split_sizes` (balanced, whole ``unit`` s), or with
        ``pad_to_multiple_of`` :func:`padded_split_sizes` (equal shards, a
        multiple of it, padding at the end).
        """
        local = len(devices)
        if pad_to_multiple_of is None:
            sizes = split_sizes(size, local * world_size, unit, what)
            capacities = sizes
        else:
            if unit != 1:
                raise ConfigError(f"{what}: padding and whole-unit splits cannot be combined (unit={unit})")
            sizes, capacity = padded_split_sizes(size, local * world_size, pad_to_multiple_of, what)
            capacities = [capacity] * len(sizes)
        return cls.from_sizes(sizes, devices, rank, world_size, capacities)

    @classmethod
    def from_sizes(
        cls,
        sizes: Sequence[int],
        devices: Sequence[Hashable],
        rank: int = 0,
        world_size: int = 1,
        capacities: Sequence[int] | None = None,
    ) -> BlockLayout:
        """The layout of a dimension cut into the given consecutive ``sizes``, one per worker of every
        process (``len(devices) * world_size`` of them), of which this process (``rank``) holds the
        ``len(devices)`` placed on ``devices``. :meth:`split` chooses the sizes; a caller with its own
        rule (whole groups of attention heads) passes them here.
        """
        local = len(devices)
        if len(sizes) != local * world_size:
            raise ConfigError(
                f"got {len(sizes)} sizes for {local} workers on each of {world_size} processes; "
                f"expected {local * world_size}"
            )
        capacities = list(sizes) if capacities is None else list(capacities)
        bounds = [0]
        for r in range(world_size):
            bounds.append(bounds[-1] + sum(sizes[r * local : (r + 1) * local]))
        spans = list(zip(bounds[:-1], bounds[1:]))
        mine = slice(rank * local, (rank + 1) * local)
        start, total = spans[rank][0], bounds[-1]
        return cls(sizes[mine], devices, start=start, total=total, spans=spans, capacities=capacities[mine])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockLayout) and (
            self.ranges,
            self.devices,
            self.total,
            self.capacities,
        ) == (
            other.ranges,
            other.devices,
            other.total,
            other.capacities,
        )

    def __hash__(self) -> int:
        return hash((tuple(self.ranges), tuple(self.devices), self.total, tuple(self.capacities)))

    @property
    def sizes(self) -> list[int]:
        """Length of each of this process's workers' slices."""
        return [last - first for first, last in self.ranges]

    def run(self, device: Hashable) -> tuple[int, int] | None:
        """``[first, last)`` when ``device``'s block starts with one consecutive global range, in order,
        and holds nothing else but trailing padding; else None."""
        workers = self.groups[device]
        consecutive = all(b == a + 1 for a, b in zip(workers, workers[1:]))
        unpadded = all(self.capacities[w] == self.sizes[w] for w in workers[:-1])
        if consecutive and unpadded:
            return self.ranges[workers[0]][0], self.ranges[workers[-1]][1]
        return None

    def is_whole(self, device: Hashable) -> bool:
        """True when ``device``'s block is exactly this process's whole span in order (a single device)."""
        whole = self.run(device) == (self.start, self.start + self.size)
        return whole and self.block_lengths[device] == self.size

    def logical_mask(self, xp: Any, device: Hashable) -> Any | None:
        """A boolean ``(block_length,)`` array on the current device, True where ``device``'s block
        holds a logical index and False on padding; None when the block has no padding."""
        if self.block_lengths[device] == sum(self.sizes[w] for w in self.groups[device]):
            return None
        mask = xp.zeros(self.block_lengths[device], dtype=bool)
        for w in self.groups[device]:
            mask[slice(*self.local[w])] = True
        return mask

    def span_slice(self, worker: int) -> slice:
        """Where ``worker``'s range lies within this process's span."""
        first, last = self.ranges[worker]
        return slice(first - self.start, last - self.start)

    def global_slices(self, device: Hashable) -> list[slice]:
        """The global slices that, concatenated, form ``device``'s block."""
        run = self.run(device)
        if run is not None:
            return [slice(*run)]
        return [slice(*self.ranges[w]) for w in self.groups[device]]

    def owned_local(self, xp, ids, device: Hashable):
        """For global indices ``ids`` (on ``device``): ``(owned, local)`` of ``device``'s block.

        ``owned`` is True where a worker of ``device`` owns the index and
        ``local`` is its row in the block (0 where not owned). ``owned`` is
        None when the block is the whole dimension (every index is owned).
        """
        run = self.run(device)
        if run is not None:
            first, last = run
            if (first, last) == (0, self.total):
                return None, ids
            owned = (ids >= first) & (ids < last)
            return owned, xp.where(owned, ids - first, 0)
        owned, local = None, None
        for w in self.groups[device]:
            first, last = self.ranges[w]
            mine = (ids >= first) & (ids < last)
            shifted = xp.where(mine, ids - first + self.local[w][0], 0)
            owned = mine if owned is None else owned | mine
            local = shifted if local is None else local + shifted
        return owned, local

    def __repr__(self) -> str:
        return f"BlockLayout(ranges={self.ranges}, devices={self.devices}, total={self.total})"
