"""The CuPy backend: one CUDA GPU per device id, peer copies between them.

CuPy is imported when this backend is first built, never by ``import tp_gpu``.
Before CuPy is chosen it must compile and run an elementwise kernel and a
matrix product on the GPU (:func:`cupy_unavailable_reason`): a CuPy that sees a
GPU but lacks NVRTC or cuBLAS (a CuPy 14 wheel installed without its ``[ctk]``
extra, and no CUDA Toolkit) is not usable.

Cross-device moves (:meth:`CupyBackend.to_device`) are asynchronous peer
copies on a copy stream of the destination GPU, ordered with events:

1. an event recorded on the source GPU's current stream marks the point at
   which the source buffer is complete; the copy stream waits on it;
2. the destination buffer is allocated on the destination's current stream,
   and the copy stream also waits for that stream's earlier work (the memory
   pool may hand out a block that work still uses);
3. ``cudaMemcpyPeerAsync`` runs on the copy stream, and the destination's
   current stream waits on an event recorded after it, so what is queued
   there next sees the copied data.

Neither the host nor the source GPU's stream waits for the copy: the source
buffer is kept referenced until the copy's event has completed (checked, not
waited for, at each later copy and at :meth:`CupyBackend.synchronize`), so the
memory pool cannot reuse it early. What the caller must not do is write the
source array in place before the copy has read it; the collectives never do
(they move partial results they do not modify afterwards).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, Device, from_dlpack, host_array, is_cupy_array, is_dlpack_array

__all__ = ["CupyBackend", "cupy_unavailable_reason", "enable_peer_access", "import_cupy", "probe_cupy"]

#: What to install when CuPy cannot compile a kernel or run a GEMM.
INSTALL_HINT = (
    "install CuPy with its CUDA libraries: pip install 'tp_gpu[gpu]' (CUDA 12, cupy-cuda12x[ctk]) "
    "or 'tp_gpu[cuda13]' (CUDA 13, cupy-cuda13x[ctk]), or install a CUDA Toolkit"
)

#: ``cudaErrorPeerAccessAlreadyEnabled``.
PEER_ACCESS_ALREADY_ENABLED = 704

#: Probe results, by CuPy module (the module is kept so that its id is not reused).
_probed: dict[int, tuple[Any, str | None]] = {}


def probe_cupy(cupy) -> str | None:
    """``None`` when ``cupy`` runs an elementwise kernel and a matrix product correctly on the
    current GPU, else a sentence saying what failed.

    The elementwise kernel needs NVRTC (CuPy compiles kernels at run time) and
    the matrix product cuBLAS; CuPy 14 wheels ship neither without the
    ``[ctk]`` extra. Runs on the current device, so that a process bound to
    one GPU creates no context on another.
    """
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = (2 * host + 1) @ (2 * host + 1).T
    try:
        a = cupy.asarray(host)
        b = a * 2 + 1
        got = cupy.asnumpy(b @ b.T)
    except Exception as exc:  # CompileException, a missing libnvrtc / libcublas, CUDARuntimeError, ...
        return (
            f"CuPy sees a GPU but cannot run an elementwise kernel and a matrix product on it "
            f"({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        )
    if not np.array_equal(got, expected):
        return (
            f"CuPy ran a test matrix product on the GPU but got a wrong result "
            f"({got.tolist()} for {expected.tolist()})"
        )
    return None


def _probe_once(cupy) -> str | None:
    """:func:`probe_cupy`, run once per process (per CuPy module); warns when it fails."""
    cached = _probed.get(id(cupy))
    if cached is not None and cached[0] is cupy:
        return cached[1]
    reason = probe_cupy(cupy)
    _probed[id(cupy)] = (cupy, reason)
    if reason is not None:
        warnings.warn(f"tp_gpu will not use CuPy: {reason}", RuntimeWarning, stacklevel=3)
    return reason


def _import_cupy_or_reason(probe: bool = True):
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising on import
        return None, (
            f"CuPy is not installed or failed to import ({type(exc).__name__}: {exc}); "
            "install it with pip install 'tp_gpu[gpu]' (CUDA 12) or 'tp_gpu[cuda13]' (CUDA 13)"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, insufficient driver, ...
        return None, f"CuPy is installed but no usable CUDA driver was found ({exc})"
    if count < 1:
        return None, "CuPy and a CUDA driver are present but no GPU is visible (check CUDA_VISIBLE_DEVICES)"
    if probe:
        reason = _probe_once(cupy)
        if reason is not None:
            return None, reason
    return cupy, None


def cupy_unavailable_reason():
    """``None`` when CuPy can run here, else a sentence saying why it cannot.

    CuPy can run when it imports, sees a GPU, and compiles and runs a small
    kernel and a matrix product there (:func:`probe_cupy`, once per process).
    """
    return _import_cupy_or_reason()[1]


def import_cupy(probe: bool = True):
    """Import CuPy, or raise BackendUnavailableError saying why it cannot run.

    ``probe=False`` skips the kernel and matrix-product check (for a caller
    that first selects its GPU, then calls again with the probe).
    """
    cupy, reason = _import_cupy_or_reason(probe)
    if reason is not None:
        raise BackendUnavailableError(f"the cupy backend cannot run: {reason}")
    return cupy


def _ensure_peer_access_function():
    """CuPy's ``_deviceEnsurePeerAccess``, or ``None`` where this CuPy has none.

    It lives in ``cupy_backends.cuda.api.runtime`` (a private name, which
    ``cupy/cuda/runtime.py`` does not re-export: its ``import *`` skips names
    starting with ``_``). ``cupy.cuda.runtime`` is that backend module only
    until something imports the submodule ``cupy.cuda.runtime``, so it is
    looked up where it is defined.
    """
    try:
        runtime = importlib.import_module("cupy_backends.cuda.api.runtime")
    except ImportError:
        return None
    return getattr(runtime, "_deviceEnsurePeerAccess", None)


def enable_peer_access(cupy, devices) -> None:
    """Enable peer access between every pair of ``devices`` the hardware allows.

    A pair already enabled (by an earlier backend, or by another library) is
    not an error. CUDA then also leaves ``cudaErrorPeerAccessAlreadyEnabled``
    as the thread's last error, which a library checking ``cudaGetLastError``
    after its kernel launches (Thrust does) could later report as its own
    failure. CuPy's ``_deviceEnsurePeerAccess``, which CuPy uses for its own
    peer access, clears it; it is used where it exists (see
    :func:`_ensure_peer_access_function`), else ``deviceEnablePeerAccess`` with
    that one error tolerated.
    """
    runtime = cupy.cuda.runtime
    ensure = _ensure_peer_access_function()
    for dev in devices:
        for peer in devices:
            if dev == peer or not runtime.deviceCanAccessPeer(dev, peer):
                continue
            with cupy.cuda.Device(dev):
                if ensure is not None:
                    ensure(peer)
                    continue
                try:
                    runtime.deviceEnablePeerAccess(peer)
                except runtime.CUDARuntimeError as exc:
                    already = getattr(exc, "status", None) == PEER_ACCESS_ALREADY_ENABLED
                    if not already and "PeerAccessAlreadyEnabled" not in str(exc):
                        raise


#: One copy stream per (CuPy module, GPU), shared by every backend of the process.
_copy_streams: dict[tuple[int, Device], Any] = {}

#: ``(event, buffers)`` of the peer copies that may still be reading ``buffers``.
_in_flight: list[tuple[Any, Any]] = []


def _copy_stream(cupy, device: Device):
    """The copy stream of GPU ``device`` (created on first use; non-blocking, so it
    does not synchronise with the legacy default stream)."""
    key = (id(cupy), device)
    if key not in _copy_streams:
        with cupy.cuda.Device(device):
            _copy_streams[key] = cupy.cuda.Stream(non_blocking=True)
    return _copy_streams[key]


def _release_completed() -> None:
    """Drop the references to the source buffers of copies whose events have completed."""
    _in_flight[:] = [(event, buffers) for event, buffers in _in_flight if not event.done]


def _hold_until(event, *buffers) -> None:
    """Keep ``buffers`` referenced until ``event`` has completed."""
    _release_completed()
    _in_flight.append((event, buffers))


class CupyBackend(Backend):
    """Workers compute on CUDA GPUs with CuPy.

    Parameters
    ----------
    devices : None, int or sequence of int
        ``None``: every visible GPU; an int ``n``: GPUs ``0..n-1``; a sequence:
        exactly those GPU ids.
    """

    name = "cupy"

    def __init__(self, devices=None) -> None:
        cupy = import_cupy()
        self.xp = cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if devices is None:
            devices = count
        if isinstance(devices, int):
            if devices > count:
                raise ConfigError(f"devices={devices} asks for more GPUs than the {count} visible")
            devices = range(devices)
        for d in devices:
            if not 0 <= d < count:
                raise ConfigError(
                    f"GPU id {d} in devices={list(devices)!r} does not exist; visible ids are 0..{count - 1}"
                )
        self.devices: tuple[int, ...] = tuple(devices)
        enable_peer_access(cupy, self.devices)

    def device(self, device: Device):
        return self.xp.cuda.Device(device)

    def device_of(self, arr):
        return arr.device.id if is_cupy_array(arr) else "host"

    def asarray(self, x, dtype, device: Device):
        cupy = self.xp
        if is_dlpack_array(x):  # a GPU tensor becomes a CuPy array on its GPU, a host one a NumPy array
            x = from_dlpack(x)
        if is_cupy_array(x):
            x = self.to_device(x, device)
            if x.dtype != dtype:
                with cupy.cuda.Device(device):
                    x = x.astype(dtype)
            return x
        with cupy.cuda.Device(device):
            return cupy.asarray(host_array(x), dtype=dtype)

    def to_device(self, arr, device: Device):
        """``arr`` on GPU ``device``: itself if already there, else a peer copy (see the module docstring).

        Returns at once; work queued on ``device``'s current stream after this
        call sees the copied data. ``arr`` must not be written in place until
        the copy has read it (work on ``device`` that depends on the result,
        or :meth:`synchronize`, shows that it has).
        """
        cupy = self.xp
        src = arr.device.id
        if src == device:
            return arr
        shape = arr.shape  # kept: cupy.ascontiguousarray turns a 0-d array into shape (1,)
        if arr.size == 0:  # nothing to copy (and no buffer: data.ptr is 0)
            with cupy.cuda.Device(device):
                return cupy.empty(shape, dtype=arr.dtype)
        with cupy.cuda.Device(src):
            source = cupy.ascontiguousarray(arr)
            produced = cupy.cuda.Event(disable_timing=True)
            produced.record(cupy.cuda.get_current_stream())
        with cupy.cuda.Device(device):
            compute = cupy.cuda.get_current_stream()
            out = cupy.empty(shape, dtype=arr.dtype)
            free = cupy.cuda.Event(disable_timing=True)
            free.record(compute)
            copy = _copy_stream(cupy, device)
            copy.wait_event(produced)
            copy.wait_event(free)
            runtime = cupy.cuda.runtime
            runtime.memcpyPeerAsync(out.data.ptr, device, source.data.ptr, src, source.nbytes, copy.ptr)
            copied = cupy.cuda.Event(disable_timing=True)
            copied.record(copy)
            compute.wait_event(copied)
        _hold_until(copied, source)
        return out

    def zero_rows(self, rows, mask) -> None:
        """``rows[k] = 0`` wherever ``mask[k]``, as one kernel on the current device.

        Boolean-mask assignment (``rows[mask] = 0``) would stop the host until
        the GPU has computed ``mask``: CuPy counts the selected elements first.
        """
        where = mask.reshape(mask.shape + (1,) * (rows.ndim - mask.ndim))
        self.xp.copyto(rows, 0, where=where)

    def scatter_add_rows(self, shape, index, rows, mask=None):
        """:meth:`Backend.scatter_add_rows`, the rows ``mask`` leaves out sent to an extra row, dropped.

        The same sums in the same order as the host version, with one host
        synchronisation fewer: selecting the kept rows (``flatnonzero(mask)``)
        would wait for the GPU to count them.
        """
        if mask is None:
            return super().scatter_add_rows(shape, index, rows)
        index = self.xp.where(mask, index, shape[0])  # row shape[0]: past the end
        return super().scatter_add_rows((shape[0] + 1, shape[1]), index, rows)[: shape[0]]

    def synchronize(self) -> None:
        for d in self.devices:
            self.xp.cuda.Device(d).synchronize()
        _release_completed()
