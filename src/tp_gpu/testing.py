"""The one tolerance table: how close a tensor-parallel result must be to its dense reference.

The tests, ``python -m tp_gpu``'s self-check and the benchmark all compare
against a dense float64 reference with these numbers. A result in dtype ``d``
computed from ``terms`` products summed together is accepted when

    max |actual - expected| <= TOLERANCE[d] * sqrt(terms) * max(1, max |expected|)

``sqrt(terms)`` is the growth of a sum of ``terms`` independently rounded
values (a random walk), so a 4096-term dot product gets 64 times the
single-term allowance.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["TOLERANCE", "tolerance", "Comparison", "compare", "assert_close"]

#: Relative tolerance of one rounded operation in each compute dtype against float64.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}


def tolerance(dtype: Any, terms: int = 1) -> float:
    """The allowed relative error of a ``dtype`` result summed over ``terms`` products."""
    return TOLERANCE[np.dtype(dtype).name] * math.sqrt(max(int(terms), 1))


class Comparison(NamedTuple):
    """What :func:`compare` found: whether it passed, the error and the allowance."""

    ok: bool
    error: float  # max |actual - expected|
    allowed: float  # tolerance(dtype, terms) * max(1, max |expected|)


def compare(actual: Any, expected: Any, dtype: Any, terms: int = 1) -> Comparison:
    """Compare host arrays ``actual`` and ``expected`` (float64 reference) for a ``dtype`` result."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return Comparison(False, math.inf, 0.0)
    error = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = max(1.0, float(np.max(np.abs(e)))) if e.size else 1.0
    allowed = tolerance(dtype, terms) * scale
    return Comparison(bool(error <= allowed), error, allowed)


def assert_close(actual: Any, expected: Any, dtype: Any, terms: int = 1, what: str = "result") -> None:
    """Raise AssertionError, naming the error and the allowance, unless :func:`compare` passes."""
    result = compare(actual, expected, dtype, terms)
    if not result.ok:
        shapes = f"{np.shape(actual)} vs {np.shape(expected)}"
        raise AssertionError(
            f"{what}: max abs error {result.error:.3g} exceeds {result.allowed:.3g} "
            f"({np.dtype(dtype).name}, {terms} terms, shapes {shapes})"
        )
