"""Keep freed host memory in the process, so that a step's temporaries do not page-fault every step.

A training step on the host makes many short-lived arrays of the same sizes: a layer's element-wise
temporaries, its outputs and its gradients. glibc's ``malloc`` serves arrays above its mmap
threshold with a fresh ``mmap`` and gives them back with ``munmap`` when freed, and it trims the
heap's free top back to the system once that top exceeds its trim threshold. Either way the next
step's array of the same size is new memory: every 4 KiB page of it costs a page fault, which the
kernel serves by zeroing the page. glibc raises its mmap threshold to the size of the largest
freed mapping (and the trim threshold to twice that), but only as far as the arrays already seen,
so a step whose temporaries together exceed the trim threshold faults on them all, every time.

Measured on the small GPT step of ``examples/train_gpt.py`` (an AMD EPYC VM, one thread): about
11,700 page faults per float64 step, 17 ms of its 42. With the thresholds pinned at the ceiling
glibc's own heuristic would reach (mmap threshold 32 MiB, trim threshold twice that), the step
faults about twice, and takes 24 ms.

:func:`retain_freed_host_memory` pins them, once per process, when the first backend is built. The
cost is that up to the trim threshold (64 MiB) of freed heap stays mapped to the process, as a
caching allocator keeps freed blocks; arrays above 32 MiB are still mapped and unmapped each time.
It changes nothing where ``malloc`` is not glibc's, where the user already set glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``, or where
``TP_GPU_HOST_MALLOC=system`` asks to leave ``malloc`` as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

from .config import env_choice

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "retain_freed_host_memory",
    "host_malloc_status",
]

#: ``TP_GPU_HOST_MALLOC=system`` leaves glibc's thresholds as they are; ``retain`` (the default, as
#: unset) pins them.
ENV_VAR = "TP_GPU_HOST_MALLOC"
CHOICES = ("", "retain", "system")
#: Arrays up to this size come from the heap and are reused from it (glibc's dynamic ceiling).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: The heap's free top is given back to the system only beyond this size (glibc's rule: twice the
#: mmap threshold).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: glibc's ``mallopt`` parameter numbers (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's own environment variables for these thresholds: when the user set one, theirs stands.
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_status: Optional[str] = None


def host_malloc_status() -> Optional[str]:
    """What :func:`retain_freed_host_memory` did in this process: ``None`` before its first call,
    ``"retained"`` when it pinned the thresholds, else the reason it left ``malloc`` alone."""
    return _status


def retain_freed_host_memory() -> str:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD` and its trim threshold at
    :data:`TRIM_THRESHOLD`, once per process; return :func:`host_malloc_status`.

    Later calls return the first call's outcome and change nothing. A ``TP_GPU_HOST_MALLOC`` that is
    neither ``retain`` nor ``system`` raises :class:`~tp_gpu.ConfigError`, and is asked again next time.
    """
    global _status
    if _status is None:
        _status = _pin_thresholds()
    return _status


def _pin_thresholds() -> str:
    choice = env_choice(ENV_VAR, CHOICES)
    if choice == "system":
        return f"left to the system ({ENV_VAR}=system)"
    user_set = [name for name in _GLIBC_VARIABLES if name in os.environ]
    if user_set:
        return f"left to the user's {', '.join(user_set)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left to the system (malloc is not glibc's)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; the mmap threshold goes first, as setting it fixes the trim
    # threshold's dynamic update too.
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ):
        return "left to the system (glibc refused the thresholds)"
    return "retained"
