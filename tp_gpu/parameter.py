"""ShardedParameter: one logical parameter held as per-worker shards, with gradients.

A parameter is either *split*, worker ``i`` holding a slice along ``axis`` on
its own device, or *whole* (``axis=None``), one array kept on one device (the
row-parallel bias, added once after the reduction). Gradients have the same
layout as the shards and stay on the shards' devices; only :meth:`full` and
:meth:`full_grad` assemble a logical array, on the host.
"""

from __future__ import annotations

from typing import Any, Hashable, List, Optional, Sequence

import numpy as np

__all__ = ["ShardedParameter"]


class ShardedParameter:
    """A logical parameter ``concatenate(shards, axis)`` (or ``shards[0]`` when whole).

    Parameters
    ----------
    name : str
        Key in ``grads()`` and state dicts, e.g. ``"weight"``.
    shards : list of arrays
        One per worker when split; a single array when whole.
    axis : int or None
        Split axis of the logical array; ``None`` for a whole parameter.
    devices : list
        The device of each shard.
    backend : Backend
        The backend that owns the shards.
    """

    def __init__(self, name: str, shards: Sequence[Any], axis: Optional[int], devices: Sequence[Hashable], backend) -> None:
        self.name = name
        self.shards: List[Any] = list(shards)
        self.axis = axis
        self.devices: List[Hashable] = list(devices)
        self.backend = backend
        self.grads: List[Optional[Any]] = [None] * len(self.shards)

    @property
    def shape(self):
        """Shape of the logical parameter."""
        if self.axis is None:
            return tuple(self.shards[0].shape)
        shape = list(self.shards[0].shape)
        shape[self.axis] = sum(s.shape[self.axis] for s in self.shards)
        return tuple(shape)

    @property
    def dtype(self):
        return self.shards[0].dtype

    def _assemble(self, arrays: Sequence[Any]) -> np.ndarray:
        host = [np.array(self.backend.to_host(a)) for a in arrays]
        return host[0] if self.axis is None else np.concatenate(host, axis=self.axis)

    def full(self) -> np.ndarray:
        """The logical parameter as a new host array."""
        return self._assemble(self.shards)

    def full_grad(self) -> np.ndarray:
        """The logical gradient as a new host array (zeros before any backward)."""
        grads = [np.zeros(s.shape, s.dtype) if g is None else g for s, g in zip(self.shards, self.grads)]
        return self._assemble(grads)

    def accumulate(self, index: int, grad: Any) -> None:
        """Add ``grad`` to shard ``index``'s gradient, on that shard's device."""
        if self.grads[index] is None:
            self.grads[index] = grad
        else:
            with self.backend.device(self.devices[index]):
                self.grads[index] += grad

    def zero_grad(self) -> None:
        """Forget the accumulated gradients."""
        self.grads = [None] * len(self.shards)

    def __repr__(self) -> str:
        return f"ShardedParameter({self.name!r}, shape={self.shape}, axis={self.axis}, devices={self.devices})"
