"""Split sizes and half-open ``[first, last)`` ranges of a partitioned dimension."""

from __future__ import annotations

import numbers
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from .config import check_positive_int
from .errors import ConfigError
from .placement import workers_by_device

__all__ = ["check_divisible", "shard_size", "shard_range", "shard_ranges", "BlockLayout"]


def check_divisible(size: int, n_workers: int, what: str) -> None:
    """Raise ConfigError unless ``n_workers`` divides ``size`` (the dimension ``what``)."""
    n_workers = check_positive_int(n_workers, "n_workers")
    size = check_positive_int(size, what)
    if size % n_workers:
        lower = size - size % n_workers
        raise ConfigError(
            f"{what} ({size}) must be divisible by n_workers ({n_workers}); "
            f"the nearest valid sizes are {lower or n_workers} and {lower + n_workers}"
        )


def shard_size(size: int, n_workers: int, what: str = "size") -> int:
    """Size of each worker's shard of a dimension of ``size`` split ``n_workers`` ways."""
    check_divisible(size, n_workers, what)
    return size // n_workers


def shard_range(size: int, n_workers: int, worker: int, what: str = "size") -> Tuple[int, int]:
    """The half-open range ``[first, last)`` of ``worker``'s shard."""
    chunk = shard_size(size, n_workers, what)
    if isinstance(worker, bool) or not isinstance(worker, numbers.Integral) or not 0 <= worker < n_workers:
        raise ConfigError(f"worker {worker!r} out of range; expected 0 <= worker < {n_workers}")
    return worker * chunk, (worker + 1) * chunk


def shard_ranges(size: int, n_workers: int, what: str = "size") -> List[Tuple[int, int]]:
    """``[first, last)`` of every worker's shard, in worker order."""
    chunk = shard_size(size, n_workers, what)
    return [(i * chunk, (i + 1) * chunk) for i in range(n_workers)]


class BlockLayout:
    """Where each worker's slice of a split dimension lives: its device and its place in that device's block.

    The workers placed on one device keep their slices side by side, in worker
    order, in one contiguous *block* per device, so that a device runs one GEMM
    (or one lookup) for all of its workers. Worker ``i`` owns the global range
    ``ranges[i] = [first, last)`` and sits at ``local[i]`` inside the block of
    ``devices[i]``.

    With one device the block is the whole dimension in global order; with one
    worker per device each block is that worker's slice.

    When several processes share the dimension, this process's workers own the
    *span* ``[start, start + size)`` of a dimension of ``total``; ``ranges`` are
    global indices.
    """

    def __init__(self, sizes: Sequence[int], devices: Sequence[Hashable], start: int = 0, total: Optional[int] = None) -> None:
        if len(sizes) != len(devices):
            raise ConfigError(f"got {len(sizes)} split sizes for {len(devices)} workers; expected one per worker")
        starts = [start]
        for s in sizes:
            starts.append(starts[-1] + s)
        self.start: int = start
        self.size: int = starts[-1] - start
        self.total: int = starts[-1] if total is None else total
        self.ranges: List[Tuple[int, int]] = list(zip(starts[:-1], starts[1:]))
        self.devices: List[Hashable] = list(devices)
        self.groups: Dict[Hashable, List[int]] = workers_by_device(self.devices)
        self.local: List[Tuple[int, int]] = [(0, 0)] * len(sizes)
        self.block_sizes: Dict[Hashable, int] = {}
        for device, workers in self.groups.items():
            offset = 0
            for w in workers:
                first, last = self.ranges[w]
                self.local[w] = (offset, offset + last - first)
                offset += last - first
            self.block_sizes[device] = offset

    @classmethod
    def even(cls, size: int, devices: Sequence[Hashable], what: str = "size", rank: int = 0, world_size: int = 1) -> "BlockLayout":
        """``size`` split evenly over ``len(devices) * world_size`` workers, of which this
        process (``rank``) holds the consecutive ``len(devices)`` placed on ``devices``."""
        chunk = shard_size(size, len(devices) * world_size, what)
        return cls([chunk] * len(devices), devices, start=rank * len(devices) * chunk, total=size)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockLayout) and (self.ranges, self.devices, self.total) == (
            other.ranges,
            other.devices,
            other.total,
        )

    def __hash__(self) -> int:
        return hash((tuple(self.ranges), tuple(self.devices), self.total))

    @property
    def sizes(self) -> List[int]:
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
