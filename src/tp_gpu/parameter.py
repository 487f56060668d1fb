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

import threading
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from . import collectives
from .backends.base import Backend, as_array
from .comm.base import Communicator, LocalComm
from .errors import ShapeError
from .partition import BlockLayout
from .placements import Dense, Partial, Placement, Replicated, Split
from .tensor import Tensor, new_tensor

__all__ = ["ShardedParameter"]


def _along(axis: int, index: slice) -> Tuple[slice, ...]:
    return (slice(None),) * axis + (index,)


class ShardedParameter(Tensor):
    """A logical parameter of shape ``shape``, split along ``axis`` (or whole) over devices.

    A leaf :class:`~tp_gpu.Tensor` that requires grad: layers pass it to their
    functions, and ``backward`` accumulates its gradient in ``grad_blocks``.

    Parameters
    ----------
    name : str
        What error messages call it, e.g. ``"weight"``.
    full : numpy.ndarray
        The initial logical value, on the host.
    backend : Backend
    dtype : numpy dtype
    layout : BlockLayout or None
        How ``axis`` is split over the workers' devices; None for a whole parameter.
    axis : int or None
        Split axis; ``None`` keeps the parameter whole on ``device``.
    device : hashable
        The device of a whole parameter.
    comm : Communicator, optional
        With several processes, ``layout`` covers this process's span only and
        :meth:`full` / :meth:`full_grad` all-gather the spans (collectives).
    replicate_on : sequence of hashable, optional
        Keep one whole copy on each of these devices (placement ``Replicated``)
        instead of one on ``device``: for a small weight every device reads at
        every step (the key and value projections when attention has fewer
        key-value heads than workers), so that no step copies it. The gradient
        of each copy is ``Partial``; :meth:`accumulate_grad` sums the parts of
        every device and process and gives each copy the sum, so an optimizer
        step keeps the copies equal.
    """

    backend: Backend  # always set: a parameter is placed by its layer's backend

    def __init__(
        self,
        name: str,
        full: np.ndarray,
        backend: Backend,
        dtype: Any,
        layout: Optional[BlockLayout] = None,
        axis: Optional[int] = None,
        device: Hashable = None,
        comm: Optional[Communicator] = None,
        replicate_on: Optional[Sequence[Hashable]] = None,
    ) -> None:
        self.name = name
        self.axis = axis
        self.layout = layout
        self.block_devices: List[Hashable] = [device] if layout is None else list(layout.groups)
        placement: Placement = Dense(device) if layout is None or axis is None else Split(axis, layout)
        if replicate_on is not None and layout is None:
            self.block_devices = list(dict.fromkeys(replicate_on))
            placement = Replicated(tuple(self.block_devices))
        Tensor.__init__(self, {}, placement, tuple(full.shape), dtype, backend, comm or LocalComm(), True)
        self.blocks = self._place(np.array(full))  # a copy: never the caller's array
        self.grad_blocks: Dict[Hashable, Optional[Any]] = dict.fromkeys(self.blocks)
        self._grad_lock = threading.Lock()

    def _place(self, full: Any, dtype: Any = None) -> Dict[Hashable, Any]:
        """Each device's block of the logical value ``full`` (host or device array), on its device,
        as ``dtype`` (default: the parameter's)."""
        dtype = self.dtype if dtype is None else dtype
        if self.layout is None or self.axis is None:
            return collectives.broadcast(self.backend, full, self.block_devices, dtype)
        return collectives.scatter_blocks(self.backend, full, self.axis, self.layout, dtype)

    def _views(self, blocks: Dict[Hashable, Any]) -> List[Any]:
        """Per-worker views into per-device ``blocks`` (a single-element list when whole)."""
        if self.layout is None or self.axis is None:
            return [blocks[self.block_devices[0]]]
        axis, layout = self.axis, self.layout
        return [blocks[d][_along(axis, slice(*layout.local[w]))] for w, d in enumerate(layout.devices)]

    @property
    def shards(self) -> List[Any]:
        """Worker i's slice, a view into its device's block (the whole array when not split)."""
        return self._views(self.blocks)

    @property
    def devices(self) -> List[Hashable]:
        """The device of each entry of ``shards``."""
        return list(self.block_devices) if self.layout is None else list(self.layout.devices)

    def assemble(self, blocks: Dict[Hashable, Any]) -> np.ndarray:
        """The logical array, on the host, of per-device ``blocks`` laid out like this parameter's
        (its value, its gradient, or optimizer state); with several processes a collective."""
        if self.layout is None or self.axis is None:
            return np.array(collectives.to_host(self.backend, blocks[self.block_devices[0]]))
        return collectives.gather_to_host(self.backend, blocks, self.axis, self.layout, self.comm)

    def full(self) -> np.ndarray:
        """The logical parameter as a new host array."""
        return self.assemble(self.blocks)

    def full_grad(self) -> np.ndarray:
        """The logical gradient as a new host array (zeros before any backward)."""
        if all(g is None for g in self.grad_blocks.values()):
            return np.zeros(self.shape, self.dtype)
        grads = {
            d: self.backend.xp.zeros(self.blocks[d].shape, self.dtype) if g is None else g
            for d, g in self.grad_blocks.items()
        }
        return self.assemble(grads)

    def accumulate(self, device: Hashable, grad: Any) -> None:
        """Add ``grad`` (shaped like ``device``'s block, on that device) to its gradient."""
        if self.grad_blocks[device] is None:
            self.grad_blocks[device] = grad
        else:
            with self.backend.device(device):
                self.grad_blocks[device] += grad

    @property
    def grad_lock(self) -> threading.Lock:
        """Held while a gradient is added to ``grad_blocks`` (backward passes may run in threads)."""
        return self._grad_lock

    def accumulate_blocks(self, grads: Dict[Hashable, Any]) -> None:
        """Add each device's gradient block ``grads[d]`` (on ``d``) to the gradient."""
        with self._grad_lock:
            for device, grad in grads.items():
                self.accumulate(device, grad)

    def accumulate_grad(self, grad: Tensor) -> None:
        """Add a gradient from the tape. A whole parameter takes it on its device (``Partial`` parts
        summed there, over every process too); a split one takes its blocks as they lie."""
        if isinstance(self.placement, (Dense, Replicated)):
            device = self.block_devices[0]
            if isinstance(grad.placement, Partial):
                block = collectives.reduce_sum(self.backend, dict(grad.blocks), device, self.comm)
            else:
                (block,) = grad.blocks.values()
            grad_blocks = collectives.broadcast(self.backend, block, self.block_devices, self.dtype)
            self.accumulate_blocks(grad_blocks)
        else:
            self.accumulate_blocks(grad.blocks)

    @property
    def grad(self) -> Optional[Tensor]:
        """The accumulated gradient as a Tensor placed like the parameter (None before any backward)."""
        if self.__dict__.get("grad_blocks") is None or all(g is None for g in self.grad_blocks.values()):
            return None
        blocks = {
            d: self.backend.xp.zeros(self.blocks[d].shape, self.dtype) if g is None else g
            for d, g in self.grad_blocks.items()
        }
        return new_tensor(blocks, self.placement, self.shape, self.dtype, self.backend, self.comm)

    @grad.setter
    def grad(self, value: Optional[Tensor]) -> None:
        if value is not None:
            raise ShapeError("a parameter's gradient is accumulated by backward; set it to None to forget it")
        if "grad_blocks" in self.__dict__:
            self.zero_grad()

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""
        self.grad_blocks = dict.fromkeys(self.blocks)

    def stage(self, full: Any, what: Optional[str] = None, dtype: Any = None) -> Dict[Hashable, Any]:
        """Each device's block of the logical value ``full``, on its device, without touching the parameter.

        ``full`` may be a host array, an array of this backend's devices or any
        DLPack array (PyTorch, JAX). It is checked first: its shape must be the
        logical shape and its dtype real (float or integer; it is cast to this
        parameter's dtype), else :class:`~tp_gpu.errors.ShapeError`. A device
        array is split where it lies and each block moves straight to its
        device, without a round trip through the host. Pass the result to
        :meth:`commit`; staging every parameter before committing any is how a
        load either changes everything or nothing. ``dtype`` stages in another
        dtype (optimizer state of a float16 parameter is float32).
        """
        what = what or f"parameter {self.name!r}"
        try:
            full = as_array(full)
        except (ValueError, TypeError) as exc:
            raise ShapeError(
                f"{what} could not be read as an array ({exc}); got {type(full).__name__}"
            ) from exc
        if tuple(full.shape) != self.shape:
            raise ShapeError(f"{what} must have shape {self.shape}, got {tuple(full.shape)}")
        if np.dtype(full.dtype).kind not in "fiu":
            raise ShapeError(f"{what} must hold real numbers (float or integer), got dtype {full.dtype}")
        return self._place(full, dtype)

    def commit(self, staged: Dict[Hashable, Any]) -> None:
        """Copy blocks made by :meth:`stage` into place, in place (views and optimizer state stay valid)."""
        for d, block in staged.items():
            with self.backend.device(d):
                self.blocks[d][...] = block

    def load(self, full: Any) -> None:
        """Overwrite the value in place from an array of the logical shape (checked first; see
        :meth:`stage`)."""
        self.commit(self.stage(full))

    def __repr__(self) -> str:
        return (
            f"ShardedParameter({self.name!r}, shape={self.shape}, axis={self.axis}, devices={self.devices})"
        )
