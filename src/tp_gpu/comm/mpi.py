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

An uncaught exception on any rank, or a rank whose program ends while the
others still wait in a collective, ends the whole job within seconds instead of
leaving the others waiting for the timeout: see :mod:`tp_gpu.comm.mpi_exit`.

Every array collective starts with one all-gather of a fixed-size buffer per
rank: the array's shape and dtype (12 integers) and, for an array of at most
:data:`SMALL_BYTES` bytes, its data. Ranks that pass different shapes (a
different number of rows to a RowParallelLinear) therefore all raise
:class:`~tp_gpu.errors.ShapeError` naming every rank's shape, instead of one
rank failing inside MPI with ``MPI_ERR_TRUNCATE`` and the others waiting for
the timeout. A small array needs no second collective: each rank sums (or
concatenates) the gathered arrays itself, in rank order, so the check costs
nothing at the small, latency-bound sizes; a larger one then goes through the
MPI collective as before, one small all-gather later.
``TP_GPU_MPI_CHECK_SHAPES=0`` skips the header (and the small-array path).
"""

from __future__ import annotations

import atexit
import os
import pickle
import time
from functools import partial
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from ..backends.base import Backend, is_cupy_array
from ..errors import BackendUnavailableError, CommError, ShapeError
from .base import Communicator
from .mpi_exit import (
    ABORT_ON_ERROR_ENV,
    EXIT_GRACE,
    EXIT_TAG,
    LeavingNotices,
    end_job,
    install_abort_on_uncaught_exception,
)

__all__ = [
    "MpiComm",
    "import_mpi",
    # from mpi_exit, importable here as before the split
    "ABORT_ON_ERROR_ENV",
    "EXIT_GRACE",
    "EXIT_TAG",
    "end_job",
    "install_abort_on_uncaught_exception",
]

#: Seconds a collective may take before it is declared failed.
DEFAULT_TIMEOUT = 120.0

#: Environment variable; ``0`` skips the shape header before each array collective.
CHECK_SHAPES_ENV = "TP_GPU_MPI_CHECK_SHAPES"

#: Integers in a shape header: ndim, dtype number, itemsize, then up to 9 sizes (more are folded).
_HEADER = 12
_HEADER_BYTES = 8 * _HEADER

#: Arrays of at most this many bytes travel with their shape header, in one collective.
SMALL_BYTES = 4096


def shape_header(array: Any) -> np.ndarray:
    """``array``'s shape and dtype as :data:`_HEADER` int64s: ``[ndim, dtype.num, itemsize, *shape]``,
    padded with -1; a shape of more than 9 axes keeps 8 and folds the rest into their product."""
    shape = [int(n) for n in array.shape]
    if len(shape) > _HEADER - 3:
        shape = shape[: _HEADER - 4] + [int(np.prod(shape[_HEADER - 4 :]))]
    dtype = np.dtype(array.dtype)
    header = np.full(_HEADER, -1, dtype=np.int64)
    header[: 3 + len(shape)] = [len(array.shape), dtype.num, dtype.itemsize, *shape]
    return header


def describe_header(header: np.ndarray) -> str:
    """``(2, 8) float64``: the shape and dtype a :func:`shape_header` describes."""
    ndim, num, itemsize = (int(v) for v in header[:3])
    sizes = tuple(int(v) for v in header[3:] if v >= 0)[:ndim]
    name = next(
        (
            t.__name__
            for t in np.sctypeDict.values()
            if np.dtype(t).num == num and np.dtype(t).itemsize == itemsize
        ),
        f"dtype#{num}",
    )
    return f"{sizes} {name}"


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


def _combine_reduce(op: str, pieces: List[np.ndarray]) -> np.ndarray:
    """``sum`` or elementwise ``max`` of every rank's array, in rank order (the same on every rank)."""
    out = pieces[0].copy()
    for piece in pieces[1:]:
        if op == "sum":
            out += piece
        else:
            np.maximum(out, piece, out=out)
    return out


def _piece(total: np.ndarray, axis: int, sizes: List[int], rank: int) -> np.ndarray:
    """Rank ``rank``'s piece of ``total`` along ``axis`` cut into ``sizes``, as a new array."""
    first = sum(sizes[:rank])
    return np.ascontiguousarray(total[(slice(None),) * axis + (slice(first, first + sizes[rank]),)])


def _ranks(ranks: List[int]) -> str:
    """``rank 3``, ``ranks 0-2, 5``: sorted ranks with consecutive runs as ranges."""
    runs: List[List[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank{'s' * (len(ranks) > 1)} {text}"


class MpiComm(Communicator):
    """The processes of ``MPI.COMM_WORLD`` (or ``comm``)."""

    name = "mpi"

    def __init__(self, comm: Any = None, timeout: Optional[float] = None) -> None:
        MPI = import_mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = (
            float(os.environ.get("TP_GPU_COMM_TIMEOUT", DEFAULT_TIMEOUT)) if timeout is None else timeout
        )
        self.cuda_aware = os.environ.get("TP_GPU_MPI_CUDA_AWARE", "0") == "1"
        self.check_shapes = os.environ.get(CHECK_SHAPES_ENV, "1") != "0"
        self.broken = False
        self.notices = LeavingNotices(MPI, self.comm, self.rank, self.size)
        atexit.register(self._at_exit)
        if self.size > 1 and os.environ.get(ABORT_ON_ERROR_ENV, "1") != "0":
            install_abort_on_uncaught_exception(MPI)

    @property
    def left(self) -> Optional[int]:
        """The rank of the first peer seen leaving the job (its program ended), or None."""
        return self.notices.left

    def _at_exit(self) -> None:
        """At exit: after a failed collective, abort the job rather than wait in MPI_Finalize; else
        tell every peer that this rank is leaving (see :mod:`tp_gpu.comm.mpi_exit`). Never raises:
        the interpreter is ending."""
        if self.broken:
            end_job(self._MPI)
        self.notices.send()

    def _wait(self, request: Any, what: str) -> None:
        """Poll ``request`` until it completes, or raise CommError after the timeout, or
        :data:`EXIT_GRACE` seconds after a peer has left the job."""
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout
        left_at = None
        delay = 1e-5
        while not request.Test():
            now = time.monotonic()
            if left_at is None and self.notices.peer_left():
                left_at = now
            if left_at is not None and now - left_at > min(EXIT_GRACE, self.timeout):
                self.broken = True
                raise CommError(
                    f"rank {self.rank}/{self.size}: rank {self.left} left the job (its program ended) "
                    f"while this rank waited in MPI {what} for {now - start:.1f} s; every rank must make "
                    "the same collective calls"
                )
            if now > deadline:
                self.broken = True
                raise CommError(
                    f"rank {self.rank}/{self.size}: MPI {what} did not complete within {self.timeout:g} s; "
                    "a peer rank may have failed or be running a different program path"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def _exchange_header(self, backend: Backend, array: Any, what: str) -> Optional[List[np.ndarray]]:
        """Every rank's shape header, and for an array of at most :data:`SMALL_BYTES` its data too,
        in one all-gather of a fixed :data:`_HEADER_BYTES` + :data:`SMALL_BYTES` per rank.

        ShapeError on every rank unless all shapes and dtypes agree (the message names them). For a
        small array, returns every rank's array (host, in rank order): the caller combines them and
        needs no second collective. For a larger one, returns None: the data collective follows.
        """
        header = shape_header(array)
        small = array.nbytes <= SMALL_BYTES
        mine = np.zeros(_HEADER_BYTES + SMALL_BYTES, dtype=np.uint8)
        mine[:_HEADER_BYTES] = header.view(np.uint8)
        host = None
        if small:
            host = np.ascontiguousarray(backend.to_host(array))
            mine[_HEADER_BYTES : _HEADER_BYTES + host.nbytes] = host.reshape(-1).view(np.uint8)
        every = np.empty((self.size, mine.size), dtype=np.uint8)
        self._wait(self.comm.Iallgather(mine, every), what)
        headers = np.ascontiguousarray(every[:, :_HEADER_BYTES]).view(np.int64)  # (size, _HEADER)
        if not (headers == header).all():
            groups: dict = {}
            for r in range(self.size):
                groups.setdefault(describe_header(headers[r]), []).append(r)
            shapes = "; ".join(f"{_ranks(ranks)}: {shape}" for shape, ranks in groups.items())
            raise ShapeError(
                f"rank {self.rank}/{self.size}: MPI {what} got arrays of different shapes or dtypes "
                f"({shapes}); every rank must pass the same shape and dtype (the same number of rows, "
                "e.g., to a RowParallelLinear)"
            )
        if host is None:
            return None
        data = every[:, _HEADER_BYTES : _HEADER_BYTES + host.nbytes]
        return [np.ascontiguousarray(data[r]).view(host.dtype).reshape(host.shape) for r in range(self.size)]

    def _run(
        self,
        backend: Backend,
        array: Any,
        make_recv: Callable[..., Any],
        start: Callable[..., Any],
        post: Callable[..., Any],
        what: str,
        combine: Callable[[List[np.ndarray]], np.ndarray],
        given: Any = None,
    ) -> Any:
        """One MPI collective on ``array``; the result lives where ``array`` did.

        Host and simulated-device arrays go to MPI as host buffers. A CuPy array
        goes as a device buffer when MPI is CUDA-aware, else through the host.
        ``make_recv(xp, send)`` allocates the receive buffer, ``start(send, recv)``
        starts the non-blocking collective, ``post(xp, recv)`` shapes the result.
        Every rank's shape and dtype (of ``given``, the caller's array, when ``array`` is a view
        of it) are checked to agree first (see :meth:`_exchange_header`); a small array travels
        with its header, and ``combine(every rank's array)`` makes the result on the host.
        """
        if self.check_shapes and self.size > 1:
            given = array if given is None else given
            pieces = self._exchange_header(backend, given, what)
            if pieces is not None:
                device = backend.device_of(given)
                result = combine(pieces)
                return backend.asarray(result, result.dtype, device) if device in backend.devices else result
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

    def all_reduce(self, backend: Backend, array: Any, op: str = "sum") -> Any:
        mpi_op = {"sum": self._MPI.SUM, "max": self._MPI.MAX}[op]
        return self._run(
            backend,
            array,
            lambda xp, send: xp.empty_like(send),
            lambda send, recv: self.comm.Iallreduce(send, recv, op=mpi_op),
            lambda xp, recv: recv,
            f"all_reduce({op})",
            partial(_combine_reduce, op),
        )

    def all_gather(self, backend: Backend, array: Any, axis: int) -> Any:
        axis %= array.ndim
        return self._run(
            backend,
            array,
            lambda xp, send: xp.empty((self.size,) + tuple(send.shape), dtype=send.dtype),
            lambda send, recv: self.comm.Iallgather(send, recv),
            lambda xp, recv: xp.concatenate([recv[r] for r in range(self.size)], axis=axis),
            "all_gather",
            lambda pieces: np.concatenate(pieces, axis=axis),
        )

    def reduce_scatter(self, backend: Backend, array: Any, axis: int, sizes: Sequence[int]) -> Any:
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
            lambda pieces: _piece(_combine_reduce("sum", pieces), axis, sizes, self.rank),
            given=array,
        )

    def all_gather_object(self, obj: Any) -> List[Any]:
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

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self.all_gather_object(obj if self.rank == root else None)[root]

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")
