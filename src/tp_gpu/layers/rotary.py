"""Rotary position embeddings (RoPE, Su et al., 2021) in Hugging Face's ``rotate_half`` convention.

Each head's vector ``x`` of ``head_dim = 2 h`` is rotated in the planes ``(x_i, x_{i+h})`` by the
angle ``p * inv_freq_i`` of its position ``p``::

    y = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x[h:], x[:h])
    cos, sin = cos(emb), sin(emb),         emb = cat(p * inv_freq, p * inv_freq)      # (B, S, head_dim)
    inv_freq_i = 1 / theta^(2i / head_dim),  i = 0 .. h - 1

:class:`RotaryEmbedding` makes ``cos`` and ``sin`` on the host in float64 (with Llama 3's or linear
frequency scaling); :class:`ApplyRotary` rotates a ``(B, S, n_heads * head_dim)`` activation where it
lies: split by whole heads (the column-parallel query and key projections), replicated or dense.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Hashable, Optional, Protocol, Tuple

import numpy as np

from .. import collectives
from ..autograd import Context, Function
from ..backends.base import Backend
from ..config import check_positive_int
from ..errors import ConfigError, ShapeError
from ..partition import BlockLayout
from ..placements import Partial, Split
from ..tensor import Blocks, Tensor, new_tensor, tensor
from .norm import compute_dtype

__all__ = ["RotaryEmbedding", "RopeScalingLike", "ApplyRotary", "apply_rotary"]


class RopeScalingLike(Protocol):
    """What :class:`RotaryEmbedding` reads of a rope scaling (``models.decoder_config.RopeScaling``)."""

    @property
    def rope_type(self) -> str: ...  # "linear" | "llama3"

    @property
    def factor(self) -> float: ...

    @property
    def low_freq_factor(self) -> float: ...  # llama3 only

    @property
    def high_freq_factor(self) -> float: ...  # llama3 only

    @property
    def original_max_position_embeddings(self) -> int: ...  # llama3 only


def _positive(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


class RotaryEmbedding:
    """The angles of rotary embeddings: ``inv_freq`` ``(head_dim / 2,)`` float64, kept on the host.

    ``inv_freq_i = 1 / theta^(2i / head_dim)``. With ``scaling.rope_type == "linear"`` it is divided
    by ``factor`` (positions interpolated); with ``"llama3"`` (Llama 3.1) the long wavelengths
    (``> original_max_position_embeddings / low_freq_factor``) are divided by ``factor``, the short
    ones (``< ... / high_freq_factor``) kept, and those between interpolated smoothly, exactly as
    transformers' ``_compute_llama3_parameters``. No parameters: nothing trains.
    """

    def __init__(
        self, head_dim: int, theta: float = 10000.0, scaling: Optional[RopeScalingLike] = None
    ) -> None:
        self.head_dim = check_positive_int(head_dim, "head_dim")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.theta = _positive(theta, "rope theta")
        self.scaling = scaling
        inv_freq = 1.0 / self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.inv_freq: np.ndarray = inv_freq if scaling is None else _scaled(inv_freq, scaling)  # (hd / 2,)

    def angles(self, positions: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(cos, sin)``, each ``(B, S, head_dim)`` float64, of integer ``positions`` ``(B, S)``."""
        p = np.asarray(positions)
        if p.ndim != 2 or p.dtype.kind not in "iu":
            raise ShapeError(f"positions must be integers of shape (B, S), got {p.dtype} of shape {p.shape}")
        freqs = p.astype(np.float64)[..., None] * self.inv_freq  # (B, S, 1) * (hd/2,) -> (B, S, hd/2)
        emb = np.concatenate([freqs, freqs], axis=-1)  # (B, S, hd)
        return np.cos(emb), np.sin(emb)

    def __repr__(self) -> str:
        scaling = "" if self.scaling is None else f", scaling={self.scaling!r}"
        return f"RotaryEmbedding(head_dim={self.head_dim}, theta={self.theta}{scaling})"


def _scaled(inv_freq: np.ndarray, scaling: Any) -> np.ndarray:
    """``inv_freq`` scaled as ``scaling`` says ("linear" or "llama3"), or ConfigError."""
    kind = getattr(scaling, "rope_type", None)
    factor = _positive(getattr(scaling, "factor", None), f"rope scaling {kind!r} factor")
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ConfigError(f"rope scaling type must be 'linear' or 'llama3', got {kind!r}")
    low = _positive(scaling.low_freq_factor, "llama3 low_freq_factor")
    high = _positive(scaling.high_freq_factor, "llama3 high_freq_factor")
    if high <= low:
        raise ConfigError(f"llama3 high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    old = _positive(scaling.original_max_position_embeddings, "llama3 original_max_position_embeddings")
    wavelen = 2 * math.pi / inv_freq  # (hd/2,)
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


# ---------------------------------------------------------------------- applying it


class _RotaryContext(Context):
    __slots__ = ("cos_sin", "placed")

    cos_sin: Tuple[Any, Any]  # as given, (B|1, S, hd) on the host
    placed: Dict[Hashable, Tuple[Any, Any]]  # {d: (cos, sin)} as each device's block uses them


class ApplyRotary(Function):
    """``y = x * cos + rotate_half(x) * sin`` for each head's vector ``x`` of each device's block.

    ``forward(ctx, t, cos_sin, head_dim)``: ``t`` is ``(B, S, n_heads * head_dim)`` on any placement but
    ``Partial`` (split on the last axis only in whole heads); ``cos_sin`` is ``(cos, sin)``, each
    ``(B, S, head_dim)`` or ``(1, S, head_dim)`` (one row for every batch row), float64 host arrays:
    each is cast to the compute dtype (float32 for float16, else ``t``'s) and copied once to each
    device. A ``t`` split along the batch or the sequence gets each device's rows of them. The output
    is placed like ``t``, in its dtype.

    Backward: the transpose, ``dx = dy * cos - rotate_half(dy * sin)``, the inverse rotation
    (angle -> -angle) of the gradient, placed like the gradient (a ``Partial`` one stays ``Partial``:
    the map is linear on each device).
    """

    ctx_class = _RotaryContext

    @staticmethod
    def forward(ctx: _RotaryContext, t: Tensor, cos_sin: Tuple[Any, Any], head_dim: int) -> Tensor:
        cos_sin = _check(t, cos_sin, head_dim)
        placed = _placed(t, cos_sin)
        blocks = _per_device(t.backend, t.blocks, placed, _rotate)
        if ctx.needs_input_grad:
            ctx.cos_sin, ctx.placed = cos_sin, placed
        return new_tensor(blocks, t.placement, t.shape, t.dtype, t.backend, t.comm)

    @staticmethod
    def backward(ctx: _RotaryContext, grad: Tensor) -> Tuple[Tensor, None, None]:
        placed = ctx.placed
        if any(d not in placed for d in grad.blocks):  # a gradient elsewhere than the input: rare
            placed = _placed(grad, ctx.cos_sin)
        blocks = _per_device(grad.backend, grad.blocks, placed, _unrotate)
        return new_tensor(blocks, grad.placement, grad.shape, grad.dtype, grad.backend, grad.comm), None, None


def apply_rotary(t: Tensor, cos_sin: Tuple[Any, Any], head_dim: int) -> Tensor:
    """``ApplyRotary.apply(t, cos_sin, head_dim)``: ``t`` (a raw array becomes a Dense constant) rotated
    by the angles of ``cos_sin`` (from :meth:`RotaryEmbedding.angles`), head by head."""
    return ApplyRotary.apply(t if isinstance(t, Tensor) else tensor(t), cos_sin, head_dim)


def _check(t: Tensor, cos_sin: Any, head_dim: int) -> Tuple[Any, Any]:
    """``cos_sin`` as two arrays (lists read as NumPy), or ShapeError (ConfigError for ``head_dim``)
    unless they fit ``t``."""
    if (
        isinstance(head_dim, bool)
        or not isinstance(head_dim, numbers.Integral)
        or head_dim <= 0
        or head_dim % 2
    ):
        raise ConfigError(f"head_dim must be a positive even integer, got {head_dim!r}")
    if t.ndim != 3 or t.shape[-1] % head_dim:
        raise ShapeError(f"rotary input must be (B, S, n_heads * {head_dim}), got shape {t.shape}")
    p = t.placement
    if isinstance(p, Partial):
        raise ShapeError(f"rotary input of partial sums ({p!r}); reduce them first")
    if isinstance(p, Split) and p.axis == 2 and _cuts_heads(p.layout, head_dim):
        raise ShapeError(
            f"rotary input split {p.layout.sizes} on its last axis cuts heads of {head_dim}; expected "
            "whole heads on each worker"
        )
    if not isinstance(cos_sin, (tuple, list)) or len(cos_sin) != 2:
        raise ShapeError(f"cos_sin must be a pair (cos, sin), got {type(cos_sin).__name__}")
    batch, seq = t.shape[0], t.shape[1]
    pair = tuple(a if hasattr(a, "shape") else np.asarray(a, np.float64) for a in cos_sin)
    for name, a in zip(("cos", "sin"), pair):
        shape = tuple(a.shape)
        if len(shape) != 3 or shape[0] not in (1, batch) or shape[1:] != (seq, head_dim):
            raise ShapeError(
                f"rotary {name} must have shape ({batch}, {seq}, {head_dim}) or (1, {seq}, {head_dim}) "
                f"for an input of shape {t.shape}, got {shape}"
            )
    return pair[0], pair[1]


def _cuts_heads(layout: BlockLayout, head_dim: int) -> bool:
    """Whether some worker's range, or its place in its device's block, does not hold whole heads."""
    bounds = [i for r in layout.ranges for i in r]
    return any(i % head_dim for i in (*bounds, *layout.capacities))


def _placed(t: Tensor, cos_sin: Tuple[Any, Any]) -> Dict[Hashable, Tuple[Any, Any]]:
    """``{d: (cos, sin)}``: each device's rows of ``cos_sin`` on it, ``(B_d|1, S_d, 1, hd)`` in the
    compute dtype of ``t``, each copied once."""
    dtype = compute_dtype(t.dtype)
    p, backend = t.placement, t.backend
    out = {}
    for d in t.blocks:
        pair = []
        for a in cos_sin:
            if isinstance(p, Split) and p.axis < 2 and a.shape[p.axis] > 1:  # batch or sequence split
                a = np.concatenate(
                    [a[(slice(None),) * p.axis + (s,)] for s in p.layout.global_slices(d)], p.axis
                )
            a = np.asarray(a, dtype) if backend is None else collectives.to_device(backend, a, d, dtype)
            pair.append(a[:, :, None, :])  # (B|1, S, 1, hd): broadcast over the heads
        out[d] = (pair[0], pair[1])
    return out


def _per_device(backend: Optional[Backend], blocks: Blocks, placed: Dict[Hashable, Any], fn: Any) -> Blocks:
    out = {}
    for d, block in blocks.items():
        if backend is None:
            out[d] = fn(block, *placed[d])
            continue
        with backend.device(d):
            out[d] = fn(block, *placed[d])
    return out


def _heads(block: Any, cos: Any) -> Tuple[Any, int]:
    """``block`` ``(B, S, n_d * hd)`` as ``(B, S, n_d, hd)`` in the compute dtype, and ``hd / 2``."""
    hd = cos.shape[-1]
    b, s, width = block.shape
    return block.reshape(b, s, width // hd, hd).astype(cos.dtype, copy=False), hd // 2  # (B, S, n_d, hd)


def _rotate(block: Any, cos: Any, sin: Any) -> Any:
    """``x * cos + rotate_half(x) * sin`` of one block, in its dtype."""
    x, h = _heads(block, cos)
    y = x * cos  # (B, S, n_d, hd) * (B|1, S, 1, hd)
    y[..., :h] -= x[..., h:] * sin[..., :h]
    y[..., h:] += x[..., :h] * sin[..., h:]
    return y.reshape(block.shape).astype(block.dtype, copy=False)  # (B, S, n_d * hd)


def _unrotate(block: Any, cos: Any, sin: Any) -> Any:
    """The transpose of :func:`_rotate`: ``dy * cos - rotate_half(dy * sin)``, in ``block``'s dtype."""
    dy, h = _heads(block, cos)
    dx = dy * cos  # (B, S, n_d, hd) * (B|1, S, 1, hd)
    dx[..., :h] += dy[..., h:] * sin[..., h:]
    dx[..., h:] -= dy[..., :h] * sin[..., :h]
    return dx.reshape(block.shape).astype(block.dtype, copy=False)  # (B, S, n_d * hd)
