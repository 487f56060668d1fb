"""What every tensor-parallel layer shares: config, backend, placement, input checks."""

from __future__ import annotations

import numbers
from typing import Any, Hashable, List, Optional

import numpy as np

from ..backends import get_backend, host_array, is_cupy_array
from ..collectives import scatter
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..partition import check_divisible, shard_ranges
from ..placement import worker_devices

__all__ = ["ParallelModule", "as_array_like", "check_seed"]


def check_seed(seed) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def as_array_like(x: Any, what: str) -> Any:
    """``x`` as something with ``.shape``/``.dtype``: arrays pass through, lists become NumPy."""
    if isinstance(x, np.ndarray) or is_cupy_array(x):
        return x
    try:
        return host_array(x)
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"{what} could not be read as a rectangular array ({exc}); got {type(x).__name__}") from exc


class ParallelModule:
    """Base of the layers: resolves the config, backend and worker placement.

    Subclasses call :meth:`_split_dim` to validate the split dimension before
    anything is allocated, then :meth:`_place` to shard a logical weight.
    """

    def __init__(self, config: Optional[TensorParallelConfig]) -> None:
        if config is None:
            config = TensorParallelConfig()
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        self.config = config
        self.dtype = np.dtype(config.dtype)

    def _split_dim(self, size, what: str) -> int:
        size = check_positive_int(size, what)
        check_divisible(size, self.config.n_workers, what)
        return size

    def _init_placement(self) -> None:
        """Build the backend and place the workers (after every argument is validated)."""
        self.backend = get_backend(self.config.backend, self.config.devices)
        self._placement = worker_devices(self.config.n_workers, self.backend.devices)
        out = self.config.output_device
        if out is None:
            out = self._placement[0]
        if out not in self.backend.devices:
            raise ConfigError(
                f"output_device {out!r} is not a device of the {self.backend.name} backend; "
                f"expected one of {list(self.backend.devices)}"
            )
        self.output_device: Hashable = out

    def _place(self, full: np.ndarray, axis: int) -> List[Any]:
        """Split the host array ``full`` along ``axis`` into ``n_workers`` shards on their devices."""
        ranges = shard_ranges(full.shape[axis], self.n_workers)
        return scatter(self.backend, full, axis, ranges, self._placement, self.dtype)

    def _check_features(self, x: Any, n_features: int, what: str) -> Any:
        """Check that ``x`` is a real array of rank >= 1 with ``n_features`` on its last axis."""
        x = as_array_like(x, what)
        kind = np.dtype(x.dtype).kind
        if kind not in "iuf":
            raise ShapeError(f"{what} must hold real numbers, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != n_features:
            raise ShapeError(f"{what} must have shape (..., {n_features}), got {tuple(x.shape)}")
        return x

    @property
    def n_workers(self) -> int:
        """Number of tensor-parallel workers."""
        return self.config.n_workers

    @property
    def devices(self) -> List[Hashable]:
        """The device of each worker: ``devices[i % len(devices)]`` of the backend."""
        return list(self._placement)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _host_concat(self, shards: List[Any], axis: int) -> np.ndarray:
        """Concatenate ``shards`` on the host (a new array, never a view of a shard)."""
        return np.concatenate([self.backend.to_host(s) for s in shards], axis=axis)
