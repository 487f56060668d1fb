"""The GEMMs of the linear layers and their gradients, over any leading axes, as one 2-D product each.

Activations of any rank ``(..., n)`` are reshaped to ``(N, n)`` before a GEMM, so that CuPy takes its
cuBLAS ``gemmEx`` path (a 3-D operand would take the batched path, without tensor cores for
float16). A reshape is a view only where the strides allow it: every function here reads its
operands and returns a new array, so a strided input (a transposed view, a torch tensor with
strides) gives the same numbers as a contiguous copy of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg.blas

#: BLAS's rank-1 update and GEMM of each dtype they serve.
_BLAS = {
    np.dtype(np.float32): (scipy.linalg.blas.sger, scipy.linalg.blas.sgemm),
    np.dtype(np.float64): (scipy.linalg.blas.dger, scipy.linalg.blas.dgemm),
}

__all__ = [
    "product",
    "as_rows",
    "matmul",
    "matmul_bias",
    "matmul_transposed",
    "weight_grad",
    "bias_grad",
    "add_in_place",
    "accumulate_weight_grad",
    "can_accumulate_weight_grad",
]


def product(a: Any, b: Any) -> Any:
    """``a @ b`` with ``np.matmul``'s broadcasting over leading (batch) axes.

    On the host, float16 operands are multiplied in float32 and the product is rounded to float16
    once. NumPy has no half-precision GEMM: its float16 ``matmul`` is an element loop, about 300x
    slower than float32's BLAS at (256, 1024) @ (1024, 1024). Accumulating in float32 is also what
    cuBLAS does for float16 by default, so the host and the GPU round alike. Other dtypes and
    device arrays (CuPy) multiply as they are.
    """
    if isinstance(a, np.ndarray) and a.dtype == np.float16:
        return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)
    return a @ b


def as_rows(x: Any) -> Any:
    """``x`` as 2-D ``(N, n)``, ``N`` the product of its leading axes (``n`` may be 0), to be read.

    A view when ``x``'s strides allow it (C-contiguous, say), else a copy: never write into it
    expecting ``x`` to change (the simulated backend makes such a copy read-only, so a write raises).
    """
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (..., n) -> (N, n)


def matmul(x: Any, w: Any, out: Any = None) -> Any:
    """``x @ w`` over every leading axis of ``x``: (..., a) @ (a, b) -> (..., b), as one 2-D GEMM; written
    into ``out`` ``(N, b)`` when given (a host buffer of ``x``'s dtype,
    :func:`~tp_gpu.reused_buffers.gemm_output`), else into a new array."""
    if out is None:
        y = product(as_rows(x), w)  # (N, a) @ (a, b) -> (N, b), a new array
    else:
        y = np.matmul(as_rows(x), w, out=out)  # (N, a) @ (a, b) -> (N, b), into out
    return y.reshape(*x.shape[:-1], w.shape[-1])  # (N, b) -> (..., b), a view of it


def matmul_bias(x: Any, w: Any, b: Any, out: Any = None) -> Any:
    """``x @ w + b``, the bias added in place into the product (a new array, or ``out`` as in
    :func:`matmul`): (..., a) @ (a, b) + (b,) -> (..., b)."""
    y = matmul(x, w, out)
    y += b
    return y


def matmul_transposed(g: Any, w: Any) -> Any:
    """``g @ w^T``: (..., b) @ (b, a) -> (..., a), the input gradient of ``x @ w``."""
    return matmul(g, w.T)


def weight_grad(inp: Any, grad: Any) -> Any:
    """``inp^T @ grad`` over every leading axis: (..., a), (..., b) -> (a, b).

    One row on the host (``N = 1``, a batch-1 step) is the outer product, taken as a broadcast
    multiply: NumPy's ``matmul`` does not hand an inner dimension of 1 to BLAS, and its own loop took
    265 µs for (256, 1) @ (1, 1024) in float32, ``np.dot`` (BLAS) 111 µs with OpenBLAS's SkylakeX
    kernel, the multiply 50 µs. Each element is one product either way, so the values are the same.
    (A gradient that already holds a block takes the product in place instead:
    :func:`accumulate_weight_grad`.)
    """
    inp2 = as_rows(inp)  # (N, a)
    grad2 = as_rows(grad)  # (N, b)
    if inp2.shape[0] == 1 and isinstance(inp2, np.ndarray):
        return np.multiply(inp2.T, grad2)  # (a, 1) * (1, b) -> (a, b)
    return product(inp2.T, grad2)  # (a, N) @ (N, b) -> (a, b)


def can_accumulate_weight_grad(target: Any, inp: Any, grad: Any) -> bool:
    """Whether :func:`accumulate_weight_grad` serves these arrays: ``target`` a writeable C-contiguous
    float32 or float64 NumPy array, ``inp`` and ``grad`` NumPy arrays of its dtype."""
    return (
        type(target) is np.ndarray
        and target.dtype in _BLAS
        and target.flags.c_contiguous
        and target.flags.writeable
        and type(inp) is np.ndarray
        and type(grad) is np.ndarray
        and inp.dtype == target.dtype
        and grad.dtype == target.dtype
    )


def accumulate_weight_grad(target: Any, inp: Any, grad: Any) -> None:
    """``target += inp^T @ grad`` in place over every leading axis, as one BLAS call: ``target``
    ``(a, b)``, ``inp`` ``(..., a)``, ``grad`` ``(..., b)``, as :func:`can_accumulate_weight_grad` says.

    One row is BLAS's rank-1 update ``?ger`` (16 µs in float32 at 256 x 1024 with OpenBLAS's SkylakeX
    kernel, where the outer product and the addition took 74; 29 against 152 in float64); more rows
    are ``?gemm`` with ``beta = 1``, which adds the product without a temporary of ``target``'s size
    (171 against 213 µs at 64 rows). Both run on ``target^T``, which is Fortran-ordered as BLAS
    wants: ``target^T += grad^T inp``.
    """
    inp2, grad2 = as_rows(inp), as_rows(grad)  # (N, a), (N, b)
    ger, gemm = _BLAS[target.dtype]
    if inp2.shape[0] == 0 or target.size == 0:  # no rows (an empty slice of the sequence): adds 0
        return
    if inp2.shape[0] == 1:
        out = ger(1.0, grad2[0], inp2[0], a=target.T, overwrite_a=1)  # (b, a) += dY_0 x_0^T
    else:
        out = gemm(1.0, grad2.T, inp2, beta=1.0, c=target.T, overwrite_c=1)  # (b, N) @ (N, a) + (b, a)
    if not np.shares_memory(out, target):  # the wrapper copied after all: put the sum in place
        target.T[...] = out


def bias_grad(grad: Any) -> Any:
    """``grad`` summed over every leading axis: (..., b) -> (b,)."""
    return as_rows(grad).sum(axis=0)  # (N, b) -> (b,)


def add_in_place(y: Any, b: Any) -> Any:
    """``y += b``, returning ``y``: (..., n) + (n,). ``y`` is an array the layer made itself."""
    y += b
    return y
