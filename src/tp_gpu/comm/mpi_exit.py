"""How an MPI job ends: at once on an uncaught exception, without a hang when a rank's program ends.

An uncaught exception on any rank stops the whole job at once, as under
``python -m mpi4py``: creating an :class:`~tp_gpu.comm.mpi.MpiComm` of more than
one process installs a ``sys.excepthook`` (:func:`install_abort_on_uncaught_exception`)
that prints the traceback as usual, then ends the job (:func:`end_job`). Without
it the other ranks would wait in their next collective for the full timeout. Set
``TP_GPU_MPI_ABORT_ON_ERROR=0`` to leave ``sys.excepthook`` alone (for example
to debug one rank post mortem).

A rank whose program *ends* (exit status 0, ``sys.exit``, falling off the end)
while the others still call collectives would likewise leave them waiting for
the full timeout. So each rank, as its Python exits, sends every other rank a
one-integer "leaving" message (tag :data:`EXIT_TAG`, point to point, on the
same communicator), and each rank keeps one receive for it posted
(:class:`LeavingNotices`). A rank that is waiting in a collective and sees that
a peer has left gives the collective :data:`EXIT_GRACE` more seconds (a
collective the peer finished before leaving completes in that time), then
raises :class:`~tp_gpu.errors.CommError` naming the rank that left; uncaught,
that aborts the job. At a normal end every rank leaves after its last
collective and nobody waits in one, so nothing is aborted: the notices are
simply not read.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any, Callable, Optional, Type

import numpy as np

__all__ = [
    "ABORT_ON_ERROR_ENV",
    "EXIT_GRACE",
    "EXIT_TAG",
    "LeavingNotices",
    "end_job",
    "install_abort_on_uncaught_exception",
]

#: Environment variable; ``0`` keeps :class:`~tp_gpu.comm.mpi.MpiComm` from installing its excepthook.
ABORT_ON_ERROR_ENV = "TP_GPU_MPI_ABORT_ON_ERROR"

#: Tag of the point-to-point "this rank is leaving" message sent at exit.
EXIT_TAG = 0x7470  # "tp"

#: Seconds a collective may still take after a peer has left, before CommError.
EXIT_GRACE = 2.0

ExceptHook = Callable[[Type[BaseException], BaseException, Optional[TracebackType]], Any]

#: Set once any communicator of this process has seen a peer leave the job (its program ended).
_PEER_LEFT = False


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
            end_job(MPI)

    abort_on_uncaught_exception._tp_gpu_mpi_abort = True  # type: ignore[attr-defined]
    sys.excepthook = abort_on_uncaught_exception
    return True


def end_job(MPI: Any) -> None:
    """Flush the output and stop the whole job with exit status 1.

    ``MPI_Abort`` normally. Once a peer has *ended* (exited with status 0 after ``MPI_Finalize``),
    Open MPI 4.1's ``mpirun`` sometimes hangs or crashes on an abort (seen here in 1 of 12 to
    15 runs on a loaded machine, with plain mpi4py too), whereas a rank that exits with a
    non-zero status is always noticed and the job ended; so then this rank exits with status 1.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or replaced stream must not keep the job alive
            pass
    if _PEER_LEFT:
        os._exit(1)
    MPI.COMM_WORLD.Abort(1)


class LeavingNotices:
    """The "leaving" messages of one communicator ``comm`` (an mpi4py communicator) of ``MPI``.

    :meth:`peer_left` polls for a peer's notice (``left`` is then its rank); :meth:`send` tells
    every peer that this rank is leaving.
    """

    def __init__(self, MPI: Any, comm: Any, rank: int, size: int) -> None:
        self._MPI = MPI
        self.comm = comm
        self.rank = rank
        self.size = size
        self.left: Optional[int] = None  # the first peer seen leaving the job
        self._leaving = np.zeros(1, dtype=np.int64)
        self._request: Any = None  # posted when a collective first has to wait

    def peer_left(self) -> bool:
        """Whether a peer's "leaving" notice has arrived (its rank is then in ``left``).

        The receive is posted on the first call; notices sent before wait for it in MPI.
        """
        global _PEER_LEFT
        if self.left is None:
            if self._request is None:
                self._request = self.comm.Irecv(self._leaving, source=self._MPI.ANY_SOURCE, tag=EXIT_TAG)
            if self._request.Test():
                self.left = int(self._leaving[0])
                _PEER_LEFT = True
        return self.left is not None

    def send(self) -> None:
        """Tell every peer that this rank is leaving, and withdraw the receive of their notices.

        Never raises: it runs as the interpreter ends.
        """
        if self.size == 1:
            return
        try:
            if self._MPI.Is_finalized():
                return
            notice = np.array([self.rank], dtype=np.int64)
            sends = [
                self.comm.Isend(notice, dest=r, tag=EXIT_TAG) for r in range(self.size) if r != self.rank
            ]
            if self._request is not None and not self._request.Test():
                self._request.Cancel()
                self._request.Wait()
            deadline = time.monotonic() + 1.0
            while not self._MPI.Request.Testall(sends) and time.monotonic() < deadline:
                time.sleep(1e-3)  # one-integer messages go eagerly: complete at once in practice
        except Exception:  # a broken or stand-in MPI: leaving quietly is all that is left to do
            pass
