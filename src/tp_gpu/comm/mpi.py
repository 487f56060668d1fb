"""MPI between processes, through mpi4py (one or more workers per process).

Host arrays (NumPy and simulated devices) are passed to MPI as buffers. CuPy
arrays are passed as device buffers when the MPI library is CUDA-aware (set
``TP_GPU_MPI_CUDA_AWARE=1``; Open MPI built with UCX/CUDA is), otherwise they
are staged through the host.

A collective that has not completed after ``TP_GPU_COMM_TIMEOUT`` seconds
(default 120) raises :class:`~tp_gpu.errors.CommError` instead of hanging, so
a rank that died or stalled does not leave the others waiting forever.
Collectives are started non-blocking and polled. After such an error the
communicator is broken: when the process exits it calls ``MPI_Abort``, which
stops every rank of the job, instead of ``MPI_Finalize``, which would wait for
the missing peer. (A rank that is killed outright is noticed by ``mpirun``,
which stops the job by itself.)

An uncaught exception on any rank stops the whole job at once, as under
``python -m mpi4py``: creating an :class:`MpiComm` of more than one process
installs a ``sys.excepthook`` that prints the traceback as usual, then calls
``MPI.COMM_WORLD.Abort(1)``. Without it the other ranks would wait in their
next collective for the full timeout. Set ``TP_GPU_MPI_ABORT_ON_ERROR=0`` to
leave ``sys.excepthook`` alone (for example to debug one rank post mortem).
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import time
from types import TracebackType
from typing import Any, Callable, List, Optional, Type

import numpy as np

from ..backends.base import is_cupy_array
from ..errors import BackendUnavailableError, CommError
from .base import Communicator

__all__ = ["MpiComm", "import_mpi", "install_abort_on_uncaught_exception"]

#: Seconds a collective may take before it is declared failed.
DEFAULT_TIMEOUT = 120.0

#: Environment variable; ``0`` keeps :class:`MpiComm` from installing its excepthook.
ABORT_ON_ERROR_ENV = "TP_GPU_MPI_ABORT_ON_ERROR"


def import_mpi():
    """``mpi4py.MPI``, or BackendUnavailableError saying why it cannot be used."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # not installed, or no MPI library for it to load
        raise BackendUnavailableError(
            f"comm='mpi' needs mpi4py and an MPI library ({type(exc).__name__}: {exc}); "
            "install Open MPI (apt-get install openmpi-bin libopenmpi-dev) and pip install 'tp_gpu[mpi]'"
        ) from exc
    return MPI


ExceptHook = Callable[[Type[BaseException], BaseException, Optional[TracebackType]], Any]


def install_abort_on_uncaught_exception(MPI: Any) -> bool:
    """Make an uncaught exception abort the whole MPI job, as ``python -m mpi4py`` does.

    Wraps ``sys.excepthook``: the current hook runs first (it prints the traceback), then the
    output is flushed and ``MPI.COMM_WORLD.Abort(1)`` stops every rank; ``mpirun`` exits non-zero.
    Installs once per process; returns whether the hook is in place.
    """
    if getattr(sys.excepthook, "_tp_gpu_mpi_abort", False):
        return True
    previous: ExceptHook = sys.excepthook

    def abort_on_uncaught_exception(
        exc_type: Type[BaseException], exc: BaseException, tb: Optional[TracebackType]
    ) -> None:
        try:
            previous(exc_type, exc, tb)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # a closed or replaced stream must not keep the job alive
                    pass
            MPI.COMM_WORLD.Abort(1)

    abort_on_uncaught_exception._tp_gpu_mpi_abort = True  # type: ignore[attr-defined]
    sys.excepthook = abort_on_uncaught_exception
    return True


class MpiComm(Communicator):
    """The processes of ``MPI.COMM_WORLD`` (or ``comm``)."""

    name = "mpi"

    def __init__(self, comm=None, timeout: Optional[float] = None) -> None:
        MPI = import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = (
            float(os.environ.get("TP_GPU_COMM_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else timeout
        )
        self.cuda_aware = os.environ.get("TP_GPU_MPI_CUDA_AWARE", "0") == "1"
        self.broken = False
        atexit.register(self._abort_if_broken)
        if self.size > 1 and os.environ.get(ABORT_ON_ERROR_ENV, "1") != "0":
            install_abort_on_uncaught_exception(MPI)

    def _abort_if_broken(self) -> None:
        """At exit after a failed collective: abort the job rather than wait in MPI_Finalize."""
        if self.broken:
            self.comm.Abort(1)

    def _wait(self, request, what: str) -> None:
        """Poll ``request`` until it completes, or raise CommError after the timeout."""
        deadline = time.monotonic() + self.timeout
        delay = 1e-5
        while not request.Test():
            if time.monotonic() > deadline:
                self.broken = True
                raise CommError(
                    f"rank {self.rank}/{self.size}: MPI {what} did not complete within {self.timeout:g} s; "
                    "a peer rank may have failed or be running a different program path"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def _run(self, backend, array: Any, make_recv, start, post, what: str) -> Any:
        """One MPI collective on ``array``; the result lives where ``array`` did.

        Host and simulated-device arrays go to MPI as host buffers. A CuPy array
        goes as a device buffer when MPI is CUDA-aware, else through the host.
        ``make_recv(xp, send)`` allocates the receive buffer, ``start(send, recv)``
        starts the non-blocking collective, ``post(xp, recv)`` shapes the result.
        """
        if is_cupy_array(array) and self.cuda_aware:
            with backend.device(array.device.id):
                send = backend.xp.ascontiguousarray(array)
                backend.xp.cuda.get_current_stream().synchronize()  # MPI reads outside CuPy's stream order
                recv = make_recv(backend.xp, send)
                self._wait(start(send, recv), what)
                return post(backend.xp, recv)
        device = backend.device_of(array)
        send = np.ascontiguousarray(backend.to_host(array))
        recv = make_recv(np, send)
        self._wait(start(send, recv), what)
        result = post(np, recv)
        return backend.asarray(result, result.dtype, device) if device in backend.devices else result

    def all_reduce(self, backend, array, op="sum"):
        mpi_op = {"sum": self._MPI.SUM, "max": self._MPI.MAX}[op]
        return self._run(
            backend,
            array,
            lambda xp, send: xp.empty_like(send),
            lambda send, recv: self.comm.Iallreduce(send, recv, op=mpi_op),
            lambda xp, recv: recv,
            f"all_reduce({op})",
        )

    def all_gather(self, backend, array, axis):
        axis %= array.ndim
        return self._run(
            backend,
            array,
            lambda xp, send: xp.empty((self.size,) + tuple(send.shape), dtype=send.dtype),
            lambda send, recv: self.comm.Iallgather(send, recv),
            lambda xp, recv: xp.concatenate([recv[r] for r in range(self.size)], axis=axis),
            "all_gather",
        )

    def reduce_scatter(self, backend, array, axis, sizes):
        """MPI's reduce-scatter (``(s - 1) / s`` of the array crosses per rank): ``array`` goes with
        ``axis`` swapped to the front, so that each rank's piece of any length is one contiguous run."""
        axis %= array.ndim
        sizes = [int(n) for n in sizes]
        return self._run(
            backend,
            array.swapaxes(0, axis),  # a view; (sizes[r] rows of the rest) per rank
            lambda xp, send: xp.empty((sizes[self.rank],) + tuple(send.shape[1:]), dtype=send.dtype),
            lambda send, recv: self.comm.Ireduce_scatter(
                send, recv, [n * int(np.prod(send.shape[1:])) for n in sizes], op=self._MPI.SUM
            ),
            lambda xp, recv: recv.swapaxes(0, axis),
            "reduce_scatter",
        )

    def all_gather_object(self, obj) -> List[Any]:
        # Objects are small (configuration fingerprints): pickle them into byte buffers and
        # gather those with the non-blocking collectives, so the timeout applies here too.
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.empty(self.size, dtype=np.int64)
        self._wait(
            self.comm.Iallgather(np.array([payload.size], dtype=np.int64), sizes), "all_gather (sizes)"
        )
        padded = np.zeros(int(sizes.max()), dtype=np.uint8)
        padded[: payload.size] = payload
        recv = np.empty((self.size, padded.size), dtype=np.uint8)
        self._wait(self.comm.Iallgather(padded, recv), "all_gather (objects)")
        return [pickle.loads(recv[r, : sizes[r]].tobytes()) for r in range(self.size)]

    def broadcast_object(self, obj, root=0):
        return self.all_gather_object(obj if self.rank == root else None)[root]

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")
