"""Threads for tp_gpu's own host kernels: one kept pool per thread count.

NumPy's ufuncs and SciPy's sparse products release the GIL, so a large host kernel (the embedding's
scatter, the float32 ``erf``) splits its work into ranges and runs them on :func:`run_ranges`. The
pools are made on first use and kept, so a call does not pay for starting its threads.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Sequence

__all__ = ["run_ranges"]

_pools: Dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def run_ranges(fn: Callable[[int, int], None], firsts: Sequence[int], lasts: Sequence[int]) -> None:
    """``fn(firsts[i], lasts[i])`` for every ``i``, each on a thread of its own, until all return (the
    first exception raised is raised here)."""
    list(_pool(len(firsts)).map(fn, firsts, lasts))


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, made once per size and kept."""
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tp_gpu-host")
        return _pools[threads]
