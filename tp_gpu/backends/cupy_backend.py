"""The CuPy backend: one CUDA GPU per device id, peer copies between them.

CuPy is imported when this backend is first built, never by ``import tp_gpu``.
Cross-device moves are asynchronous peer copies ordered with events:

1. an event recorded on the source device's current stream marks the point at
   which the source buffer is complete; the destination stream waits on it;
2. ``cudaMemcpyPeerAsync`` runs on the destination device's current stream;
3. an event recorded after the copy makes the source stream wait, so the
   source buffer is not reused (memory pool) before the copy has read it.

No host synchronisation is involved.
"""

from __future__ import annotations

from typing import Tuple

from ..errors import BackendUnavailableError, ConfigError
from .base import Backend, from_dlpack, host_array, is_cupy_array, is_dlpack_array

__all__ = ["CupyBackend", "import_cupy", "cupy_unavailable_reason"]


def _import_cupy_or_reason():
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
    return cupy, None


def cupy_unavailable_reason():
    """``None`` when CuPy can run here, else a sentence saying why it cannot."""
    return _import_cupy_or_reason()[1]


def import_cupy():
    """Import CuPy, or raise BackendUnavailableError saying why it cannot run."""
    cupy, reason = _import_cupy_or_reason()
    if reason is not None:
        raise BackendUnavailableError(f"the cupy backend cannot run: {reason}")
    return cupy


def enable_peer_access(cupy, devices) -> None:
    """Enable peer access between every pair of ``devices`` the hardware allows.

    A pair already enabled (by an earlier backend, or by another library) is
    not an error. CUDA then also leaves ``cudaErrorPeerAccessAlreadyEnabled``
    as the thread's last error, which a library checking ``cudaGetLastError``
    after its kernel launches (Thrust does) could later report as its own
    failure. CuPy's ``runtime._deviceEnsurePeerAccess``, which CuPy uses for
    its own peer access, clears it; it is used where it exists.
    """
    runtime = cupy.cuda.runtime
    ensure = getattr(runtime, "_deviceEnsurePeerAccess", None)
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
                    if "PeerAccessAlreadyEnabled" not in str(exc):
                        raise


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
                raise ConfigError(f"GPU id {d} in devices={list(devices)!r} does not exist; visible ids are 0..{count - 1}")
        self.devices: Tuple[int, ...] = tuple(devices)
        enable_peer_access(cupy, self.devices)
        from ..comm.nccl_local import maybe_in_process_nccl

        #: In-process NCCL for reductions across these GPUs, when TP_GPU_NCCL=1 (else None: peer copies).
        self.nccl = maybe_in_process_nccl(cupy, self.devices)

    def device(self, device: int):
        return self.xp.cuda.Device(device)

    def device_of(self, arr):
        return arr.device.id if is_cupy_array(arr) else "host"

    def asarray(self, x, dtype, device: int):
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

    def to_device(self, arr, device: int):
        cupy = self.xp
        src = arr.device.id
        if src == device:
            return arr
        shape = arr.shape  # kept: cupy.ascontiguousarray turns a 0-d array into shape (1,)
        if arr.size == 0:  # nothing to copy (and no buffer: data.ptr is 0)
            with cupy.cuda.Device(device):
                return cupy.empty(shape, dtype=arr.dtype)
        with cupy.cuda.Device(src):
            arr = cupy.ascontiguousarray(arr)
            produced = cupy.cuda.Event(disable_timing=True)
            produced.record(cupy.cuda.get_current_stream())
        with cupy.cuda.Device(device):
            stream = cupy.cuda.get_current_stream()
            stream.wait_event(produced)
            out = cupy.empty(shape, dtype=arr.dtype)
            cupy.cuda.runtime.memcpyPeerAsync(out.data.ptr, device, arr.data.ptr, src, arr.nbytes, stream.ptr)
            copied = cupy.cuda.Event(disable_timing=True)
            copied.record(stream)
        with cupy.cuda.Device(src):
            cupy.cuda.get_current_stream().wait_event(copied)
        return out

    def scatter_add(self, target, indices, values) -> None:
        import cupyx

        cupyx.scatter_add(target, indices, values)

    def synchronize(self) -> None:
        for d in self.devices:
            self.xp.cuda.Device(d).synchronize()
