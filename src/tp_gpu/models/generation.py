"""Text generation with a key-value cache, as transformers' ``generate`` does it, split over the workers.

One prefill pass runs the prompt ``(B, S)`` through every layer and fills
cache slots ``0 .. S - 1``; each decoding step then runs one token per row
and fills one slot. Only the last position's logits are computed, and they
stay split on the vocabulary: the next token is picked per shard and then
reduced (:mod:`.sampling`). A batch of prompts of different lengths is
padded on the left, and its ``attention_mask`` hides the padding; the
position of token ``i`` of a row is the number of real tokens before it
(``cumsum(mask) - 1``, 0 on padding), as transformers' ``generate`` sets
``position_ids``.

A row that emits an end-of-sequence id is finished: it gets ``pad_token_id``
from then on, and generation stops when every row is finished or after
``max_new_tokens``.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from ..autograd import no_grad
from ..config import check_positive_int
from ..errors import ConfigError, ShapeError
from ..layers.kv_cache import KVCache
from .sampling import SamplingConfig, next_tokens

__all__ = ["GenerationMixin", "left_padded_positions"]

TokenIds = Union[None, int, Sequence[int]]


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
    """``cumsum(mask) - 1`` per row, 0 where ``mask`` is 0: transformers' ``generate`` position ids."""
    positions = np.cumsum(mask != 0, axis=1) - 1  # (B, S)
    return np.where(mask != 0, positions, 0)


def _check_left_padded(mask: np.ndarray) -> None:
    """ShapeError unless every row is zeros then ones (padding on the left) with at least one token."""
    keep = mask != 0
    empty = np.flatnonzero(~keep.any(axis=1))
    if empty.size:
        raise ShapeError(f"attention_mask row {int(empty[0])} has no token (all 0); expected at least one 1")
    right = keep[:, :-1] & ~keep[:, 1:]  # a 1 followed by a 0
    if right.any():
        row = int(np.flatnonzero(right.any(axis=1))[0])
        raise ShapeError(
            f"attention_mask row {row} is {mask[row].tolist()}: padding must be on the left (zeros, then "
            "ones), as decoder-only generation needs; pad the prompts on the left"
        )


def _token_set(value: TokenIds, what: str) -> Tuple[int, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, (int, np.integer)) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{what} must be a token id (int >= 0) or a list of them, got {value!r}")
    return tuple(int(v) for v in values)


class GenerationMixin:
    """``generate`` and ``stream`` for :class:`~tp_gpu.models.decoder.DecoderForCausalLM`."""

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        eos_token_id: TokenIds = None,
        pad_token_id: Optional[int] = None,
    ) -> np.ndarray:
        """The sequences ``(B, S + n)``: the prompts followed by ``n <= max_new_tokens`` new tokens.

        As transformers' ``generate``: greedy unless ``do_sample``; sampling
        applies ``temperature``, then ``top_k``, then ``top_p`` (None: off; note
        transformers' own default is ``top_k=50``); ``eos_token_id`` (default:
        the model config's) finishes a row, which is then filled with
        ``pad_token_id`` (default: the config's, else the first end-of-sequence id); it stops
        early when every row is finished. Sampling is keyed by ``seed``, the
        step, the row and the vocabulary index, so the same seed gives the
        same tokens at every worker count.
        """
        ids, steps = self.check_ids(input_ids), []  # type: ignore[attr-defined]
        for tokens in self.stream(
            ids,
            attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        ):
            steps.append(tokens)
        new = np.stack(steps, axis=1) if steps else np.zeros((ids.shape[0], 0), dtype=np.int64)
        return np.concatenate([ids.astype(np.int64), new], axis=1)  # (B, S + n)

    def stream(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: int = 0,
        eos_token_id: TokenIds = None,
        pad_token_id: Optional[int] = None,
    ) -> Iterator[np.ndarray]:
        """An iterator of each step's new tokens ``(B,)``, made as they are read (see :meth:`generate`).

        Everything is checked by the call itself, before the first pass: the
        ids, the mask (padding on the left), the sampling settings, and room
        for ``max_new_tokens`` within the model's positions.
        """
        model: Any = self
        ids = model.check_ids(input_ids)
        batch, seq = ids.shape
        new = check_positive_int(max_new_tokens, "max_new_tokens")
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p, seed)
        mask = (
            np.ones(ids.shape, dtype=np.int64)
            if attention_mask is None
            else model._check_mask(attention_mask, ids.shape)
        )
        _check_left_padded(mask)
        c = model.decoder_config
        eos = _token_set(c.eos_token_ids if eos_token_id is None else eos_token_id, "eos_token_id")
        pad = (
            _token_set(pad_token_id, "pad_token_id") or _token_set(c.pad_token_id, "pad_token_id") or eos[:1]
        )
        if model.config.sequence_parallel:
            raise ConfigError(
                "generate needs sequence_parallel=False (a decoding step has one position per row), got "
                "a model built with sequence_parallel=True; build it with sequence_parallel=False"
            )
        positions = left_padded_positions(mask)  # (B, S)
        last = int(positions[mask != 0].max()) + new - 1  # the position of the last token fed
        if c.learned_positions and last >= c.max_position_embeddings:
            raise ConfigError(
                f"a prompt reaching position {int(positions[mask != 0].max())} and max_new_tokens={new} feed "
                f"positions up to {last}; the model has {c.max_position_embeddings} (0 .. "
                f"{c.max_position_embeddings - 1})"
            )
        model.embed_tokens._check_ids(ids)  # ids in range, before anything runs
        return self._decode(ids, mask, positions, new, sampling, eos, pad[0] if pad else None)

    def _decode(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray,
        new: int,
        sampling: SamplingConfig,
        eos: Tuple[int, ...],
        pad: Optional[int],
    ) -> Iterator[np.ndarray]:
        model: Any = self
        batch, seq = ids.shape
        plan = model.decoder_layers[0].attention.plan
        with no_grad():
            cache = KVCache(plan, len(model.decoder_layers), batch, seq + new, model.backend, model.dtype)
            unfinished = np.ones(batch, dtype=bool)
            tokens, last_positions = ids, positions
            for step in range(new):
                logits = self._last_logits(tokens, mask, last_positions, cache)  # (B, V), split on V
                chosen = next_tokens(logits, sampling, step)  # (B,)
                if eos:
                    if pad is not None:
                        chosen = np.where(unfinished, chosen, pad)
                    unfinished &= ~np.isin(chosen, eos)
                yield chosen
                if not unfinished.any() or step == new - 1:
                    return
                tokens = chosen[:, None]  # (B, 1)
                last_positions = last_positions[:, -1:] + 1  # (B, 1)
                mask = np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)  # (B, L + 1)

    def _last_logits(
        self, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: KVCache
    ) -> Any:
        """The logits ``(B, V)`` of the last of ``tokens`` ``(B, S)``, whose keys go into ``cache``."""
        model: Any = self
        cache.check_room(tokens.shape[1])
        step = model.step(tokens.shape, mask, positions, cache, cache.length)
        hidden = model.hidden_states(tokens, positions, step)  # (B, S, H)
        cache.advance(tokens.shape[1])
        return model.lm_head(hidden[:, -1])  # (B, H) -> (B, V), split on V
