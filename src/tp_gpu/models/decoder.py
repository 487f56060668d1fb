"""Decoder language models (GPT-2, Llama, Qwen2), tensor-parallel end to end, written forward-only.

For ids ``t`` ``(B, S)`` at positions ``pos``::

    x_0 = E[t] (+ P[pos], GPT-2's learned positions)                     # (B, S, H)
    h_l = x_{l-1} + Attention(Norm_1(x_{l-1}), pos)                      # causal, grouped-query
    x_l = h_l + MLP(Norm_2(h_l))                                         # (B, S, H)
    logits = Norm_f(x_L) W_head                                          # (B, S, V), split on V

GPT-2: LayerNorm, learned positions, ``fc2(gelu_tanh(fc1 z))``, head tied to
``E``. Llama: RMSNorm, rotary positions, ``down(silu(gate z) * up z)``, the
head tied or not. Qwen2: Llama with biases on q, k and v. Every matrix is
split as Megatron-LM splits it (:mod:`tp_gpu.layers.decoder_attention`,
:class:`~tp_gpu.layers.gated_mlp.GatedMLP`, the vocabulary-parallel
embedding and head), so a layer costs one reduction after the attention and
one after the MLP. The logits stay split on the vocabulary; padding of the
vocabulary (``pad_to_multiple_of``) is never part of them.

:meth:`DecoderForCausalLM.forward` is the training and scoring path (on the
tape; sequence parallelism works); :mod:`.generation` decodes with a
key-value cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Union

import numpy as np

from ..config import TensorParallelConfig
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError
from ..layers.base import check_seed
from ..layers.decoder_attention import AttentionStep, DecoderAttention, attention_masks
from ..layers.embedding import ParallelEmbedding
from ..layers.gated_mlp import GatedMLP
from ..layers.kv_cache import KVCache
from ..layers.linear import ColumnParallelLinear
from ..layers.lm_head import TiedLMHead
from ..layers.mlp import ParallelMLP
from ..layers.norm import LayerNorm
from ..layers.rms_norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..module import Module, Sequential
from ..tensor import Tensor
from .decoder_config import DecoderConfig
from .generation import GenerationMixin

__all__ = ["DecoderForCausalLM", "DecoderLayer"]

Norm = Union[LayerNorm, RMSNorm]


def _norm(c: DecoderConfig, config: TensorParallelConfig) -> Norm:
    if c.norm == "layernorm":
        return LayerNorm(c.hidden_size, config, eps=c.norm_eps)
    return RMSNorm(c.hidden_size, config, eps=c.norm_eps)


class DecoderLayer(Module):
    """``h = x + attention(norm_1(x))``, ``y = h + mlp(norm_2(h))``: a pre-norm decoder layer."""

    def __init__(self, c: DecoderConfig, config: TensorParallelConfig, index: int, seed: int) -> None:
        super().__init__()
        self.index = index
        self.input_norm = _norm(c, config)
        self.attention = DecoderAttention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            config,
            head_dim=c.head_dim,
            seed=seed,
            qkv_bias=c.qkv_bias,
            o_bias=c.o_bias,
        )
        self.post_norm = _norm(c, config)
        self.mlp: Module
        if c.gated_mlp:
            self.mlp = GatedMLP(
                c.hidden_size,
                c.intermediate_size,
                config,
                seed=seed + 4,
                bias=c.mlp_bias,
                activation=c.hidden_act,
            )
        else:
            self.mlp = ParallelMLP(
                c.hidden_size,
                c.intermediate_size,
                c.hidden_size,
                config,
                seed=seed + 4,
                activation=c.hidden_act,
                bias=c.mlp_bias,
            )

    def forward(self, x: Any, step: AttentionStep) -> Tensor:
        h = x + self.attention(self.input_norm(x), step, self.index)  # (B, S, H)
        return h + self.mlp(self.post_norm(h))  # (B, S, H)


class DecoderForCausalLM(Module, GenerationMixin):
    """A decoder language model of ``decoder_config`` whose every weight matrix is split over the workers.

    Parameters
    ----------
    decoder_config : DecoderConfig
        The architecture and sizes (``config.json``: :meth:`DecoderConfig.from_json`).
    config : TensorParallelConfig, optional
        Workers, backend, devices, dtype, sequence parallelism (default ``TensorParallelConfig()``).
    seed : int
        Seeds the random initial weights (which :meth:`from_pretrained` overwrites).
    pad_to_multiple_of : int, optional
        Pad the vocabulary of the embedding and the head to equal shards of a
        multiple of it (vLLM's padding); padded rows never reach the logits.

    Attributes
    ----------
    embed_tokens, embed_positions (GPT-2 only), layers (Sequential of DecoderLayer), norm, lm_head.
    """

    def __init__(
        self,
        decoder_config: DecoderConfig,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        pad_to_multiple_of: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(decoder_config, DecoderConfig):
            raise ConfigError(f"decoder_config must be a DecoderConfig, got {type(decoder_config).__name__}")
        config = TensorParallelConfig() if config is None else config
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        seed = check_seed(seed)
        c = self.decoder_config = decoder_config
        self.config = config
        pad = pad_to_multiple_of
        self.embed_tokens = ParallelEmbedding(
            c.vocab_size, c.hidden_size, config, seed=seed, pad_to_multiple_of=pad
        )
        if c.learned_positions:
            self.embed_positions = ParallelEmbedding(
                c.max_position_embeddings, c.hidden_size, config, seed=seed + 1
            )
        self.layers = Sequential(
            *[DecoderLayer(c, config, i, seed + 2 + 8 * i) for i in range(c.num_hidden_layers)]
        )
        self.norm = _norm(c, config)
        self.lm_head: Module
        if c.tie_word_embeddings:
            self.lm_head = TiedLMHead(self.embed_tokens)
        else:
            split_config = dataclasses.replace(config, gather_output=False)
            self.lm_head = ColumnParallelLinear(
                c.hidden_size, c.vocab_size, split_config, seed=seed + 2, bias=False, pad_to_multiple_of=pad
            )
        self.rotary = (
            None if c.learned_positions else RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Any,
        config: Optional[TensorParallelConfig] = None,
        *,
        pad_to_multiple_of: Optional[int] = None,
    ) -> DecoderForCausalLM:
        """The model of the Hugging Face folder ``model_dir``, split over ``config``'s workers, in eval mode.

        See :func:`tp_gpu.models.decoder_loading.load_decoder`: ``config.json`` and every tensor's
        name, shape and dtype are checked before any weight is read; then the tensors are read one
        at a time and split onto the devices.
        """
        from .decoder_loading import load_decoder

        return load_decoder(model_dir, config, pad_to_multiple_of=pad_to_multiple_of, expected=cls)

    def save_pretrained(self, folder: Any, *, max_shard_size: Union[int, str] = "50GB") -> None:
        """Write a Hugging Face folder (``config.json``, ``model.safetensors`` or shards and an index)
        that transformers' ``AutoModelForCausalLM`` and :meth:`from_pretrained` load; collective with
        several processes (rank 0 writes). See :func:`tp_gpu.models.hf_export.save_pretrained`."""
        from .hf_export import save_pretrained

        save_pretrained(self, folder, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ properties

    @property
    def decoder_layers(self) -> List[DecoderLayer]:
        """The decoder layers, in order."""
        return self.layers.children()  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    @property
    def vocab_size(self) -> int:
        return self.decoder_config.vocab_size

    # ------------------------------------------------------------------ compute

    def check_ids(self, input_ids: Any) -> np.ndarray:
        """``input_ids`` as a host ``(B, S)`` integer array; ShapeError naming what it got."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or 0 in ids.shape or ids.dtype.kind not in "iu":
            raise ShapeError(
                f"input_ids must be a non-empty (batch, seq) array of integer token ids, got shape "
                f"{ids.shape} of dtype {ids.dtype}"
            )
        return ids

    def step(
        self,
        shape: tuple,
        attention_mask: Optional[np.ndarray],
        position_ids: np.ndarray,
        cache: Optional[KVCache] = None,
        start: int = 0,
    ) -> AttentionStep:
        """What the layers share in one pass over ``shape`` ``(B, S)`` new positions: rotary angles for
        ``position_ids``, each device's mask from ``attention_mask`` ``(B, start + S)`` (or None),
        the cache and the ``start`` positions it held."""
        angles = None if self.rotary is None else self.rotary.angles(position_ids)
        group = self.group
        masks = attention_masks(
            group.backend, group.distinct_devices, attention_mask, start, shape[1], self.dtype
        )
        return AttentionStep(angles, masks, cache, start)

    def hidden_states(self, ids: np.ndarray, position_ids: np.ndarray, step: AttentionStep) -> Tensor:
        """``Norm_f(x_L)`` ``(B, S, H)`` of ids ``(B, S)`` at ``position_ids`` ``(B, S)``."""
        h = self.embed_tokens(ids)  # (B, S, H)
        if self.decoder_config.learned_positions:
            h = h + self.embed_positions(position_ids)  # (B, S, H)
        for layer in self.decoder_layers:
            h = layer(h, step)
        return self.norm(h)

    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None) -> Tensor:
        """The logits ``(B, S, V)``, split on the vocabulary, for ``input_ids`` ``(B, S)``.

        ``attention_mask`` ``(B, S)`` of 1 (keep) / 0 (pad) hides padded keys;
        ``position_ids`` default to ``0 .. S - 1`` on every row, as
        transformers' forward (:meth:`generate` derives them from the mask,
        as transformers' ``generate`` does). Everything is checked first.
        """
        ids = self.check_ids(input_ids)
        batch, seq = ids.shape
        keep = None if attention_mask is None else self._check_mask(attention_mask, ids.shape)
        if position_ids is None:
            positions = np.broadcast_to(np.arange(seq), (batch, seq))
        else:
            positions = np.asarray(position_ids)
            if positions.shape != ids.shape or positions.dtype.kind not in "iu":
                raise ShapeError(
                    f"position_ids must be integers of the shape of input_ids {ids.shape}, got shape "
                    f"{positions.shape} of dtype {positions.dtype}"
                )
        limit = self.decoder_config.max_position_embeddings
        if self.decoder_config.learned_positions and (positions.min() < 0 or positions.max() >= limit):
            raise IndexOutOfRangeError(
                f"position ids must lie in [0, {limit}) (max_position_embeddings, GPT-2's n_positions), got "
                f"[{int(positions.min())}, {int(positions.max())}] for input_ids of shape {ids.shape}"
            )
        step = self.step(ids.shape, keep, positions)
        return self.lm_head(self.hidden_states(ids, positions, step))  # (B, S, V), split on V

    @staticmethod
    def _check_mask(attention_mask: Any, shape: tuple) -> np.ndarray:
        mask = np.asarray(attention_mask)
        if mask.shape != tuple(shape) or mask.dtype.kind not in "biuf":
            raise ShapeError(
                f"attention_mask must be (batch, seq) {tuple(shape)} of 1 (keep) / 0 (pad), got shape "
                f"{mask.shape} of dtype {mask.dtype}"
            )
        return mask

    def extra_repr(self) -> str:
        c = self.decoder_config
        return (
            f"model_type={c.model_type!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}, kv_heads={c.num_key_value_heads}, vocab={c.vocab_size}, "
            f"n_workers={self.config.n_workers}, dtype={self.dtype.name!r}"
        )
