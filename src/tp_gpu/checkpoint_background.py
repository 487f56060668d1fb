"""Background checkpoint saves: the write runs in a thread while training goes on.

``handle = save_checkpoint(path, module, optimizer=opt, scaler=scaler, background=True)``
works in two halves:

1. **Prepare**, in the caller's thread: every tensor (weights, optimizer state) is
   copied to new host arrays, and the training state and metadata are taken. With
   several processes this is the collective part (the gathers), so it runs where
   every collective runs. When the call returns, the parameters, the optimizer and
   the scaler may change freely: the checkpoint holds their values at the call.
2. **Write**, in a thread: the prepared save's ``write()`` serializes and writes
   the file (or folder) atomically, exactly as a synchronous save does, and then
   drops the host buffers. It runs no collective (no MPI call happens outside the
   caller's thread). The mechanism only needs an object with ``write()``: the
   single-file format (:class:`tp_gpu.checkpoint.SingleFileSave`) and any other
   format with a prepared save work alike.

The :class:`SaveHandle` that the call returns has

``wait(timeout=None)``  block until the save is on disk; raise its error, the
                        original exception (e.g. :class:`~tp_gpu.errors.CheckpointFileError`,
                        an ``OSError`` naming the path and the cause); ``TimeoutError``
                        if it is still running after ``timeout`` seconds (it goes on)
``done()``              True once the thread has ended (reports nothing, runs no collective)
``path``                the checkpoint path (a ``str``)
``prepare_seconds``     the time the caller was blocked (the host copies)
``write_seconds``       the time the thread took to write, None until done
``seconds``             both: from the call until the checkpoint was on disk, None until done

Rules, so that no failure is ever silently dropped:

* **One save in flight per process.** Every ``save_checkpoint`` call, background or
  not, first waits for the previous background save. If that save failed and its
  error was not yet raised by ``wait()``, the call raises it and does not start the
  new save. A ``load_checkpoint`` of the same path also waits first (and raises).
* **At interpreter exit** the writing thread is finished (it is not a daemon: the
  interpreter waits for it, so the save completes), and an error that nothing
  reported is printed to stderr and raised from the ``atexit`` hook.
* **With several processes** ``wait()`` (and so the next save, or a load of the
  path) is collective: every rank must call it. Each rank joins its own thread,
  then the ranks exchange their outcome in the calling thread (through
  :func:`tp_gpu.collectives.all_reduce_host_scalar`): a failure on any rank raises
  on every rank, the original error on the rank(s) where it happened and a
  :class:`~tp_gpu.errors.CheckpointError` naming the first failed rank elsewhere;
  a save still running on any rank after ``timeout`` raises ``TimeoutError`` on
  every rank. Give every rank the same ``timeout``.
* Once ``wait()`` has reported an outcome, it returns (or raises) the same again
  without any collective, and the next save starts normally.

The host buffers are owned by the prepared save, which only the thread holds;
they are released when the write ends, whether it succeeded or failed (the
locals of a failed write's frames are cleared), and never kept by the handle.
A background save holds about the same host memory as a synchronous one, for
longer: the prepared tensors plus, while writing, the serialized file.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from typing import Optional, Protocol, Set

from . import collectives
from .comm.base import Communicator
from .errors import CheckpointError, ConfigError

__all__ = ["SaveHandle", "PreparedWrite", "start", "wait_previous", "wait_for", "pending"]


class PreparedWrite(Protocol):
    """A save whose tensors are already on the host: ``write()`` puts it on disk, without collectives."""

    def write(self) -> None: ...


class SaveHandle:
    """A background save: :meth:`wait` for it, or let the next save (or load of ``path``) do so."""

    def __init__(self, path: str, comm: Communicator, prepare_seconds: float) -> None:
        self.path = path
        self.prepare_seconds = prepare_seconds
        self.write_seconds: Optional[float] = None
        self._comm = comm
        self._error: Optional[BaseException] = None
        self._reported = False  # wait() has returned or raised the outcome on every rank
        self._thread: Optional[threading.Thread] = None

    @property
    def seconds(self) -> Optional[float]:
        """From the ``save_checkpoint`` call until the checkpoint was on disk; None while writing."""
        return None if self.write_seconds is None else self.prepare_seconds + self.write_seconds

    def done(self) -> bool:
        """True once the write has ended (successfully or not). Local: no collective, raises nothing."""
        return self._thread is None or not self._thread.is_alive()

    def _run(self, prepared: PreparedWrite) -> None:
        start = time.perf_counter()
        try:
            prepared.write()
        except BaseException as exc:  # kept for wait(): an error is never dropped
            _clear_frames(exc)  # the frames' locals may hold the host buffers (or the serialized file)
            self._error = exc
        finally:
            del prepared
            self.write_seconds = time.perf_counter() - start

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until the save is on disk, then return; raise its error if it failed.

        ``timeout`` (seconds, None for no limit): raise ``TimeoutError`` if the save
        is still running then; it goes on, and ``wait`` may be called again. With
        several processes this is collective (see the module docstring).
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise ConfigError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
        if not self._reported:
            if self._thread is not None:
                self._thread.join(timeout)
            self._settle()
        if self._error is not None:
            raise self._error

    def _settle(self) -> None:
        """Exchange the outcome with the other ranks (in the calling thread) and mark it reported."""
        running, failed = not self.done(), self._error is not None
        comm = self._comm
        if comm.size > 1:
            # One number: above size if a rank is still writing, else size - (first failed rank), else 0.
            code = 2 * comm.size if running else (comm.size - comm.rank if failed else 0)
            agreed = int(collectives.all_reduce_host_scalar(comm, code, "max"))
            running = agreed > comm.size
            if not running and agreed:
                count = int(collectives.all_reduce_host_scalar(comm, 1.0 if failed else 0.0, "sum"))
                if not failed:
                    self._error = CheckpointError(
                        f"the background save of checkpoint {self.path!r} failed on {count} of {comm.size} "
                        f"ranks (rank {comm.size - agreed} first); that rank raises the error itself"
                    )
        if running:
            raise TimeoutError(f"the background save of checkpoint {self.path!r} is still running")
        self._reported = True

    def __repr__(self) -> str:
        state = "reported" if self._reported else ("done" if self.done() else "writing")
        return f"SaveHandle({self.path!r}, {state})"


def _clear_frames(error: Optional[BaseException], seen: Optional[Set[int]] = None) -> None:
    """Clear the locals of the finished frames in the tracebacks of ``error`` and of its causes and
    contexts (a CheckpointFileError raised ``from`` an OSError keeps the writer's frames there)."""
    seen = set() if seen is None else seen
    if error is None or id(error) in seen:
        return
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)
    _clear_frames(error.__cause__, seen)
    _clear_frames(error.__context__, seen)


_lock = threading.Lock()
_pending: Optional[SaveHandle] = None
_atexit_registered = False


def pending() -> Optional[SaveHandle]:
    """The background save of this process whose outcome is not reported yet, or None."""
    handle = _pending
    return None if handle is None or handle._reported else handle


def start(prepared: PreparedWrite, path: str, comm: Communicator, started: float) -> SaveHandle:
    """Start ``prepared.write()`` in a thread; the handle. ``started``: ``time.perf_counter()``
    when the caller began to prepare. Call :func:`wait_previous` first (``save_checkpoint`` does)."""
    global _pending, _atexit_registered
    handle = SaveHandle(path, comm, time.perf_counter() - started)
    with _lock:
        if pending() is not None:
            raise CheckpointError(
                f"a background save of checkpoint {_pending.path!r} is still unreported; "  # type: ignore[union-attr]
                "save_checkpoint waits for it first: do not call start() directly"
            )
        if not _atexit_registered:
            atexit.register(_at_exit)
            _atexit_registered = True
        thread = threading.Thread(
            target=handle._run, args=(prepared,), name=f"tp_gpu checkpoint {os.path.basename(path)}"
        )
        del prepared  # only the thread holds the host buffers now
        handle._thread = thread
        _pending = handle
        thread.start()
    return handle


def wait_previous() -> None:
    """Wait for this process's background save still unreported, raising its error (collective)."""
    global _pending
    handle = pending()
    if handle is None:
        return
    try:
        handle.wait()
    finally:
        if handle._reported and _pending is handle:
            _pending = None


def wait_for(path: str) -> None:
    """:func:`wait_previous` if the unreported background save writes ``path`` (the same file)."""
    handle = pending()
    if handle is not None and os.path.realpath(handle.path) == os.path.realpath(path):
        wait_previous()


def _at_exit() -> None:
    """Finish the background save and raise its error if nothing reported it (no collective)."""
    handle = pending()
    if handle is None:
        return
    if handle._thread is not None:
        handle._thread.join()
    handle._reported = True
    error = handle._error
    if error is not None:
        print(
            f"tp_gpu: the background save of checkpoint {handle.path!r} failed, and nothing waited for it: "
            f"{type(error).__name__}: {error}",
            file=sys.stderr,
            flush=True,
        )
        raise error
