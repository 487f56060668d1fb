"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu.backends import cupy_available

#: Absolute/relative tolerance of each dtype against a float64 reference.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}


def skip_unless_cupy() -> None:
    """Skip the calling test, saying why, when CuPy cannot run here."""
    if not cupy_available():
        from tp_gpu.backends.cupy_backend import cupy_unavailable_reason

        pytest.skip(f"CuPy backend unavailable: {cupy_unavailable_reason()}")


def to_host(layer, array) -> np.ndarray:
    """An output of ``layer`` as a host float64 NumPy array."""
    return np.asarray(layer.backend.to_host(array), dtype=np.float64)
