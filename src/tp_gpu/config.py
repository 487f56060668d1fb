"""TensorParallelConfig: the validated settings shared by every layer."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError

__all__ = [
    "TensorParallelConfig",
    "SUPPORTED_DTYPES",
    "BACKEND_NAMES",
    "COMM_NAMES",
    "check_positive_int",
    "env_choice",
    "normalize_devices",
]

#: Floating dtypes the layers compute in.
SUPPORTED_DTYPES: Tuple[str, ...] = ("float64", "float32", "float16")

#: Backend names accepted by ``TensorParallelConfig.backend`` and ``TP_GPU_BACKEND``.
BACKEND_NAMES: Tuple[str, ...] = ("numpy", "cupy", "simulated")

#: Communicator names accepted by ``TensorParallelConfig.comm``.
COMM_NAMES: Tuple[str, ...] = ("local", "mpi", "nccl")


def env_choice(name: str, choices: Sequence[str]) -> str:
    """The environment variable ``name`` stripped and in lower case (``""`` when unset), or a
    ConfigError naming the value as set and ``choices`` (their first, ``""``, means unset)."""
    choice = os.environ.get(name, "").strip().lower()
    if choice not in choices:
        raise ConfigError(
            f"{name}={os.environ[name]!r} is not a choice; expected one of {tuple(choices[1:])} (or unset)"
        )
    return choice


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as an int if it is an integer >= 1, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer (>= 1), got {value!r}")
    return int(value)


def _normalize_dtype(dtype) -> str:
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise ConfigError(f"dtype must be one of {SUPPORTED_DTYPES}, got None")
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name is None and str(dtype).lower() in ("bfloat16", "bf16"):
        raise ConfigError(
            f"dtype {dtype!r} is not supported: NumPy has no bfloat16 and tp_gpu does not emulate it; "
            f"expected one of {SUPPORTED_DTYPES} (for mixed precision: 'float16', which trains with "
            "float32 master weights and GradScaler)"
        )
    if name not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    return name


def normalize_devices(devices) -> Union[None, int, Tuple[int, ...]]:
    """``None``, a device count, or a tuple of distinct non-negative ids; else ConfigError."""
    if devices is None:
        return None
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        return check_positive_int(devices, "devices (a device count)")
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise ConfigError(
            f"devices must be None, a device count or a sequence of device ids, got {devices!r}"
        )
    ids = []
    for d in devices:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ConfigError(f"device ids must be non-negative integers, got {d!r} in devices={devices!r}")
        ids.append(int(d))
    if not ids:
        raise ConfigError("devices must name at least one device, got an empty sequence")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"devices must not repeat a device id, got {list(devices)!r}")
    return tuple(ids)


@dataclass(frozen=True)
class TensorParallelConfig:
    """Settings of a tensor-parallel layer.

    The config is immutable and validated on construction, so one config can be
    shared by many layers. A bad value raises :class:`~tp_gpu.errors.ConfigError`.
    Construction has no side effects: it neither imports mpi4py nor starts MPI.
    The communicator starts, and every rank's agreement is checked, when the
    first layer is built (see :func:`tp_gpu.group.get_group`).
    """

    n_workers: int = 2  # number of tensor-parallel workers (shards); any split size is allowed
    gather_output: bool = True  # column layer: concatenate the shards (True) or return a ShardedTensor
    backend: Optional[str] = None  # "numpy" | "cupy" | "simulated"; None: $TP_GPU_BACKEND, then auto
    devices: Union[None, int, Sequence[int]] = None  # device count or ids; None: every visible device
    dtype: str = "float32"  # compute and storage dtype: float32 (as PyTorch), float64 or float16
    output_device: Union[None, int, str] = None  # where gathered/reduced outputs land; None: worker 0's
    comm: Optional[str] = None  # between processes: None/"local" (one process), "mpi" or "nccl"
    sequence_parallel: bool = False  # between TP regions, each worker holds a slice of the sequence axis

    def __post_init__(self) -> None:
        object.__setattr__(self, "n_workers", check_positive_int(self.n_workers, "n_workers"))
        if not isinstance(self.gather_output, (bool, np.bool_)):
            raise ConfigError(f"gather_output must be True or False, got {self.gather_output!r}")
        object.__setattr__(self, "gather_output", bool(self.gather_output))
        if self.backend is not None and self.backend not in BACKEND_NAMES:
            raise ConfigError(f"backend must be None or one of {BACKEND_NAMES}, got {self.backend!r}")
        object.__setattr__(self, "devices", normalize_devices(self.devices))
        object.__setattr__(self, "dtype", _normalize_dtype(self.dtype))
        od = self.output_device
        if od is not None and not (
            isinstance(od, str) or (isinstance(od, numbers.Integral) and not isinstance(od, bool))
        ):
            raise ConfigError(f"output_device must be None, a device id or 'cpu', got {od!r}")
        if self.comm is not None and self.comm not in COMM_NAMES:
            raise ConfigError(f"comm must be one of {COMM_NAMES}, got {self.comm!r}")
        if not isinstance(self.sequence_parallel, (bool, np.bool_)):
            raise ConfigError(f"sequence_parallel must be True or False, got {self.sequence_parallel!r}")
        object.__setattr__(self, "sequence_parallel", bool(self.sequence_parallel))

    @property
    def rank(self) -> int:
        """This process's rank among the processes of ``comm`` (0 with one process); starts ``comm``."""
        from .comm import get_communicator

        return get_communicator(self.comm).rank

    @property
    def world_size(self) -> int:
        """The number of processes of ``comm`` (1 with one process); starts ``comm``."""
        from .comm import get_communicator

        return get_communicator(self.comm).size
