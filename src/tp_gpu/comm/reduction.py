"""How one array per device is combined into one array on a destination device, within a process.

:func:`tp_gpu.collectives.default_reduction` picks the strategy of a backend: peer copies
(:class:`PeerCopyReduction`) by default, NCCL among the process's GPUs
(:class:`InProcessNcclReduction`, :mod:`tp_gpu.comm.nccl_local`) when asked for with
``TP_GPU_NCCL=1``. Either computes ``out = op_d per_device[d]`` elementwise, ``op`` a ufunc name
(``"add"``, ``"maximum"``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from ..backends.base import Backend, Blocks

if TYPE_CHECKING:
    from .nccl_local import InProcessNccl

__all__ = ["InProcessNcclReduction", "PeerCopyReduction", "Reduction"]


class Reduction(Protocol):
    """How one array per device is combined elementwise into one array on ``dst``."""

    def combine(self, backend: Backend, per_device: Blocks, dst: Hashable, ufunc: str) -> Any: ...


class PeerCopyReduction:
    """Each device's array is copied to ``dst`` (a peer copy on CuPy) and combined there."""

    def combine(self, backend: Backend, per_device: Blocks, dst: Hashable, ufunc: str) -> Any:
        combine = getattr(backend.xp, ufunc)
        arrays = list(per_device.values())
        total = backend.to_device(arrays[0], dst)
        with backend.device(dst):
            for local in arrays[1:]:
                combine(total, backend.to_device(local, dst), out=total)
        return total


class InProcessNcclReduction:
    """NCCL's reduce across the GPUs of one process, where it applies; peer copies otherwise.

    Chosen by :func:`tp_gpu.collectives.default_reduction` with ``TP_GPU_NCCL=1`` on the CuPy
    backend with two or more GPUs. NCCL applies when every GPU holds one
    array of the same shape and dtype.
    """

    def __init__(self, nccl: InProcessNccl) -> None:
        self.nccl = nccl
        self.fallback = PeerCopyReduction()

    def combine(self, backend: Backend, per_device: Blocks, dst: Hashable, ufunc: str) -> Any:
        if self.nccl.can_reduce(per_device, dst, ufunc):
            return self.nccl.reduce(per_device, dst, ufunc)
        return self.fallback.combine(backend, per_device, dst, ufunc)
