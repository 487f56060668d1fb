"""Collectives over per-worker shards: the only place arrays of different devices meet.

Every function takes the backend that owns the arrays. Moves go through
``backend.to_device`` / ``backend.asarray`` (peer copies on CuPy); arithmetic is
limited to sums, each run under the device its operands live on.

Shapes use ``p`` for the number of workers and ``d`` for the number of distinct
devices they are placed on (``d <= p``).
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Sequence, Tuple

from .placement import workers_by_device

__all__ = [
    "broadcast",
    "scatter",
    "to_placement",
    "all_gather",
    "reduce_sum",
    "reduce_max",
    "all_reduce_sum",
    "all_reduce_max",
]


def broadcast(backend, x: Any, devices: Sequence[Hashable], dtype) -> Dict[Hashable, Any]:
    """Copy ``x`` (host or any device) as ``dtype`` onto each distinct device, once per device.

    Returns ``{device: array}``; workers sharing a device share its copy.
    """
    return {device: backend.asarray(x, dtype, device) for device in dict.fromkeys(devices)}


def scatter(backend, x: Any, axis: int, ranges: Sequence[Tuple[int, int]], placement: Sequence[Hashable], dtype) -> List[Any]:
    """Split ``x`` along ``axis`` into ``x[..., first:last, ...]`` for each range and put
    worker i's piece on ``placement[i]`` as ``dtype``. Only each piece crosses devices."""
    axis = axis % x.ndim
    pieces = []
    for (first, last), device in zip(ranges, placement):
        index = (slice(None),) * axis + (slice(first, last),)
        pieces.append(backend.asarray(x[index], dtype, device))
    return pieces


def to_placement(backend, arrays: Sequence[Any], placement: Sequence[Hashable], dtype) -> List[Any]:
    """Put ``arrays[i]`` on ``placement[i]`` as ``dtype`` (no copy where it already is)."""
    return [backend.asarray(a, dtype, device) for a, device in zip(arrays, placement)]


def all_gather(backend, shards: Sequence[Any], axis: int, dst: Hashable) -> Any:
    """Concatenate ``shards`` along ``axis`` into one array on ``dst``.

    The output is allocated once on ``dst`` and each shard is written into its
    slice: a shard already on ``dst`` is copied straight in, a remote one is
    peer-copied first.
    """
    ndim = shards[0].ndim
    axis = axis % ndim
    sizes = [s.shape[axis] for s in shards]
    shape = list(shards[0].shape)
    shape[axis] = sum(sizes)
    out = backend.empty(tuple(shape), shards[0].dtype, dst)
    first = 0
    for shard, size in zip(shards, sizes):
        local = backend.to_device(shard, dst)
        index = (slice(None),) * axis + (slice(first, first + size),)
        with backend.device(dst):
            out[index] = local
        first += size
    return out


def _reduce(backend, partials: Sequence[Any], placement: Sequence[Hashable], dst: Hashable, ufunc: str) -> Any:
    """Combine ``partials`` elementwise with ``xp.<ufunc>`` into one new array on ``dst``.

    Partials that share a device are combined there first, so one array per
    device crosses to ``dst``. The partials are not modified.
    """
    combine = getattr(backend.xp, ufunc)
    per_device = []
    for device, workers in workers_by_device(placement).items():
        with backend.device(device):
            local = partials[workers[0]].copy()
            for w in workers[1:]:
                combine(local, partials[w], out=local)
        per_device.append(local)
    total = backend.to_device(per_device[0], dst)
    with backend.device(dst):
        for local in per_device[1:]:
            combine(total, backend.to_device(local, dst), out=total)
    return total


def reduce_sum(backend, partials: Sequence[Any], placement: Sequence[Hashable], dst: Hashable) -> Any:
    """``sum_i partials[i]`` (worker i's on ``placement[i]``) as a new array on ``dst``."""
    return _reduce(backend, partials, placement, dst, "add")


def reduce_max(backend, partials: Sequence[Any], placement: Sequence[Hashable], dst: Hashable) -> Any:
    """Elementwise ``max_i partials[i]`` as a new array on ``dst``."""
    return _reduce(backend, partials, placement, dst, "maximum")


def _replicate(backend, total: Any, placement: Sequence[Hashable]) -> List[Any]:
    copies = broadcast(backend, total, placement, total.dtype)
    return [copies[device] for device in placement]


def all_reduce_sum(backend, partials: Sequence[Any], placement: Sequence[Hashable]) -> List[Any]:
    """The sum of ``partials`` on every worker's device (workers sharing a device share it)."""
    return _replicate(backend, reduce_sum(backend, partials, placement, placement[0]), placement)


def all_reduce_max(backend, partials: Sequence[Any], placement: Sequence[Hashable]) -> List[Any]:
    """The elementwise max of ``partials`` on every worker's device."""
    return _replicate(backend, reduce_max(backend, partials, placement, placement[0]), placement)
