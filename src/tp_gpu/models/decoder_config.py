"""The sizes and choices of a decoder LM (GPT-2, Llama, Qwen2), read from a Hugging Face ``config.json``.

One :class:`DecoderConfig` describes the three families::

    GPT-2:        h = x + Attn(LN_1(x));   y = h + W_2 act(W_1 LN_2(h))                (wpe positions)
    Llama/Qwen2:  h = x + Attn(RMS_1(x));  y = h + W_down(act(W_gate z) * W_up z), z = RMS_2(h)   (RoPE)

Keys are read as transformers 5.25 reads them, defaults included. Rotary settings come in two
layouts, both read:

* transformers >= 5 writes ``"rope_parameters": {"rope_type": ..., "rope_theta": ..., "factor": ...}``;
* older folders write a top-level ``"rope_theta"`` and ``"rope_scaling": {"type" | "rope_type": ...}``.

As in transformers, a non-empty ``rope_scaling`` wins over ``rope_parameters``, and a ``rope_theta``
inside the dict wins over the top-level one (default 10000).

Settings that change what transformers computes and that this model does not compute are refused
with a :class:`~tp_gpu.errors.ConfigError` naming the key and the value (``is_causal: false``, see
also :func:`_refuse_gpt2`, :func:`_qwen2_sliding`, :func:`_rope`); settings transformers reads only
in training (dropouts) or not at all at inference (Llama's ``pretraining_tp``) are ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from ..errors import ConfigError
from .hf_loader import PathLike, _positive_int, read_json

__all__ = [
    "DECODER_ACTIVATIONS",
    "DECODER_MODEL_TYPES",
    "ROPE_TYPES",
    "DecoderConfig",
    "RopeScaling",
]

#: The ``model_type`` values read here.
DECODER_MODEL_TYPES = ("gpt2", "llama", "qwen2")

#: Hugging Face activation name -> tp_gpu activation name (the same function; ``swish`` is SiLU).
DECODER_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

#: Rotary variants computed: ``default`` (unscaled), ``linear`` and ``llama3`` frequency scaling.
ROPE_TYPES = ("default", "linear", "llama3")

_LAYER_TYPES = ("full_attention", "sliding_attention")  # Qwen2's per-layer attention kinds
_LLAMA3_FACTORS = ("low_freq_factor", "high_freq_factor")
_MISSING = object()


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary inverse frequencies ``f_j = theta^(-2j / head_dim)`` are rescaled.

    * ``linear``: ``f_j / factor`` (positions interpolated by ``factor``).
    * ``llama3``: with ``L = original_max_position_embeddings`` and wavelength ``w_j = 2 pi / f_j``:
      ``f_j`` where ``w_j < L / high_freq_factor``, ``f_j / factor`` where ``w_j > L / low_freq_factor``,
      between them ``(1 - s) f_j / factor + s f_j`` with ``s = (L / w_j - low) / (high - low)``.
    """

    rope_type: str  # "linear" | "llama3"   (None on DecoderConfig = default rope)
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class DecoderConfig:
    """A GPT-2, Llama or Qwen2 decoder, as its ``config.json`` describes it (GPT-2 small: V=50257,
    H=768, 12 layers of 12 heads of 64, I=3072, P=1024, gelu_tanh, tied). :meth:`from_dict` checks
    every key; direct construction checks the sizes, the head grouping and the choices."""

    model_type: str  # "gpt2" | "llama" | "qwen2"
    vocab_size: int  # V, rows of the token table
    hidden_size: int  # H, width of the residual stream
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads
    num_key_value_heads: int  # K/V heads (grouped-query attention); gpt2: = num_attention_heads
    head_dim: int  # columns per head; llama/qwen2: config "head_dim" if present else hidden/heads
    intermediate_size: int  # MLP inner width; gpt2: n_inner or 4*n_embd
    max_position_embeddings: int  # longest sequence; gpt2: n_positions (rows of wpe)
    norm: str  # "layernorm" (gpt2) | "rmsnorm"
    norm_eps: float  # gpt2 layer_norm_epsilon; llama/qwen2 rms_norm_eps
    hidden_act: str  # tp_gpu activation name: "gelu" | "gelu_tanh" | "relu" | "silu"
    gated_mlp: bool  # True for llama/qwen2 (SwiGLU: down(act(gate(x)) * up(x)))
    learned_positions: bool  # True for gpt2 (wpe table), False = rotary
    rope_theta: float  # rotary base, 10000.0 default (gpt2: unused)
    rope_scaling: Optional[RopeScaling]  # None: default rope
    qkv_bias: bool  # gpt2 True; llama: attention_bias; qwen2 True
    o_bias: bool  # gpt2 True; llama: attention_bias; qwen2 False
    mlp_bias: bool  # gpt2 True; llama: mlp_bias (default False); qwen2 False
    tie_word_embeddings: bool  # lm_head shares the token table
    bos_token_id: Optional[int]
    eos_token_ids: Tuple[int, ...]  # config eos_token_id may be int, list or None
    pad_token_id: Optional[int]
    torch_dtype: Optional[str]  # "float32"/"bfloat16"/... ("dtype" or "torch_dtype"), informational

    def __post_init__(self) -> None:
        for key in _SIZE_FIELDS:
            _positive_int(self.__dict__, key, "DecoderConfig")
        _check_heads(self.num_attention_heads, self.num_key_value_heads, "DecoderConfig")
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                got = getattr(self, key)
                raise ConfigError(f"DecoderConfig: {key} must be one of {list(allowed)}, got {got!r}")

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config.json") -> DecoderConfig:
        """Validate a ``config.json`` mapping; ConfigError naming the key, the value and what is expected."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", _MISSING)
        parse = _PARSERS.get(model_type) if isinstance(model_type, str) else None
        if parse is None:
            got = "no model_type" if model_type is _MISSING else f"model_type {model_type!r}"
            raise ConfigError(
                f"{where}: {got} is not a supported decoder; expected one of {DECODER_MODEL_TYPES}"
            )
        if raw.get("is_causal", True) is not True:
            raise ConfigError(
                f"{where}: is_causal must be true, got {raw['is_causal']!r}: transformers then attends "
                "in both directions, and only causal attention is computed"
            )
        fields = parse(raw, where)
        fields.update(_token_ids(raw, where, model_type))
        dtype = raw.get("dtype") if raw.get("dtype") is not None else raw.get("torch_dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise ConfigError(f"{where}: dtype (torch_dtype) must be a name such as 'float32', got {dtype!r}")
        return cls(model_type=model_type, torch_dtype=dtype, **fields)

    @classmethod
    def from_json(cls, path: PathLike) -> DecoderConfig:
        """The config in the JSON file ``path`` (CheckpointError naming it if missing or not JSON)."""
        return cls.from_dict(read_json(path, "decoder config"), os.fspath(path))


# --------------------------------------------------------------------------------------- values

_SIZE_FIELDS = tuple(
    "vocab_size hidden_size num_hidden_layers num_attention_heads num_key_value_heads head_dim "
    "intermediate_size max_position_embeddings".split()
)
_CHOICES = {
    "model_type": DECODER_MODEL_TYPES,
    "norm": ("layernorm", "rmsnorm"),
    "hidden_act": tuple(sorted(set(DECODER_ACTIVATIONS.values()))),
}


def _sizes(
    raw: Mapping[str, Any], keys: Mapping[str, Sequence[str]], where: str, model: str
) -> Dict[str, int]:
    """``field -> positive int`` from the first of each field's keys present and not null (aliases);
    ConfigError listing every field none of whose keys is given."""
    missing = [" or ".join(names) for names in keys.values() if all(raw.get(n) is None for n in names)]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}; a {model} config needs each of them")
    return {field: _positive_int(raw, next(n for n in names if raw.get(n) is not None), where)
            for field, names in keys.items()}  # fmt: skip


def _optional_size(raw: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    """The positive int ``raw[key]``, or ``default`` where the key is missing or null."""
    return default if raw.get(key) is None else _positive_int(raw, key, where)


def _flag(raw: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _positive_number(value: Any, key: str, where: str) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number, got {value!r}")
    return float(value)


def _activation(raw: Mapping[str, Any], key: str, default: str, where: str) -> str:
    act = raw.get(key, default)
    if act not in DECODER_ACTIVATIONS:
        raise ConfigError(f"{where}: {key} must be one of {list(DECODER_ACTIVATIONS)}, got {act!r}")
    return DECODER_ACTIVATIONS[act]


def _check_heads(heads: int, kv_heads: int, where: str, note: str = "") -> None:
    if heads % kv_heads:
        raise ConfigError(
            f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
            f"({kv_heads}{note}): in grouped-query attention each K/V head serves a group of query heads"
        )


def _token_id(value: Any, key: str, where: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(f"{where}: {key} must be a non-negative integer or null, got {value!r}")
    return value


#: transformers' defaults of ``(bos_token_id, eos_token_id)`` where config.json has no such key.
_TOKEN_DEFAULTS = {"gpt2": (50256, 50256), "llama": (1, 2), "qwen2": (None, None)}


def _token_ids(raw: Mapping[str, Any], where: str, model_type: str) -> Dict[str, Any]:
    """bos / eos / pad ids; ``eos_token_id`` may be one id, a list of ids or null (then ``()``)."""
    bos, eos = _TOKEN_DEFAULTS[model_type]
    eos = raw.get("eos_token_id", eos)
    eos_ids = [_token_id(e, "eos_token_id", where) for e in (eos if isinstance(eos, list) else [eos])]
    return {
        "bos_token_id": _token_id(raw.get("bos_token_id", bos), "bos_token_id", where),
        "eos_token_ids": tuple(i for i in eos_ids if i is not None),
        "pad_token_id": _token_id(raw.get("pad_token_id"), "pad_token_id", where),
    }


# --------------------------------------------------------------------------------------- GPT-2

#: field -> config keys; as transformers' attribute_map does, the generic name wins over GPT-2's own.
_GPT2_SIZES = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
}


def _refuse_gpt2(raw: Mapping[str, Any], where: str) -> None:
    """Refuse what GPT2Attention can compute and this model does not.

    ``reorder_and_upcast_attn`` is accepted: transformers then computes the same ``softmax(s q k^T)``,
    only in float32 from half-precision inputs (and only with the eager kernel; sdpa ignores it).
    """
    if not _flag(raw, "scale_attn_weights", True, where):
        raise ConfigError(
            f"{where}: scale_attn_weights must be true (scores q.k / sqrt(head_dim)), got false"
        )
    for key, why in (
        ("scale_attn_by_inverse_layer_idx", "scores divided by (layer_idx + 1) are not computed"),
        ("add_cross_attention", "a decoder-only model has no cross-attention"),
    ):
        if _flag(raw, key, False, where):
            raise ConfigError(f"{where}: {key} must be false, got true: {why}")
    _flag(raw, "reorder_and_upcast_attn", False, where)


def _gpt2(raw: Mapping[str, Any], where: str) -> Dict[str, Any]:
    sizes = _sizes(raw, _GPT2_SIZES, where, "gpt2")
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if hidden % heads:
        raise ConfigError(f"{where}: n_embd ({hidden}) must be a multiple of n_head ({heads})")
    _refuse_gpt2(raw, where)
    eps = _positive_number(raw.get("layer_norm_epsilon", 1e-5), "layer_norm_epsilon", where)
    return dict(
        sizes, num_key_value_heads=heads, head_dim=hidden // heads, norm="layernorm", norm_eps=eps,
        intermediate_size=_optional_size(raw, "n_inner", where, 4 * hidden),
        hidden_act=_activation(raw, "activation_function", "gelu_new", where),
        gated_mlp=False, learned_positions=True, rope_theta=10000.0, rope_scaling=None,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", True, where),
    )  # fmt: skip


# --------------------------------------------------------------------------------------- Llama / Qwen2

_ROTARY_SIZES = {key: (key,) for key in _SIZE_FIELDS if key not in ("num_key_value_heads", "head_dim")}


def _rotary(raw: Mapping[str, Any], where: str, model_type: str, kv_default: Optional[int]) -> Dict[str, Any]:
    """The fields Llama and Qwen2 share: sizes, heads, RMSNorm, SwiGLU, RoPE."""
    sizes = _sizes(raw, _ROTARY_SIZES, where, model_type)
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    # A missing key takes transformers' default (llama: heads, qwen2: 32); null means "= heads" in both.
    if "num_key_value_heads" not in raw and kv_default is not None:
        kv_heads, note = kv_default, f", {model_type}'s default when the key is missing"
    else:
        kv_heads, note = _optional_size(raw, "num_key_value_heads", where, heads), ""
    _check_heads(heads, kv_heads, where, note)
    head_dim = _optional_size(raw, "head_dim", where, None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(
                f"{where}: hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) "
                "when the config gives no head_dim"
            )
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(
            f"{where}: head_dim must be even for rotary embeddings (column pairs), got {head_dim}"
        )
    theta, scaling = _rope(raw, where, sizes["max_position_embeddings"])
    return dict(
        sizes, num_key_value_heads=kv_heads, head_dim=head_dim, norm="rmsnorm",
        norm_eps=_positive_number(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        hidden_act=_activation(raw, "hidden_act", "silu", where),
        gated_mlp=True, learned_positions=False, rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=_flag(raw, "tie_word_embeddings", False, where),
    )  # fmt: skip


def _llama(raw: Mapping[str, Any], where: str) -> Dict[str, Any]:
    fields = _rotary(raw, where, "llama", None)
    bias = _flag(raw, "attention_bias", False, where)
    return dict(fields, qkv_bias=bias, o_bias=bias, mlp_bias=_flag(raw, "mlp_bias", False, where))


def _qwen2(raw: Mapping[str, Any], where: str) -> Dict[str, Any]:
    fields = _rotary(raw, where, "qwen2", 32)
    _qwen2_sliding(raw, where, fields["num_hidden_layers"])
    # Qwen2Attention hard-codes q/k/v biases and a bias-free o_proj (attention_bias is not read).
    return dict(fields, qkv_bias=True, o_bias=False, mlp_bias=False)


def _qwen2_sliding(raw: Mapping[str, Any], where: str, n_layers: int) -> None:
    """Refuse a Qwen2 with a layer that attends within a sliding window, decided as Qwen2Config does:
    ``layer_types`` if given, else layer ``i`` slides where ``use_sliding_window`` is true,
    ``sliding_window`` is not null and ``i >= max_window_layers`` (default 28)."""
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        valid = isinstance(layer_types, list) and all(t in _LAYER_TYPES for t in layer_types)
        if not valid or len(layer_types) != n_layers:
            raise ConfigError(
                f"{where}: layer_types must list num_hidden_layers ({n_layers}) entries, each one of "
                f"{list(_LAYER_TYPES)}, got {layer_types!r}"
            )
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        if sliding:
            raise ConfigError(
                f"{where}: layer_types makes layers {sliding} 'sliding_attention'; "
                "only full causal attention is computed"
            )
        return
    window = raw.get("sliding_window", 4096)  # Qwen2Config's default
    if not _flag(raw, "use_sliding_window", False, where) or window is None:
        return
    first = raw.get("max_window_layers", 28)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ConfigError(f"{where}: max_window_layers must be a non-negative integer, got {first!r}")
    if first < n_layers:
        raise ConfigError(
            f"{where}: use_sliding_window is true, sliding_window={window!r}, max_window_layers={first}: "
            f"layers {first}..{n_layers - 1} would attend within the window; only full attention is computed"
        )


def _rope(raw: Mapping[str, Any], where: str, max_positions: int) -> Tuple[float, Optional[RopeScaling]]:
    """``(rope_theta, rope_scaling)`` from either layout (see the module docstring)."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(key) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: {key} must be an object or null, got {params!r}")
    if any(name in params for name in _LAYER_TYPES):  # transformers' Qwen2/Llama cannot run these either
        raise ConfigError(f"{where}: {key} nested by layer type is not supported, got {params!r}")
    theta_key = f"{key}.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = _positive_number(params.get("rope_theta", raw.get("rope_theta", 10000.0)), theta_key, where)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(
            f"{where}: partial_rotary_factor must be 1 (rotate all of each head), got {partial!r}"
        )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: {key} rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}"
        )
    factor = _positive_number(params.get("factor"), f"{key}.factor", where)
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor)
    low, high = (_positive_number(params.get(n), f"{key}.{n}", where) for n in _LLAMA3_FACTORS)
    if high <= low:
        raise ConfigError(f"{where}: {key}.high_freq_factor ({high}) must exceed low_freq_factor ({low})")
    name = f"{key}.original_max_position_embeddings"  # transformers' default: max_position_embeddings
    original = _positive_int(
        {name: params.get("original_max_position_embeddings", max_positions)}, name, where
    )
    return theta, RopeScaling("llama3", factor, low, high, original)


_PARSERS: Dict[str, Callable[[Mapping[str, Any], str], Dict[str, Any]]] = {
    "gpt2": _gpt2,
    "llama": _llama,
    "qwen2": _qwen2,
}
