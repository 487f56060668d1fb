"""Split sizes and half-open ``[first, last)`` ranges of a partitioned dimension."""

from __future__ import annotations

from typing import List, Tuple

from .config import check_positive_int
from .errors import ConfigError

__all__ = ["check_divisible", "shard_size", "shard_range", "shard_ranges"]


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
    if not 0 <= worker < n_workers:
        raise ConfigError(f"worker {worker!r} out of range; expected 0 <= worker < {n_workers}")
    return worker * chunk, (worker + 1) * chunk


def shard_ranges(size: int, n_workers: int, what: str = "size") -> List[Tuple[int, int]]:
    """``[first, last)`` of every worker's shard, in worker order."""
    chunk = shard_size(size, n_workers, what)
    return [(i * chunk, (i + 1) * chunk) for i in range(n_workers)]
