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
again each time it is read. A backward from a checked tensor also refuses a
``grad`` that is not real numbers (a bool, a string) with ShapeError. Checks
are kept per thread: a graph belongs to the thread that built it. Host arrays
(NumPy, lists) are checked at once, on the host.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .backends.base import Backend, as_array
from .errors import ShapeError, TensorParallelError
from .placements import HOST
from .sharded import ShardedTensor
from .tensor import Tensor

__all__ = [
    "DeferredCheck",
    "MAX_PENDING",
    "defer",
    "raise_pending",
    "pending_checks",
    "lives_on_device",
    "reading_checks",
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
            host = self.backend.to_host(self.stats)  # the one device-to-host copy of this check
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


def raise_pending() -> None:
    """Read every waiting check of this thread, oldest first; raise the first error found."""
    checks = _pending()
    while checks:
        checks.pop(0).verify()


class _Reading:
    """What a checked tensor adds: a host read, or a backward from it, first reads the waiting checks
    and its own ``checks`` (those of the values it was computed from, also once read elsewhere)."""

    __slots__ = ()
    checks: Tuple[DeferredCheck, ...]

    def _verify(self) -> None:
        raise_pending()
        for check in self.checks:
            check.verify()

    def numpy(self) -> np.ndarray:
        self._verify()
        return super().numpy()  # type: ignore[misc]

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        self._verify()
        if grad is not None and not isinstance(grad, Tensor):
            _check_real(grad)
        super().backward(grad, retain_graph)  # type: ignore[misc]


def _check_real(grad: Any) -> None:
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


class CheckedTensor(_Reading, Tensor):
    """A :class:`~tp_gpu.Tensor` whose host read or backward first reads the waiting checks."""

    __slots__ = ("checks",)


class CheckedShardedTensor(_Reading, ShardedTensor):
    """A :class:`~tp_gpu.ShardedTensor` whose host read or backward first reads the waiting checks."""


def reading_checks(t: Tensor, checks: Tuple[DeferredCheck, ...] = ()) -> Tensor:
    """``t`` (a region's output, its tape node kept) as a tensor that reads the waiting checks and
    ``checks`` first. Only the Python object changes: blocks, placement and ``grad_fn`` are the same.
    """
    out: CheckedTensor | CheckedShardedTensor
    if isinstance(t, ShardedTensor):
        out = CheckedShardedTensor.__new__(CheckedShardedTensor)
    else:
        out = CheckedTensor.__new__(CheckedTensor)
    for name in Tensor.__slots__:
        if name != "__weakref__":
            object.__setattr__(out, name, getattr(t, name))
    out.checks = tuple(checks)
    return out
