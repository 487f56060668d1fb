"""Checks of device-resident values that cost no device-to-host copy when they are made.

A range check of token ids or targets that already live on a GPU needs their
values on the host, and reading them there waits for the GPU: one copy and one
synchronisation per forward. Instead, a layer computes a few numbers about them
on the device (how many are out of range, and which), keeps them in a
:class:`DeferredCheck`, and carries on with the bad values masked, so that
nothing reads out of bounds. The check is read when the program synchronises
anyway, as CUDA reports a device-side assertion at the next synchronisation:

* when an output of such a layer is brought to the host (``np.asarray(out)``,
  ``out.numpy()``, ``float(loss)``: see :func:`reading_checks`);
* at the start of ``backward`` from such an output, and at the start of the
  backward of the layer that made the check (before any gradient is accumulated
  when the loss is the root);
* after :data:`MAX_PENDING` checks of one thread are waiting, the oldest is read
  (a long inference loop that never reads an output of ours keeps no more).

A check that finds a bad value raises its error then, naming the value, and
again each time it is read (a tensor keeps the checks of the values it was
computed from in ``Tensor.checks``). :func:`check_real` is the test every
``backward(grad)`` makes of a gradient given as an array. Checks are kept
per thread: a graph belongs to the thread that built it. Host arrays
(NumPy, lists) are checked at once, on the host.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from . import collectives
from .backends.base import Backend, as_array
from .errors import ShapeError, TensorParallelError
from .placements import HOST

__all__ = [
    "DeferredCheck",
    "MAX_PENDING",
    "defer",
    "raise_pending",
    "pending_checks",
    "lives_on_device",
    "reading_checks",
    "verify_all",
    "check_real",
]

#: How many unread checks a thread keeps before the oldest is read.
MAX_PENDING = 64

_local = threading.local()


def lives_on_device(backend: Backend, x: Any) -> bool:
    """Whether the array ``x`` lives on one of ``backend``'s devices (a CuPy or simulated array),
    where its checks run; host arrays, and everything on the NumPy backend, are checked on the host."""
    return backend.name != "numpy" and backend.device_of(x) != HOST


class DeferredCheck:
    """A few numbers computed on a device about some values, and how to judge them once on the host.

    ``stats`` is one small device array; ``judge(host_stats)`` returns the error
    to raise (naming the bad value) or None. :meth:`verify` reads ``stats`` with
    one device-to-host copy the first time and remembers the verdict.
    """

    __slots__ = ("backend", "stats", "judge", "error", "read")

    def __init__(
        self, backend: Backend, stats: Any, judge: Callable[[np.ndarray], Optional[TensorParallelError]]
    ) -> None:
        self.backend = backend
        self.stats: Any = stats
        self.judge = judge
        self.error: Optional[TensorParallelError] = None
        self.read = False

    def verify(self) -> None:
        """Raise the error the numbers show, if any (reading them on the first call)."""
        if not self.read:
            host = collectives.to_host(self.backend, self.stats)  # the one device-to-host copy of this check
            self.error, self.read, self.stats = self.judge(np.asarray(host)), True, None
        if self.error is not None:
            raise self.error


def _pending() -> List[DeferredCheck]:
    checks: Optional[List[DeferredCheck]] = getattr(_local, "checks", None)
    if checks is None:
        checks = _local.checks = []
    return checks


def pending_checks() -> int:
    """How many checks of this thread are waiting to be read."""
    return len(_pending())


def defer(check: DeferredCheck) -> DeferredCheck:
    """Keep ``check`` until the next synchronisation point of this thread; returns it."""
    checks = _pending()
    checks.append(check)
    if len(checks) > MAX_PENDING:
        checks.pop(0).verify()
    return check


def has_pending() -> bool:
    """Whether this thread has a check waiting to be read."""
    return bool(getattr(_local, "checks", None))


def raise_pending() -> None:
    """Read every waiting check of this thread, oldest first; raise the first error found."""
    checks = _pending()
    while checks:
        checks.pop(0).verify()


def check_real(grad: Any) -> None:
    """ShapeError unless ``grad`` holds real numbers (bools, strings, complex numbers and objects are
    refused, as torch refuses a complex gradient for a real output), naming what it got."""
    try:
        array = as_array(grad)
        dtype = np.dtype(array.dtype)
    except (ValueError, TypeError):
        array, dtype = None, np.dtype(object)
    if dtype.kind in "iuf":
        return
    shape = getattr(array, "shape", ())
    what = repr(grad) if not shape else f"an array of shape {tuple(shape)}"
    raise ShapeError(
        f"backward: grad must be real numbers, got {what} of dtype {dtype}; expected float or integer"
    )


def reading_checks(t: Any, checks: Tuple[DeferredCheck, ...] = ()) -> Any:
    """``t`` (a Tensor) made to read ``checks`` (and this thread's waiting ones) before a host read
    or a backward from it: :meth:`tp_gpu.Tensor.numpy` and ``backward`` call :func:`verify_all`."""
    t.checks = tuple(checks)
    return t


def verify_all(checks: Tuple[DeferredCheck, ...]) -> None:
    """Read this thread's waiting checks, then ``checks``; raise the first error found."""
    raise_pending()
    for check in checks:
        check.verify()
