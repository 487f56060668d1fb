"""Grouped-query attention over each device's heads, with an optional key-value cache, as a tape function.

For query head ``h`` reading key-value head ``j = h // g`` (see
:mod:`.head_plan`), with ``q`` already scaled by ``1 / sqrt(head_dim)``::

    P_h = softmax(q_h K_j^T + M)      # (B, S, L)
    C_h = P_h V_j                     # (B, S, head_dim)

``M`` is the additive mask (causal, padding), ``L`` the number of keys: ``S``
without a cache; with one, the ``start`` keys cached before plus the ``S`` of
this call, which are written into the cache first (slots ``start .. start +
S - 1``). The ``r`` query heads that read one key-value head are stacked into
one product, ``(B, r S, hd) @ (B, hd, L)``, so the keys are never copied per
query head (transformers' ``repeat_kv`` copies them).

Backward (without a cache), per key-value head, with ``dC`` the context
gradient of its ``r`` query heads stacked alike::

    dV_j = P^T dC;  dP = dC V_j^T;  dZ = P * (dP - rowsum(dP * P))
    dq = dZ K_j / sqrt(head_dim);  dK_j = dZ^T q

so ``dK_j`` and ``dV_j`` sum over the query heads that read head ``j``.
Scores and softmax run in float32 for float16, else in the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Tuple

import numpy as np

from ..autograd import Context, Function
from ..placements import Partial, Split
from ..tensor import Tensor, new_tensor
from .gemm import product
from .head_plan import DeviceHeads, HeadPlan
from .norm import compute_dtype

__all__ = ["GroupedAttention", "LayerCache", "Run"]

#: Query heads ``[first, first + count)`` of a block reading key-value heads ``[kv_first, kv_first + n)``,
#: ``count / n`` query heads each: ``(kv_first, n, first, count)``.
Run = Tuple[int, int, int, int]


@dataclass
class LayerCache:
    """One layer's cached keys and values: ``{device: (B, n_kv_d, capacity, head_dim)}`` each."""

    keys: Dict[Hashable, Any]
    values: Dict[Hashable, Any]


def runs_of(heads: DeviceHeads) -> List[Run]:
    """One run for the whole block when every key-value head has the same number of query heads in
    order (always so when the heads are split), else one run per key-value head."""
    if heads.uniform is not None:
        return [(0, len(heads.kv), 0, len(heads.query))]
    return [(k, 1, first, count) for k, first, count in heads.groups]


#: What backward needs of one device: per run ``(q, k, v, probs)``, q scaled, all ``(B, n, rows, hd)``
#: and ``(B, n, rows, L)``.
Saved = List[Tuple[Any, Any, Any, Any]]


class _GroupedContext(Context):
    __slots__ = ("saved", "plan", "q_placement", "q_shape", "kv_placement", "kv_shape")

    saved: Dict[Hashable, Saved]
    plan: HeadPlan
    q_placement: Any
    q_shape: Tuple[int, ...]
    kv_placement: Any
    kv_shape: Tuple[int, ...]


class GroupedAttention(Function):
    """The context ``(B, S, n_heads * hd)``, split like ``q``, of grouped-query attention on each device.

    ``forward(ctx, q, k, v, plan, masks, cache, start)``: ``q`` split by
    ``plan.q_layout``; ``k`` and ``v`` split by ``plan.kv_layout``, or
    Replicated (every key-value head on every device) when the plan
    replicates them; ``masks`` the additive mask of each device (or None);
    ``cache`` a :class:`LayerCache` (inference only) and ``start`` the number
    of positions it holds already.
    """

    ctx_class = _GroupedContext

    @staticmethod
    def forward(
        ctx: _GroupedContext,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        plan: HeadPlan,
        masks: Dict[Hashable, Any],
        cache: Optional[LayerCache],
        start: int,
    ) -> Tensor:
        backend = q.backend
        assert backend is not None
        keep = bool(ctx.needs_input_grad)
        contexts, saved = {}, {}
        for d, qb in q.blocks.items():
            heads = plan.devices[d]
            with backend.device(d):
                kh = _heads(k.blocks[d], plan.head_dim, heads.select)  # (B, n_kv_d, S, hd)
                vh = _heads(v.blocks[d], plan.head_dim, heads.select)  # (B, n_kv_d, S, hd)
                if cache is not None:
                    kh, vh = _append(cache.keys[d], cache.values[d], kh, vh, start)  # (B, n_kv_d, L, hd)
                mask = masks.get(d)
                contexts[d], saved[d] = _attend(backend.xp, qb, kh, vh, mask, heads, plan.head_dim, keep)
        if keep:
            ctx.saved, ctx.plan = saved, plan
            ctx.q_placement, ctx.q_shape = q.placement, q.shape
            ctx.kv_placement, ctx.kv_shape = k.placement, k.shape
        return new_tensor(contexts, q.placement, q.shape, q.dtype, backend, q.comm)

    @staticmethod
    def backward(ctx: _GroupedContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        backend = grad.backend
        assert backend is not None
        plan = ctx.plan
        dq, dk, dv = {}, {}, {}
        for d, g in grad.blocks.items():
            heads = plan.devices[d]
            with backend.device(d):
                dq[d], dkh, dvh = _attend_backward(backend.xp, g, ctx.saved[d], heads, plan.head_dim)
                width = ctx.kv_shape[-1] if heads.select is not None else len(heads.kv) * plan.head_dim
                dk[d] = _unheads(backend.xp, dkh, heads.select, plan.head_dim, width)  # (B, S, width)
                dv[d] = _unheads(backend.xp, dvh, heads.select, plan.head_dim, width)
        kv_grad = ctx.kv_placement if isinstance(ctx.kv_placement, Split) else Partial(tuple(dk))
        dtype, comm = grad.dtype, grad.comm
        return (
            new_tensor(dq, ctx.q_placement, ctx.q_shape, dtype, backend, comm),
            new_tensor(dk, kv_grad, ctx.kv_shape, dtype, backend, comm),
            new_tensor(dv, kv_grad, ctx.kv_shape, dtype, backend, comm),
            None,
            None,
            None,
            None,
        )


def _heads(block: Any, head_dim: int, select: Optional[Tuple[int, ...]]) -> Any:
    """``(B, S, n * hd)`` as ``(B, n, S, hd)``, keeping only the heads ``select`` when given."""
    batch, seq, width = block.shape
    h = block.reshape(batch, seq, width // head_dim, head_dim)  # (B, S, n, hd)
    if select is not None and list(select) != list(range(width // head_dim)):
        h = h[:, :, list(select)]  # (B, S, n_kv_d, hd)
    return h.transpose(0, 2, 1, 3)  # (B, n, S, hd)


def _unheads(xp: Any, h: Any, select: Optional[Tuple[int, ...]], head_dim: int, width: int) -> Any:
    """The inverse of :func:`_heads`: ``(B, n, S, hd)`` as ``(B, S, width)``, zero on unselected heads."""
    batch, n, seq, _ = h.shape
    rows = h.transpose(0, 2, 1, 3)  # (B, S, n, hd)
    if select is None or list(select) == list(range(width // head_dim)):
        return rows.reshape(batch, seq, n * head_dim)  # (B, S, n * hd)
    out = xp.zeros((batch, seq, width // head_dim, head_dim), dtype=h.dtype)  # (B, S, n_kv, hd)
    out[:, :, list(select)] = rows
    return out.reshape(batch, seq, width)


def _append(keys: Any, values: Any, kh: Any, vh: Any, start: int) -> Tuple[Any, Any]:
    """Write this call's keys and values into cache slots ``start ..``; the filled part of the cache."""
    end = start + kh.shape[2]
    keys[:, :, start:end] = kh  # (B, n_kv_d, S, hd) into (B, n_kv_d, T, hd)
    values[:, :, start:end] = vh
    return keys[:, :, :end], values[:, :, :end]  # (B, n_kv_d, L, hd), views


def _attend(
    xp: Any, qb: Any, kh: Any, vh: Any, mask: Any, heads: DeviceHeads, head_dim: int, keep: bool
) -> Tuple[Any, Saved]:
    """One device's context block ``(B, S, n_q_d * hd)`` and, when ``keep``, what backward needs."""
    dtype = np.dtype(qb.dtype)
    cdtype = compute_dtype(dtype)
    batch, seq, width = qb.shape
    n_q = width // head_dim
    qh = qb.reshape(batch, seq, n_q, head_dim).transpose(0, 2, 1, 3)  # (B, nq, S, hd)
    qh = qh * dtype.type(1.0 / math.sqrt(head_dim))  # scaled, a new array
    keys = kh.shape[2]
    outputs, saved = [], []
    for kv_first, n, first, count in runs_of(heads):
        r = count // n
        qg = qh[:, first : first + count].reshape(batch, n, r * seq, head_dim)  # (B, n, r S, hd)
        k = kh[:, kv_first : kv_first + n]  # (B, n, L, hd)
        v = vh[:, kv_first : kv_first + n]  # (B, n, L, hd)
        kt = k.transpose(0, 1, 3, 2)  # (B, n, hd, L)
        scores = product(qg, kt).astype(cdtype, copy=False)  # (B, n, rS, hd) @ (B, n, hd, L) -> (B, n, rS, L)
        if mask is not None:
            view = scores.reshape(batch, count, seq, keys)  # (B, r n, S, L), a view
            view += mask  # + (B|1, 1, S|1, L)
        scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys, in place
        xp.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)  # probs (B, n, r S, L)
        context = product(scores.astype(dtype, copy=False), v)  # (B, n, rS, L) @ (B, n, L, hd)
        outputs.append(context.reshape(batch, count, seq, head_dim))  # (B, count, S, hd)
        if keep:
            saved.append((qg, k, v, scores))
    if not outputs:
        return xp.zeros((batch, seq, 0), dtype=dtype), saved
    context = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=1)  # (B, nq, S, hd)
    return context.transpose(0, 2, 1, 3).reshape(batch, seq, width), saved  # (B, S, nq * hd)


def _attend_backward(
    xp: Any, grad: Any, saved: Saved, heads: DeviceHeads, head_dim: int
) -> Tuple[Any, Any, Any]:
    """``(dq block (B, S, n_q_d * hd), dK (B, n_kv_d, S, hd), dV (B, n_kv_d, S, hd))`` of one device."""
    dtype = np.dtype(grad.dtype)
    batch, seq, width = grad.shape
    n_q = width // head_dim
    dc = grad.reshape(batch, seq, n_q, head_dim).transpose(0, 2, 1, 3)  # (B, nq, S, hd)
    scale = dtype.type(1.0 / math.sqrt(head_dim))
    dqs, dks, dvs = [], [], []
    for (_, n, first, count), (qg, k, v, probs) in zip(runs_of(heads), saved):
        r = count // n
        dcg = dc[:, first : first + count].reshape(batch, n, r * seq, head_dim)  # (B, n, r S, hd)
        p = probs.astype(dtype, copy=False)  # (B, n, r S, L)
        dvs.append(product(p.transpose(0, 1, 3, 2), dcg))  # (B, n, L, rS) @ (B, n, rS, hd) -> (B, n, L, hd)
        dp = product(dcg, v.transpose(0, 1, 3, 2)).astype(probs.dtype, copy=False)  # (B, n, rS, L)
        dp -= (dp * probs).sum(axis=-1, keepdims=True)  # softmax backward, in place
        dp *= probs
        dz = dp.astype(dtype, copy=False)  # (B, n, r S, L)
        dq = product(dz, k) * scale  # (B, n, rS, L) @ (B, n, L, hd) -> (B, n, rS, hd)
        dqs.append(dq.reshape(batch, count, seq, head_dim))  # (B, count, S, hd)
        dks.append(product(dz.transpose(0, 1, 3, 2), qg))  # (B, n, L, rS) @ (B, n, rS, hd) -> (B, n, L, hd)
    if not dqs:
        empty = xp.zeros((batch, 0, seq, head_dim), dtype=dtype)
        return xp.zeros((batch, seq, 0), dtype=dtype), empty, empty
    dq = dqs[0] if len(dqs) == 1 else xp.concatenate(dqs, axis=1)  # (B, nq, S, hd)
    dk = dks[0] if len(dks) == 1 else xp.concatenate(dks, axis=1)  # (B, n_kv_d, S, hd)
    dv = dvs[0] if len(dvs) == 1 else xp.concatenate(dvs, axis=1)
    return dq.transpose(0, 2, 1, 3).reshape(batch, seq, width), dk, dv
