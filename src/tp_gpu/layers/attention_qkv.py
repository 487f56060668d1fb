"""The fused per-head Q/K/V layout of :class:`~tp_gpu.layers.attention.ParallelSelfAttention`.

Column ``(3 h + j) * head_dim + c`` of the fused ``(hidden, 3 * hidden)``
weight is column ``h * head_dim + c`` of ``[Q, K, V][j]``: per head
``[q_h | k_h | v_h]`` (Megatron's interleaving), so that a column split in
whole units of ``3 * head_dim`` gives each worker whole heads with their
queries, keys and values. :func:`fuse_qkv` builds it from separate
projections, :func:`split_fused_qkv` takes it apart again.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from ..config import check_positive_int
from ..errors import ConfigError, ShapeError
from .base import as_array_like, check_layout
from .linear import dense_weight

__all__ = ["QKV", "fuse_qkv", "split_fused_qkv", "head_dim_of"]


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
    head_dim = head_dim_of(hidden, n_heads)
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
    head_dim = head_dim_of(hidden, n_heads)
    w = _check_part(w, (hidden, 3 * hidden), "split_fused_qkv weight", "(hidden, 3 * hidden)")
    b = _check_part(bias, (3 * hidden,), "split_fused_qkv bias", "(3 * hidden,)")
    w4 = w.reshape(hidden, n_heads, 3, head_dim)  # (H, nh, 3, hd)
    b3 = b.reshape(n_heads, 3, head_dim)  # (nh, 3, hd)
    parts = []
    for j in range(3):
        wj = w4[:, :, j].reshape(hidden, hidden)  # (H, nh * hd)
        parts += [wj if layout == "in_out" else wj.T, b3[:, j].reshape(hidden)]
    return QKV(*parts)


def head_dim_of(hidden: int, n_heads: int) -> int:
    """``hidden / n_heads``, or ConfigError when ``n_heads`` does not divide ``hidden``."""
    if hidden % n_heads:
        raise ConfigError(
            f"hidden ({hidden}) must be a multiple of n_heads ({n_heads}); "
            f"got head_dim {hidden / n_heads:g}, expected a whole number"
        )
    return hidden // n_heads
