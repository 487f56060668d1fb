"""The interface every backend implements, and host conversion shared by all.

A backend owns arrays: it knows which device an array lives on, how to make a
device current, and how to move an array from one device to another. Layers
compute with the backend's array namespace ``xp`` under ``backend.device(d)``;
only :mod:`tp_gpu.collectives` moves arrays between devices.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, ContextManager, Dict, Hashable, Sequence, Tuple

import numpy as np

from ..errors import ShapeError, TensorParallelError
from .host_erf import erf_float32
from .host_pool import run_ranges

__all__ = [
    "Backend",
    "Blocks",
    "Device",
    "is_cupy_array",
    "is_dlpack_array",
    "from_dlpack",
    "as_array",
    "host_array",
    "erf_function",
]

Device = Hashable

#: What ``Backend.device`` returns where there is no current device to switch (the host):
#: ``contextlib.nullcontext`` is reentrant and reusable, so one serves every call.
_NO_DEVICE_SWITCH = contextlib.nullcontext()

#: One array per device (NumPy, CuPy or simulated), keyed by the device it lives on: a parameter's or
#: an activation's blocks, or one partial result per device.
Blocks = Dict[Device, Any]

#: DLPack device types (``DLDeviceType``) whose memory the host can read: CPU,
#: CUDA pinned host, ROCm pinned host, CUDA managed. NumPy imports these.
DLPACK_HOST_TYPES = {1: "CPU", 3: "CUDA host", 11: "ROCm host", 13: "CUDA managed"}

#: DLPack device types of GPU memory, which CuPy imports without a copy.
DLPACK_GPU_TYPES = {2: "CUDA", 10: "ROCm"}


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray``, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "device") and hasattr(x, "get")


def is_dlpack_array(x: Any) -> bool:
    """True for a foreign array that speaks DLPack (a PyTorch tensor, a JAX array, ...).

    NumPy and CuPy arrays are not foreign: they are used as they are.
    """
    return (
        hasattr(x, "__dlpack__")
        and hasattr(x, "__dlpack_device__")
        and not isinstance(x, np.ndarray)
        and not is_cupy_array(x)
    )


def from_dlpack(x: Any) -> Any:
    """Import the DLPack array ``x`` without copying its data.

    Memory the host can read (CPU, pinned, managed) becomes a NumPy array that
    shares it; GPU memory (CUDA, ROCm) becomes a CuPy array on the same GPU,
    with no round trip through the host. CuPy is imported only in that case.

    A tensor that requires a gradient (PyTorch refuses to export those) is
    read through ``x.detach()``: tp_gpu takes its values, and PyTorch's
    autograd does not see what tp_gpu computes from them.

    Raises
    ------
    TensorParallelError
        ``x`` lives on a GPU and CuPy cannot be imported to read it, or on a
        device type neither NumPy nor CuPy reads.
    ShapeError
        The exporter or the importer refused ``x`` (for example a dtype NumPy
        has no equivalent of, such as bfloat16).
    """
    if getattr(x, "requires_grad", False) and callable(getattr(x, "detach", None)):
        x = x.detach()
    kind = type(x).__name__
    try:
        device_type, device_id = (int(v) for v in x.__dlpack_device__())
    except Exception as exc:  # a broken or unusual __dlpack_device__
        raise ShapeError(
            f"could not read the DLPack device of a {kind} ({type(exc).__name__}: {exc})"
        ) from exc
    if device_type in DLPACK_HOST_TYPES:
        importer, importer_name = np.from_dlpack, "NumPy"
    elif device_type in DLPACK_GPU_TYPES:
        where = f"{DLPACK_GPU_TYPES[device_type]} device {device_id}"
        try:
            import cupy
        except Exception as exc:  # ImportError, or a broken CUDA install raising on import
            raise TensorParallelError(
                f"the {kind} lives on {where} (DLPack device type {device_type}), and reading GPU memory "
                f"needs CuPy, which failed to import ({type(exc).__name__}: {exc}); install tp_gpu[gpu] "
                "or move the array to the host first (for PyTorch: tensor.cpu())"
            ) from exc
        importer, importer_name = cupy.from_dlpack, "CuPy"
    else:
        raise TensorParallelError(
            f"the {kind} lives on DLPack device type {device_type} (device {device_id}), which tp_gpu "
            f"cannot read; supported: {sorted({**DLPACK_HOST_TYPES, **DLPACK_GPU_TYPES}.values())}. "
            "Move it to the host first"
        )
    try:
        return importer(x)
    except Exception as exc:  # BufferError, RuntimeError, TypeError: unsupported dtype, layout, ...
        raise ShapeError(
            f"{importer_name} could not import the {kind} through DLPack ({type(exc).__name__}: {exc})"
        ) from exc


def as_array(x: Any) -> Any:
    """``x`` as a NumPy or CuPy array, copying only what must be copied.

    NumPy and CuPy arrays pass through; DLPack arrays are imported without a
    copy (:func:`from_dlpack`); anything else goes through ``numpy.asarray``
    (which raises ValueError or TypeError for what is not an array).
    """
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x
    if is_dlpack_array(x):
        return from_dlpack(x)
    return np.asarray(x)


def host_array(x: Any) -> np.ndarray:
    """Return ``x`` as a host NumPy array (no copy when it already is one).

    Accepts NumPy arrays (and subclasses, viewed as plain ndarrays), CuPy arrays
    on any device, DLPack arrays (PyTorch, JAX; see :func:`from_dlpack`),
    nested lists, scalars, and anything with ``__array__``.
    """
    if is_cupy_array(x):
        return _cupy_get(x)
    if isinstance(x, np.ndarray):
        return x.view(np.ndarray) if type(x) is not np.ndarray else x
    if is_dlpack_array(x):
        x = from_dlpack(x)
        return _cupy_get(x) if is_cupy_array(x) else x
    return np.asarray(x)


def _cupy_get(x: Any) -> np.ndarray:
    """The CuPy array ``x`` copied to the host, after the work queued for it on its GPU.

    ``x.get()`` copies on the current stream of the *current* device; under
    ``x.device`` that is the stream ``x`` was produced on (and, after
    :meth:`CupyBackend.to_device`, the stream that waits for its copy).
    """
    with x.device:
        return x.get()


def erf_function(xp: Any, dtype: Any = None) -> Any:
    """The elementwise error function of the array namespace ``xp`` (NumPy, simulated or CuPy), for
    arrays of ``dtype``.

    NumPy has none. float32 NumPy arrays are served by the vectorised rational approximation of
    :func:`~tp_gpu.backends.host_erf.erf_float32` (within 1e-7, three times SciPy's speed, on
    :func:`host_threads` threads); other host dtypes, and the simulated devices' arrays, by SciPy's
    ``scipy.special.erf`` ufunc; CuPy by ``cupyx.scipy.special.erf``.
    """
    if getattr(xp, "__name__", "") == "cupy":
        import cupyx.scipy.special

        return cupyx.scipy.special.erf
    if xp is np and dtype is not None and np.dtype(dtype) == np.float32:
        return functools.partial(erf_float32, threads=host_threads())
    try:
        import scipy.special
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise TensorParallelError(
            f"the exact GELU needs scipy.special.erf ({exc}); pip install scipy"
        ) from exc
    return scipy.special.erf


#: The dtypes SciPy's sparse products take (float16 is not among them).
SPARSE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Up to this many numbers of ``rows``, the host scatter is ``np.add.at`` (the same sums, in the same order).
SMALL_SCATTER_ELEMENTS = 4096
#: The host scatter takes one more thread per this many numbers of ``rows`` (up to :func:`host_threads`):
#: threads write the whole result, where one thread touches only the pages of the rows ids land on.
SCATTER_ELEMENTS_PER_THREAD = 2**24


def host_threads() -> int:
    """How many threads tp_gpu's own host kernels may use: ``$TP_GPU_NUM_THREADS``, else
    ``$OMP_NUM_THREADS``, else every core (as NumPy's BLAS and PyTorch do by default)."""
    for name in ("TP_GPU_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def host_scatter_add_rows(
    shape: Tuple[int, int], index: np.ndarray, rows: np.ndarray, mask: Any = None
) -> np.ndarray:
    """:meth:`Backend.scatter_add_rows` on host arrays: ``S @ rows``, ``S`` the ``(shape[0], n)`` sparse
    matrix with a one at ``(index[k], k)`` for each selected ``k``.

    ``S`` is built in compressed-column form as it stands (column ``k`` holds its one entry; a column
    ``mask`` leaves out holds none): no sort, no conversion. SciPy's product then walks the columns in
    order, adding each row of ``rows`` into its place, so the rows are read once, in order, and
    repeated indices accumulate in the order of ``k``, as ``np.add.at`` does (bit for bit). The
    result is a new C-contiguous array that NumPy allocates with ``calloc``: pages no row lands on
    are never touched. Large scatters run on :func:`host_threads` threads (SciPy's product releases
    the GIL), each over a range of ids holding as many of them as the others, so the sums do not
    depend on the thread count. Of the NumPy ways timed by ``python -m benchmarks.training_step``
    (sorting and ``np.add.reduceat``, ``np.add.at``, one ``np.bincount`` per column, the product in
    compressed-row form) it is the fastest from a few thousand ids on (benchmarks/README.md).
    """
    if rows.size <= SMALL_SCATTER_ELEMENTS or shape[0] == 0:  # SciPy's fixed cost (~70 us) would dominate
        out = np.zeros(shape, dtype=rows.dtype)
        keep = slice(None) if mask is None else np.flatnonzero(mask)
        np.add.at(out, index[keep], rows[keep])
        return out
    threads = max(1, min(host_threads(), rows.size // SCATTER_ELEMENTS_PER_THREAD))
    kept = index if mask is None else index[mask]
    if threads == 1 or kept.size == 0:
        return _scatter_ids(index, rows, mask, 0, shape[0], whole=True)
    cuts = np.quantile(kept, np.arange(1, threads) / threads, method="lower").astype(np.int64)
    bounds = np.unique(np.concatenate(([0], cuts, [shape[0]])))
    out = np.zeros(shape, dtype=rows.dtype)

    def part(first: int, last: int) -> None:
        out[first:last] = _scatter_ids(index, rows, mask, first, last)

    run_ranges(part, bounds[:-1].tolist(), bounds[1:].tolist())
    return out


def _scatter_ids(
    index: np.ndarray, rows: np.ndarray, mask: Any, first: int, last: int, whole: bool = False
) -> np.ndarray:
    """``G[index[k] - first] += rows[k]`` for the selected ``k`` whose index lies in ``[first, last)``
    (every index, when ``whole``): a new ``(last - first, dim)`` array, one sparse product (see
    :func:`host_scatter_add_rows`)."""
    import scipy.sparse

    n = rows.shape[0]
    if whole and mask is None:
        indptr, local = np.arange(n + 1), index  # every column holds its one entry
    else:
        selected = (index >= first) & (index < last)
        if mask is not None:
            selected &= mask
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(selected, out=indptr[1:])
        local = index[selected] - first
    ones = np.ones(local.size, dtype=rows.dtype)
    selection = scipy.sparse.csc_matrix((ones, local, indptr), shape=(last - first, n))
    return np.ascontiguousarray(selection @ rows)  # (ids, n) @ (n, dim) -> (ids, dim)


class Backend:
    """Interface of a backend. Subclasses bind ``name``, ``xp`` and ``devices``.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"cupy"`` or ``"simulated"``.
    xp : module
        The array namespace that compute code calls (``numpy`` or ``cupy``).
    devices : tuple
        The devices workers are placed on, in placement order.
    """

    name: str = ""
    xp: Any = np
    devices: Tuple[Device, ...] = ()

    def device(self, device: Device) -> ContextManager:
        """Context manager under which ``device`` is the current device (one reusable no-op here)."""
        return _NO_DEVICE_SWITCH

    def device_of(self, arr: Any) -> Device:
        """The device ``arr`` lives on."""
        raise NotImplementedError

    def asarray(self, x: Any, dtype: Any, device: Device) -> Any:
        """``x`` (host, any device, nested list) as a ``dtype`` array on ``device``.

        Returns ``x`` itself when it already is such an array.
        """
        raise NotImplementedError

    def to_device(self, arr: Any, device: Device) -> Any:
        """``arr`` on ``device``: itself if already there, else a copy."""
        raise NotImplementedError

    def empty(self, shape: Sequence[int], dtype: Any, device: Device) -> Any:
        """An uninitialised array on ``device``."""
        with self.device(device):
            return self.xp.empty(shape, dtype=dtype)

    def zero_rows(self, rows: Any, mask: Any) -> None:
        """Set ``rows[k] = 0`` in place wherever ``mask[k]`` (``mask`` covers the leading axes of ``rows``).

        Runs on the current device, where both arrays live.
        """
        rows[mask] = 0

    def scatter_add_rows(self, shape: Tuple[int, int], index: Any, rows: Any, mask: Any = None) -> Any:
        """A new ``shape`` array ``G`` with ``G[index[k]] += rows[k]`` for every ``k`` where ``mask[k]``
        (every ``k`` when ``mask`` is None); repeated indices accumulate, in the order of ``k``.

        ``index`` is ``(n,)``, ``rows`` ``(n, shape[1])``. Runs on the current
        device, where the arrays live. On the host (NumPy arrays of float32 or
        float64) it is one sparse product, ``G = S @ rows`` with ``S[index[k], k]
        = 1`` (:func:`host_scatter_add_rows`); elsewhere the selected rows are
        sorted by index and summed with one ``reduceat`` per run of equal indices.
        """
        xp = self.xp
        if xp is np and type(rows) is np.ndarray and rows.dtype in SPARSE_DTYPES:
            return host_scatter_add_rows(shape, index, rows, mask)
        if mask is not None:
            keep = xp.flatnonzero(mask)
            index, rows = xp.take(index, keep), xp.take(rows, keep, axis=0)
        out = xp.zeros(shape, dtype=rows.dtype)
        if index.size:
            order = xp.argsort(index, kind="stable")
            index, rows = xp.take(index, order), xp.take(rows, order, axis=0)
            starts = xp.flatnonzero(xp.concatenate((xp.ones(1, dtype=bool), index[1:] != index[:-1])))
            out[xp.take(index, starts)] = xp.add.reduceat(rows, starts, axis=0)
        return out

    def to_host(self, arr: Any) -> np.ndarray:
        """``arr`` as a host NumPy array."""
        return host_array(arr)

    def synchronize(self) -> None:
        """Wait for all queued work on every device of this backend (timing)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(devices={list(self.devices)!r})"
