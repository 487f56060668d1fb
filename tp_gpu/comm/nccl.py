"""NCCL between processes, one GPU per process, through ``cupyx.distributed``.

Rendezvous goes through MPI when mpi4py can run (ranks from ``mpirun``/``srun``
with MPI), else through cupyx's TCP store: set ``TP_GPU_RANK`` and
``TP_GPU_WORLD_SIZE`` (or launch with ``mpirun``/SLURM, whose rank variables are
read), and ``CUPYX_DISTRIBUTED_HOST`` / ``CUPYX_DISTRIBUTED_PORT`` for rank 0's
address. Each process uses GPU ``local_rank % visible GPUs``.

Only CuPy arrays can go through NCCL. Unlike :class:`~tp_gpu.comm.mpi.MpiComm`,
a dead peer is not detected by a timeout here: NCCL calls block on the GPU
stream, and the launcher is relied on to stop the job.

Not exercised in CI (no GPU there); see the README for how it was run.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, List

import numpy as np

from ..backends.base import is_cupy_array
from ..backends.cupy_backend import import_cupy
from ..errors import BackendUnavailableError, ConfigError
from .base import Communicator

__all__ = ["NcclComm", "launcher_rank"]

_RANK_VARS = ("TP_GPU_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_SIZE_VARS = ("TP_GPU_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("TP_GPU_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def _first_env(names, default=None):
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launcher_rank():
    """``(rank, world_size, local_rank)`` from the launcher's environment (1 process when unset)."""
    rank = _first_env(_RANK_VARS, 0)
    size = _first_env(_SIZE_VARS, 1)
    return rank, size, _first_env(_LOCAL_RANK_VARS, rank)


class NcclComm(Communicator):
    """NCCL over every process of the job, one GPU each."""

    name = "nccl"

    def __init__(self) -> None:
        cupy = import_cupy()
        try:
            import cupyx.distributed
        except Exception as exc:
            raise BackendUnavailableError(f"comm='nccl' needs cupyx.distributed with NCCL ({exc})") from exc
        self._cupy = cupy
        try:
            from .mpi import MpiComm

            mpi = MpiComm()
            self.rank, self.size, use_mpi = mpi.rank, mpi.size, True
            local_rank = _first_env(_LOCAL_RANK_VARS, self.rank)
        except BackendUnavailableError:
            self.rank, self.size, local_rank = launcher_rank()
            use_mpi = False
        self.device = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device).use()
        self._nccl = cupyx.distributed.init_process_group(self.size, self.rank, use_mpi=use_mpi)

    def _check(self, array: Any) -> None:
        if not is_cupy_array(array):
            raise ConfigError(f"comm='nccl' moves CuPy arrays only; got {type(array).__name__} (use backend='cupy')")

    def allreduce(self, backend, array, op="sum"):
        self._check(array)
        with backend.device(array.device.id):
            send = self._cupy.ascontiguousarray(array)
            out = self._cupy.empty_like(send)
            self._nccl.all_reduce(send, out, op)
        return out

    def allgather(self, backend, array, axis):
        self._check(array)
        axis %= array.ndim
        with backend.device(array.device.id):
            send = self._cupy.ascontiguousarray(array)
            out = self._cupy.empty((self.size,) + tuple(send.shape), dtype=send.dtype)
            self._nccl.all_gather(send, out, send.size)
            return self._cupy.concatenate([out[r] for r in range(self.size)], axis=axis)

    def allgather_object(self, obj) -> List[Any]:
        cupy = self._cupy
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        with cupy.cuda.Device(self.device):
            sizes = cupy.empty(self.size, dtype=cupy.int64)
            self._nccl.all_gather(cupy.asarray([payload.size], dtype=cupy.int64), sizes, 1)
            longest = int(sizes.max())
            padded = cupy.zeros(longest, dtype=cupy.uint8)
            padded[: payload.size] = cupy.asarray(payload)
            out = cupy.empty((self.size, longest), dtype=cupy.uint8)
            self._nccl.all_gather(padded, out, longest)
            host, lengths = out.get(), sizes.get()
        return [pickle.loads(host[r, : lengths[r]].tobytes()) for r in range(self.size)]

    def broadcast_object(self, obj, root=0):
        return self.allgather_object(obj if self.rank == root else None)[root]

    def barrier(self) -> None:
        self._nccl.barrier()
