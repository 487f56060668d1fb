"""Bringing a result to the host: the one documented way, on every backend.

A layer's output lives on a device: a NumPy array on the host, a CuPy array on
a GPU, or an array of the simulated backend that knows its device (and, like
CuPy, refuses to mix with a host array). :func:`to_numpy` turns any of them,
or a :class:`~tp_gpu.Tensor` (a split one gathered, partial sums added), into a NumPy
array that plain NumPy code can use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends.base import host_array
from .tensor import Tensor

__all__ = ["to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a plain host NumPy array.

    ``x`` may be a layer's output on any backend (NumPy, CuPy on any GPU,
    simulated devices), a ``Tensor`` (its logical value: a ShardedTensor's shards gathered
    in order; collective with several processes), a DLPack array (PyTorch), a
    number or a nested list. A host NumPy array is returned without a copy;
    device arrays are copied after the work queued for them.
    """
    if isinstance(x, Tensor):
        return x.numpy()
    return np.asarray(host_array(x))  # a simulated array comes back as a plain ndarray view
