"""Seeded initialisers of *logical* (unsharded) weights.

The master weight is drawn on the host in float64 from the seed and the full
shape alone, then split. So the logical weight does not depend on
``n_workers``, the backend or the placement: a layer with any worker count
equals the dense layer built from ``full_weight()``.

Before drawing, the weight's float64 size is checked against the host's
physical memory: a weight that cannot fit raises
:class:`~tp_gpu.errors.ConfigError` saying how much it would need, instead of
a ``MemoryError`` (or the machine swapping) part-way through.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np

from .errors import ConfigError

__all__ = ["xavier_uniform", "embedding_uniform", "EMBEDDING_INIT_RANGE", "check_fits_in_memory"]

#: Embedding tables start as U(-EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE), as in the original.
EMBEDDING_INIT_RANGE = 0.02

#: The limit where the host's memory cannot be read (no ``os.sysconf``, e.g. Windows): 1 TiB.
FALLBACK_MEMORY_LIMIT = 1 << 40


def host_memory_bytes() -> Optional[int]:
    """The host's physical memory in bytes, from ``os.sysconf``; None where it cannot be read."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _size(nbytes: float) -> str:
    """``nbytes`` in binary units: ``"64.0 TiB"``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB")
    power = 0
    while nbytes >= 1024 and power < len(units) - 1:
        nbytes /= 1024
        power += 1
    return f"{nbytes:.1f} {units[power]}"


def check_fits_in_memory(shape: Tuple[int, ...], what: str = "weight") -> None:
    """Raise ConfigError if a float64 array of ``shape`` cannot fit in the host's memory.

    The logical weight is drawn whole on the host in float64 before it is split, so it needs
    ``prod(shape) * 8`` bytes there whatever the worker count, dtype or backend.
    """
    nbytes = math.prod(int(n) for n in shape) * 8  # Python ints: no overflow
    total = host_memory_bytes()
    limit = FALLBACK_MEMORY_LIMIT if total is None else total
    if nbytes > limit:
        available = (
            f"this machine's {_size(total)} of memory"
            if total is not None
            else f"the {_size(limit)} limit used where the memory size is unknown"
        )
        raise ConfigError(
            f"the logical {what} = {tuple(int(n) for n in shape)} would need {_size(nbytes)} "
            f"({nbytes} bytes) of host memory: it is drawn whole in float64 before it is split, "
            f"whatever the worker count, and that is more than {available}"
        )


def xavier_uniform(n_in: int, n_out: int, seed: int) -> np.ndarray:
    """A ``(n_in, n_out)`` float64 weight drawn from U(-a, a), ``a = sqrt(6 / (n_in + n_out))``.

    Xavier/Glorot uniform over the *full* fan-in and fan-out. Raises ConfigError, before drawing,
    if it cannot fit in the host's memory (see :func:`check_fits_in_memory`).
    """
    check_fits_in_memory((n_in, n_out), "weight (n_in, n_out)")
    limit = np.sqrt(6.0 / (n_in + n_out))
    return np.random.default_rng(seed).uniform(-limit, limit, size=(n_in, n_out))


def embedding_uniform(vocab_size: int, embed_dim: int, seed: int) -> np.ndarray:
    """A ``(vocab_size, embed_dim)`` float64 table drawn from U(-0.02, 0.02).

    Raises ConfigError, before drawing, if it cannot fit in the host's memory.
    """
    check_fits_in_memory((vocab_size, embed_dim), "embedding table (vocab_size, embed_dim)")
    r = EMBEDDING_INIT_RANGE
    return np.random.default_rng(seed).uniform(-r, r, size=(vocab_size, embed_dim))
