"""NCCL between processes, one GPU per process, through ``cupyx.distributed``.

Rendezvous goes through MPI when mpi4py can run (ranks from ``mpirun``/``srun``
with MPI; an MPI world of one process counts only when the environment does not
name a larger job), else through cupyx's TCP store: set ``TP_GPU_RANK`` and
``TP_GPU_WORLD_SIZE`` (or launch with ``mpirun``/SLURM, whose rank variables are
read), and ``CUPYX_DISTRIBUTED_HOST`` / ``CUPYX_DISTRIBUTED_PORT`` for rank 0's
address. Each process uses GPU ``local_rank % visible GPUs``.

NCCL moves CuPy arrays on this process's GPU; arrays on another GPU of the
process, and host NumPy arrays, are staged through it. Unlike
:class:`~tp_gpu.comm.mpi.MpiComm`, a dead peer is not detected by a timeout
here: NCCL calls block on the GPU stream, and the launcher is relied on to stop
the job.

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
        except BackendUnavailableError:
            mpi = None
        launched = launcher_rank()
        # Processes started without mpirun (TP_GPU_RANK/TP_GPU_WORLD_SIZE) each see an MPI
        # singleton of size 1 when mpi4py is installed: their ranks come from the environment.
        use_mpi = mpi is not None and (mpi.size > 1 or launched[1] == 1)
        if use_mpi:
            self.rank, self.size = mpi.rank, mpi.size
            local_rank = _first_env(_LOCAL_RANK_VARS, self.rank)
        else:
            self.rank, self.size, local_rank = launched
        self.device = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device).use()
        self._nccl = cupyx.distributed.init_process_group(self.size, self.rank, use_mpi=use_mpi)

    def _run(self, backend, array: Any, collective, *args: Any) -> Any:
        """``collective(array on this rank's GPU, *args)``; the result lives where ``array`` did.

        NCCL's communicator is bound to ``self.device``: a CuPy array on another
        GPU of this process goes there and back through ``backend.to_device``,
        and a host NumPy array (a full parameter being assembled for a
        checkpoint) through ``cupy.asarray`` and ``.get()``.
        """
        cupy = self._cupy
        if isinstance(array, np.ndarray):
            with cupy.cuda.Device(self.device):
                return collective(cupy.asarray(array), *args).get()
        if not is_cupy_array(array):
            raise ConfigError(f"comm='nccl' moves CuPy and NumPy arrays only; got {type(array).__name__} (use backend='cupy')")
        home = array.device.id
        if home != self.device:
            return backend.to_device(self._run(backend, backend.to_device(array, self.device), collective, *args), home)
        with cupy.cuda.Device(self.device):
            return collective(array, *args)

    def _allreduce(self, array, op):
        send = self._cupy.ascontiguousarray(array)
        out = self._cupy.empty(array.shape, dtype=array.dtype)  # not empty_like(send): a 0-d send is 1-d
        self._nccl.all_reduce(send, out, op)
        return out

    def _allgather(self, array, axis):
        send = self._cupy.ascontiguousarray(array)
        out = self._cupy.empty((self.size,) + tuple(send.shape), dtype=send.dtype)
        self._nccl.all_gather(send, out, send.size)
        return self._cupy.concatenate([out[r] for r in range(self.size)], axis=axis)

    def allreduce(self, backend, array, op="sum"):
        return self._run(backend, array, self._allreduce, op)

    def allgather(self, backend, array, axis):
        return self._run(backend, array, self._allgather, axis % array.ndim)

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
