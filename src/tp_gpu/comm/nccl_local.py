"""NCCL among the GPUs of one process (``cupy.cuda.nccl.NcclCommunicator.initAll``).

Opt-in with ``TP_GPU_NCCL=1`` on the CuPy backend with two or more GPUs; peer
copies stay the default and the fallback. Used for the cross-device step of a
reduction when every GPU of the backend holds one partial of the same shape
and dtype (:meth:`InProcessNccl.can_reduce`).

Each GPU's part of the reduction is queued on that GPU's current stream, inside
one NCCL group, so the partials are read after the work that produced them and
the result is ready for the work queued after it on the destination.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from ..backends.base import Blocks

__all__ = ["InProcessNccl", "maybe_in_process_nccl"]


class InProcessNccl:
    """One NCCL communicator per GPU of ``devices``, all in this process."""

    def __init__(self, cupy, devices) -> None:
        from cupy.cuda import nccl

        self._cupy, self._nccl = cupy, nccl
        self.devices = list(devices)
        self.comms = nccl.NcclCommunicator.initAll(self.devices)
        self._types = {
            np.dtype(np.float16): nccl.NCCL_FLOAT16,
            np.dtype(np.float32): nccl.NCCL_FLOAT32,
            np.dtype(np.float64): nccl.NCCL_FLOAT64,
        }
        self._ops = {"add": nccl.NCCL_SUM, "maximum": nccl.NCCL_MAX}

    def can_reduce(self, arrays: Blocks, dst: Hashable, ufunc: str) -> bool:
        """True when NCCL can do this reduction: one same-shaped array on every GPU, a known op and dtype."""
        if set(arrays) != set(self.devices) or dst not in arrays or ufunc not in self._ops:
            return False
        first = next(iter(arrays.values()))
        same = all(a.shape == first.shape and a.dtype == first.dtype for a in arrays.values())
        return first.dtype in self._types and same

    def reduce(self, arrays: Blocks, dst: Hashable, ufunc: str) -> Any:
        """Elementwise ``ufunc`` ("add" or "maximum") of ``arrays`` onto a new array on ``dst``."""
        cupy, nccl = self._cupy, self._nccl
        sends = {}
        for device, array in arrays.items():
            with cupy.cuda.Device(device):
                sends[device] = cupy.ascontiguousarray(array)
        with cupy.cuda.Device(dst):
            # not empty_like(sends[dst]): ascontiguousarray makes a 0-d array 1-d
            out = cupy.empty(arrays[dst].shape, dtype=arrays[dst].dtype)
        first = sends[dst]
        root = self.devices.index(dst)
        nccl.groupStart()
        for device, comm in zip(self.devices, self.comms):
            send = sends[device]
            with cupy.cuda.Device(device):
                recv = out.data.ptr if device == dst else send.data.ptr  # only the root's is written
                comm.reduce(
                    send.data.ptr,
                    recv,
                    first.size,
                    self._types[first.dtype],
                    self._ops[ufunc],
                    root,
                    cupy.cuda.get_current_stream().ptr,
                )
        nccl.groupEnd()
        return out


#: One InProcessNccl per tuple of GPUs: every layer builds its own backend, and each
#: ``initAll`` would otherwise create (and hold GPU memory for) a new set of communicators.
_instances: dict[tuple[int, ...], InProcessNccl] = {}


def maybe_in_process_nccl(cupy, devices) -> InProcessNccl | None:
    """The process's :class:`InProcessNccl` over ``devices`` when ``TP_GPU_NCCL=1``, there are
    two or more GPUs and NCCL is available (built on first use, then shared)."""
    import os

    if os.environ.get("TP_GPU_NCCL") != "1" or len(devices) < 2:
        return None
    from cupy.cuda import nccl

    if not nccl.available:
        return None
    key = tuple(devices)
    if key not in _instances:
        _instances[key] = InProcessNccl(cupy, key)
    return _instances[key]
