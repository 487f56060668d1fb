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

__all__ = ["Backend", "is_cupy_array", "host_array"]

Device = Hashable


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray``, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "device") and hasattr(x, "get")


def host_array(x: Any) -> np.ndarray:
    """Return ``x`` as a host NumPy array (no copy when it already is one).

    Accepts NumPy arrays (and subclasses, viewed as plain ndarrays), CuPy arrays
    on any device, nested lists, scalars, and anything with ``__array__``.
    """
    if is_cupy_array(x):
        return x.get()
    if isinstance(x, np.ndarray):
        return x.view(np.ndarray) if type(x) is not np.ndarray else x
    return np.asarray(x)


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

    def scatter_add(self, target: Any, indices: Any, values: Any) -> None:
        """``target[indices[k]] += values[k]`` for every k, repeated indices accumulating.

        Runs on the current device; all three arrays must live there.
        """
        self.xp.add.at(target, indices, values)

    def to_host(self, arr: Any) -> np.ndarray:
        """``arr`` as a host NumPy array."""
        return host_array(arr)

    def synchronize(self) -> None:
        """Wait for all queued work on every device of this backend (timing)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(devices={list(self.devices)!r})"
