"""The tape function of the vocab-parallel cross-entropy, in named steps (as Megatron-core's).

The logits ``Z`` ``(..., V)`` arrive split on the vocabulary (``Split(-1)``),
device ``d`` holding ``Z_d``. :class:`CrossEntropy` computes, per device and
with reductions of per-row numbers only (see :mod:`tp_gpu.layers.loss` for
the formulas):

1. :func:`prepare_shard`: ``Z_d`` in the accumulator dtype (padded columns at
   -inf) and its row maxima; :func:`~tp_gpu.collectives.all_reduce_max` gives ``m``;
2. :func:`shard_terms`: ``z = Z_d - m``, then ``exp(z)`` in place, its row sums
   (all-reduced: ``S``), the target's ``z_t`` and ``w_t`` and ``sum_j w_j z_j``
   (reduced onto the output device);
3. :func:`row_losses` on the output device, and the reduction (:func:`reduce_rows`).

The loss is a ``Dense`` tensor on the output device (the logits' first
device): 0-d for ``"mean"`` and ``"sum"``, ``targets.shape`` for ``"none"``.
Nothing is read back to the host. Backward (:func:`shard_grad`) turns the
saved ``exp(z)`` of each device into ``dZ_d`` in place: the only logits-sized
array each device keeps (none when nothing is recorded), and with
``inplace`` that array is the logits' own memory; without, it is the device's
buffer of a :class:`LogitsWorkspace`, kept from one call to the next, so a
step allocates (and page-faults) no fresh logits-sized array.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import collectives
from ..autograd import Context, Function
from ..collectives import Blocks
from ..device_checks import DeferredCheck, raise_pending, reading_checks
from ..placements import Dense
from ..reused_buffers import ReusedBuffers
from ..tensor import Tensor, new_tensor
from .gemm import as_rows

__all__ = [
    "CrossEntropy",
    "CrossEntropyOptions",
    "LogitsWorkspace",
    "ShardState",
    "RowLosses",
    "prepare_shard",
    "shard_terms",
    "row_losses",
    "reduce_rows",
    "shard_grad",
    "subtract_at_targets",
    "matmul_vector",
]


@dataclass(frozen=True)
class CrossEntropyOptions:
    """The settings of one loss call (see :class:`~tp_gpu.VocabParallelCrossEntropy`)."""

    ignore_index: int
    label_smoothing: float
    reduction: str
    inplace: bool
    class_weight: Optional[np.ndarray]

    def total_weight(self, vocab: int) -> float:
        """``W = sum_j w_j`` (``V`` without class weights)."""
        return float(vocab) if self.class_weight is None else float(self.class_weight.sum())


class LogitsWorkspace(ReusedBuffers):
    """One logits-sized buffer per device, reused by the kept-logits loss from one call to the next.

    Only a recorded call uses it (outside the tape the array lives during the call only).
    :meth:`take` gives device ``d`` its buffer of the logits' shape in the accumulator dtype
    (float32 for float16 logits): the kept one when its shape, dtype and device match and nothing
    else holds it, a new kept one when they do not match, and a fresh one, not kept, while the
    kept one is still in use (:class:`~tp_gpu.reused_buffers.ReusedBuffers`). An earlier loss still
    alive on the tape (two forwards before one backward), or its ``dZ`` (which is written into the
    buffer) still held, as a leaf's ``.grad`` or any view, keeps it busy, so a live graph never
    shares its buffer. Holding it costs one logits-sized array per device between steps;
    :meth:`clear` drops them. Copies (``copy.deepcopy``, pickling) start empty.
    """

    __slots__ = ()


class ShardState:
    """One device's part of the loss: its shifted logits (then ``exp``), weights, targets and row sums."""

    __slots__ = ("z", "writable", "out", "w", "mask", "owned", "local", "row_max", "sum", "z_t", "w_t", "wz")

    def __init__(
        self, z: Any, writable: bool, out: Any, w: Any, mask: Any, owned: Any, local: Any, row_max: Any
    ) -> None:
        self.z = z  # (..., V_d): the logits (or a copy), shifted and then exp(z) in place by shard_terms
        self.writable = writable  # whether z may be written (a copy, or the logits with inplace)
        self.out = out  # (..., V_d) in acc: where shard_terms shifts read-only z (None: a new array)
        self.w = w  # (V_d,) class weights, or None
        self.mask = mask  # (V_d,) True on logical columns, or None without padding
        self.owned = owned  # (...) whether this device holds the row's target
        self.local = local  # (...) the target's column here (0 where not owned)
        self.row_max = row_max  # (...) max_j Z_d, in the accumulator dtype
        self.sum: Any = None  # (...) sum_j exp(z_j) over this device's columns
        self.z_t: Any = None  # (...) the target's z where owned, else 0
        self.w_t: Any = None  # (...) the target's class weight where owned, else 0 (None: no weights)
        self.wz: Any = None  # (...) sum_j w_j z_j (label smoothing only)


class RowLosses:
    """Per row, on the output device: the loss, whether the row counts, and its weight ``w_t``."""

    __slots__ = ("loss", "valid", "w_t", "denominator")

    def __init__(self, loss: Any, valid: Any, w_t: Any, denominator: Any) -> None:
        self.loss, self.valid, self.w_t, self.denominator = loss, valid, w_t, denominator


class _CrossEntropyContext(Context):
    __slots__ = ("options", "shards", "sums", "rows", "acc", "out", "logits", "check")
    options: CrossEntropyOptions
    shards: Dict[Hashable, ShardState]  # per device: exp(z) (backward turns it into dZ), targets, weights
    sums: Blocks  # per device: S, the all-reduced row sums of exp(z)
    rows: RowLosses  # on the output device: valid, w_t, the mean's denominator
    acc: np.dtype  # the accumulator dtype
    out: Hashable  # the output device (the logits' first)
    logits: Tensor  # the logits' placement, shape and dtype (no blocks)
    check: Optional[DeferredCheck]  # the pending range check of targets that live on a device


class CrossEntropy(Function):
    """``loss(Z, t)`` for logits ``Z`` split on the vocabulary: a ``Dense`` loss on the output device.

    ``targets`` are int64 blocks on every device of the logits; ``check`` the
    pending range check of device-resident targets (read at the start of backward).
    Backward: ``dZ`` split like the logits, in their dtype.
    """

    ctx_class = _CrossEntropyContext

    @staticmethod
    def forward(
        ctx: _CrossEntropyContext,
        logits: Tensor,
        targets: Blocks,
        options: CrossEntropyOptions,
        check: Optional[DeferredCheck],
        workspace: Optional[LogitsWorkspace] = None,
    ) -> Tensor:
        backend, comm = logits.backend, logits.comm
        assert backend is not None
        xp, vocab = backend.xp, logits.shape[-1]
        acc = np.promote_types(logits.dtype, np.float32)
        layout = logits.placement.layout  # type: ignore[attr-defined]
        weights = None
        if options.class_weight is not None:
            weights = collectives.scatter_blocks(backend, options.class_weight, 0, layout, acc)
        shards: Dict[Hashable, ShardState] = {}
        for d, block in logits.blocks.items():
            with backend.device(d):
                w = None if weights is None else weights[d]
                out = None
                if (
                    workspace is not None
                    and ctx.needs_input_grad
                    and not (options.inplace and block.dtype == acc)
                ):
                    out = workspace.take(backend, d, block.shape, acc)  # kept for backward: the kept buffer
                shards[d] = prepare_shard(xp, layout, acc, options.inplace, block, targets[d], d, w, out)
        row_max = collectives.all_reduce_max(backend, {d: s.row_max for d, s in shards.items()}, comm)
        for d, s in shards.items():
            with backend.device(d):
                shard_terms(xp, options.label_smoothing, s, row_max[d])
        out = next(iter(shards))
        sums = collectives.all_reduce_sum(backend, {d: s.sum for d, s in shards.items()}, comm)

        def reduced(name: str) -> Any:
            parts = {d: getattr(s, name) for d, s in shards.items()}
            if parts[out] is None:
                return None
            return collectives.reduce_sum(backend, parts, out, comm)

        z_t, w_t, wz = reduced("z_t"), reduced("w_t"), reduced("wz")
        with backend.device(out):
            rows = row_losses(xp, options, vocab, acc, z_t, w_t, wz, sums[out], targets[out])
            value = reduce_rows(xp, options.reduction, rows)
        if ctx.needs_input_grad:
            for s in shards.values():
                s.row_max = s.sum = s.z_t = s.w_t = s.wz = None  # row vectors backward does not read
            ctx.options, ctx.shards, ctx.sums, ctx.rows = options, shards, sums, rows
            ctx.acc, ctx.out, ctx.check = acc, out, check
            ctx.logits = Tensor({}, logits.placement, logits.shape, logits.dtype, backend, comm)  # no blocks
        loss = new_tensor({out: value}, Dense(out), tuple(value.shape), acc, backend, comm)
        return reading_checks(loss, () if check is None else (check,))

    @staticmethod
    def backward(ctx: _CrossEntropyContext, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None, None]:
        raise_pending()  # targets (and ids) checked on a device: a bad one raises here, before any dZ
        if ctx.check is not None:
            ctx.check.verify()
        logits, options, rows, out, acc = ctx.logits, ctx.options, ctx.rows, ctx.out, ctx.acc
        backend = logits.backend
        assert backend is not None
        xp = backend.xp
        g = collectives.to_device(
            backend, next(iter(grad.blocks.values())), out, acc
        )  # () or (...) on the output device
        with backend.device(out):
            if options.reduction == "mean":
                nonzero = rows.denominator != 0
                g = xp.where(nonzero, g / xp.where(nonzero, rows.denominator, 1), 0)
            scale = xp.where(rows.valid, g, acc.type(0))  # (...): zero for ignored rows
        devices = list(ctx.shards)
        scales = collectives.broadcast(backend, scale, devices, acc)
        w_ts = collectives.broadcast(backend, rows.w_t, devices, acc)
        vocab, total_weight = logits.shape[-1], options.total_weight(logits.shape[-1])
        grads = {}
        for d, s in ctx.shards.items():
            with backend.device(d):
                grads[d] = shard_grad(
                    xp, options.label_smoothing, vocab, total_weight, logits.dtype, s, ctx.sums[d],
                    scales[d], w_ts[d],
                )  # fmt: skip
        dz = new_tensor(grads, logits.placement, logits.shape, logits.dtype, backend, logits.comm)
        return dz, None, None, None, None


def prepare_shard(
    xp: Any,
    layout: Any,
    acc: Any,
    inplace: bool,
    block: Any,
    t: Any,
    device: Hashable,
    w: Any,
    out: Any = None,
) -> ShardState:
    """One device's state: ``z`` (its logits, or with padding a copy in ``acc``, written into ``out``
    when given; padded columns at -inf) and whether it is ``writable`` (a copy, or the logits with
    ``inplace``), its class weights ``w``, padding ``mask``, the row ``max`` (in ``acc``) and, for
    each row, whether it ``owned`` the target and where (``local``). Without ``inplace`` the
    caller's logits are only read; ``out`` (a buffer of ``block``'s shape in ``acc``, or None for a
    new array) receives the copy that the forward shifts and exponentiates."""
    mask = layout.logical_mask(xp, device)
    z, writable = block, inplace and block.dtype == acc
    if mask is not None:
        if not writable:
            if out is None:
                z = block.astype(acc)  # the forward shifts it in place
            else:
                xp.copyto(out, block)  # the same values, in the kept buffer
                z = out
            writable, out = True, None
        xp.copyto(z, -np.inf, where=~mask)  # padded columns: no probability
    owned, local = layout.owned_local(xp, t, device)
    if owned is None:  # this device holds the whole vocabulary: only ignored (or bad) rows are not owned
        owned = (t >= 0) & (t < layout.total)
        local = xp.where(owned, t, 0)
    if z.shape[-1]:
        row_max = z.max(axis=-1).astype(acc, copy=False)
    else:
        row_max = xp.full(z.shape[:-1], -np.inf, dtype=acc)
    return ShardState(z, writable, out, w, mask, owned, local, row_max)


def shard_terms(xp: Any, eps: float, s: ShardState, m: Any) -> None:
    """On one device: ``z = Z_d - m`` (in place where ``z`` may be written, else one pass into the
    device's one logits-sized array: ``s.out``, or a new one), then ``z`` becomes ``exp(z)`` in
    place; the row sums of it, and the target's ``z_t`` and ``w_t`` where this device owns the
    target, and ``sum_j w_j z_j``."""
    z, w, owned, local = s.z, s.w, s.owned, s.local
    if s.writable:
        z -= m[..., None]  # a masked copy, or the logits themselves (inplace)
    else:
        if s.out is None:
            z = xp.subtract(z, m[..., None], dtype=m.dtype)  # the caller's logits, shifted into a new array
        else:
            z = xp.subtract(z, m[..., None], out=s.out, dtype=m.dtype)  # ... into the kept buffer
        s.out = None
    if z.shape[-1]:
        s.z_t = xp.where(owned, xp.take_along_axis(z, local[..., None], axis=-1)[..., 0], 0)
        s.w_t = None if w is None else xp.where(owned, xp.take(w, local), 0)
    else:
        s.z_t = xp.zeros(z.shape[:-1], dtype=z.dtype)
        s.w_t = None if w is None else xp.zeros(z.shape[:-1], dtype=z.dtype)
    if eps:
        finite = z if s.mask is None else xp.where(s.mask, z, 0)
        s.wz = finite.sum(axis=-1) if w is None else matmul_vector(finite, w)  # (..., V_d) @ (V_d,) -> (...)
    xp.exp(z, out=z)
    s.z, s.sum = z, z.sum(axis=-1)


def row_losses(
    xp: Any,
    options: CrossEntropyOptions,
    vocab: int,
    acc: Any,
    z_t: Any,
    w_t: Any,
    wz: Any,
    sums: Any,
    targets: Any,
) -> RowLosses:
    """Per row on the output device: ``loss``, ``valid``, ``w_t`` (ones without weights)."""
    log_sum = xp.log(sums)
    valid = targets != options.ignore_index
    w_t = xp.ones(sums.shape, dtype=acc) if w_t is None else w_t
    w_t = xp.where(valid, w_t, 0)
    eps = options.label_smoothing
    loss = (1.0 - eps) * w_t * (log_sum - z_t)  # -w_t log softmax(Z)_t
    if eps:
        loss += (eps / vocab) * (options.total_weight(vocab) * log_sum - wz)
    loss = xp.where(valid, loss, 0)
    return RowLosses(loss, valid, w_t, w_t.sum(keepdims=True).reshape(()))


def reduce_rows(xp: Any, reduction: str, rows: RowLosses) -> Any:
    """The loss on the output device: the rows (``"none"``), their sum, or their weighted mean
    ``sum / sum(w_t)`` (NaN when every row is ignored, as in PyTorch)."""
    if reduction == "none":
        return rows.loss
    total = rows.loss.sum(keepdims=True).reshape(())  # a 0-d array, not a host scalar
    if reduction == "sum":
        return total
    nonzero = rows.denominator != 0
    return xp.where(nonzero, total / xp.where(nonzero, rows.denominator, 1), np.nan).astype(total.dtype)


def shard_grad(
    xp: Any,
    eps: float,
    vocab: int,
    total_weight: float,
    dtype: Any,
    s: ShardState,
    sums: Any,
    scale: Any,
    w_t: Any,
) -> Any:
    """``dZ_d``, in place on the saved exps (see :mod:`tp_gpu.layers.loss` for the formula): one pass
    that scales each row by its factor, the targets' entries, and (with label smoothing) two more."""
    g = s.z
    factor = ((1.0 - eps) * w_t + eps * total_weight / vocab) / sums  # softmax over the global vocabulary
    hit = (1.0 - eps) * w_t
    if not eps:  # the row's scale folds into the same pass
        factor *= scale
        hit *= scale
    g *= factor.astype(g.dtype, copy=False)[..., None]
    if g.shape[-1]:
        subtract_at_targets(xp, g, s.local, hit * s.owned)  # only at each row's target
    if eps:
        spread = s.w if s.w is not None else s.mask
        g -= (eps / vocab) * (1.0 if spread is None else spread)
        g *= scale[..., None]
    return g.astype(dtype, copy=False)


def subtract_at_targets(xp: Any, g: Any, local: Any, hit: Any) -> None:
    """``g[r, local[r]] -= hit[r]`` for every row ``r`` of ``g`` ``(..., V_d)``, written into ``g`` itself.

    ``local`` and ``hit`` have ``g``'s leading shape ``(...)``. The rows are indexed with an open
    mesh over the leading axes (``ix_``), not through a 2-D reshape: reshaping a strided ``g``
    (logits built from ``moveaxis`` views, or written in place with ``inplace=True``) makes a
    copy, and the subtraction would land in that copy. Each row is hit once, so ``-=`` is exact.
    """
    rows = xp.ix_(*(xp.arange(n) for n in g.shape[:-1]))  # broadcasts to (...): one index per row
    g[rows + (local,)] -= hit.astype(g.dtype, copy=False)  # (...) entries, one per row


def matmul_vector(x: Any, v: Any) -> Any:
    """``x @ v`` over the last axis: (..., n) @ (n,) -> (...)."""
    return (as_rows(x) @ v).reshape(x.shape[:-1])  # (N, n) @ (n,) -> (N,)
