"""The next token from logits split on the vocabulary: greedy, or sampled with temperature, top-k, top-p.

The logits ``Z`` ``(B, V)`` arrive as a column-parallel head leaves them, placed ``Split(-1)``:
device ``d`` holds ``Z_d`` ``(B, V_d)``, its workers' vocabulary slices side by side, each
possibly followed by padding (a worker's capacity beyond its logical slice), which is never chosen.

**Greedy**: ``t_b = argmax_v Z[b, v]``, ties to the smallest ``v`` (``torch.argmax``). Each device
sets its padding to ``-inf``, takes the argmax of each row of its block and maps it to the logical
id; the per-device pairs ``(value, id)`` are then combined by one reduction of pairs under the
lexicographic max (larger value, then smaller id). The logits are never gathered.

**Sampling** (Gumbel-max; Gumbel 1954, Maddison et al. 2014): with ``s = Z / T`` in float64 and the
kept set ``K_b`` of transformers' warpers in the order temperature -> top-k -> top-p,

    t_b = argmax_{v in K_b} (s[b, v] + g[b, v]),   g = -log(-log u),   u = keyed_uniform(seed, step, b, v).

The ``g`` are independent standard Gumbel variables, so ``P(t_b = v) = exp(s_v) / sum_{K_b} exp(s)``:
the softmax of the warped scores, which transformers samples with ``torch.multinomial``. ``u`` is a
pure function of the seed, the step, the row and the *logical* vocabulary id (SplitMix64, as
:mod:`tp_gpu.layers.dropout`), so one seed gives the same tokens at every worker count, device
placement and process count, and two rows with the same prompt sample independently. ``K_b`` is
``{v : s_v >= tau_b}`` for a threshold ``tau_b``:

* top-k: ``tau`` is the k-th largest ``s`` of the row (counted with repeats): tokens tied with it
  are kept, as ``TopKLogitsWarper`` keeps them;
* top-p: ``tau`` is the smallest score kept by ``TopPLogitsWarper`` (scores sorted ascending,
  ``cumsum(softmax) <= 1 - top_p`` removed, the largest always kept). Where tokens tied in score
  straddle that cut, all of them are kept (transformers removes those its sort happens to put
  first); for continuous logits this has probability 0.

Communication per step (B rows; D devices in this process; P processes):

* greedy, and sampling without top-k/top-p: one reduction of ``(value, id)`` pairs: each device's
  ``B x 2`` numbers to the process's first device, and across processes one all-gather of ``B x 2``
  float64 per process, combined lexicographically (an elementwise max cannot carry the pair, and
  packing both into one int64 would round float64 values);
* top-k alone: before that, each device's ``k`` largest scores per row (``B x k``) to the first
  device and an all-gather of ``B x k`` per process; the threshold (``B``) goes back to each device;
* top-p (with or without top-k): the rows themselves, ``B x V`` in the logits' dtype, gathered once
  on the first device of every process (the logits of one position, small); the threshold, the
  noise and the argmax are computed there, with no further communication.

Each call reads ``B`` int64 back to the host. **NaN**: a NaN logit counts as larger than every number,
as ``torch.argmax`` and ``np.argmax`` count it: a row holding NaN yields its smallest NaN id, greedy
or sampled (NaN passes every threshold, since ``NaN < tau`` is false; transformers' sampling would
raise in ``torch.multinomial`` instead). An ``inf`` logit wins its row the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import collectives, device_checks
from ..errors import ConfigError, ShapeError
from ..layers.dropout import _GOLDEN, _MASK64, _SEED_MULTIPLIER, _mix, _mix_int
from ..partition import BlockLayout
from ..placements import Split
from ..tensor import Tensor

__all__ = ["SamplingConfig", "greedy_tokens", "sample_tokens", "next_tokens", "keyed_uniform"]

#: XOR-ed into the key of a seed and step, so that sampling's stream differs from dropout's.
_SAMPLING_STREAM = 0x5A3C_96E1_D2B4_870F

Pair = Tuple[Any, Any]  # ((B,) float64 values, (B,) int64 logical ids), on one device


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(
            f"{name} must be a non-negative integer, got {value!r} of type {type(value).__name__}"
        )
    return int(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How :func:`next_tokens` picks a token; validated on construction.

    ``top_k=0`` and ``top_p=1.0`` are stored as None (off), as transformers adds no warper for them.
    """

    do_sample: bool = False  # False: greedy (the other fields are not used); True: sample
    temperature: float = 1.0  # > 0: the scores are logits / temperature
    top_k: Optional[int] = None  # >= 1: keep the k highest scores (and ties); None or 0: off
    top_p: Optional[float] = None  # in (0, 1]: keep the smallest top set of mass >= top_p; None or 1: off
    seed: int = 0  # >= 0: with the step, the row and the vocabulary id, keys the noise

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise ConfigError(f"do_sample must be True or False, got {self.do_sample!r}")
        object.__setattr__(self, "do_sample", bool(self.do_sample))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t > 0):
            raise ConfigError(f"temperature must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise ConfigError(f"top_k must be an integer >= 1, or None or 0 (off), got {k!r}")
            object.__setattr__(self, "top_k", int(k) or None)
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
                raise ConfigError(f"top_p must be a number in (0, 1], or None (off), got {p!r}")
            object.__setattr__(self, "top_p", None if p == 1.0 else float(p))
        object.__setattr__(self, "seed", _non_negative_int(self.seed, "seed"))


def keyed_uniform(xp: Any, seed: int, step: int, rows: Any, columns: Any, vocab_size: int) -> Any:
    """Uniform numbers in the open interval (0, 1), float64, keyed by ``(seed, step, row, column)``.

    ``rows`` (batch indices) and ``columns`` (logical vocabulary ids) are non-negative integer arrays
    on the current device of ``xp`` (or ints) that broadcast together; entry ``(b, v)`` is

        u = (floor(mix(i * 0x9E3779B97F4A7C15 + key) / 2^12) + 1/2) / 2^52,   i = b * vocab_size + v,

    with ``mix`` SplitMix64's finaliser and ``key = mix((seed * 0xD1B54A32D192ED03 + step) ^ c)`` for a
    constant ``c`` that separates it from dropout's stream. ``u`` lies in ``[2^-53, 1 - 2^-53]``.
    """
    seed, step = _non_negative_int(seed, "seed"), _non_negative_int(step, "step")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    key = np.uint64(_mix_int(((seed * _SEED_MULTIPLIER + step) & _MASK64) ^ _SAMPLING_STREAM))
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic (NumPy warns for scalars only)
        z = _as_uint64(rows) * np.uint64(vocab_size) + _as_uint64(columns)  # (B, n): the flat index i
        z = z * _GOLDEN + key
        z = _mix(z)
    return ((z >> np.uint64(12)).astype(np.float64) + 0.5) * 2.0**-52


def _as_uint64(x: Any) -> Any:
    if isinstance(x, numbers.Integral):
        return np.uint64(_non_negative_int(x, "row or column index"))
    return x.astype(np.uint64)


# ---------------------------------------------------------------------- the public calls


def greedy_tokens(logits: Tensor) -> np.ndarray:
    """``argmax_v logits[b, v]`` for each row (ties to the smallest id, NaN above all), as ``(B,)``
    int64 logical ids on the host; one reduction of ``(value, id)`` pairs, no gather."""
    backend, layout, vocab = _check_logits(logits)
    xp = backend.xp
    pairs: Dict[Hashable, Pair] = {}
    for d, block in logits.blocks.items():
        with backend.device(d):
            places, first = _places(xp, layout, d, vocab)
            mask = layout.logical_mask(xp, d)
            z = block if mask is None else xp.where(mask, block, -np.inf)  # (B, V_d), padding at -inf
            pairs[d] = _block_best(xp, z, places, first, vocab)
    return _reduce_pairs(logits, pairs)


def sample_tokens(logits: Tensor, config: SamplingConfig, step: int) -> np.ndarray:
    """One token per row drawn from ``softmax`` of the warped ``logits / T`` (see the module notes), as
    ``(B,)`` int64 logical ids on the host; ``step`` (>= 0) keys the noise with ``config.seed``.

    Samples whatever ``config.do_sample`` says (:func:`next_tokens` reads it)."""
    backend, layout, vocab = _check_logits(logits)
    config, step = _check_config(config), _non_negative_int(step, "step")
    xp, comm = backend.xp, logits.comm
    top_k = None if config.top_k is None else min(config.top_k, vocab)
    if config.top_p is not None:  # the whole row is needed: gather it once, then work on it
        dst = next(iter(logits.blocks))
        row = collectives.gather_blocks(backend, logits.blocks, 1, layout, dst, comm)  # (B, V) on dst
        with backend.device(dst):
            s = _scores(row, config.temperature)  # (B, V) float64
            tau = _dense_threshold(xp, s, top_k, config.top_p)
            places = xp.arange(vocab, dtype=np.int64)
            _, index = _sampled_best(xp, s, places, 0, vocab, config.seed, step, tau)
        return _tokens(logits, index)
    scores: Dict[Hashable, Any] = {}
    for d, block in logits.blocks.items():
        with backend.device(d):
            mask = layout.logical_mask(xp, d)
            s = _scores(block, config.temperature)  # (B, V_d) float64
            scores[d] = s if mask is None else xp.where(mask, s, -np.inf)  # padding at -inf
    taus: Dict[Hashable, Any] = {d: None for d in scores}
    if top_k is not None:
        taus = _top_k_threshold(logits, scores, top_k)
    pairs: Dict[Hashable, Pair] = {}
    for d, s in scores.items():
        with backend.device(d):
            places, first = _places(xp, layout, d, vocab)
            pairs[d] = _sampled_best(xp, s, places, first, vocab, config.seed, step, taus[d])
    return _reduce_pairs(logits, pairs)


def next_tokens(logits: Tensor, config: SamplingConfig, step: int) -> np.ndarray:
    """:func:`sample_tokens` when ``config.do_sample``, else :func:`greedy_tokens`; ``(B,)`` int64."""
    config, step = _check_config(config), _non_negative_int(step, "step")
    return sample_tokens(logits, config, step) if config.do_sample else greedy_tokens(logits)


# ---------------------------------------------------------------------- checks


def _check_logits(logits: Any) -> Tuple[Any, BlockLayout, int]:
    """``(backend, layout, V)`` of 2-D float logits placed ``Split(-1)``, else ShapeError naming them."""
    if not isinstance(logits, Tensor):
        raise ShapeError(
            f"logits must be a tp_gpu.Tensor (B, V) split on the vocabulary (Split(-1)), "
            f"got {type(logits).__name__}"
        )
    placement = logits.placement
    if len(logits.shape) != 2 or not isinstance(placement, Split) or placement.axis != 1:
        raise ShapeError(
            f"logits must be a 2-D Tensor (B, V) placed Split(-1) (split on the vocabulary), got shape "
            f"{logits.shape} placed {placement!r}"
        )
    if logits.dtype.kind != "f":
        raise ShapeError(f"logits must hold floating-point numbers, got dtype {logits.dtype}")
    assert logits.backend is not None
    return logits.backend, placement.layout, int(logits.shape[1])


def _check_config(config: Any) -> SamplingConfig:
    if not isinstance(config, SamplingConfig):
        raise ConfigError(f"config must be a SamplingConfig, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------- per device


def _places(xp: Any, layout: BlockLayout, device: Hashable, vocab: int) -> Tuple[Any, int]:
    """The logical id of each place of ``device``'s block, ``(V_d,)`` int64 (``vocab`` on padding), and
    the smallest id the block holds (``vocab`` if none). Ids rise along the block's logical places."""
    places = xp.full(layout.block_lengths[device], vocab, dtype=np.int64)
    first = vocab
    for w in layout.groups[device]:
        (lo, hi), (a, b) = layout.local[w], layout.ranges[w]
        if b > a:
            places[lo:hi] = xp.arange(a, b, dtype=np.int64)
            first = min(first, a)
    return places, first


def _block_best(xp: Any, z: Any, places: Any, first: int, vocab: int) -> Pair:
    """Per row of ``z`` ``(B, V_d)`` (padding at -inf): the max (float64) and its smallest logical id.

    ``argmax`` takes the first maximum (a NaN first), which is the smallest id. It lands on padding
    only when every logical value of the row is -inf; their smallest id, ``first``, is then the answer.
    """
    if z.shape[-1] == 0:
        return xp.full(z.shape[0], -np.inf), xp.full(z.shape[0], vocab, dtype=np.int64)
    pos = xp.argmax(z, axis=-1)  # (B,)
    value = xp.take_along_axis(z, pos[:, None], axis=-1)[:, 0].astype(np.float64)  # (B,)
    index = xp.take(places, pos)  # (B,)
    return value, xp.where(index == vocab, first, index)


def _scores(block: Any, temperature: float) -> Any:
    """``s = Z / T`` in float64, a new array: the same bits for a logit on every device and layout."""
    s = block.astype(np.float64)
    if temperature != 1.0:
        s /= temperature
    return s


def _sampled_best(
    xp: Any, s: Any, places: Any, first: int, vocab: int, seed: int, step: int, tau: Any
) -> Pair:
    """The best ``(s + g, id)`` per row of ``s`` ``(B, V_d)`` (padding at -inf) over the places not
    below ``tau`` ``(B,)`` (NaN is kept), ``g = -log(-log u)`` keyed by the row and the logical id."""
    rows = xp.arange(s.shape[0], dtype=np.uint64)[:, None]  # (B, 1)
    u = keyed_uniform(xp, seed, step, rows, places[None, :], vocab)  # (B, V_d)
    noisy = s - xp.log(-xp.log(u))  # (B, V_d): s + g, -inf on padding
    if tau is not None:
        noisy = xp.where(s < tau[:, None], -np.inf, noisy)
    return _block_best(xp, noisy, places, first, vocab)


def _top_values(xp: Any, s: Any, k: int) -> Any:
    """The ``min(k, n)`` largest entries of each row of ``s`` ``(B, n)``, in any order."""
    n = s.shape[-1]
    return s if n <= k else xp.partition(s, n - k, axis=-1)[:, n - k :]


def _kth_largest(xp: Any, s: Any, k: int) -> Any:
    """The ``k``-th largest entry of each row of ``s`` ``(B, n)``, ``n >= k``, repeats counted: ``(B,)``."""
    n = s.shape[-1]
    return xp.partition(s, n - k, axis=-1)[:, n - k]


def _dense_threshold(xp: Any, s: Any, top_k: Optional[int], top_p: float) -> Any:
    """``tau`` ``(B,)`` of top-k then top-p over whole rows ``s`` ``(B, V)``: the smallest kept score."""
    if top_k is not None:
        s = xp.where(s < _kth_largest(xp, s, top_k)[:, None], -np.inf, s)  # (B, V)
    with np.errstate(invalid="ignore"):  # rows of -inf, inf or NaN: the threshold is then moot
        ascending = xp.sort(s, axis=-1)  # (B, V)
        e = xp.exp(ascending - ascending[:, -1:])  # (B, V)
        cumulative = xp.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1)  # (B, V)
        removed = cumulative <= 1.0 - top_p  # a prefix of each row (cumulative never falls)
    removed[:, -1] = False  # the largest is always kept
    first_kept = removed.sum(axis=-1)  # (B,)
    return xp.take_along_axis(ascending, first_kept[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------- communication


def _top_k_threshold(logits: Tensor, scores: Dict[Hashable, Any], k: int) -> Dict[Hashable, Any]:
    """The k-th largest score of each row over every device and process, ``(B,)`` on every device.

    Each device sends its ``k`` largest per row; their union holds the global ``k`` largest."""
    backend, comm = logits.backend, logits.comm
    assert backend is not None
    xp = backend.xp
    candidates = collectives.on_devices(backend, lambda s: _top_values(xp, s, k), scores)  # {d: (B, <=k)}
    dst = next(iter(scores))
    moved = [collectives.to_device(backend, c, dst, np.float64) for c in candidates.values()]
    with backend.device(dst):
        local = _top_values(xp, xp.concatenate(moved, axis=-1), k)  # (B, <=k)
        if local.shape[-1] < k:  # every process sends B x k
            fill = xp.full((local.shape[0], k - local.shape[-1]), -np.inf)
            local = xp.concatenate([local, fill], axis=-1)
    if comm.size > 1:
        local = _all_gather_processes(logits, local, 1, dst)  # (B, P k)
    with backend.device(dst):
        tau = _kth_largest(xp, local, k)  # (B,)
    return collectives.broadcast(backend, tau, list(scores), np.float64)


def _combine(xp: Any, best: Pair, other: Pair) -> Pair:
    """The lexicographic max of two pairs per row: NaN above all, then the larger value, the smaller id."""
    (v, i), (w, j) = best, other
    nan_v, nan_w = xp.isnan(v), xp.isnan(w)
    wins = xp.where(nan_v | nan_w, nan_w & (~nan_v | (j < i)), (w > v) | ((w == v) & (j < i)))
    return xp.where(wins, w, v), xp.where(wins, j, i)


def _reduce_pairs(logits: Tensor, pairs: Dict[Hashable, Pair]) -> np.ndarray:
    """The ids of the lexicographic max of every device's and process's pairs, on the host."""
    backend, comm = logits.backend, logits.comm
    assert backend is not None
    xp = backend.xp
    dst = next(iter(pairs))
    best: Optional[Pair] = None
    for v, i in pairs.values():
        moved = (
            collectives.to_device(backend, v, dst, np.float64),
            collectives.to_device(backend, i, dst, np.int64),
        )
        with backend.device(dst):
            best = moved if best is None else _combine(xp, best, moved)
    assert best is not None
    if comm.size > 1:
        with backend.device(dst):
            local = xp.stack([best[0], best[1].astype(np.float64)])[None]  # (1, 2, B): ids < 2^53 exact
        every = _all_gather_processes(logits, local, 0, dst)  # (P, 2, B), in rank order
        with backend.device(dst):
            best = None
            for r in range(every.shape[0]):
                pair = (every[r, 0], every[r, 1].astype(np.int64))
                best = pair if best is None else _combine(xp, best, pair)
        assert best is not None
    return _tokens(logits, best[1])


def _all_gather_processes(logits: Tensor, x: Any, axis: int, dst: Hashable) -> Any:
    """Every process's ``x`` (one shape on every process, on ``dst``), concatenated along ``axis`` in
    rank order: the gather of a dimension of which each process holds one equal span."""
    assert logits.backend is not None
    comm, n = logits.comm, x.shape[axis]
    spans = [(r * n, (r + 1) * n) for r in range(comm.size)]
    layout = BlockLayout([n], [dst], start=comm.rank * n, total=comm.size * n, spans=spans)
    return collectives.gather_blocks(logits.backend, {dst: x}, axis, layout, dst, comm)


def _tokens(logits: Tensor, index: Any) -> np.ndarray:
    """``index`` ``(B,)`` as a host int64 array, after the device checks ``logits`` carries (a bad id)."""
    if logits.checks or device_checks.has_pending():
        device_checks.verify_all(logits.checks)
    assert logits.backend is not None
    return np.asarray(collectives.to_host(logits.backend, index), dtype=np.int64)
