"""LayerNorm and RMSNorm of host arrays in one pass per row, compiled by Numba where it is installed.

A normalisation in NumPy is eight or nine ufunc and GEMV calls, each a pass over the array and each
with a fixed cost of about half a microsecond: 6.6 µs for one row of 256 float32 numbers, where
PyTorch's fused kernel takes the whole call in 5.9. Here each row is read once for its mean, once
for its variance and once to write the outputs, in one compiled loop, with every sum in float64:

    LayerNorm:  mean = sum(x) / H,   rstd = 1 / sqrt(sum((x - mean)^2) / H + eps),
                xhat = (x - mean) * rstd,   y = xhat * weight + bias
    RMSNorm:    rstd = 1 / sqrt(sum(x^2) / H + eps),   xhat = x * rstd,   y = xhat * weight

``xhat`` and ``rstd`` are stored in the input's dtype for the backward, and RMSNorm's ``y`` multiplies
the stored (rounded) ``xhat`` by the weight in that dtype, as transformers' ``LlamaRMSNorm`` does. The
backward, with ``g = dy * weight``, sums in float64 too:

    LayerNorm:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
                dweight = sum over rows of dy * xhat,   dbias = sum over rows of dy
    RMSNorm:    dx = rstd * (g - xhat * mean(g * xhat)),   dweight = sum over rows of dy * xhat

Measured on an AMD EPYC core (benchmarks/results/layer-calls-*): 1.3 µs against NumPy's 6.6 at
(1, 256), and 586 µs against 2,167 at (4096, 512) in float32, nearer the float64 result at every
size. The loops are compiled with Numba's ``reassoc`` and ``contract`` flags only, so that LLVM may
vectorise the sums; NaN and infinity propagate as in NumPy. Each row's result depends on that row
alone, so it is the same however the rows are split among devices.

Only float32 and float64 NumPy arrays are served, all of one dtype; float16, the simulated devices'
arrays and CuPy keep the ufunc path. ``TP_GPU_HOST_KERNELS`` chooses: unset or empty, Numba when it
imports; ``numba``, Numba or a :class:`~tp_gpu.errors.ConfigError`; ``numpy``, never Numba. Numba is
imported, and the loops compiled (cached on disk where the package's folder or the user's cache is
writable), at the first call that uses them.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any, Optional, Tuple

import numpy as np

from ..config import env_choice
from ..errors import ConfigError

__all__ = [
    "CHOICES",
    "ENV_VAR",
    "check_choice",
    "host_kernels",
    "reread_choice",
    "serves",
    "layer_norm",
    "layer_norm_grad",
    "rms_norm",
    "rms_norm_grad",
]

#: Which host kernels the normalisations use: ``numba`` / ``numpy``, or unset / empty for Numba when
#: it imports.
ENV_VAR = "TP_GPU_HOST_KERNELS"
CHOICES = ("", "numba", "numpy")
_NO_NUMBA = f"{ENV_VAR}=numba, but Numba does not import; pip install 'tp_gpu[host]'"
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The floating-point freedoms the loops are compiled with: reassociation (vectorised sums) and
#: fused multiply-adds; not ``nnan`` / ``ninf``, so NaN and infinity behave as in NumPy.
_FASTMATH = frozenset({"reassoc", "contract"})
_UNREAD = SimpleNamespace()  # the choice is not read yet
#: The compiled loops, ``None`` where they are not used, or ``_UNREAD``.
_chosen: Any = _UNREAD


def serves(xp: Any, dtype: np.dtype, *arrays: Any) -> bool:
    """Whether the compiled loops take these ``arrays``: NumPy's own arrays (``xp`` is NumPy, not the
    simulated devices' namespace), every one of ``dtype``, float32 or float64, with Numba chosen."""
    if xp is not np or dtype not in _DTYPES or _kernels() is None:
        return False
    return all(type(a) is np.ndarray and a.dtype == dtype for a in arrays)


def host_kernels() -> str:
    """``"numba"`` or ``"numpy"``: what the host normalisations run on in this process (for reports)."""
    return "numpy" if _kernels() is None else "numba"


def reread_choice() -> str:
    """Read ``$TP_GPU_HOST_KERNELS`` again (it is read once, at the first use) and return
    :func:`host_kernels`; a :class:`~tp_gpu.errors.ConfigError` for a value not in :data:`CHOICES`, or
    for ``numba`` without Numba, leaves the earlier choice in place."""
    global _chosen
    _chosen = _choose()
    return host_kernels()


def check_choice() -> None:
    """Raise the :class:`~tp_gpu.errors.ConfigError` that the first host normalisation would raise
    for ``$TP_GPU_HOST_KERNELS`` (a value not in :data:`CHOICES`, or ``numba`` without Numba), now:
    called when a backend is built, so that a bad value stops a run before it computes anything."""
    if env_choice(ENV_VAR, CHOICES) == "numba" and _compiled() is None:
        raise ConfigError(_NO_NUMBA)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> Tuple[np.ndarray, ...]:
    """``(y, xhat, rstd)`` of LayerNorm over the last axis of ``x`` ``(..., H)``: ``y`` and ``xhat``
    shaped as ``x``, ``rstd`` ``(..., 1)``, all of ``x``'s dtype."""
    x = _contiguous(x)
    y, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((*x.shape[:-1], 1), x.dtype)
    _kernels().layer_norm(x, weight, bias, float(eps), y, xhat, rstd)
    return y, xhat, rstd


def layer_norm_grad(
    dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, weight: np.ndarray
) -> Tuple[np.ndarray, ...]:
    """``(dx, dweight, dbias)`` of LayerNorm from ``dy`` ``(..., H)`` and the forward's ``xhat`` (shaped
    as ``dy``) and ``rstd`` ``(..., 1)``: ``dx`` shaped as ``dy``, the parameters' ``(H,)``, all of
    ``dy``'s dtype."""
    dy, xhat, rstd = _contiguous(dy), _contiguous(xhat), _contiguous(rstd)
    dx = np.empty_like(dy)
    dweight, dbias = np.zeros(dy.shape[-1]), np.zeros(dy.shape[-1])  # float64 sums
    _kernels().layer_norm_grad(dy, xhat, rstd, weight, dx, dweight, dbias)
    return dx, dweight.astype(dy.dtype), dbias.astype(dy.dtype)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> Tuple[np.ndarray, ...]:
    """``(y, xhat, rstd)`` of RMSNorm over the last axis of ``x`` ``(..., H)``, as :func:`layer_norm`."""
    x = _contiguous(x)
    y, xhat = np.empty_like(x), np.empty_like(x)
    rstd = np.empty((*x.shape[:-1], 1), x.dtype)
    _kernels().rms_norm(x, weight, float(eps), y, xhat, rstd)
    return y, xhat, rstd


def rms_norm_grad(
    dy: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, weight: np.ndarray
) -> Tuple[np.ndarray, ...]:
    """``(dx, dweight)`` of RMSNorm from ``dy`` ``(..., H)``, as :func:`layer_norm_grad`."""
    dy, xhat, rstd = _contiguous(dy), _contiguous(xhat), _contiguous(rstd)
    dx = np.empty_like(dy)
    dweight = np.zeros(dy.shape[-1])  # float64 sums
    _kernels().rms_norm_grad(dy, xhat, rstd, weight, dx, dweight)
    return dx, dweight.astype(dy.dtype)


def _contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when C-contiguous (the loops view it as rows), else a C-contiguous copy."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _kernels() -> Any:
    """The compiled loops, or ``None`` where the choice or a missing Numba rules them out."""
    global _chosen
    if _chosen is _UNREAD:
        _chosen = _choose()
    return _chosen


def _choose() -> Optional[SimpleNamespace]:
    """The loops ``$TP_GPU_HOST_KERNELS`` asks for, checked."""
    choice = env_choice(ENV_VAR, CHOICES)
    if choice == "numpy":
        return None
    kernels = _compiled()
    if kernels is None and choice == "numba":
        raise ConfigError(_NO_NUMBA)
    return kernels


@functools.cache
def _compiled() -> Optional[SimpleNamespace]:
    """The four loops compiled by Numba (``nogil``, cached on disk where it can be), or ``None``
    without Numba. Each compiles at its first call, once per dtype and number of axes."""
    try:
        import numba
    except ImportError:
        return None

    def jit(fn: Any) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, fastmath=set(_FASTMATH))(fn)
        except RuntimeError:  # no writable cache folder: compile in memory only
            return numba.njit(nogil=True, fastmath=set(_FASTMATH))(fn)

    return SimpleNamespace(
        layer_norm=jit(_layer_norm_rows),
        layer_norm_grad=jit(_layer_norm_grad_rows),
        rms_norm=jit(_rms_norm_rows),
        rms_norm_grad=jit(_rms_norm_grad_rows),
    )


# The loops below are compiled by Numba: plain Python over C-contiguous arrays, each sum in a float64
# accumulator.


def _layer_norm_rows(x, weight, bias, eps, y, xhat, rstd):
    """``y``, ``xhat`` ``(..., H)`` and ``rstd`` ``(..., 1)`` of LayerNorm of the rows of ``x`` ``(..., H)``,
    all C-contiguous."""
    h = x.shape[-1]
    n = x.size // h
    x, y, xhat, rstd = x.reshape((n, h)), y.reshape((n, h)), xhat.reshape((n, h)), rstd.reshape((n, 1))
    for i in range(n):
        total = 0.0
        for j in range(h):
            total += np.float64(x[i, j])
        mean = total / h
        squares = 0.0
        for j in range(h):
            centred = np.float64(x[i, j]) - mean
            squares += centred * centred
        r = 1.0 / math.sqrt(squares / h + eps)
        rstd[i, 0] = r
        for j in range(h):
            normalised = (np.float64(x[i, j]) - mean) * r
            xhat[i, j] = normalised
            y[i, j] = normalised * weight[j] + bias[j]


def _layer_norm_grad_rows(dy, xhat, rstd, weight, dx, dweight, dbias):
    """``dx`` ``(..., H)`` of LayerNorm from ``dy`` ``(..., H)``; adds the rows' ``dy * xhat`` and ``dy``
    into the float64 ``dweight`` and ``dbias`` ``(H,)``."""
    h = dy.shape[-1]
    n = dy.size // h
    dy, xhat, rstd, dx = dy.reshape((n, h)), xhat.reshape((n, h)), rstd.reshape((n, 1)), dx.reshape((n, h))
    for i in range(n):
        g_total = 0.0
        gx_total = 0.0
        for j in range(h):
            d = np.float64(dy[i, j])
            xh = np.float64(xhat[i, j])
            g = d * weight[j]
            g_total += g
            gx_total += g * xh
            dweight[j] += d * xh
            dbias[j] += d
        g_mean = g_total / h
        gx_mean = gx_total / h
        r = np.float64(rstd[i, 0])
        for j in range(h):
            g = np.float64(dy[i, j]) * weight[j]
            dx[i, j] = r * (g - g_mean - np.float64(xhat[i, j]) * gx_mean)


def _rms_norm_rows(x, weight, eps, y, xhat, rstd):
    """``y``, ``xhat`` ``(..., H)`` and ``rstd`` ``(..., 1)`` of RMSNorm of the rows of ``x`` ``(..., H)``;
    ``y`` is the stored ``xhat`` times ``weight`` in their dtype."""
    h = x.shape[-1]
    n = x.size // h
    x, y, xhat, rstd = x.reshape((n, h)), y.reshape((n, h)), xhat.reshape((n, h)), rstd.reshape((n, 1))
    for i in range(n):
        squares = 0.0
        for j in range(h):
            v = np.float64(x[i, j])
            squares += v * v
        r = 1.0 / math.sqrt(squares / h + eps)
        rstd[i, 0] = r
        for j in range(h):
            xhat[i, j] = np.float64(x[i, j]) * r
            y[i, j] = xhat[i, j] * weight[j]


def _rms_norm_grad_rows(dy, xhat, rstd, weight, dx, dweight):
    """``dx`` ``(..., H)`` of RMSNorm from ``dy`` ``(..., H)``; adds the rows' ``dy * xhat`` into the
    float64 ``dweight`` ``(H,)``."""
    h = dy.shape[-1]
    n = dy.size // h
    dy, xhat, rstd, dx = dy.reshape((n, h)), xhat.reshape((n, h)), rstd.reshape((n, 1)), dx.reshape((n, h))
    for i in range(n):
        gx_total = 0.0
        for j in range(h):
            d = np.float64(dy[i, j])
            xh = np.float64(xhat[i, j])
            gx_total += d * weight[j] * xh
            dweight[j] += d * xh
        gx_mean = gx_total / h
        r = np.float64(rstd[i, 0])
        for j in range(h):
            g = np.float64(dy[i, j]) * weight[j]
            dx[i, j] = r * (g - np.float64(xhat[i, j]) * gx_mean)
