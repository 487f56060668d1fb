"""Collectives over per-device blocks: with the backends, the only code where arrays change device.

Every function takes the backend that owns the arrays. Moves go through
``backend.to_device`` / ``backend.asarray`` (peer copies on CuPy); arithmetic
is limited to sums and maxima, each run under the device its operands live on.
A collective works within the process first (one array per device), then
across processes through the communicator ``comm`` when there are several.

A *block* dict maps each device to one array: the slices of every worker
placed on that device, side by side (see :class:`~tp_gpu.partition.BlockLayout`).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from .backends.base import Backend, Blocks
from .backends.numpy_backend import CPU, NumpyBackend
from .comm.base import Communicator
from .comm.reduction import InProcessNcclReduction, PeerCopyReduction, Reduction
from .errors import ConfigError
from .partition import BlockLayout

__all__ = [
    "Blocks",
    "InProcessNcclReduction",
    "PeerCopyReduction",
    "Reduction",
    "all_gather_blocks",
    "all_reduce_max",
    "all_reduce_host_scalar",
    "all_reduce_sum",
    "assemble_blocks",
    "broadcast",
    "default_reduction",
    "gather_blocks",
    "gather_to_host",
    "on_devices",
    "reduce_max",
    "reduce_scatter_blocks",
    "reduce_sum",
    "scatter_blocks",
    "to_devices",
    "to_host",
]

_HOST = NumpyBackend()  # host arrays, and the host side of checkpoints, travel as NumPy


def _along(axis: int, index: slice) -> tuple[slice, ...]:
    return (slice(None),) * axis + (index,)


_reductions: weakref.WeakKeyDictionary[Backend, Reduction] = weakref.WeakKeyDictionary()


def default_reduction(backend: Backend) -> Reduction:
    """The reduction strategy of ``backend``: in-process NCCL when asked for and possible, else
    peer copies."""
    key = backend
    if key not in _reductions:
        strategy: Reduction = PeerCopyReduction()
        if backend.name == "cupy" and os.environ.get("TP_GPU_NCCL") == "1" and len(backend.devices) > 1:
            from .comm.nccl_local import maybe_in_process_nccl

            nccl = maybe_in_process_nccl(backend.xp, backend.devices)
            if nccl is not None:
                strategy = InProcessNcclReduction(nccl)
        _reductions[key] = strategy
    return _reductions[key]


def on_devices(
    backend: Backend, fn: Callable[..., Any], *blocks: Blocks, keys: Iterable[Hashable] | None = None
) -> Blocks:
    """``{d: fn(blocks[0][d], blocks[1][d], ...)}`` for each device ``d`` of ``keys`` (default: the
    devices of ``blocks[0]``), each call under its device, where its operands already live.

    This is the one loop over devices that compute code uses; it moves nothing.
    """
    out = {}
    for device in blocks[0] if keys is None else keys:
        with backend.device(device):
            out[device] = fn(*(b[device] for b in blocks))
    return out


def broadcast(backend: Backend, x: Any, devices: Sequence[Hashable], dtype: Any) -> Blocks:
    """Copy ``x`` (host or any device) as ``dtype`` onto each distinct device, once per device."""
    return {device: backend.asarray(x, dtype, device) for device in dict.fromkeys(devices)}


def to_devices(backend: Backend, arrays: Sequence[Any], devices: Sequence[Hashable], dtype: Any) -> list[Any]:
    """``arrays[i]`` on ``devices[i]`` as ``dtype`` (no copy where it already is)."""
    return [backend.asarray(a, dtype, device) for a, device in zip(arrays, devices)]


def to_device(backend: Backend, x: Any, device: Hashable, dtype: Any) -> Any:
    """``x`` (host or any device) as a ``dtype`` array on ``device`` (itself when it already is one)."""
    return backend.asarray(x, dtype, device)


def to_host(backend: Backend, x: Any) -> np.ndarray:
    """``x`` as a host NumPy array (a device-to-host copy; on a GPU it waits for ``x``)."""
    return backend.to_host(x)


def scatter_blocks(backend: Backend, x: Any, axis: int, layout: BlockLayout, dtype: Any) -> Blocks:
    """Split ``x`` along ``axis`` into each device's block: its workers' slices, side by side.

    Only each block's slices cross to its device. A device whose workers own one
    consecutive range receives a single slice (with one device: ``x`` itself).
    """
    axis %= x.ndim
    if layout.padded:
        return assemble_blocks(
            backend, [x[_along(axis, slice(*r))] for r in layout.ranges], axis, layout, dtype
        )
    blocks = {}
    for device in layout.groups:
        parts = [backend.asarray(x[_along(axis, s)], dtype, device) for s in layout.global_slices(device)]
        if len(parts) == 1:
            blocks[device] = parts[0]
        else:
            with backend.device(device):
                blocks[device] = backend.xp.concatenate(parts, axis=axis)
    return blocks


def assemble_blocks(
    backend: Backend, pieces: Sequence[Any], axis: int, layout: BlockLayout, dtype: Any
) -> Blocks:
    """Each device's block built from per-worker ``pieces`` (worker ``w``'s slice along ``axis``,
    anywhere), with zeros on the padding of a padded layout. Each piece crosses to its device once."""
    blocks = {}
    for device, workers in layout.groups.items():
        moved = [backend.asarray(pieces[w], dtype, device) for w in workers]
        shape = list(moved[0].shape)
        shape[axis] = layout.block_lengths[device]
        with backend.device(device):
            block = backend.xp.zeros(tuple(shape), dtype=dtype)
            for w, piece in zip(workers, moved):
                block[_along(axis, slice(*layout.local[w]))] = piece
        blocks[device] = block
    return blocks


def gather_blocks(
    backend: Backend,
    blocks: Blocks,
    axis: int,
    layout: BlockLayout,
    dst: Hashable,
    comm: Communicator | None = None,
) -> Any:
    """The full array on ``dst`` from per-device ``blocks`` split along ``axis`` as ``layout`` says.

    Each block crosses to ``dst`` once. A single block that already is the whole
    span in order is used as it is (moved to ``dst`` if needed), without a
    copy; otherwise the output is allocated once on ``dst`` and every worker's
    slice is written into place. With a ``comm`` of several processes, the
    processes' spans (of any lengths, ``layout.spans``) are then all-gathered.
    """
    span = _gather_span(backend, blocks, axis, layout, dst)
    if comm is None or comm.size == 1:
        return span
    return _all_gather_spans(backend, span, axis, [last - first for first, last in layout.spans], comm)


def gather_to_host(
    backend: Backend, blocks: Blocks, axis: int, layout: BlockLayout, comm: Communicator | None = None
) -> np.ndarray:
    """The full array as a new host NumPy array, from per-device ``blocks`` laid out as ``layout``.

    With a ``comm`` of several processes this is collective: the spans are all-gathered on the host.
    """
    host = {device: np.array(backend.to_host(block)) for device, block in blocks.items()}
    span = np.array(_gather_span(_HOST, host, axis, layout, CPU))
    if comm is None or comm.size == 1:
        return span
    return _all_gather_spans(_HOST, span, axis, [last - first for first, last in layout.spans], comm)


def _gather_span(backend: Backend, blocks: Blocks, axis: int, layout: BlockLayout, dst: Hashable) -> Any:
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


def _all_gather_spans(
    backend: Backend, span: Any, axis: int, sizes: Sequence[int], comm: Communicator
) -> Any:
    """Every process's ``span`` (lengths ``sizes`` along ``axis``) concatenated in rank order.

    Communicators gather equal pieces, so each span is padded to the longest
    first and the padding is cut off after.
    """
    axis %= span.ndim
    longest = max(sizes)
    xp = backend.xp
    device = backend.device_of(span)
    if span.shape[axis] < longest:
        pad = [(0, 0)] * span.ndim
        pad[axis] = (0, longest - span.shape[axis])
        if device in backend.devices:
            with backend.device(device):
                span = xp.pad(span, pad)
        else:
            span = np.pad(span, pad)
    gathered = comm.all_gather(backend, span, axis)
    if all(size == longest for size in sizes):
        return gathered
    pieces = [gathered[_along(axis, slice(r * longest, r * longest + n))] for r, n in enumerate(sizes)]
    if backend.device_of(gathered) not in backend.devices:  # a host array
        return np.concatenate(pieces, axis=axis)
    with backend.device(backend.device_of(gathered)):
        return xp.concatenate(pieces, axis=axis)


def _reduce(
    backend: Backend, partials: Blocks, dst: Hashable, ufunc: str, reduction: Reduction | None
) -> Any:
    """Combine one array per device (``partials``) with ``xp.<ufunc>`` into one array on ``dst``."""
    strategy = default_reduction(backend) if reduction is None else reduction
    if len(partials) == 1:
        return backend.to_device(next(iter(partials.values())), dst)
    return strategy.combine(backend, partials, dst, ufunc)


def reduce_sum(
    backend: Backend,
    partials: Blocks,
    dst: Hashable,
    comm: Communicator | None = None,
    reduction: Reduction | None = None,
) -> Any:
    """``sum_d partials[d]`` on ``dst``; consumes the partials (one may become the result).

    With a ``comm`` of several processes, each process's local sum is then
    all-reduced, so every process gets the global sum on its ``dst``.
    """
    total = _reduce(backend, partials, dst, "add", reduction)
    return total if comm is None or comm.size == 1 else comm.all_reduce(backend, total, "sum")


def reduce_max(
    backend: Backend,
    partials: Blocks,
    dst: Hashable,
    comm: Communicator | None = None,
    reduction: Reduction | None = None,
) -> Any:
    """Elementwise ``max_d partials[d]`` on ``dst``; consumes the partials (and all-reduces over ``comm``)."""
    total = _reduce(backend, partials, dst, "maximum", reduction)
    return total if comm is None or comm.size == 1 else comm.all_reduce(backend, total, "max")


def all_reduce_host_scalar(comm: Communicator | None, value: float, op: str = "sum") -> float:
    """``op`` ("sum" or "max") of one host number over every process of ``comm``."""
    if comm is None or comm.size == 1:
        return value
    return float(comm.all_reduce(_HOST, np.array([value], dtype=np.float64), op)[0])


def failed_rank(comm: Communicator | None, failure: BaseException | None) -> int | None:
    """The highest rank whose ``failure`` is not None, or None when no rank failed: how the ranks agree
    that an operation failed somewhere (one host all-reduce with several processes)."""
    rank = 0 if comm is None else comm.rank
    worst = int(all_reduce_host_scalar(comm, -1.0 if failure is None else float(rank), "max"))
    return None if worst < 0 else worst


def all_reduce_sum(backend: Backend, partials: Blocks, comm: Communicator | None = None) -> Blocks:
    """The sum of ``partials`` (over every process of ``comm``) on every device of ``partials``."""
    devices = list(partials)
    total = reduce_sum(backend, partials, devices[0], comm)
    return broadcast(backend, total, devices, total.dtype)


def all_reduce_max(backend: Backend, partials: Blocks, comm: Communicator | None = None) -> Blocks:
    """The elementwise max of ``partials`` (over every process of ``comm``) on every device of
    ``partials``."""
    devices = list(partials)
    total = reduce_max(backend, partials, devices[0], comm)
    return broadcast(backend, total, devices, total.dtype)


# ---------------------------------------------------------------------- sequence parallelism


def all_gather_blocks(
    backend: Backend, blocks: Blocks, axis: int, layout: BlockLayout, comm: Communicator | None = None
) -> Blocks:
    """The whole array ``concat_w X_w`` (every process's span, in order) on every device of ``blocks``.

    ``blocks`` holds one block per device, split along ``axis`` as ``layout``
    says. Within a process each device receives every other device's block
    once, straight from it, and writes each worker's slice into place: with
    ``d`` equal blocks, ``(d - 1) / d`` of the whole array reaches each device.
    A single block that already is the whole is returned as it is. With a
    ``comm`` of several processes, the process's span is assembled on its first
    device, the spans (of any lengths) are all-gathered over the processes, and
    the whole is copied to the process's other devices.
    """
    if comm is None or comm.size == 1:
        return {dst: _gather_span(backend, blocks, axis, layout, dst) for dst in blocks}
    devices = list(blocks)
    span = _gather_span(backend, blocks, axis, layout, devices[0])
    whole = _all_gather_spans(backend, span, axis, [last - first for first, last in layout.spans], comm)
    return {device: backend.to_device(whole, device) for device in devices}


def reduce_scatter_blocks(
    backend: Backend, partials: Blocks, axis: int, layout: BlockLayout, comm: Communicator | None = None
) -> Blocks:
    """Each device's block of ``Y = sum_d partials[d]`` (summed over every process of ``comm`` too).

    ``partials`` holds one whole array per device (``layout.total`` long on
    ``axis``); the result is split along ``axis`` as ``layout`` says (no
    padding), each block a new array. Within a process device ``d`` keeps
    ``Y[d's slices] = sum_e partials[e][d's slices]``: it receives from each
    other device only those slices, one copy per pair, so with ``d`` equal
    blocks ``(d - 1) / d`` of a whole array reaches each device. With several
    processes the local partials are first summed on the first device,
    ``comm.reduce_scatter`` leaves this process its span of the global sum,
    and the span is split into the device blocks. Consumes the partials (they
    may be summed into in place).
    """
    if layout.padded:
        raise ConfigError(f"reduce_scatter_blocks needs a layout without padding, got {layout!r}")
    axis %= next(iter(partials.values())).ndim
    if comm is not None and comm.size > 1:
        first = next(iter(partials))
        total = _reduce(backend, partials, first, "add", None)  # (..., total, ...) on the first device
        span = comm.reduce_scatter(backend, total, axis, [last - first for first, last in layout.spans])
        return {
            dst: backend.to_device(
                _slices_of(backend, span, axis, layout, dst, first, layout.start, copy=dst == first), dst
            )
            for dst in layout.groups
        }
    blocks = {}
    for dst in layout.groups:
        if len(partials) == 1 and layout.is_whole(dst):
            blocks[dst] = partials[dst]
            continue
        block = _slices_of(backend, partials[dst], axis, layout, dst, dst, copy=True)
        for src, partial in partials.items():
            if src != dst:
                piece = backend.to_device(_slices_of(backend, partial, axis, layout, dst, src), dst)
                with backend.device(dst):
                    block += piece
        blocks[dst] = block
    return blocks


def _slices_of(
    backend: Backend,
    array: Any,
    axis: int,
    layout: BlockLayout,
    owner: Hashable,
    where: Hashable,
    offset: int = 0,
    copy: bool = False,
) -> Any:
    """``owner``'s slices of ``array`` (which lies on ``where`` and starts at global index ``offset``
    along ``axis``), side by side as in ``owner``'s block: a view for one slice (a copy with
    ``copy``), else a new array on ``where``."""
    slices = [slice(s.start - offset, s.stop - offset) for s in layout.global_slices(owner)]
    if len(slices) == 1 and not copy:
        return array[_along(axis, slices[0])]
    with backend.device(where):
        return backend.xp.concatenate([array[_along(axis, s)] for s in slices], axis=axis)
