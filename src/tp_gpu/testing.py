"""The one tolerance table: how close a tensor-parallel result must be to its dense reference.

Also :func:`gradcheck`, the finite-difference check of a user's :class:`~tp_gpu.Function`.

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
from typing import Any, Callable, List, NamedTuple, Sequence, Tuple

import numpy as np

from .errors import TensorParallelError

__all__ = ["TOLERANCE", "tolerance", "Comparison", "compare", "assert_close", "gradcheck", "GradcheckError"]

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


class GradcheckError(TensorParallelError):
    """A function's ``backward`` disagrees with finite differences of its ``forward``."""


def gradcheck(
    fn: Callable[..., Any],
    inputs: Sequence[Any],
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> bool:
    """Check ``fn``'s gradients (its tape: a user's :class:`~tp_gpu.Function`, a module) against
    central finite differences, as ``torch.autograd.gradcheck`` does.

    ``fn(*tensors)`` must return one Tensor. Each of ``inputs`` (arrays; float64 is advised) becomes a
    leaf that requires grad. With a random ``v`` of the output's shape, the tape's ``x.grad = J^T v``
    must match ``(v . f(x + eps e_i) - v . f(x - eps e_i)) / (2 eps)`` for every element ``i`` of every
    input within ``atol + rtol * |numeric|``; else :class:`GradcheckError` names the input, the element
    and both values. Returns True. It costs two evaluations of ``fn`` per input element: use small inputs.
    """
    from .tensor import Tensor, tensor

    arrays = [
        np.array(np.asarray(x), dtype=np.float64 if np.asarray(x).dtype.kind != "f" else None) for x in inputs
    ]
    leaves = [tensor(a, requires_grad=True) for a in arrays]
    out = fn(*leaves)
    if not isinstance(out, Tensor):
        raise GradcheckError(f"gradcheck: fn returned a {type(out).__name__}; expected a Tensor")
    v = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(v.astype(out.dtype))
    for k, (array, leaf) in enumerate(zip(arrays, leaves)):
        analytic = np.zeros(array.shape) if leaf.grad is None else np.asarray(leaf.grad, dtype=np.float64)
        for i in np.ndindex(array.shape):
            numeric = _directional_difference(fn, arrays, k, i, v, eps)
            if abs(analytic[i] - numeric) > atol + rtol * abs(numeric):
                raise GradcheckError(
                    f"gradcheck: input {k} element {i}: backward gives {float(analytic[i])!r}, finite "
                    f"differences give {numeric!r}; expected them within {atol} + {rtol} * |numeric|"
                )
    return True


def _directional_difference(
    fn: Callable[..., Any],
    arrays: List[np.ndarray],
    k: int,
    index: Tuple[int, ...],
    v: np.ndarray,
    eps: float,
) -> float:
    """``(v . f(x + eps e_i) - v . f(x - eps e_i)) / (2 eps)`` for element ``index`` of input ``k``."""
    from .autograd import no_grad
    from .tensor import tensor

    values = []
    for step in (eps, -eps):
        moved = [a.copy() for a in arrays]
        moved[k][index] += step
        with no_grad():
            values.append(float(np.sum(np.asarray(fn(*[tensor(a) for a in moved]), dtype=np.float64) * v)))
    return (values[0] - values[1]) / (2 * eps)
