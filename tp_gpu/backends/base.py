"""The interface every backend implements, and host conversion shared by all.

A backend owns arrays: it knows which device an array lives on, how to make a
device current, and how to move an array from one device to another. Layers
compute with the backend's array namespace ``xp`` under ``backend.device(d)``;
only :mod:`tp_gpu.collectives` moves arrays between devices.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Hashable, Sequence, Tuple

import numpy as np

from ..errors import ShapeError, TensorParallelError

__all__ = [
    "Backend",
    "is_cupy_array",
    "is_dlpack_array",
    "from_dlpack",
    "as_array",
    "host_array",
    "erf_function",
]

Device = Hashable

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


def erf_function(xp: Any) -> Any:
    """The elementwise error function of the array namespace ``xp`` (NumPy, simulated or CuPy).

    NumPy has none: SciPy's ``scipy.special.erf`` ufunc serves the host (and
    the simulated devices, whose arrays it dispatches through), and
    ``cupyx.scipy.special.erf`` serves CuPy.
    """
    if getattr(xp, "__name__", "") == "cupy":
        import cupyx.scipy.special

        return cupyx.scipy.special.erf
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


def host_scatter_add_rows(
    shape: Tuple[int, int], index: np.ndarray, rows: np.ndarray, mask: Any = None
) -> np.ndarray:
    """:meth:`Backend.scatter_add_rows` on host arrays: ``S @ rows``, ``S`` the ``(shape[0], n)`` sparse
    matrix with a one at ``(index[k], k)`` for each selected ``k``.

    SciPy builds ``S`` by a counting sort of the indices (no comparison sort) and its product adds each
    row into its place in index order, so repeated indices accumulate in the order of ``k``, as
    ``np.add.at`` does. The rows ``mask`` leaves out are never read (``S`` has no entry in their
    columns). The result is a new C-contiguous array, which NumPy allocates with ``calloc``: its pages
    are not touched until something writes them, so a few ids in a large table cost little. Of the
    NumPy ways timed by ``python -m benchmarks.training_step`` (sorting and ``np.add.reduceat``,
    ``np.add.at``, one ``np.bincount`` per column) it is the fastest from a few thousand ids on, 3-18x
    at 16,384 to 1M ids into a 50,000 x 512 table (benchmarks/README.md).
    """
    import scipy.sparse

    n = rows.shape[0]
    columns = np.arange(n) if mask is None else np.flatnonzero(mask)
    if mask is not None:
        index = index[columns]
    if rows.size <= SMALL_SCATTER_ELEMENTS or shape[0] == 0:  # SciPy's fixed cost (~70 us) would dominate
        out = np.zeros(shape, dtype=rows.dtype)
        np.add.at(out, index, rows if mask is None else rows[columns])
        return out
    ones = np.ones(columns.size, dtype=rows.dtype)
    selection = scipy.sparse.csr_matrix((ones, (index, columns)), shape=(shape[0], n))
    return np.ascontiguousarray(selection @ rows)  # (V, n) @ (n, dim) -> (V, dim)


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
        """Context manager under which ``device`` is the current device."""
        return contextlib.nullcontext()

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
