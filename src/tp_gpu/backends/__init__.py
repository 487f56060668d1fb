"""Backends own arrays: NumPy on the host, CuPy on CUDA GPUs, simulated devices.

:func:`get_backend` picks one: an explicit name first, then the environment
variable ``TP_GPU_BACKEND``, then auto (CuPy when it imports and a GPU is
visible, else NumPy). CuPy is looked for without being imported until needed.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Dict, Optional, Tuple

from ..config import BACKEND_NAMES, normalize_devices
from ..errors import ConfigError
from ..host_memory import retain_freed_host_memory
from . import host_norm
from .base import Backend, as_array, from_dlpack, host_array, is_cupy_array, is_dlpack_array
from .numpy_backend import CPU, NumpyBackend
from .simulated import SimArray, SimulatedBackend

__all__ = [
    "Backend",
    "NumpyBackend",
    "SimulatedBackend",
    "SimArray",
    "CPU",
    "ENV_VAR",
    "get_backend",
    "resolve_backend_name",
    "cupy_available",
    "host_array",
    "is_cupy_array",
    "is_dlpack_array",
    "from_dlpack",
    "as_array",
]

#: Environment variable naming the backend when the config does not.
ENV_VAR = "TP_GPU_BACKEND"


def cupy_available() -> bool:
    """True when CuPy is installed and a GPU is visible."""
    if importlib.util.find_spec("cupy") is None:
        return False
    from .cupy_backend import cupy_unavailable_reason

    return cupy_unavailable_reason() is None


def resolve_backend_name(name=None) -> str:
    """The backend name to use: ``name``, else ``$TP_GPU_BACKEND``, else auto."""
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is not None and name not in BACKEND_NAMES:
            raise ConfigError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKEND_NAMES}")
    if name is None:
        return "cupy" if cupy_available() else "numpy"
    if name not in BACKEND_NAMES:
        raise ConfigError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


#: One backend per (name, devices) in this process, so that layers built alike share it.
_instances: Dict[Tuple[str, Any], Backend] = {}


def get_backend(name: Optional[str] = None, devices: Any = None) -> Backend:
    """The process's backend ``resolve_backend_name(name)`` over ``devices``, built on first use.

    Layers built from equal configs get the same instance (and so share its
    devices, memory pools and transfer counter).
    """
    name = resolve_backend_name(name)
    key = (name, normalize_devices(devices))
    if key not in _instances:
        _instances[key] = _build_backend(name, key[1])
    return _instances[key]


def _build_backend(name: str, devices: Any) -> Backend:
    retain_freed_host_memory()  # every backend computes on the host too (see tp_gpu.host_memory)
    host_norm.check_choice()  # a bad TP_GPU_HOST_KERNELS stops here, before anything is computed
    if name == "numpy":
        return NumpyBackend(devices)
    if name == "simulated":
        return SimulatedBackend(devices)
    from .cupy_backend import CupyBackend

    return CupyBackend(devices)
