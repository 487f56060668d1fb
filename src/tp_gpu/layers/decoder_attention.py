"""Causal grouped-query self-attention of decoder models (GPT-2, Llama, Qwen2), split by heads.

For ``x`` ``(B, S, H)``, query heads ``h`` and key-value heads ``j = h // g``::

    q_h = x W_q,h + b_q,h;  k_j = x W_k,j + b_k,j;  v_j = x W_v,j + b_v,j    # (B, S, hd)
    q_h, k_j = RoPE(q_h, pos), RoPE(k_j, pos)                              # rotary models only
    C_h = softmax(q_h [K_j]^T / sqrt(hd) + M) [V_j]                        # (B, S, hd)
    y = concat_h(C_h) W_o + b_o                                            # (B, S, H)

``[K_j]`` are the keys of the cache followed by this call's. ``M`` is causal
over cache slots and masks padded keys. ``W_q`` is column-parallel by whole
query heads, grouped by the key-value head they read; ``W_k`` and ``W_v`` are
split by whole key-value heads, or held whole on every device when there are
fewer key-value heads than workers (:mod:`.head_plan`). ``W_o`` is
row-parallel with ``W_q``'s split, so a layer costs one reduction, as
Megatron-LM's. Each device attends with its own heads
(:class:`~.grouped_attention.GroupedAttention`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional, Tuple

import numpy as np

from .. import collectives
from ..backends.base import Backend
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError
from ..regions import replicate
from ..tensor import Tensor
from .base import ParallelModule, check_seed
from .grouped_attention import GroupedAttention
from .head_plan import HeadPlan
from .kv_cache import KVCache
from .linear import ColumnParallelLinear, RowParallelLinear, check_bias_flag
from .norm import compute_dtype
from .replicated_linear import ReplicatedLinear
from .rotary import apply_rotary

__all__ = ["AttentionStep", "DecoderAttention", "attention_masks"]


@dataclass
class AttentionStep:
    """What every layer's attention shares in one forward pass.

    ``cos_sin``: the rotary angles ``(B, S, hd)`` on the host (None without
    rotary embeddings); ``masks``: the additive mask of each device (None
    where nothing is masked); ``cache`` and ``start``: the key-value cache
    (inference) and the positions it held before this pass.
    """

    cos_sin: Optional[Tuple[np.ndarray, np.ndarray]]
    masks: Dict[Hashable, Any]
    cache: Optional[KVCache] = None
    start: int = 0


def attention_masks(
    backend: Backend,
    devices: Tuple[Hashable, ...],
    keep: Optional[np.ndarray],
    start: int,
    seq: int,
    dtype: Any,
) -> Dict[Hashable, Any]:
    """The additive mask ``(B|1, 1, S, start + S)`` of a pass, on each device, in the compute dtype.

    Query ``i`` sits in cache slot ``start + i`` and sees key slot ``j`` when
    ``j <= start + i`` and ``keep[b, j]`` is nonzero (``keep``: ``(B, start + S)``
    of 1 / 0, None for no padding); hidden keys get ``finfo.min``, as
    transformers' eager attention. None on every device when nothing is hidden.
    """
    cdtype = compute_dtype(dtype)
    length = start + seq
    padded = keep is not None and not bool(np.all(keep))
    if seq == 1 and not padded:
        return dict.fromkeys(devices)
    hidden = np.arange(length)[None, :] > (start + np.arange(seq))[:, None]  # (S, L), the future
    hidden = hidden[None, None]  # (1, 1, S, L)
    if padded:
        assert keep is not None
        hidden = hidden | (keep == 0)[:, None, None, :]  # (B, 1, S, L)
    mask = np.where(hidden, np.finfo(cdtype).min, 0).astype(cdtype)
    return collectives.broadcast(backend, mask, devices, cdtype)


class DecoderAttention(ParallelModule):
    """Causal grouped-query self-attention with ``n_heads`` query and ``n_kv_heads`` key-value heads.

    Parameters
    ----------
    hidden, n_heads, n_kv_heads : int
        Model width and head counts; ``n_kv_heads`` divides ``n_heads``
        (``n_kv_heads == n_heads`` is multi-head attention, as GPT-2's).
    config : TensorParallelConfig, optional
    head_dim : int, optional
        Columns per head (default ``hidden / n_heads``).
    seed : int
        Seeds ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` with ``seed .. seed + 3``.
    qkv_bias, o_bias : bool
        Biases on the query, key and value projections (GPT-2, Qwen2) and on the output one (GPT-2).
    """

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        head_dim: Optional[int] = None,
        seed: int = 0,
        qkv_bias: bool = False,
        o_bias: bool = False,
    ) -> None:
        super().__init__(config)
        self.hidden = check_positive_int(hidden, "hidden")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.n_kv_heads = check_positive_int(n_kv_heads, "n_kv_heads")
        if head_dim is None:
            if self.hidden % self.n_heads:
                raise ConfigError(
                    f"hidden ({self.hidden}) must be a multiple of n_heads ({self.n_heads}) "
                    "when head_dim is not given"
                )
            head_dim = self.hidden // self.n_heads
        self.head_dim = check_positive_int(head_dim, "head_dim")
        self.seed = check_seed(seed)
        qkv_bias, o_bias = check_bias_flag(qkv_bias), check_bias_flag(o_bias)
        self._join_group(
            hidden=self.hidden, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim
        )
        group = self.group
        self.plan = HeadPlan.build(
            self.n_heads, self.n_kv_heads, self.head_dim, group.devices, group.comm.rank, group.comm.size
        )
        split_config = dataclasses.replace(self.config, gather_output=False)
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q_layout, kv_layout = self.plan.q_layout, self.plan.kv_layout
        self.q_proj = ColumnParallelLinear(
            hidden, q_width, split_config, seed=self.seed, bias=qkv_bias, layout=q_layout
        )
        self.k_proj: Any
        self.v_proj: Any
        if kv_layout is None:
            self.k_proj = ReplicatedLinear(hidden, kv_width, self.config, seed=self.seed + 1, bias=qkv_bias)
            self.v_proj = ReplicatedLinear(hidden, kv_width, self.config, seed=self.seed + 2, bias=qkv_bias)
        else:
            self.k_proj = ColumnParallelLinear(
                hidden, kv_width, split_config, seed=self.seed + 1, bias=qkv_bias, layout=kv_layout
            )
            self.v_proj = ColumnParallelLinear(
                hidden, kv_width, split_config, seed=self.seed + 2, bias=qkv_bias, layout=kv_layout
            )
        self.o_proj = RowParallelLinear(
            q_width,
            hidden,
            self.config,
            seed=self.seed + 3,
            input_is_parallel=True,
            bias=o_bias,
            layout=q_layout,
        )

    def forward(self, x: Any, step: AttentionStep, layer: int = 0) -> Tensor:
        """``y`` ``(B, S, H)`` for ``x`` ``(B, S, H)`` (Dense, or split along the sequence), as the
        output projection leaves it. ``layer`` picks this layer's part of ``step.cache``."""
        x = self._check_features(x, self.hidden, "DecoderAttention input")
        x = replicate(x, self.group, self.dtype, "DecoderAttention input")  # (B, S, H) on every device, once
        q = self.q_proj(x)  # device d: (B, S, n_q_d * hd)
        k = self.k_proj(x)  # device d: (B, S, n_kv_d * hd), or every key-value head
        v = self.v_proj(x)
        if step.cos_sin is not None:
            q = apply_rotary(q, step.cos_sin, self.head_dim)
            k = apply_rotary(k, step.cos_sin, self.head_dim)
        cache = None if step.cache is None else step.cache.layers[layer]
        context = GroupedAttention.apply(q, k, v, self.plan, step.masks, cache, step.start)  # like q
        return self.o_proj(context)  # (B, S, n_q_d * hd) -> (B, S, H), one reduction

    def extra_repr(self) -> str:
        heads = {str(d): len(h.query) for d, h in self.plan.devices.items()}
        return (
            f"hidden={self.hidden}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"head_dim={self.head_dim}, query heads per device={heads}, "
            f"kv={'replicated' if self.plan.replicated else 'split'}"
        )
