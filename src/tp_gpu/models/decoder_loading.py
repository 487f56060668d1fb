"""Loading decoder models from Hugging Face folders: ``AutoModelForCausalLM.from_pretrained``.

The class comes from ``config.json``'s ``model_type`` (``gpt2``, ``llama``,
``qwen2``; any other is a ConfigError naming it). Every tensor's name, shape
and dtype is checked from the files' headers before any is read
(:class:`~.decoder_checkpoint.DecoderCheckpoint`); then the tensors are read
one at a time and split onto the devices. Checkpoint names map onto the
module tree as follows (``{i}`` a layer):

=============================================  ================================================
GPT-2 (``transformer.`` prefix optional)        tp_gpu
=============================================  ================================================
``wte``, ``wpe``                                ``embed_tokens``, ``embed_positions``
``h.{i}.ln_1``, ``h.{i}.ln_2``, ``ln_f``        ``layers.{i}.input_norm``, ``.post_norm``, ``norm``
``h.{i}.attn.c_attn`` (in, 3H): q | k | v       ``layers.{i}.attention.q_proj``, ``k_proj``, ``v_proj``
``h.{i}.attn.c_proj`` (in, out)                 ``layers.{i}.attention.o_proj``
``h.{i}.mlp.c_fc``, ``h.{i}.mlp.c_proj``        ``layers.{i}.mlp.fc1``, ``.fc2``
=============================================  ================================================

=============================================  ================================================
Llama, Qwen2 (``model.`` prefix)               tp_gpu
=============================================  ================================================
``embed_tokens``, ``norm``, ``lm_head``        ``embed_tokens``, ``norm``, ``lm_head``
``layers.{i}.input_layernorm``                  ``layers.{i}.input_norm``
``layers.{i}.post_attention_layernorm``         ``layers.{i}.post_norm``
``layers.{i}.self_attn.{q,k,v,o}_proj``         ``layers.{i}.attention.{q,k,v,o}_proj`` (transposed)
``layers.{i}.mlp.{gate,up,down}_proj``          ``layers.{i}.mlp`` (gate and up interleaved)
=============================================  ================================================
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type

import numpy as np

from ..config import TensorParallelConfig
from ..errors import ConfigError
from .decoder import DecoderForCausalLM, DecoderLayer
from .decoder_checkpoint import DecoderCheckpoint, read_decoder_config

__all__ = [
    "AutoModelForCausalLM",
    "GPT2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "load_decoder",
]

Getter = Callable[[str], np.ndarray]


class GPT2ForCausalLM(DecoderForCausalLM):
    """GPT-2 (``model_type: gpt2``): LayerNorm, learned positions, GELU (tanh) MLP, tied head."""

    model_type = "gpt2"


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama (``model_type: llama``): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention."""

    model_type = "llama"


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 (``model_type: qwen2``): Llama with biases on the query, key and value projections."""

    model_type = "qwen2"


#: ``model_type`` -> class.
MODEL_CLASSES: Dict[str, Type[DecoderForCausalLM]] = {
    cls.model_type: cls for cls in (GPT2ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM)
}


class AutoModelForCausalLM:
    """Picks the decoder class of a folder by its ``config.json``'s ``model_type``, as transformers' does."""

    @staticmethod
    def from_pretrained(
        model_dir: Any,
        config: Optional[TensorParallelConfig] = None,
        *,
        pad_to_multiple_of: Optional[int] = None,
    ) -> DecoderForCausalLM:
        """The decoder of the Hugging Face folder ``model_dir`` (see :func:`load_decoder`)."""
        return load_decoder(model_dir, config, pad_to_multiple_of=pad_to_multiple_of)


def load_decoder(
    model_dir: Any,
    config: Optional[TensorParallelConfig] = None,
    *,
    pad_to_multiple_of: Optional[int] = None,
    expected: Optional[type] = None,
) -> DecoderForCausalLM:
    """The decoder of ``model_dir``, split over ``config``'s workers, in eval mode.

    Reads ``config.json`` and ``model.safetensors`` (or the shards of
    ``model.safetensors.index.json``). The config and every tensor are checked
    before any weight is read (CheckpointError / ConfigError naming the file
    and the value); ``expected`` (a class's own ``from_pretrained``) must
    match the folder's ``model_type``.
    """
    decoder_config = read_decoder_config(model_dir)
    cls = MODEL_CLASSES[decoder_config.model_type]
    if expected is not None and expected not in (DecoderForCausalLM, cls):
        raise ConfigError(
            f"{model_dir}: model_type is {decoder_config.model_type!r}, so it loads as {cls.__name__}; "
            f"got {expected.__name__}.from_pretrained (use AutoModelForCausalLM.from_pretrained)"
        )
    with DecoderCheckpoint(model_dir, decoder_config) as checkpoint:
        checkpoint.check()
        model = cls(decoder_config, config, pad_to_multiple_of=pad_to_multiple_of)
        load_weights(model, checkpoint.get)
    model.eval()
    return model


def load_weights(model: DecoderForCausalLM, get: Getter) -> None:
    """Overwrite every weight of ``model`` from the canonical checkpoint names ``get`` reads."""
    c = model.decoder_config
    gpt2 = c.model_type == "gpt2"
    model.embed_tokens.load_dense(get("wte.weight" if gpt2 else "embed_tokens.weight"))
    norm: Any = model.norm  # LayerNorm (GPT-2) or RMSNorm
    if gpt2:
        model.embed_positions.load_dense(get("wpe.weight"))
        norm.load_dense(get("ln_f.weight"), get("ln_f.bias"))
    else:
        norm.load_dense(get("norm.weight"))
    for layer in model.decoder_layers:
        (_load_gpt2_layer if gpt2 else _load_llama_layer)(layer, get, c.hidden_size)
    if not c.tie_word_embeddings:
        head: Any = model.lm_head  # a ColumnParallelLinear when untied
        head.load_dense(get("lm_head.weight"), None, layout="out_in")


def _load_gpt2_layer(layer: DecoderLayer, get: Getter, hidden: int) -> None:
    """GPT-2's ``Conv1D`` weights are stored ``(in, out)``; ``c_attn``'s columns are ``q | k | v``."""
    p = f"h.{layer.index}."
    layer.input_norm.load_dense(get(p + "ln_1.weight"), get(p + "ln_1.bias"))  # type: ignore[call-arg]
    layer.post_norm.load_dense(get(p + "ln_2.weight"), get(p + "ln_2.bias"))  # type: ignore[call-arg]
    qkv_w, qkv_b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")  # (H, 3H), (3H,)
    attention = layer.attention
    for j, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        columns = slice(j * hidden, (j + 1) * hidden)
        proj.load_dense(qkv_w[:, columns], qkv_b[columns], layout="in_out")
    attention.o_proj.load_dense(get(p + "attn.c_proj.weight"), get(p + "attn.c_proj.bias"), layout="in_out")
    mlp: Any = layer.mlp
    mlp.load_dense(
        get(p + "mlp.c_fc.weight"),
        get(p + "mlp.c_fc.bias"),
        get(p + "mlp.c_proj.weight"),
        get(p + "mlp.c_proj.bias"),
        layout="in_out",
    )


def _load_llama_layer(layer: DecoderLayer, get: Getter, hidden: int) -> None:
    """Llama and Qwen2 store ``nn.Linear`` weights ``(out, in)``."""
    p = f"layers.{layer.index}."
    c_attention = layer.attention
    layer.input_norm.load_dense(get(p + "input_layernorm.weight"))  # type: ignore[call-arg]
    layer.post_norm.load_dense(get(p + "post_attention_layernorm.weight"))  # type: ignore[call-arg]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        proj = getattr(c_attention, name)
        bias = get(f"{p}self_attn.{name}.bias") if proj.has_bias else None
        proj.load_dense(get(f"{p}self_attn.{name}.weight"), bias, layout="out_in")
    mlp: Any = layer.mlp
    biases = (
        [get(f"{p}mlp.{name}.bias") for name in ("gate_proj", "up_proj", "down_proj")]
        if mlp.gate_up.has_bias
        else [None, None, None]
    )
    mlp.load_dense(
        get(p + "mlp.gate_proj.weight"),
        get(p + "mlp.up_proj.weight"),
        get(p + "mlp.down_proj.weight"),
        *biases,
        layout="out_in",
    )
