"""Collectives over per-worker shards: the only place arrays of different devices meet.

Every function takes the backend that owns the arrays. Moves go through
``backend.to_device`` / ``backend.asarray`` (peer copies on CuPy); arithmetic is
limited to sums, each run under the device its operands live on.

Shapes use ``p`` for the number of workers and ``d`` for the number of distinct
devices they are placed on (``d <= p``).
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Sequence, Tuple

from .partition import BlockLayout
from .placement import workers_by_device


def _along(axis: int, index: slice) -> Tuple[slice, ...]:
    return (slice(None),) * axis + (index,)

__all__ = [
    "broadcast",
    "scatter",
    "scatter_blocks",
    "gather_blocks",
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


def scatter_blocks(backend, x: Any, axis: int, layout: BlockLayout, dtype) -> Dict[Hashable, Any]:
    """Split ``x`` along ``axis`` into each device's block: its workers' slices, side by side.

    Only each block's slices cross to its device. A device whose workers own one
    consecutive range receives a single slice (with one device: ``x`` itself).
    """
    axis %= x.ndim
    blocks = {}
    for device in layout.groups:
        parts = [backend.asarray(x[_along(axis, s)], dtype, device) for s in layout.global_slices(device)]
        if len(parts) == 1:
            blocks[device] = parts[0]
        else:
            with backend.device(device):
                blocks[device] = backend.xp.concatenate(parts, axis=axis)
    return blocks


def gather_blocks(backend, blocks: Dict[Hashable, Any], axis: int, layout: BlockLayout, dst: Hashable, comm=None) -> Any:
    """The full array on ``dst`` from per-device ``blocks`` split along ``axis`` as ``layout`` says.

    Each block crosses to ``dst`` once. A single block that already is the whole
    span in order is used as it is (moved to ``dst`` if needed), without a
    copy; otherwise the output is allocated once on ``dst`` and every worker's
    slice is written into place. With a ``comm`` of several processes, the
    processes' spans are then all-gathered.
    """
    span = _gather_span(backend, blocks, axis, layout, dst)
    return span if comm is None or comm.size == 1 else comm.allgather(backend, span, axis)


def _gather_span(backend, blocks: Dict[Hashable, Any], axis: int, layout: BlockLayout, dst: Hashable) -> Any:
    first_device, first_block = next(iter(blocks.items()))
    axis %= first_block.ndim
    if len(blocks) == 1 and layout.is_whole(first_device):
        return backend.to_device(first_block, dst)
    shape = list(first_block.shape)
    shape[axis] = layout.size
    out = backend.empty(tuple(shape), first_block.dtype, dst)
    for device, block in blocks.items():
        local = backend.to_device(block, dst)
        with backend.device(dst):
            for w in layout.groups[device]:
                out[_along(axis, layout.span_slice(w))] = local[_along(axis, slice(*layout.local[w]))]
    return out


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
    """Combine ``partials`` elementwise with ``xp.<ufunc>`` into one array on ``dst``.

    Partials that share a device are combined there first, so one array per
    device crosses to ``dst``. The partials are consumed: the first partial of
    each device is the accumulator of that device (callers pass temporaries),
    and the result may be one of them.
    """
    combine = getattr(backend.xp, ufunc)
    per_device = {}
    for device, workers in workers_by_device(placement).items():
        local = partials[workers[0]]
        with backend.device(device):
            for w in workers[1:]:
                combine(local, partials[w], out=local)
        per_device[device] = local
    nccl = getattr(backend, "nccl", None)  # opt-in in-process NCCL on several GPUs (TP_GPU_NCCL=1)
    if nccl is not None and nccl.can_reduce(per_device, dst, ufunc):
        return nccl.reduce(per_device, dst, ufunc)
    per_device = list(per_device.values())
    total = backend.to_device(per_device[0], dst)
    with backend.device(dst):
        for local in per_device[1:]:
            combine(total, backend.to_device(local, dst), out=total)
    return total


def reduce_sum(backend, partials: Sequence[Any], placement: Sequence[Hashable], dst: Hashable, comm=None) -> Any:
    """``sum_i partials[i]`` (the i-th on ``placement[i]``) on ``dst``; consumes the partials.

    With a ``comm`` of several processes, each process's local sum is then
    all-reduced, so every process gets the global sum on its ``dst``.
    """
    total = _reduce(backend, partials, placement, dst, "add")
    return total if comm is None or comm.size == 1 else comm.allreduce(backend, total, "sum")


def reduce_max(backend, partials: Sequence[Any], placement: Sequence[Hashable], dst: Hashable, comm=None) -> Any:
    """Elementwise ``max_i partials[i]`` on ``dst``; consumes the partials (and all-reduces over ``comm``)."""
    total = _reduce(backend, partials, placement, dst, "maximum")
    return total if comm is None or comm.size == 1 else comm.allreduce(backend, total, "max")


def _replicate(backend, total: Any, placement: Sequence[Hashable]) -> List[Any]:
    copies = broadcast(backend, total, placement, total.dtype)
    return [copies[device] for device in placement]


def all_reduce_sum(backend, partials: Sequence[Any], placement: Sequence[Hashable], comm=None) -> List[Any]:
    """The sum of ``partials`` (over every process of ``comm``) on every worker's device."""
    return _replicate(backend, reduce_sum(backend, partials, placement, placement[0], comm), placement)


def all_reduce_max(backend, partials: Sequence[Any], placement: Sequence[Hashable], comm=None) -> List[Any]:
    """The elementwise max of ``partials`` (over every process of ``comm``) on every worker's device."""
    return _replicate(backend, reduce_max(backend, partials, placement, placement[0], comm), placement)
