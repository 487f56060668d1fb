"""ShardedParameter: one logical parameter held in per-device blocks, with gradients.

A parameter is either *split* along ``axis`` over the workers, or *whole*
(``axis=None``): one array on one device (the row-parallel bias, added once
after the reduction). A split parameter keeps, on each device, one contiguous
block with the slices of every worker placed there (see
:class:`~tp_gpu.partition.BlockLayout`); ``shards[i]`` is worker ``i``'s view
into its device's block. Gradients have the same per-device layout and stay on
their devices; only :meth:`full` and :meth:`full_grad` assemble a logical
array, on the host.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Tuple

import numpy as np

from . import collectives
from .backends.base import as_array
from .backends.numpy_backend import NumpyBackend
from .comm import LocalComm
from .errors import ShapeError
from .partition import BlockLayout

__all__ = ["ShardedParameter"]

_HOST = NumpyBackend()  # host arrays travel between processes as NumPy


def _along(axis: int, index: slice) -> Tuple[slice, ...]:
    return (slice(None),) * axis + (index,)


class ShardedParameter:
    """A logical parameter of shape ``shape``, split along ``axis`` (or whole) over devices.

    Parameters
    ----------
    name : str
        Key in ``grads()`` and state dicts, e.g. ``"weight"``.
    full : numpy.ndarray
        The initial logical value, on the host.
    axis : int or None
        Split axis; ``None`` keeps the parameter whole on ``devices[0]``.
    layout : BlockLayout or None
        How ``axis`` is split over the workers' devices (None when whole).
    device : hashable
        The device of a whole parameter.
    backend : Backend
    dtype : numpy dtype
    comm : Communicator, optional
        With several processes, ``layout`` covers this process's span only and
        :meth:`full` / :meth:`full_grad` all-gather the spans (collectives).
    """

    def __init__(
        self, name: str, full: np.ndarray, axis: Optional[int], layout: Optional[BlockLayout], device, backend, dtype, comm=None
    ) -> None:
        self.name = name
        self.comm = LocalComm() if comm is None else comm
        self.axis = axis
        self.layout = layout
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.shape: Tuple[int, ...] = tuple(full.shape)
        self.block_devices: List[Hashable] = [device] if axis is None else list(layout.groups)
        self.blocks: Dict[Hashable, Any] = {
            d: backend.asarray(piece, self.dtype, d) for d, piece in self._host_blocks(full).items()
        }
        self.grad_blocks: Dict[Hashable, Optional[Any]] = dict.fromkeys(self.blocks)

    def _host_blocks(self, full: np.ndarray) -> Dict[Hashable, np.ndarray]:
        """Each device's block of the host array ``full``, as new contiguous arrays."""
        if self.axis is None:
            return {self.block_devices[0]: np.array(full, dtype=self.dtype, order="C")}
        return {
            d: np.ascontiguousarray(np.concatenate([full[_along(self.axis, s)] for s in self.layout.global_slices(d)], self.axis), dtype=self.dtype)
            for d in self.block_devices
        }

    def _views(self, blocks: Dict[Hashable, Any]) -> List[Any]:
        """Per-worker views into per-device ``blocks`` (a single-element list when whole)."""
        if self.axis is None:
            return [blocks[self.block_devices[0]]]
        return [blocks[d][_along(self.axis, slice(*self.layout.local[w]))] for w, d in enumerate(self.layout.devices)]

    @property
    def shards(self) -> List[Any]:
        """Worker i's slice, a view into its device's block (the whole array when not split)."""
        return self._views(self.blocks)

    @property
    def devices(self) -> List[Hashable]:
        """The device of each entry of ``shards``."""
        return list(self.block_devices) if self.axis is None else list(self.layout.devices)

    def _assemble(self, blocks: Dict[Hashable, Any]) -> np.ndarray:
        """The logical array on the host; with several processes a collective (all-gather of the spans)."""
        host = [np.array(self.backend.to_host(v)) for v in self._views(blocks)]
        if self.axis is None:
            return host[0]  # whole parameters are the same on every process
        span = np.concatenate(host, axis=self.axis)
        return span if self.comm.size == 1 else self.comm.allgather(_HOST, span, self.axis)

    def full(self) -> np.ndarray:
        """The logical parameter as a new host array."""
        return self._assemble(self.blocks)

    def full_grad(self) -> np.ndarray:
        """The logical gradient as a new host array (zeros before any backward)."""
        grads = {d: np.zeros(b.shape, self.dtype) if self.grad_blocks[d] is None else self.grad_blocks[d] for d, b in self.blocks.items()}
        return self._assemble(grads)

    def accumulate(self, device: Hashable, grad: Any) -> None:
        """Add ``grad`` (shaped like ``device``'s block, on that device) to its gradient."""
        if self.grad_blocks[device] is None:
            self.grad_blocks[device] = grad
        else:
            with self.backend.device(device):
                self.grad_blocks[device] += grad

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""
        self.grad_blocks = dict.fromkeys(self.blocks)

    def stage(self, full: Any, what: Optional[str] = None) -> Dict[Hashable, Any]:
        """Each device's block of the logical value ``full``, on its device, without touching the parameter.

        ``full`` may be a host array, an array of this backend's devices or any
        DLPack array (PyTorch, JAX). It is checked first: its shape must be the
        logical shape and its dtype real (float or integer; it is cast to this
        parameter's dtype), else :class:`~tp_gpu.errors.ShapeError`. A device
        array is split where it lies and each block moves straight to its
        device, without a round trip through the host. Pass the result to
        :meth:`commit`; staging every parameter before committing any is how a
        load either changes everything or nothing.
        """
        what = what or f"parameter {self.name!r}"
        try:
            full = as_array(full)
        except (ValueError, TypeError) as exc:
            raise ShapeError(f"{what} could not be read as an array ({exc}); got {type(full).__name__}") from exc
        if tuple(full.shape) != self.shape:
            raise ShapeError(f"{what} must have shape {self.shape}, got {tuple(full.shape)}")
        if np.dtype(full.dtype).kind not in "fiu":
            raise ShapeError(f"{what} must hold real numbers (float or integer), got dtype {full.dtype}")
        if self.axis is None:
            device = self.block_devices[0]
            return {device: self.backend.asarray(full, self.dtype, device)}
        return collectives.scatter_blocks(self.backend, full, self.axis, self.layout, self.dtype)

    def commit(self, staged: Dict[Hashable, Any]) -> None:
        """Copy blocks made by :meth:`stage` into place, in place (views and optimizer state stay valid)."""
        for d, block in staged.items():
            with self.backend.device(d):
                self.blocks[d][...] = block

    def load(self, full: Any) -> None:
        """Overwrite the value in place from an array of the logical shape (checked first; see :meth:`stage`)."""
        self.commit(self.stage(full))

    def __repr__(self) -> str:
        return f"ShardedParameter({self.name!r}, shape={self.shape}, axis={self.axis}, devices={self.devices})"
