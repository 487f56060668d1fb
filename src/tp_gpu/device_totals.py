"""Reductions over every gradient block that end on the host in one device-to-host copy.

Clipping needs ``sum_blocks sum |g|^q`` (or ``max |g|``) over every gradient block, and loss
scaling needs whether any block holds an inf or NaN. Each block's partial result is a small
array on the block's device. Reading each one on the host would make the host wait for its
device once per parameter and device; instead:

1. each device folds its own partials (``xp.stack(values).sum(0)`` or ``.max(0)``, under the device);
2. the devices' results meet on the first device (one peer copy each,
   :func:`tp_gpu.collectives.reduce_sum` / :func:`~tp_gpu.collectives.reduce_max`);
3. that one small array is copied to the host (:func:`tp_gpu.collectives.to_host`): one
   synchronisation, as in ``torch.nn.utils.clip_grad_norm_`` and Megatron's ``clip_grad_norm_fp32``.

Nothing here talks to other processes: the caller all-reduces the host result over its communicator.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Hashable, List, Sequence

import numpy as np

from . import collectives
from .backends.base import Backend
from .collectives import Blocks

__all__ = ["total_to_host"]

#: The reductions :func:`total_to_host` knows, and the collective that combines the devices' results.
_OPS = {"sum": collectives.reduce_sum, "max": collectives.reduce_max}


def _fold(xp: Any, op: str, values: List[Any]) -> Any:
    """``op`` over ``values`` (arrays of one shape on the current device), elementwise: one stack and
    one reduction. ``max`` keeps a NaN, as ``np.max`` and ``cupy.max`` do."""
    stacked = xp.stack(values)  # (n, *shape)
    return stacked.sum(axis=0) if op == "sum" else stacked.max(axis=0)


def total_to_host(backend: Backend, partials: Sequence[Blocks], op: str) -> np.ndarray:
    """``op`` ("sum" or "max") over every array of ``partials``, elementwise, as a host array.

    ``partials`` holds dicts ``{device: array}``; every array has one shape (a 0-d number or a few
    numbers) and lives on its device. The result is
    ``op_{i, d} partials[i][d]``: folded on each device, combined on the first device, and copied
    to the host once, whatever the number of dicts and devices. An empty ``partials`` raises
    ValueError.
    """
    if op not in _OPS:
        raise ValueError(f"total_to_host op must be one of {sorted(_OPS)}, got {op!r}")
    by_device: Dict[Hashable, List[Any]] = {}
    for blocks in partials:
        for device, value in blocks.items():
            by_device.setdefault(device, []).append(value)
    if not by_device:
        raise ValueError("total_to_host got no partial results")
    folded = collectives.on_devices(backend, partial(_fold, backend.xp, op), by_device)
    total = _OPS[op](backend, folded, next(iter(folded)))
    return collectives.to_host(backend, total)
