"""The core of self-attention as a tape function: ``softmax(Q K^T / sqrt(d) + M) V``, per device, per head.

``CoreAttention`` takes the fused ``qkv`` activations of a column-parallel
projection, split by whole heads (``Split(-1)``: device ``d`` holds
``(B, S, 3 * n_heads_d * head_dim)``, per head ``[q_h | k_h | v_h]``, see
:mod:`.attention_qkv`), and gives the context, split alike
(``(B, S, n_heads_d * head_dim)`` on device ``d``), ready for a
row-parallel output projection. Nothing moves between devices: each device
attends with its own heads, batched over (batch, heads) in one matmul.

Forward, per head ``h``::

    P_h = softmax(q_h k_h^T / sqrt(head_dim) + M)      # (B, S, S)
    C_h = P_h v_h                                      # (B, S, head_dim)

Backward, per head, from the context gradient ``dC_h``::

    dv_h = P_h^T dC_h;  dP_h = dC_h v_h^T;  dZ_h = P_h * (dP_h - rowsum(dP_h * P_h))
    dq_h = dZ_h k_h / sqrt(head_dim);  dk_h = dZ_h^T q_h / sqrt(head_dim)

``M`` is the additive mask: from an attention mask (``("keep", (B, S))`` of
1 / 0, padded keys getting ``finfo.min``; or ``("add", (B|1, 1, S|1, S|1))``)
and, when causal, ``finfo.min`` above the diagonal. Scores and softmax are
computed in float32 for float16, else in the activations' dtype.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Hashable, List, Optional, Tuple

import numpy as np

from .. import collectives
from ..autograd import Context, Function
from ..backends.base import Backend
from ..partition import BlockLayout
from ..placements import Placement, Split
from ..tensor import Tensor, new_tensor
from .gemm import product
from .norm import compute_dtype

__all__ = ["CoreAttention", "CheckedMask"]

#: A checked attention mask: ``("keep", (B, S))`` of 1 (keep) / 0 (pad), or ``("add", (B|1, 1, S|1, S|1))``.
CheckedMask = Optional[Tuple[str, Any]]

#: What backward needs of one device: ``q`` (scaled by ``1 / sqrt(head_dim)``), ``k``, ``v``, each
#: ``(B, nh, S, hd)``, and the probabilities ``(B, nh, S, S)`` in the compute dtype.
Saved = Tuple[Any, Any, Any, Any]


class _AttentionContext(Context):
    __slots__ = ("saved", "placement", "shape", "head_dim")

    saved: Dict[Hashable, Optional[Saved]]  # {d: (q, k, v, probs)} of each device's heads
    placement: Placement  # of qkv, which its gradient takes
    shape: Tuple[int, ...]  # of qkv, (B, S, 3H)
    head_dim: int


class CoreAttention(Function):
    """``C_d = softmax(q k^T / sqrt(hd) + M) v`` for each device's heads: a ``Split(-1)`` context.

    ``forward(ctx, qkv, mask, causal, head_dim, layout)``: ``qkv`` is the fused
    projection ``(B, S, 3H)`` split in whole heads, ``mask`` a :data:`CheckedMask`,
    ``layout`` the context's split (``head_dim`` columns per head). Backward
    gives ``dqkv`` placed like ``qkv``.
    """

    ctx_class = _AttentionContext

    @staticmethod
    def forward(
        ctx: _AttentionContext,
        qkv: Tensor,
        mask: CheckedMask,
        causal: bool,
        head_dim: int,
        layout: BlockLayout,
    ) -> Tensor:
        backend = qkv.backend
        assert backend is not None
        batch, seq, width = qkv.shape
        keep = bool(ctx.needs_input_grad)
        masks = device_masks(backend, mask, causal, seq, list(qkv.blocks), qkv.dtype)
        contexts, saved = {}, {}
        for d, block in qkv.blocks.items():
            with backend.device(d):
                contexts[d], saved[d] = attend(backend.xp, block, masks[d], head_dim, keep)
        if keep:
            ctx.saved, ctx.placement, ctx.shape, ctx.head_dim = saved, qkv.placement, qkv.shape, head_dim
        shape = (batch, seq, width // 3)
        return new_tensor(contexts, Split(qkv.ndim - 1, layout), shape, qkv.dtype, backend, qkv.comm)

    @staticmethod
    def backward(ctx: _AttentionContext, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None, None]:
        backend = grad.backend
        assert backend is not None
        grads = {}
        for d, g in grad.blocks.items():
            saved = ctx.saved[d]
            assert saved is not None
            with backend.device(d):
                grads[d] = attend_backward(backend.xp, g, saved, ctx.head_dim)
        return (
            new_tensor(grads, ctx.placement, ctx.shape, grad.dtype, backend, grad.comm),
            None,
            None,
            None,
            None,
        )


def attend(xp: Any, block: Any, mask: Any, head_dim: int, keep: bool) -> Tuple[Any, Optional[Saved]]:
    """``(context, saved)`` of one device's heads: context ``(B, S, n_heads_d * hd)``; ``saved`` (for
    backward) only when ``keep``. Run under the block's device."""
    dtype = np.dtype(block.dtype)
    cdtype = compute_dtype(dtype)
    batch, seq, width = block.shape
    heads, hd = width // (3 * head_dim), head_dim
    qkv = block.reshape(batch, seq, heads, 3, hd)  # (B, S, nh, 3, hd)
    q = qkv[:, :, :, 0].transpose(0, 2, 1, 3) * dtype.type(1.0 / math.sqrt(hd))  # (B, nh, S, hd), scaled
    k = qkv[:, :, :, 1].transpose(0, 2, 1, 3)  # (B, nh, S, hd)
    v = qkv[:, :, :, 2].transpose(0, 2, 1, 3)  # (B, nh, S, hd)
    kt = k.transpose(0, 1, 3, 2)  # (B, nh, hd, S)
    scores = product(q, kt).astype(cdtype, copy=False)  # (B, nh, S, hd) @ (B, nh, hd, S)
    if mask is not None:
        scores += mask  # (B, nh, S, S) + (B|1, 1, S|1, S)
    scores -= scores.max(axis=-1, keepdims=True)  # softmax over the keys, in place
    xp.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)  # probs (B, nh, S, S)
    context = product(scores.astype(dtype, copy=False), v)  # (B, nh, S, S) @ (B, nh, S, hd)
    context = context.transpose(0, 2, 1, 3).reshape(batch, seq, heads * hd)  # (B, S, nh * hd)
    return context, ((q, k, v, scores) if keep else None)


def attend_backward(xp: Any, grad_context: Any, saved: Saved, head_dim: int) -> Any:
    """One device's ``dqkv`` block ``(B, S, 3 * n_heads_d * hd)`` from its context gradient."""
    dtype = np.dtype(grad_context.dtype)
    cdtype = compute_dtype(dtype)
    q, k, v, probs = saved  # q scaled by 1 / sqrt(hd); probs in the compute dtype
    batch, seq, width = grad_context.shape
    heads, hd = width // head_dim, head_dim
    dc = grad_context.reshape(batch, seq, heads, hd).transpose(0, 2, 1, 3)  # (B, nh, S, hd)
    p = probs.astype(dtype, copy=False)  # (B, nh, S, S)
    dv = product(p.transpose(0, 1, 3, 2), dc)  # (B, nh, S, S) @ (B, nh, S, hd) -> (B, nh, S, hd)
    vt = v.transpose(0, 1, 3, 2)  # (B, nh, hd, S)
    dp = product(dc, vt).astype(cdtype, copy=False)  # (B, nh, S, hd) @ (B, nh, hd, S) -> (B, nh, S, S)
    dp -= (dp * probs).sum(axis=-1, keepdims=True)  # softmax backward, in place: (B, nh, S, S)
    dp *= probs
    ds = dp.astype(dtype, copy=False)  # dZ (B, nh, S, S)
    dq = product(ds, k) * dtype.type(1.0 / math.sqrt(hd))  # (B, nh, S, S) @ (B, nh, S, hd)
    dk = product(ds.transpose(0, 1, 3, 2), q)  # (B, nh, S, S) @ (B, nh, S, hd) -> (B, nh, S, hd)
    dqkv = xp.stack([dq, dk, dv], axis=-2)  # (B, nh, S, 3, hd)
    return dqkv.transpose(0, 2, 1, 3, 4).reshape(batch, seq, heads * 3 * hd)  # (B, S, nh * 3 * hd)


# ---------------------------------------------------------------------- the additive mask


def device_masks(
    backend: Backend, mask: CheckedMask, causal: bool, seq: int, devices: List[Hashable], dtype: Any
) -> Dict[Hashable, Any]:
    """The additive mask on each device, in the compute dtype of ``dtype`` (None when there is none)."""
    if mask is None and not causal:
        return dict.fromkeys(devices)
    cdtype = compute_dtype(dtype)
    if mask is None:
        raw: Dict[Hashable, Any] = dict.fromkeys(devices)
    else:
        raw = collectives.broadcast(backend, mask[1], devices, cdtype)  # {d: the mask as given}
    kind = None if mask is None else mask[0]
    out = {}
    for d in devices:
        with backend.device(d):
            out[d] = additive_mask(backend.xp, raw[d], kind, causal, seq, cdtype)
    return out


def additive_mask(xp: Any, raw: Any, kind: Optional[str], causal: bool, seq: int, dtype: Any) -> Any:
    """``raw`` as an additive mask broadcastable to ``(B, 1, S, S)``, with the causal mask added."""
    lowest = np.finfo(dtype).min
    mask = raw
    if kind == "keep":
        mask = ((raw == 0) * lowest)[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if causal:
        future = xp.arange(seq)[None, :] > xp.arange(seq)[:, None]  # (S, S), True above the diagonal
        if mask is None:
            return (future * lowest)[None, None]  # (1, 1, S, S)
        mask = xp.where(future, lowest, mask)  # (B|1, 1, S, S); a sum could overflow to -inf
    return mask
