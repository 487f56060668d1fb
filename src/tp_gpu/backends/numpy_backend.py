"""The NumPy backend: one host device, ``"cpu"``, where moves are no-ops."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import Backend, host_array

__all__ = ["NumpyBackend", "CPU"]

CPU = "cpu"


class NumpyBackend(Backend):
    """Every worker computes on the host with NumPy."""

    name = "numpy"
    xp = np

    def __init__(self, devices=None) -> None:
        if isinstance(devices, bool) or devices not in (None, 1, (0,), [0]):
            raise ConfigError(
                f"the numpy backend has one device, 'cpu'; got devices={devices!r} "
                "(expected None; use backend='simulated' to emulate several devices)"
            )
        self.devices = (CPU,)

    def device_of(self, arr) -> str:
        return CPU

    def asarray(self, x, dtype, device=CPU):
        if type(x) is np.ndarray and x.dtype == dtype:
            return x  # the common case, without host_array's checks
        return np.asarray(host_array(x), dtype=dtype)

    def to_device(self, arr, device=CPU):
        return arr
