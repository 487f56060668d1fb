"""Buffers a layer keeps from one call to the next, reused while nothing else holds them.

A training step on the host makes its large arrays anew every time: the logits, the MLP's hidden
activations. glibc's ``malloc`` serves an array of at least its mmap threshold (32 MiB once
:mod:`tp_gpu.host_memory` has pinned it; it cannot go higher) with freshly mapped memory and unmaps
it when the array is freed, so the next step's array of the same shape is new memory again. The
kernel serves each of its pages with a fault that zeroes the page, and for huge pages it may first
compact memory to find one. Measured on the AMD EPYC VM of ``benchmarks/results``: ``y @ W`` of
(4096, 512) @ (512, 50000) in float32 took 0.89 to 2.6 s into a fresh 819 MB array and 0.85 s into
a kept one, four times in a row each.

:class:`ReusedBuffers` keeps one buffer per device. :meth:`ReusedBuffers.take` hands it back when
its shape, dtype and device match and nothing else holds it, which is read from its reference
count: the output of an earlier call still alive (kept by the user, by the tape for a backward, or
as a view of it such as a gradient written into it) holds it, and the call gets a fresh array that
is not kept. A live value never shares its memory. The cost is one array per device kept between
calls; :meth:`ReusedBuffers.clear` drops them. :func:`gemm_output` decides which GEMM outputs are
worth keeping: host arrays of at least :data:`~tp_gpu.host_memory.MMAP_THRESHOLD` bytes.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, Hashable, Optional, Tuple

import numpy as np

from .host_memory import MMAP_THRESHOLD

__all__ = ["ReusedBuffers", "gemm_output", "KEEP_BYTES"]

#: Host GEMM outputs of at least this many bytes are written into kept buffers (below it, the heap
#: that :mod:`tp_gpu.host_memory` keeps serves them again without faults).
KEEP_BYTES = MMAP_THRESHOLD
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class ReusedBuffers:
    """One buffer per device, kept between calls and handed out again while nothing else holds it."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: Dict[Hashable, Any] = {}  # device -> its kept buffer

    def take(self, backend: Any, device: Hashable, shape: Tuple[int, ...], dtype: Any) -> Any:
        """A writable buffer of ``shape`` in ``dtype`` on ``device`` (call it under that device): the
        kept one when it matches and nothing else holds it; a new kept one when the shape, dtype or
        device changed; a fresh one, not kept, while the kept one is still in use."""
        shape, buffers = tuple(shape), self.buffers
        kept = buffers.get(device)
        if kept is not None and tuple(kept.shape) == shape and kept.dtype == dtype:
            if backend.device_of(kept) == device:
                if sys.getrefcount(kept) <= 3:  # only the dict's, ``kept``'s and the argument's
                    return kept
                return backend.xp.empty(shape, dtype=dtype)  # a live value holds it: a fresh one
        buffers[device] = backend.xp.empty(shape, dtype=dtype)  # new, or shape/dtype/device changed
        return buffers[device]

    def clear(self) -> None:
        """Drop every kept buffer (the next call allocates again)."""
        self.buffers = {}

    def __deepcopy__(self, memo: Dict[int, Any]) -> ReusedBuffers:
        return type(self)()  # a copy starts empty: it must never share a buffer with the original

    def __reduce__(self) -> Tuple[Any, Tuple[()]]:
        return (type(self), ())


def gemm_output(buffers: Optional[ReusedBuffers], backend: Any, device: Hashable, x: Any, w: Any) -> Any:
    """Where ``as_rows(x) @ w`` ``(N, a) @ (a, b)`` may write: a kept ``(N, b)`` buffer from ``buffers``
    when both are NumPy's own arrays (not the simulated devices', not CuPy's) of one dtype, float32 or
    float64, and the product has at least :data:`KEEP_BYTES`; else None (a new array, as usual)."""
    if buffers is None or type(x) is not np.ndarray or type(w) is not np.ndarray:
        return None
    dtype = x.dtype
    if dtype != w.dtype or dtype not in _DTYPES:
        return None
    shape = (math.prod(x.shape[:-1]), w.shape[-1])
    if shape[0] * shape[1] * dtype.itemsize < KEEP_BYTES:
        return None
    return buffers.take(backend, device, shape, dtype)
