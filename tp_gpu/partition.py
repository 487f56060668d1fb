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

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from .config import check_positive_int
from .errors import ConfigError
from .placement import workers_by_device

__all__ = ["split_sizes", "split_ranges", "BlockLayout"]


def split_sizes(size: int, parts: int, unit: int = 1, what: str = "size") -> List[int]:
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
        raise ConfigError(f"{what} ({size}) is not a whole number of units of {unit}; expected a multiple of {unit}")
    base, extra = divmod(size // unit, parts)
    return [(base + (i < extra)) * unit for i in range(parts)]


def split_ranges(size: int, parts: int, unit: int = 1, what: str = "size") -> List[Tuple[int, int]]:
    """The half-open ``[first, last)`` of each piece of :func:`split_sizes`, in worker order."""
    ranges, first = [], 0
    for piece in split_sizes(size, parts, unit, what):
        ranges.append((first, first + piece))
        first += piece
    return ranges


def _local_ranges(sizes: Sequence[int], groups: Dict[Hashable, List[int]]) -> List[Tuple[int, int]]:
    """Where each worker's slice sits inside its device's block (workers side by side, in order)."""
    local = [(0, 0)] * len(sizes)
    for workers in groups.values():
        offset = 0
        for w in workers:
            local[w] = (offset, offset + sizes[w])
            offset += sizes[w]
    return local


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
        total: Optional[int] = None,
        spans: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> None:
        if len(sizes) != len(devices):
            raise ConfigError(f"got {len(sizes)} split sizes for {len(devices)} workers; expected one per worker")
        starts = [start]
        for s in sizes:
            starts.append(starts[-1] + s)
        self.start: int = start
        self.size: int = starts[-1] - start
        self.total: int = starts[-1] if total is None else total
        self.spans: List[Tuple[int, int]] = [(start, start + self.size)] if spans is None else list(spans)
        self.ranges: List[Tuple[int, int]] = list(zip(starts[:-1], starts[1:]))
        self.devices: List[Hashable] = list(devices)
        self.groups: Dict[Hashable, List[int]] = workers_by_device(self.devices)
        self.local: List[Tuple[int, int]] = _local_ranges(self.sizes, self.groups)

    @classmethod
    def split(
        cls, size: int, devices: Sequence[Hashable], rank: int = 0, world_size: int = 1, unit: int = 1, what: str = "size"
    ) -> "BlockLayout":
        """``size`` split over ``len(devices) * world_size`` workers (:func:`split_sizes`), of which
        this process (``rank``) holds the consecutive ``len(devices)`` placed on ``devices``."""
        local = len(devices)
        sizes = split_sizes(size, local * world_size, unit, what)
        bounds = [0]
        for r in range(world_size):
            bounds.append(bounds[-1] + sum(sizes[r * local : (r + 1) * local]))
        spans = list(zip(bounds[:-1], bounds[1:]))
        mine = sizes[rank * local : (rank + 1) * local]
        return cls(mine, devices, start=spans[rank][0], total=size, spans=spans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockLayout) and (self.ranges, self.devices, self.total) == (
            other.ranges,
            other.devices,
            other.total,
        )

    def __hash__(self) -> int:
        return hash((tuple(self.ranges), tuple(self.devices), self.total))

    @property
    def sizes(self) -> List[int]:
        """Length of each of this process's workers' slices."""
        return [last - first for first, last in self.ranges]

    def run(self, device: Hashable) -> Optional[Tuple[int, int]]:
        """``[first, last)`` when ``device``'s workers own one consecutive global range, else None."""
        workers = self.groups[device]
        if all(b == a + 1 for a, b in zip(workers, workers[1:])):
            return self.ranges[workers[0]][0], self.ranges[workers[-1]][1]
        return None

    def is_whole(self, device: Hashable) -> bool:
        """True when ``device``'s block is this process's whole span in order (a single device)."""
        return self.run(device) == (self.start, self.start + self.size)

    def span_slice(self, worker: int) -> slice:
        """Where ``worker``'s range lies within this process's span."""
        first, last = self.ranges[worker]
        return slice(first - self.start, last - self.start)

    def global_slices(self, device: Hashable) -> List[slice]:
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

