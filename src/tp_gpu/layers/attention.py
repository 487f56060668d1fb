"""Tensor-parallel multi-head self-attention (Megatron-LM, Shoeybi et al., 2019).

The fused Q/K/V projection is column-parallel and split by whole heads, so
each worker attends with its own heads and nothing moves between the
projection, the attention and the row-parallel output projection: one
reduction forward (in ``out``) and one backward (of ``dX`` in ``qkv``).
The attention itself, with its backward, is :class:`.attention_core.CoreAttention`;
the fused per-head layout of the weights is :mod:`.attention_qkv`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import numpy as np

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..placements import Split
from ..tensor import Tensor, tensor
from .attention_core import CheckedMask, CoreAttention
from .attention_qkv import QKV, fuse_qkv, head_dim_of, split_fused_qkv
from .base import ParallelModule, as_array_like, check_seed
from .linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["ParallelSelfAttention", "QKV", "fuse_qkv", "split_fused_qkv"]


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

    The tape replays it backward: ``out``'s, then the attention's per head
    (``dv_h = P_h^T dC_h``, ``dZ_h = P_h * (dP_h - rowsum(dP_h * P_h))``,
    ``dq_h = dZ_h k_h / sqrt(head_dim)``, ``dk_h = dZ_h^T q_h / sqrt(head_dim)``;
    see :class:`~tp_gpu.layers.attention_core.CoreAttention`), then ``qkv``'s,
    which reduces ``dX`` onto the output device.

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
        self.head_dim = head_dim_of(self.hidden, self.n_heads)
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

    def check_input(self, x: Any) -> Tensor:
        """``x`` checked to be ``(batch, seq, hidden)`` of real numbers (else ShapeError), as a Tensor: an
        array (a Dense constant where it lies), a Tensor, or one split along the sequence (axis 1), as
        sequence parallelism leaves it."""
        placement = getattr(x, "placement", None)
        if isinstance(placement, Split) and (x.ndim != 3 or placement.axis != 1):
            raise ShapeError(
                f"ParallelSelfAttention takes a ShardedTensor of shape (batch, seq, {self.hidden}) "
                f"split along the sequence (axis 1), got {x!r}"
            )
        x = self._check_features(x, self.hidden, "ParallelSelfAttention input")
        if x.ndim != 3 or x.shape[1] == 0:
            raise ShapeError(
                f"ParallelSelfAttention input must have shape (batch, seq, {self.hidden}) with seq >= 1, "
                f"got {tuple(x.shape)}"
            )
        return x if isinstance(x, Tensor) else tensor(x)

    def check_mask(self, attention_mask: Any, batch: int, seq: int) -> CheckedMask:
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

    def forward(self, x: Any, attention_mask: Any = None) -> Tensor:
        """``y`` ``(B, S, H)``, a Tensor on the output device, for ``x`` ``(B, S, H)``.

        With ``config.sequence_parallel``, ``y`` is a ShardedTensor split along
        the sequence (``out`` reduce-scatters). ``x`` may be an array, a Tensor,
        or a ShardedTensor split along the sequence, which ``qkv`` all-gathers
        (keeping only its slices for backward).

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
        qkv = self.qkv(x)  # device d: (B, S, 3 * n_heads_d * hd), whole heads
        context = CoreAttention.apply(qkv, mask, self.causal, self.head_dim, self.out.layout)
        return self.out(context)  # device d: (B, S, n_heads_d * hd) -> (B, S, H)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, n_heads={self.n_heads}, head_dim={self.head_dim}, causal={self.causal}, "
            f"heads={self.heads}, dtype={self.dtype.name!r}"
        )
