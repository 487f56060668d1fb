"""Tensor-parallel multi-head self-attention (Megatron-LM, Shoeybi et al., 2019).

The fused Q/K/V projection is column-parallel and split by whole heads, so
each worker attends with its own heads and nothing moves between the
projection, the attention and the row-parallel output projection: one
reduction forward (in ``out``) and one backward (of ``dX`` in ``qkv``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Hashable, List, NamedTuple, Optional, Tuple

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..regions import Blocks
from ..sharded import ShardedTensor
from .base import ParallelModule, as_array_like, check_layout, check_seed
from .gemm import product
from .linear import ColumnParallelLinear, RowParallelLinear, dense_weight
from .norm import compute_dtype

__all__ = ["ParallelSelfAttention", "QKV", "fuse_qkv", "split_fused_qkv"]


class QKV(NamedTuple):
    """Separate query, key and value projections, each weight ``(hidden, hidden)`` in some layout."""

    q_weight: Any
    q_bias: Any
    k_weight: Any
    k_bias: Any
    v_weight: Any
    v_bias: Any


def _check_part(value: Any, expected: Tuple[int, ...], what: str, dims: str) -> Any:
    array = as_array_like(value, what)
    if tuple(array.shape) != expected:
        raise ShapeError(f"{what} must have shape {expected} {dims}, got {tuple(array.shape)}")
    return array


def fuse_qkv(
    q_weight: Any,
    q_bias: Any,
    k_weight: Any,
    k_bias: Any,
    v_weight: Any,
    v_bias: Any,
    *,
    n_heads: int,
    layout: str = "in_out",
    hidden: Optional[int] = None,
) -> Tuple[Any, Any]:
    """The fused ``(hidden, 3 * hidden)`` weight and ``(3 * hidden,)`` bias of separate Q, K and V.

    Column ``(3 h + j) * head_dim + c`` of the fused weight is column
    ``h * head_dim + c`` of ``[Q, K, V][j]``: the columns are ordered per head
    as ``[q_h | k_h | v_h]`` for ``h = 0 .. n_heads - 1`` (Megatron's
    interleaving), so that a split in whole units of ``3 * head_dim`` columns
    gives each worker whole heads with their queries, keys and values.

    Weights are ``(hidden, hidden)`` in ``layout`` (``"out_in"`` for PyTorch
    and Hugging Face ``nn.Linear``); the result is ``"in_out"``. A ``None``
    bias is zero. ``hidden`` defaults to ``q_weight``'s size. Arrays of any
    kind (NumPy, CuPy, a DLPack tensor) are fused in their own namespace.
    """
    layout = check_layout(layout)
    n_heads = check_positive_int(n_heads, "n_heads")
    names = ("q", "k", "v")
    first = dense_weight(q_weight, layout, "fuse_qkv q_weight")
    hidden = first.shape[0] if hidden is None else check_positive_int(hidden, "hidden")
    head_dim = _head_dim(hidden, n_heads)
    dims = "(n_in, n_out)" if layout == "in_out" else "(n_out, n_in)"
    weights = [
        dense_weight(_check_part(w, (hidden, hidden), f"{n}_weight", dims), layout, f"{n}_weight")
        for n, w in zip(names, (q_weight, k_weight, v_weight))
    ]  # each (hidden, hidden) in_out
    biases = [
        np.zeros_like(weights[0][0]) if b is None else _check_part(b, (hidden,), f"{n}_bias", "(hidden,)")
        for n, b in zip(names, (q_bias, k_bias, v_bias))
    ]  # each (hidden,)
    weight = np.stack([w.reshape(hidden, n_heads, head_dim) for w in weights], axis=2)  # (H, nh, 3, hd)
    bias = np.stack([b.reshape(n_heads, head_dim) for b in biases], axis=1)  # (nh, 3, hd)
    return weight.reshape(hidden, 3 * hidden), bias.reshape(3 * hidden)  # (H, 3H), (3H,)


def split_fused_qkv(weight: Any, bias: Any, n_heads: int, *, layout: str = "in_out") -> QKV:
    """The inverse of :func:`fuse_qkv`: separate Q, K and V of a fused ``(H, 3H)`` ``in_out`` weight.

    The weights come back ``(hidden, hidden)`` in ``layout`` (``"out_in"``
    for PyTorch), the biases ``(hidden,)``.
    """
    layout = check_layout(layout)
    w = dense_weight(weight, "in_out", "split_fused_qkv weight")
    hidden = w.shape[0]
    head_dim = _head_dim(hidden, n_heads)
    w = _check_part(w, (hidden, 3 * hidden), "split_fused_qkv weight", "(hidden, 3 * hidden)")
    b = _check_part(bias, (3 * hidden,), "split_fused_qkv bias", "(3 * hidden,)")
    w4 = w.reshape(hidden, n_heads, 3, head_dim)  # (H, nh, 3, hd)
    b3 = b.reshape(n_heads, 3, head_dim)  # (nh, 3, hd)
    parts = []
    for j in range(3):
        wj = w4[:, :, j].reshape(hidden, hidden)  # (H, nh * hd)
        parts += [wj if layout == "in_out" else wj.T, b3[:, j].reshape(hidden)]
    return QKV(*parts)


def _head_dim(hidden: int, n_heads: int) -> int:
    if hidden % n_heads:
        raise ConfigError(
            f"hidden ({hidden}) must be a multiple of n_heads ({n_heads}); "
            f"got head_dim {hidden / n_heads:g}, expected a whole number"
        )
    return hidden // n_heads


class ParallelSelfAttention(ParallelModule):
    """Multi-head self-attention with heads split over the workers, as Megatron-LM splits it.

    For ``x`` of shape ``(B, S, H)`` and each head ``h`` (of ``head_dim = H / n_heads``)::

        q_h, k_h, v_h = x W_q,h + b_q,h,  x W_k,h + b_k,h,  x W_v,h + b_v,h     # (B, S, head_dim)
        P_h = softmax(q_h k_h^T / sqrt(head_dim) + M)                            # (B, S, S)
        y = concat_h(P_h v_h) W_o + b_o                                          # (B, S, H)

    ``qkv`` is one :class:`ColumnParallelLinear` ``(H, 3H)`` whose columns are
    ordered per head ``[q_h | k_h | v_h]`` (see :func:`fuse_qkv`) and split in
    whole units of ``3 * head_dim``: worker ``i`` holds whole heads (12 heads on
    8 workers: 2, 2, 2, 2, 1, 1, 1, 1; a worker may hold none). Each device
    attends with its workers' heads, batched over (batch, heads) in one
    matmul, and hands the context ``(B, S, n_heads_d * head_dim)`` to ``out``,
    a :class:`RowParallelLinear` split in units of ``head_dim``, which sums the
    partial outputs onto the output device.

    ``M`` is the additive mask: from ``attention_mask`` (see :meth:`forward`)
    and, with ``causal``, ``finfo.min`` above the diagonal. Scores and softmax
    are computed in float32 for float16, else in the layer's dtype.

    Backward, per head, with ``dC_h`` the context gradient from ``out``::

        dv_h = P_h^T dC_h;  dP_h = dC_h v_h^T;  dZ_h = P_h * (dP_h - rowsum(dP_h * P_h))
        dq_h = dZ_h k_h / sqrt(head_dim);  dk_h = dZ_h^T q_h / sqrt(head_dim)

    then ``qkv.backward`` reduces ``dX`` onto the output device.

    Hugging Face names (relative to a ``BertLayer``'s ``attention``):

    =====================================  ======================================================
    Hugging Face                           tp_gpu
    =====================================  ======================================================
    ``self.query/key/value.weight/bias``   ``qkv.weight/bias``, fused: :meth:`load_qkv` (or
                                           :func:`fuse_qkv`) with ``layout="out_in"``
    ``output.dense.weight``                ``out.weight``, transposed (``layout="out_in"``)
    ``output.dense.bias``                  ``out.bias``
    ``output.LayerNorm``                   ``attention_norm`` of :class:`ParallelTransformerLayer`
    =====================================  ======================================================

    Parameters
    ----------
    hidden, n_heads : int
        Model width and number of heads; ``n_heads`` must divide ``hidden``.
    config : TensorParallelConfig, optional
        Shared by both projections (``gather_output`` is forced off for ``qkv``).
    seed : int
        ``qkv`` is seeded with ``seed``, ``out`` with ``seed + 1``.
    causal : bool
        Mask every key after its query (decoders).
    """

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        causal: bool = False,
    ) -> None:
        super().__init__(config)
        self.hidden = check_positive_int(hidden, "hidden")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.head_dim = _head_dim(self.hidden, self.n_heads)
        self.seed = check_seed(seed)
        if not isinstance(causal, (bool, np.bool_)):
            raise ConfigError(f"causal must be True or False, got {causal!r}")
        self.causal = bool(causal)
        self._join_group(hidden=self.hidden, n_heads=self.n_heads, seed=self.seed, causal=self.causal)
        column_config = dataclasses.replace(self.config, gather_output=False)
        hidden, hd = self.hidden, self.head_dim
        self.qkv = ColumnParallelLinear(hidden, 3 * hidden, column_config, seed=self.seed, unit=3 * hd)
        self.out = RowParallelLinear(
            hidden, hidden, self.config, seed=self.seed + 1, input_is_parallel=True, unit=hd
        )

    @property
    def heads(self) -> List[int]:
        """How many heads each of this process's workers holds."""
        return [size // (3 * self.head_dim) for size in self.qkv.layout.sizes]

    # ------------------------------------------------------------------ weights

    def load_qkv(
        self,
        q_weight: Any,
        q_bias: Any,
        k_weight: Any,
        k_bias: Any,
        v_weight: Any,
        v_bias: Any,
        *,
        layout: str = "in_out",
    ) -> None:
        """Overwrite ``qkv`` from separate ``(hidden, hidden)`` Q, K, V weights and ``(hidden,)`` biases.

        ``layout="out_in"`` takes PyTorch / Hugging Face ``nn.Linear`` weights
        (``attention.self.query.weight`` etc.). Everything is checked before
        anything changes. See :func:`fuse_qkv`.
        """
        parts = (q_weight, q_bias, k_weight, k_bias, v_weight, v_bias)
        weight, bias = fuse_qkv(*parts, n_heads=self.n_heads, layout=layout, hidden=self.hidden)
        self.qkv.load_dense(weight, bias)

    def split_qkv(self, *, layout: str = "in_out") -> QKV:
        """The separate Q, K, V weights ``(hidden, hidden)`` (in ``layout``) and biases, as host arrays."""
        return split_fused_qkv(self.qkv.full_weight(), self.qkv.full_bias(), self.n_heads, layout=layout)

    def load_dense(
        self,
        q_weight: Any,
        q_bias: Any,
        k_weight: Any,
        k_bias: Any,
        v_weight: Any,
        v_bias: Any,
        out_weight: Any,
        out_bias: Any,
        *,
        layout: str = "in_out",
    ) -> None:
        """Overwrite both projections from dense Q, K, V and output weights and biases, all or nothing."""
        parts = (q_weight, q_bias, k_weight, k_bias, v_weight, v_bias)
        weight, bias = fuse_qkv(*parts, n_heads=self.n_heads, layout=layout, hidden=self.hidden)
        state = {f"qkv.{k}": v for k, v in self.qkv.dense_state(weight, bias, "in_out", "qkv").items()}
        out = self.out.dense_state(out_weight, out_bias, layout, "out")
        self.load_state_dict({**state, **{f"out.{k}": v for k, v in out.items()}})

    # ------------------------------------------------------------------ forward

    def check_input(self, x: Any) -> Any:
        """``x`` as an array, checked to be ``(batch, seq, hidden)`` of real numbers (else ShapeError).

        A ShardedTensor passes as it is when it is split along the sequence
        (axis 1), as sequence parallelism leaves activations.
        """
        if isinstance(x, ShardedTensor):
            if x.ndim != 3 or x.shape[1] == 0 or x.shape[2] != self.hidden or x.axis != 1:
                raise ShapeError(
                    f"ParallelSelfAttention takes a ShardedTensor of shape (batch, seq, {self.hidden}) "
                    f"split along the sequence (axis 1), got {x!r}"
                )
            return x
        x = self._check_features(x, self.hidden, "ParallelSelfAttention input")
        if x.ndim != 3 or x.shape[1] == 0:
            raise ShapeError(
                f"ParallelSelfAttention input must have shape (batch, seq, {self.hidden}) with seq >= 1, "
                f"got {tuple(x.shape)}"
            )
        return x

    def check_mask(self, attention_mask: Any, batch: int, seq: int) -> Optional[Tuple[str, Any]]:
        """``attention_mask`` checked for inputs of ``(batch, seq)``: ``None``, ``("keep", (B, S))`` or
        ``("add", (B|1, 1, S|1, S|1))``; ShapeError naming the shape received and those expected."""
        if attention_mask is None:
            return None
        mask = as_array_like(attention_mask, "attention_mask")
        kind = np.dtype(mask.dtype).kind
        shape = tuple(mask.shape)
        if mask.ndim == 2 and shape == (batch, seq) and kind in "biuf":
            return ("keep", mask)
        if (
            mask.ndim == 4
            and shape[0] in (1, batch)
            and shape[1] == 1
            and shape[2] in (1, seq)
            and shape[3] in (1, seq)
            and kind == "f"
        ):
            return ("add", mask)
        raise ShapeError(
            f"attention_mask must be ({batch}, {seq}) (batch, seq) of 1 (keep) / 0 (pad), or an additive "
            f"float mask broadcastable to ({batch}, 1, {seq}, {seq}) (batch, 1, seq, seq); "
            f"got shape {shape} of dtype {mask.dtype}"
        )

    def forward(self, x: Any, attention_mask: Any = None) -> Any:
        """``y`` ``(B, S, H)`` on the output device, for ``x`` ``(B, S, H)``.

        With ``config.sequence_parallel``, ``y`` is a ShardedTensor split along
        the sequence (``out`` reduce-scatters), and ``x`` may be one too
        (``qkv`` all-gathers it).

        ``attention_mask`` is ``None``; or ``(B, S)`` of 1 (keep) / 0 (pad)
        as Hugging Face passes it (nonzero keeps), turned into
        ``finfo(dtype).min`` on the padded keys as Hugging Face does; or a
        float mask added to the scores, broadcastable to ``(B, 1, S, S)``
        (``(B, 1, 1, S)`` masks keys). Inputs and mask are checked before
        anything changes.
        """
        x = self.check_input(x)
        batch, seq = x.shape[:2]
        mask = self.check_mask(attention_mask, batch, seq)
        qkv = self.qkv(x)  # shards (B, S, 3 * heads_i * hd)
        blocks = qkv.device_blocks()  # {d: (B, S, 3 * n_heads_d * hd)}
        masks = self._device_masks(mask, seq, list(blocks))  # {d: (B|1, 1, S|1, S) or None}
        attended = self.group.on_devices(self._attend, blocks, masks)  # {d: (context, saved)}
        contexts = {d: context for d, (context, _) in attended.items()}  # {d: (B, S, n_heads_d * hd)}
        self._keep({"attended": {d: s for d, (_, s) in attended.items()}, "shape": tuple(x.shape)})
        return self.out(ShardedTensor.from_blocks(contexts, -1, self.out.layout, self.backend, self.comm))

    def _device_masks(self, mask: Optional[Tuple[str, Any]], seq: int, devices: List[Hashable]) -> Blocks:
        """The additive mask on each device, in the compute dtype (None when there is none)."""
        if mask is None and not self.causal:
            return dict.fromkeys(devices)
        dtype = compute_dtype(self.dtype)
        if mask is None:
            raw = dict.fromkeys(devices)
        else:
            raw = collectives.broadcast(self.backend, mask[1], devices, dtype)  # {d: the mask as given}
        kind = None if mask is None else mask[0]
        return self.group.on_devices(lambda m: self._additive_mask(m, kind, seq), raw, keys=devices)

    def _additive_mask(self, raw: Any, kind: Optional[str], seq: int) -> Any:
        """``raw`` as an additive mask broadcastable to ``(B, 1, S, S)``, with the causal mask added."""
        xp, dtype = self.backend.xp, compute_dtype(self.dtype)
        lowest = np.finfo(dtype).min
        mask = raw
        if kind == "keep":
            mask = ((raw == 0) * lowest)[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
        if self.causal:
            future = xp.arange(seq)[None, :] > xp.arange(seq)[:, None]  # (S, S), True above the diagonal
            if mask is None:
                return (future * lowest)[None, None]  # (1, 1, S, S)
            mask = xp.where(future, lowest, mask)  # (B|1, 1, S, S); a sum could overflow to -inf
        return mask

    def _attend(self, block: Any, mask: Any) -> Tuple[Any, Any]:
        """``(context, saved)`` of one device's heads: context ``(B, S, n_heads_d * hd)``."""
        xp, dtype, cdtype = self.backend.xp, self.dtype, compute_dtype(self.dtype)
        batch, seq, width = block.shape
        heads, hd = width // (3 * self.head_dim), self.head_dim
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
        return context, ((q, k, v, scores) if self.training else None)

    # ------------------------------------------------------------------ backward

    def backward(self, grad_output: Any) -> Any:
        """Accumulate every gradient and return ``dX`` ``(B, S, H)`` on the output device."""
        if self._saved is not None:  # a bad gradient raises before anything is consumed
            self._check_grad_shape(grad_output, self._saved["shape"], "ParallelSelfAttention", sharded=True)
        saved = self._take_saved()
        grad_context = self.out.backward(grad_output)  # ShardedTensor {d: (B, S, n_heads_d * hd)}
        grads = self.group.on_devices(self._attend_backward, grad_context.device_blocks(), saved["attended"])
        grad_qkv = ShardedTensor.from_blocks(grads, -1, self.qkv.layout, self.backend, self.comm)
        return self.qkv.backward(grad_qkv)

    def _attend_backward(self, grad_context: Any, saved: Tuple[Any, Any, Any, Any]) -> Any:
        """One device's ``dqkv`` block ``(B, S, 3 * n_heads_d * hd)`` from its context gradient."""
        xp, dtype, cdtype = self.backend.xp, self.dtype, compute_dtype(self.dtype)
        q, k, v, probs = saved  # q scaled by 1 / sqrt(hd); probs in the compute dtype
        batch, seq, width = grad_context.shape
        heads, hd = width // self.head_dim, self.head_dim
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

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, n_heads={self.n_heads}, head_dim={self.head_dim}, causal={self.causal}, "
            f"heads={self.heads}, dtype={self.dtype.name!r}"
        )
