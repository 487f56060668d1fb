"""What every tensor-parallel layer shares: config, group, parameters, input checks."""

from __future__ import annotations

import numbers
from typing import Any, Hashable, List, Optional

import numpy as np

from ..backends import as_array, from_dlpack, is_dlpack_array
from ..comm.base import Communicator
from ..config import TensorParallelConfig
from ..errors import ConfigError, ShapeError
from ..group import get_group
from ..module import Module
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..tensor import Tensor

__all__ = ["ParallelModule", "as_array_like", "check_seed", "check_layout", "LAYOUTS"]


def check_seed(seed) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise ConfigError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def as_array_like(x: Any, what: str) -> Any:
    """``x`` as something with ``.shape``/``.dtype``: arrays pass through, lists become NumPy.

    DLPack arrays (PyTorch tensors, JAX arrays) are imported without a copy:
    host memory as a NumPy array, GPU memory as a CuPy array on its GPU (see
    :func:`tp_gpu.backends.from_dlpack`), so a GPU tensor reaches the CuPy
    backend without a round trip through the host.
    """
    if is_dlpack_array(x):
        try:
            return from_dlpack(x)
        except ShapeError as exc:
            raise ShapeError(f"{what}: {exc}") from exc
    try:
        return as_array(x)
    except (ValueError, TypeError) as exc:
        raise ShapeError(
            f"{what} could not be read as a rectangular array ({exc}); got {type(x).__name__}"
        ) from exc


#: Weight layouts accepted by ``from_dense`` / ``load_dense``: ours, ``(n_in, n_out)``,
#: and PyTorch's ``nn.Linear``, ``(n_out, n_in)``.
LAYOUTS = ("in_out", "out_in")


def check_layout(layout: Any) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`, else raise ConfigError."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ConfigError(
            f"layout must be 'in_out' (weight of shape (n_in, n_out)) or 'out_in' "
            f"(PyTorch nn.Linear's (n_out, n_in)), got {layout!r}"
        )
    return layout


class ParallelModule(Module):
    """Base of the tensor-parallel layers: config, dtype, and the group of devices they run on.

    A subclass validates its sizes, then calls :meth:`_join_group` (which
    builds or reuses the group and checks that every rank built the layer
    alike), then :meth:`_add_parameter` for each logical parameter.
    """

    def __init__(self, config: Optional[TensorParallelConfig]) -> None:
        super().__init__()
        if config is None:
            config = TensorParallelConfig()
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        self.config = config
        self.dtype = np.dtype(config.dtype)

    def _join_group(self, **fingerprint: Any) -> None:
        """Get this config's group (after every argument is validated); every rank must agree."""
        self._group = get_group(self.config)
        self._group.check_same_on_every_rank(
            type(self).__name__,
            {
                "n_workers": self.config.n_workers,
                "dtype": self.config.dtype,
                "sequence_parallel": self.config.sequence_parallel,
                **fingerprint,
            },
        )

    def _add_parameter(
        self,
        name: str,
        full: np.ndarray,
        layout: Optional[BlockLayout] = None,
        axis: Optional[int] = None,
        replicate: bool = False,
    ) -> ShardedParameter:
        """Register the host array ``full`` as parameter ``name``: split along ``axis`` as
        ``layout`` says, or kept whole on the output device when ``layout`` is None (with
        ``replicate``, whole on every device of the group: ``Replicated``)."""
        group = self.group
        copies = group.distinct_devices if replicate else None
        param = ShardedParameter(
            name, full, group.backend, self.dtype, layout, axis, group.output_device, group.comm, copies
        )
        setattr(self, name, param)
        return param

    @property
    def comm(self) -> Communicator:
        """The communicator between the processes of this layer's group."""
        return self.group.comm

    @property
    def devices(self) -> List[Hashable]:
        """The device of each worker this process holds: ``devices[i % len(devices)]`` of the backend."""
        return list(self.group.devices)

    @property
    def workers(self) -> List[int]:
        """The global ids of the workers this process holds (every worker with one process)."""
        return self.group.workers

    def _check_features(self, x: Any, n_features: int, what: str) -> Any:
        """Check that ``x`` is a real array of rank >= 1 with ``n_features`` on its last axis."""
        if not isinstance(x, Tensor):
            x = as_array_like(x, what)
        kind = np.dtype(x.dtype).kind
        if kind not in "iuf":
            raise ShapeError(f"{what} must hold real numbers, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != n_features:
            raise ShapeError(f"{what} must have shape (..., {n_features}), got {tuple(x.shape)}")
        return x
