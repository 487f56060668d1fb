"""A simulated multi-device backend on NumPy, for testing placement on any machine.

Every array is a :class:`SimArray`, a NumPy array that carries the id of the
device it lives on. Like CUDA, the simulation has a *current device* (per
thread, 0 by default, changed with ``backend.device(d)``), and it is stricter
than CuPy: any NumPy operation (ufunc, matmul, reduction, concatenate, take,
...) raises :class:`~tp_gpu.errors.DeviceMismatchError` when

* its array operands live on different devices, or mix a device array with a
  host array, or
* its operands live on a device other than the current one.

The second rule catches what CuPy's ``matmul`` lets through silently
(cupy/cupy#1389). A reshape (``a.reshape``, ``np.reshape``, ``ravel``) that
cannot be a view of a strided array returns its copy read-only, so code that
writes into a reshaped array expecting the original to change raises
(``ValueError: assignment destination is read-only``) instead of losing the
write, as NumPy and CuPy silently do. Moves between devices happen only through
:meth:`SimulatedBackend.to_device`, which counts them in ``transfers``, and copies
to the host through :meth:`SimulatedBackend.to_host`, which counts them in
``host_reads``, so tests can check how often data crosses devices and how often
the host waits for a device (each ``to_host`` is a synchronisation on a GPU).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Tuple

import numpy as np

from ..config import normalize_devices
from ..errors import DeviceMismatchError
from .base import Backend, Device, host_array

__all__ = ["SimArray", "SimulatedBackend", "DEFAULT_SIMULATED_DEVICES", "current_device"]

#: Number of simulated devices when the config names none.
DEFAULT_SIMULATED_DEVICES = 4

_state = threading.local()


def current_device() -> int:
    """The simulated current device of this thread (0 unless inside ``device(d)``)."""
    return getattr(_state, "device", 0)


def _collect_devices(obj, found: set, host: list) -> None:
    """Gather the devices of every array in ``obj`` (nested lists/tuples too)."""
    if isinstance(obj, SimArray):
        found.add(obj.device)
    elif isinstance(obj, np.ndarray):
        if obj.ndim > 0:
            host.append(obj.shape)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _collect_devices(item, found, host)


def _check_operands(what: str, operands) -> int:
    found: set = set()
    host: list = []
    _collect_devices(operands, found, host)
    if not found:
        return current_device()
    if len(found) > 1:
        raise DeviceMismatchError(
            f"{what}: operands live on different devices {sorted(found)}; expected one device"
        )
    (dev,) = found
    if host:
        raise DeviceMismatchError(
            f"{what}: mixes an array on device {dev} with host array(s) of shape {host}; move them first"
        )
    cur = current_device()
    if dev != cur:
        raise DeviceMismatchError(
            f"{what}: operands live on device {dev} but the current device is {cur}; "
            f"run it under backend.device({dev})"
        )
    return dev


def _plain(obj):
    """Strip SimArray to ndarray views, recursing into lists and tuples."""
    if isinstance(obj, SimArray):
        return obj.view(np.ndarray)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(o) for o in obj)
    return obj


def _wrap(result, device: int):
    """Results live on the operands' device; NumPy scalars become 0-d arrays, as in CuPy."""
    if isinstance(result, np.generic):
        result = np.asarray(result)
    if isinstance(result, np.ndarray):
        out = result.view(SimArray)
        out._sim_device = device
        return out
    if isinstance(result, tuple):
        return tuple(_wrap(r, device) for r in result)
    if isinstance(result, list):
        return [_wrap(r, device) for r in result]
    return result


#: The NumPy functions whose result is a view of their argument when its strides allow, else a copy.
_RESHAPES = frozenset({"reshape", "ravel"})


def _read_only_if_copied(result: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``result`` of reshaping ``source``, made read-only when it is a copy (shares no memory).

    A write into such a copy is lost on NumPy and CuPy; here it raises. ``may_share_memory``
    compares bounds only, so the check costs the same for any size.
    """
    if result.size and not np.may_share_memory(result.view(np.ndarray), source.view(np.ndarray)):
        result.flags.writeable = False
    return result


class SimArray(np.ndarray):
    """A NumPy array that lives on simulated device ``.device``.

    A reshape that has to copy (a strided array) returns the copy read-only: see the module docstring.
    """

    _sim_device: int = 0

    @property
    def device(self) -> int:  # type: ignore[override]  # a simulated device id; ndarray's is always "cpu"
        """The simulated device id this array lives on."""
        return self._sim_device

    def __array_finalize__(self, obj) -> None:
        # Views and slices stay on their base's device; new arrays on the current one.
        self._sim_device = obj._sim_device if isinstance(obj, SimArray) else current_device()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        dev = _check_operands(f"{ufunc.__name__}.{method}", list(inputs) + list(out))
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _wrap(result, dev)

    def __array_function__(self, func, types, args, kwargs):
        dev = _check_operands(func.__name__, list(args) + list(kwargs.values()))
        result = func(*_plain(args), **{k: _plain(v) for k, v in kwargs.items()})
        if func.__name__ in _RESHAPES and args and isinstance(args[0], np.ndarray):
            result = _read_only_if_copied(result, args[0])
        return _wrap(result, dev)

    def reshape(self, *shape, **kwargs):
        """``ndarray.reshape``; a copy (strides that allow no view) comes back read-only."""
        return _read_only_if_copied(super().reshape(*shape, **kwargs), self)

    def ravel(self, order="C"):
        """``ndarray.ravel``; a copy (strides that allow no view) comes back read-only."""
        return _read_only_if_copied(super().ravel(order), self)

    def __setitem__(self, key, value) -> None:
        _check_operands("__setitem__", [self, value])
        super().__setitem__(_plain(key), _plain(value))

    def __repr__(self) -> str:
        return f"SimArray(device={self.device}, {np.ndarray.__repr__(self.view(np.ndarray))})"

    __str__ = __repr__


class _SimulatedNumpy:
    """NumPy, except that array constructors place their result on the current device.

    This mirrors CuPy, where ``cupy.zeros(...)`` allocates on the current GPU.
    Every other attribute is NumPy's own.
    """

    _CONSTRUCTORS = frozenset({"empty", "zeros", "ones", "full", "arange", "eye", "linspace"})

    def __getattr__(self, name: str):
        attr = getattr(np, name)
        if name not in self._CONSTRUCTORS:
            return attr

        def on_current_device(*args, **kwargs):
            return _wrap(attr(*args, **kwargs), current_device())

        return on_current_device


class SimulatedBackend(Backend):
    """NumPy arrays pinned to simulated devices, with checked device use.

    Parameters
    ----------
    devices : None, int or sequence of int
        ``None``: ``DEFAULT_SIMULATED_DEVICES`` devices ``0..n-1``; an int ``n``:
        devices ``0..n-1``; a sequence: exactly those ids.
    """

    name = "simulated"
    xp = _SimulatedNumpy()

    def __init__(self, devices=None) -> None:
        devices = normalize_devices(DEFAULT_SIMULATED_DEVICES if devices is None else devices)
        self.devices: Tuple[int, ...] = tuple(range(devices)) if isinstance(devices, int) else devices
        #: Count and bytes of cross-device copies, keyed ``(src, dst)``.
        self.transfers: Dict[Tuple[object, int], Tuple[int, int]] = {}
        #: Count and bytes of device-to-host copies (:meth:`to_host` of a device array), keyed by
        #: the source device: on a GPU each one waits for the device.
        self.host_reads: Dict[Device, Tuple[int, int]] = {}

    @contextlib.contextmanager
    def device(self, device: Device):
        if device not in self.devices:
            raise DeviceMismatchError(
                f"device {device!r} is not one of this backend's devices {list(self.devices)}"
            )
        previous = current_device()
        _state.device = device
        try:
            yield
        finally:
            _state.device = previous

    def device_of(self, arr) -> object:
        return arr.device if isinstance(arr, SimArray) else "host"

    def _record(self, src, dst: int, nbytes: int) -> None:
        count, total = self.transfers.get((src, dst), (0, 0))
        self.transfers[(src, dst)] = (count + 1, total + nbytes)

    def _place(self, host: np.ndarray, dtype, device: int) -> SimArray:
        out = np.array(host, dtype=dtype, copy=True, order="C").view(SimArray)
        out._sim_device = device
        return out

    def asarray(self, x, dtype, device: Device):
        if device not in self.devices:
            raise DeviceMismatchError(
                f"device {device!r} is not one of this backend's devices {list(self.devices)}"
            )
        if isinstance(x, SimArray) and x.device == device and x.dtype == np.dtype(dtype):
            return x
        src = self.device_of(x)
        host = host_array(x)
        if src != device:
            self._record(src, device, host.nbytes)
        return self._place(host, dtype, device)

    def to_device(self, arr, device: Device):
        if isinstance(arr, SimArray) and arr.device == device:
            return arr
        return self.asarray(arr, arr.dtype, device)

    def to_host(self, arr) -> np.ndarray:
        """``arr`` as a host NumPy array; a device array's copy is counted in ``host_reads``."""
        host = host_array(arr)
        if isinstance(arr, SimArray):
            count, total = self.host_reads.get(arr.device, (0, 0))
            self.host_reads[arr.device] = (count + 1, total + host.nbytes)
        return host

    def reset_transfers(self) -> None:
        """Forget the recorded transfers and host reads."""
        self.transfers.clear()
        self.host_reads.clear()
