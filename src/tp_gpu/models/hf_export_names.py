"""The Hugging Face side of an export: ``config.json`` and every tensor's name, layout and gather.

The inverse of the loaders' name tables (:mod:`.bert` for BERT, :mod:`.decoder_loading` for
GPT-2, Llama and Qwen2); :mod:`.hf_export` writes the folder. A config is checked to read back
as the model's own (:meth:`BertConfig.from_dict`, :meth:`DecoderConfig.from_dict`) before any
weight is gathered. Each tensor is a function that gathers it (collective with several
processes) in transformers' layout: ``nn.Linear`` ``(out, in)`` (ours transposed), GPT-2's
``Conv1D`` ``(in, out)`` as ours, ``c_attn = q | k | v``; BERT's Q/K/V cut from the fused
``qkv`` and Llama's gate/up from the interleaved ``gate_up`` (column ``2j`` gate, ``2j + 1`` up),
each fused array gathered once and dropped after its last cut.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import fields, replace
from typing import Any, Callable, Dict

import numpy as np

from ..errors import ConfigError
from .decoder_config import DecoderConfig
from .hf_loader import BertConfig

__all__ = ["bert_config_dict", "bert_fetches", "decoder_config_dict", "decoder_fetches"]

Fetch = Callable[[], np.ndarray]

_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: tp_gpu activation -> Hugging Face name (GPT-2 calls the tanh form gelu_new).
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


# --------------------------------------------------------------------------------------- config.json


def _checked(
    raw: Dict[str, Any], parse: Callable[[Dict[str, Any]], Any], own: Any, what: str
) -> Dict[str, Any]:
    """``raw`` if it reads back as ``own``; else ConfigError naming each field that would change."""
    back = parse(raw)
    changed = [f"{f.name}={getattr(own, f.name)!r} (written as {getattr(back, f.name)!r})"
               for f in fields(own) if getattr(own, f.name) != getattr(back, f.name)]  # fmt: skip
    if changed:
        raise ConfigError(
            f"this {what} cannot be written as a transformers config.json: {', '.join(changed)}"
        )
    return raw


def bert_config_dict(config: BertConfig, dtype: str) -> Dict[str, Any]:
    """``config.json`` of a ``transformers.BertModel`` with the sizes of ``config``, weights ``dtype``."""
    raw = {
        "architectures": ["BertModel"], "model_type": "bert", "dtype": dtype,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "hidden_act": _ACTIVATIONS.get(config.hidden_act),
        "layer_norm_eps": config.layer_norm_eps, "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
    }  # fmt: skip
    return _checked(raw, BertConfig.from_dict, config, "BertConfig")


def decoder_config_dict(config: DecoderConfig, dtype: str) -> Dict[str, Any]:
    """``config.json`` of transformers' model of ``config.model_type``, weights ``dtype``.

    ConfigError when the config has a choice that model_type's transformers class does not make
    (GPT-2 without biases, Qwen2 with a bias on ``o_proj``, ...): it must read back as itself.
    """
    c = config
    eos = list(c.eos_token_ids)
    raw: Dict[str, Any] = {
        "architectures": [_ARCHITECTURES[c.model_type]], "model_type": c.model_type, "dtype": dtype,
        "vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_word_embeddings, "use_cache": True,
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": c.pad_token_id,
    }  # fmt: skip
    act = _ACTIVATIONS.get(c.hidden_act)
    gpt2_act = "gelu_new" if act == "gelu_pytorch_tanh" else act
    if c.model_type == "gpt2":
        raw.update(
            n_embd=c.hidden_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
            n_inner=c.intermediate_size, n_positions=c.max_position_embeddings,
            layer_norm_epsilon=c.norm_eps, activation_function=gpt2_act,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
            add_cross_attention=False,
        )  # fmt: skip
    else:
        rope: Dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_scaling is not None:
            s = c.rope_scaling
            rope.update(rope_type=s.rope_type, factor=s.factor)
            if s.rope_type == "llama3":
                rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                            original_max_position_embeddings=s.original_max_position_embeddings)  # fmt: skip
        raw.update(
            hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps, hidden_act=act,
            rope_parameters=rope,
        )  # fmt: skip
        if c.model_type == "llama":
            raw.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
        else:
            raw.update(use_sliding_window=False, sliding_window=None,
                       layer_types=["full_attention"] * c.num_hidden_layers)  # fmt: skip
    return _checked(raw, DecoderConfig.from_dict, replace(c, torch_dtype=dtype), "DecoderConfig")


# --------------------------------------------------------------------------------------- tensors


class _Fused:
    """Several exported tensors cut from one gathered array: gathered at the first cut, dropped
    after the last, so only one fused array is held at a time."""

    def __init__(self, gather: Callable[[], Any], cuts: int) -> None:
        self._gather, self._left = gather, cuts
        self._value: Any = None

    def cut(self, how: Callable[[Any], np.ndarray]) -> Fetch:
        def fetch() -> np.ndarray:
            if self._value is None:
                self._value = self._gather()
            out, self._left = how(self._value), self._left - 1
            if self._left == 0:
                self._value = None
            return out

        return fetch


def _transposed(linear: Any) -> Fetch:
    """Our ``(in, out)`` weight of ``linear`` as ``nn.Linear``'s ``(out, in)``."""
    return lambda: linear.full_weight().T


def bert_fetches(model: Any) -> Dict[str, Fetch]:
    """BERT name -> a function gathering that tensor (see :mod:`.bert`'s table)."""
    emb = model.embeddings
    out: Dict[str, Fetch] = {
        f"embeddings.{n}.weight": getattr(emb, n).weight.full
        for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")
    }
    out.update(
        {"embeddings.LayerNorm.weight": emb.norm.weight.full, "embeddings.LayerNorm.bias": emb.norm.bias.full}
    )
    for i, layer in enumerate(model.layers):
        p, attention = f"encoder.layer.{i}.", layer.attention
        qkv = _Fused(functools.partial(attention.split_qkv, layout="out_in"), 6)  # q_w, q_b, k_w, ...
        for j, part in enumerate(("query", "key", "value")):
            out[f"{p}attention.self.{part}.weight"] = qkv.cut(operator.itemgetter(2 * j))
            out[f"{p}attention.self.{part}.bias"] = qkv.cut(operator.itemgetter(2 * j + 1))
        linears = {"attention.output.dense": attention.out, "intermediate.dense": layer.mlp.fc1,
                   "output.dense": layer.mlp.fc2}  # fmt: skip
        for name, lin in linears.items():
            out[f"{p}{name}.weight"] = _transposed(lin)
            out[f"{p}{name}.bias"] = lin.full_bias
        for name, norm in (
            ("attention.output.LayerNorm", layer.attention_norm),
            ("output.LayerNorm", layer.mlp_norm),
        ):
            out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = norm.weight.full, norm.bias.full
    return out


def decoder_fetches(model: Any) -> Dict[str, Fetch]:
    """Canonical decoder name (:func:`decoder_tensor_shapes`) -> a function gathering that tensor."""
    c = model.decoder_config
    gpt2 = c.model_type == "gpt2"
    out: Dict[str, Fetch] = {
        ("wte.weight" if gpt2 else "embed_tokens.weight"): model.embed_tokens.weight.full
    }
    if gpt2:
        out.update({"wpe.weight": model.embed_positions.weight.full,
                    "ln_f.weight": model.norm.weight.full, "ln_f.bias": model.norm.bias.full})  # fmt: skip
    else:
        out["norm.weight"] = model.norm.weight.full
    for layer in model.decoder_layers:
        out.update((_gpt2_layer if gpt2 else _llama_layer)(layer))
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = lambda: model.lm_head.full_weight().T  # (H, V) -> (V, H)
    return out


def _gpt2_layer(layer: Any) -> Dict[str, Fetch]:
    """Conv1D weights ``(in, out)`` as we hold them; ``c_attn`` joins q | k | v (``_load_gpt2_layer``)."""
    p, a, mlp = f"h.{layer.index}.", layer.attention, layer.mlp
    qkv = (a.q_proj, a.k_proj, a.v_proj)
    out: Dict[str, Fetch] = {
        p + "attn.c_attn.weight": lambda: np.concatenate([x.full_weight() for x in qkv], axis=1),  # (H, 3H)
        p + "attn.c_attn.bias": lambda: np.concatenate([x.full_bias() for x in qkv]),  # (3H,)
    }
    for name, lin in (("attn.c_proj", a.o_proj), ("mlp.c_fc", mlp.fc1), ("mlp.c_proj", mlp.fc2)):
        out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = lin.full_weight, lin.full_bias
    for name, norm in (("ln_1", layer.input_norm), ("ln_2", layer.post_norm)):
        out[f"{p}{name}.weight"], out[f"{p}{name}.bias"] = norm.weight.full, norm.bias.full
    return out


def _llama_layer(layer: Any) -> Dict[str, Fetch]:
    """``nn.Linear`` weights ``(out, in)``: ours transposed; gate/up from the interleaved gate_up."""
    p, a, mlp = f"layers.{layer.index}.", layer.attention, layer.mlp
    out: Dict[str, Fetch] = {p + "input_layernorm.weight": layer.input_norm.weight.full,
                             p + "post_attention_layernorm.weight": layer.post_norm.weight.full}  # fmt: skip
    linears = {f"self_attn.{n}": getattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    linears["mlp.down_proj"] = mlp.down
    for name, lin in linears.items():  # ReplicatedLinear k/v too: full_weight is (in, out) for all
        out[f"{p}{name}.weight"] = _transposed(lin)
        if lin.has_bias:
            out[f"{p}{name}.bias"] = lin.full_bias
    gate_up = _Fused(mlp.gate_up.full_weight, 2)  # (H, 2I): column 2j gate, 2j + 1 up
    out[p + "mlp.gate_proj.weight"] = gate_up.cut(lambda w: w[:, 0::2].T)  # (I, H)
    out[p + "mlp.up_proj.weight"] = gate_up.cut(lambda w: w[:, 1::2].T)
    if mlp.gate_up.has_bias:
        pair = _Fused(mlp.gate_up.full_bias, 2)
        out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = (
            pair.cut(lambda b: b[0::2]),
            pair.cut(lambda b: b[1::2]),
        )
    return out
