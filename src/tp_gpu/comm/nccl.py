"""NCCL between processes, one GPU per process, through ``cupyx.distributed``.

Rendezvous goes through MPI when mpi4py can run (ranks from ``mpirun``/``srun``
with MPI; an MPI world of one process counts only when the environment does not
name a larger job), else through cupyx's TCP store: set ``TP_GPU_RANK`` and
``TP_GPU_WORLD_SIZE`` (or launch with ``mpirun``/SLURM, whose rank variables are
read), and ``CUPYX_DISTRIBUTED_HOST`` / ``CUPYX_DISTRIBUTED_PORT`` for rank 0's
address. Each process uses GPU ``local_rank % visible GPUs``.

The TCP store is needed only to hand NCCL's unique id to every rank. Rank 0
runs it in a child process that does not stop by itself, and Python's exit
waits for that child (cupy/cupy#7863): a process that ends without stopping it
hangs. So once the NCCL communicator works (a first barrier has passed), the
store is stopped; :meth:`NcclComm.close`, also registered with ``atexit``, stops
it where that point was not reached. :meth:`NcclComm.barrier` is a one-element
NCCL all-reduce, as in vLLM, and needs no store.

NCCL moves CuPy arrays on this process's GPU; arrays on another GPU of the
process, and host NumPy arrays, are staged through it. Unlike
:class:`~tp_gpu.comm.mpi.MpiComm`, a dead peer is not detected by a timeout
here: NCCL calls block on the GPU stream, and the launcher is relied on to stop
the job.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pickle
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..backends.base import Backend, is_cupy_array
from ..backends.cupy_backend import import_cupy
from ..errors import BackendUnavailableError, ConfigError, ShapeError
from .base import Communicator

__all__ = ["NcclComm", "launcher_rank", "reduce_scatter_rows"]

_RANK_VARS = ("TP_GPU_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")
_SIZE_VARS = ("TP_GPU_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("TP_GPU_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")

#: Seconds to wait for the TCP store's process to end once told to stop, before terminating it.
STORE_STOP_TIMEOUT = 5.0


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


def reduce_scatter_rows(sizes: Sequence[int]) -> Optional[int]:
    """Rows per rank that NCCL's native reduce-scatter is given for pieces of ``sizes`` rows, or None
    where the all-reduce + slice moves less.

    ``ncclReduceScatter`` cuts its input into ``s`` equal pieces, so every piece is padded to
    ``L = max(sizes)`` rows (zeros, trimmed after). On a ring it sends ``(s - 1) L`` rows per rank,
    where the all-reduce sends ``2 (s - 1) T / s`` for ``T = sum(sizes)``: the native call is used
    when ``s L < 2 T``. Pieces that differ by at most ``k`` rows (a sequence-parallel split: ``k`` is
    the devices per process) pad at most ``(s - 1) k`` rows in all, so it is used whenever
    ``T > (s - 1) k``; it falls back only for sequences about as short as the job is wide.
    """
    longest, total = max(sizes), sum(sizes)
    return longest if len(sizes) * longest < 2 * total else None


def _join(process, timeout: float) -> None:
    """``process.join(timeout)``; cupyx's ``ExceptionAwareProcess.join`` takes no timeout, so the
    :class:`multiprocessing.Process` one is called for real processes."""
    if isinstance(process, multiprocessing.Process):
        multiprocessing.Process.join(process, timeout)
    else:
        process.join(timeout)


def _end_process(process, wait: float = STORE_STOP_TIMEOUT) -> None:
    """Wait up to ``wait`` seconds for ``process`` to end, then terminate it (a TCP server, nothing else)."""
    if process is None or not process.is_alive():
        return
    _join(process, wait)
    if process.is_alive():
        process.terminate()
        _join(process, STORE_STOP_TIMEOUT)


def _stop_store(group) -> None:
    """Stop the TCP store that rank 0's ``cupyx.distributed`` process group runs, if any.

    ``group.stop()`` tells the store's server loop to end and joins it; it does
    nothing once cupyx's own ``atexit`` hook has run, so the process is then
    ended directly.
    """
    process = getattr(getattr(group, "_store", None), "_process", None)
    stop = getattr(group, "stop", None)
    if stop is not None and process is not None and process.is_alive():
        try:
            stop()
        except Exception:  # the server raised in its process (re-raised by join): it has ended anyway
            pass
    _end_process(process)


def _store_processes():
    """The live child processes that are cupyx TCP stores (cupyx's ``ExceptionAwareProcess``)."""
    return {p for p in multiprocessing.active_children() if type(p).__name__ == "ExceptionAwareProcess"}


class NcclComm(Communicator):
    """NCCL over every process of the job, one GPU each.

    Call :meth:`close` when done with it (it is also called at exit); the
    communicator stays usable for collectives after that.
    """

    name = "nccl"

    def __init__(self) -> None:
        cupy = import_cupy(probe=False)  # the GPU check runs below, on this rank's own GPU
        try:
            import cupyx.distributed
        except Exception as exc:
            raise BackendUnavailableError(f"comm='nccl' needs cupyx.distributed with NCCL ({exc})") from exc
        self._cupy = cupy
        self._nccl: Any = None  # cupyx.distributed's NCCL process group, once initialised
        try:
            from .mpi import MpiComm

            mpi = MpiComm()
        except BackendUnavailableError:
            mpi = None
        launched = launcher_rank()
        # Processes started without mpirun (TP_GPU_RANK/TP_GPU_WORLD_SIZE) each see an MPI
        # singleton of size 1 when mpi4py is installed: their ranks come from the environment.
        use_mpi = mpi is not None and (mpi.size > 1 or launched[1] == 1)
        if use_mpi and mpi is not None:  # use_mpi implies mpi is not None
            self.rank, self.size = mpi.rank, mpi.size
            local_rank = _first_env(_LOCAL_RANK_VARS, self.rank)
        else:
            self.rank, self.size, local_rank = launched
        self.device = local_rank % cupy.cuda.runtime.getDeviceCount()
        cupy.cuda.Device(self.device).use()
        import_cupy()  # a kernel and a GEMM on this GPU, or BackendUnavailableError saying why not
        before = _store_processes()
        try:
            self._nccl = cupyx.distributed.init_process_group(self.size, self.rank, use_mpi=use_mpi)
        except BaseException:
            for process in _store_processes() - before:  # a store started before the failure
                _end_process(process, wait=0)
            raise
        atexit.register(self.close)
        # Every rank has joined NCCL once this passes, so none still needs the store.
        self.barrier()
        self.close()

    def close(self) -> None:
        """Stop the TCP store (rank 0, TCP rendezvous), so that the process can exit.

        Idempotent. Collectives keep working: they go through NCCL alone.
        """
        if self._nccl is not None:
            _stop_store(self._nccl)

    def _run(self, backend: Backend, array: Any, collective: Callable[..., Any], *args: Any) -> Any:
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
            raise ConfigError(
                f"comm='nccl' moves CuPy and NumPy arrays only; got {type(array).__name__} "
                "(use backend='cupy')"
            )
        home = array.device.id
        if home != self.device:
            staged = backend.to_device(array, self.device)
            return backend.to_device(self._run(backend, staged, collective, *args), home)
        with cupy.cuda.Device(self.device):
            return collective(array, *args)

    def _all_reduce(self, array, op):
        send = self._cupy.ascontiguousarray(array)
        out = self._cupy.empty(array.shape, dtype=array.dtype)  # not empty_like(send): a 0-d send is 1-d
        self._nccl.all_reduce(send, out, op)
        return out

    def _all_gather(self, array, axis):
        send = self._cupy.ascontiguousarray(array)
        out = self._cupy.empty((self.size,) + tuple(send.shape), dtype=send.dtype)
        self._nccl.all_gather(send, out, send.size)
        return self._cupy.concatenate([out[r] for r in range(self.size)], axis=axis)

    def _reduce_scatter(self, array, axis, sizes, rows):
        """This rank's piece of the sum, through ``reduce_scatter``, pieces padded to ``rows`` rows.

        ``axis`` goes to the front, so that piece ``r`` is one contiguous run of ``sizes[r]`` rows of
        ``m`` elements (``m`` the product of the other axes). NCCL needs ``s`` equal runs of
        ``count = rows * m``: equal pieces are the array itself (one copy only where ``axis`` was not
        first), uneven ones are copied into a zero ``(s, rows, m)`` buffer. The result is the first
        ``sizes[rank]`` of this rank's ``rows`` rows, with ``axis`` put back (a view).
        """
        cupy = self._cupy
        front = array.swapaxes(0, axis)  # (total, ...) view
        rest = tuple(front.shape[1:])
        if all(n == rows for n in sizes):
            send = cupy.ascontiguousarray(front)
        else:
            send = cupy.zeros((self.size, rows) + rest, dtype=array.dtype)
            first = 0
            for r, n in enumerate(sizes):
                send[r, :n] = front[first : first + n]
                first += n
        out = cupy.empty((rows,) + rest, dtype=array.dtype)
        self._nccl.reduce_scatter(send, out, out.size, "sum")
        return out[: sizes[self.rank]].swapaxes(0, axis)

    def all_reduce(self, backend: Backend, array: Any, op: str = "sum") -> Any:
        return self._run(backend, array, self._all_reduce, op)

    def reduce_scatter(self, backend: Backend, array: Any, axis: int, sizes: Sequence[int]) -> Any:
        """NCCL's native reduce-scatter: ``(s - 1) / s`` of the (padded) array crosses per rank on a
        ring, half of the all-reduce + slice of :meth:`Communicator.reduce_scatter`, and the result
        buffer is one piece, not the whole. Pieces of different lengths are padded to the longest
        (see :func:`reduce_scatter_rows`); where padding would cost more than it saves, this falls
        back to the all-reduce + slice.
        """
        axis %= array.ndim
        sizes = [int(n) for n in sizes]
        if len(sizes) != self.size or sum(sizes) != array.shape[axis]:
            raise ShapeError(
                f"rank {self.rank}/{self.size}: reduce_scatter got pieces {sizes} for axis {axis} of "
                f"shape {tuple(array.shape)}; expected {self.size} pieces summing to {array.shape[axis]}"
            )
        rows = reduce_scatter_rows(sizes)
        if rows is None:
            return super().reduce_scatter(backend, array, axis, sizes)
        return self._run(backend, array, self._reduce_scatter, axis, sizes, rows)

    def all_gather(self, backend: Backend, array: Any, axis: int) -> Any:
        return self._run(backend, array, self._all_gather, axis % array.ndim)

    def all_gather_object(self, obj: Any) -> list[Any]:
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

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.all_gather_object(obj if self.rank == root else None)[root]

    def barrier(self) -> None:
        """Return once every rank has called it: a one-element NCCL all-reduce, waited for on the host.

        Also waits for the work queued before it on this rank's GPU (its
        current stream).
        """
        cupy = self._cupy
        with cupy.cuda.Device(self.device):
            token = cupy.ones(1, dtype=cupy.float32)
            total = cupy.empty(1, dtype=cupy.float32)
            self._nccl.all_reduce(token, total, "sum")
            cupy.cuda.get_current_stream().synchronize()
