"""A float64 NumPy twin of GPT-2, Llama and Qwen2 forwards, and writers of random Hugging Face folders.

No tp_gpu code and no torch: :func:`write_folder` writes ``config.json`` (the keys transformers 5
writes for GPT2Config / LlamaConfig / Qwen2Config) and safetensors files (one, or an index and two
shards) of random weights; :func:`reference_logits` reads a folder back with its own safetensors
parser and runs the textbook forward in float64 throughout (LayerNorm, RMSNorm, RoPE with linear
and Llama 3 scaling as transformers' ``modeling_rope_utils`` computes it, causal and padding masks
filled with ``finfo(float64).min``, grouped-query attention by repeating key-value heads). So
agreement with the tensor-parallel model checks the library's math, not a shared helper.
(transformers itself is not a 1e-10 reference: even after ``.double()`` it computes the rotary
angles, RMSNorm and the eager softmax in float32.)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["generate_positions", "inv_freq", "read_safetensors", "reference_logits",
           "to_bf16", "write_folder"]  # fmt: skip

_NUMPY_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


# --------------------------------------------------------------------------------------- safetensors


def to_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (round to nearest, ties to even), returned as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return rounded.astype(np.uint32).view(np.float32)


def _save(path: Path, tensors: Dict[str, np.ndarray], dtype: str) -> None:
    """A safetensors file of ``tensors`` stored as ``dtype`` (bfloat16 written by hand: NumPy has none)."""
    if dtype != "bfloat16":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, dtype=np.dtype(dtype)) for k, v in tensors.items()}, str(path))
        return
    header: Dict[str, Any] = {}
    chunks, offset = [], 0
    for name, value in tensors.items():
        data = (to_bf16(value).view(np.uint32) >> 16).astype("<u2").tobytes()
        offsets = [offset, offset + len(data)]
        header[name] = {"dtype": "BF16", "shape": list(np.shape(value)), "data_offsets": offsets}
        offset = offsets[1]
        chunks.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(chunks))


def read_safetensors(path: Any) -> Dict[str, np.ndarray]:
    """Every tensor of the safetensors file ``path`` as float64 (F16 / F32 / F64 / BF16)."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + n + o for o in info["data_offsets"])
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(blob[begin:end], "<u2").astype(np.uint32) << 16
            out[name] = bits.view(np.float32).astype(np.float64).reshape(shape)
        else:
            stored = np.frombuffer(blob[begin:end], _NUMPY_DTYPES[info["dtype"]])
            out[name] = stored.astype(np.float64).reshape(shape)
    return out


def _read_weights(folder: Path) -> Dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        return read_safetensors(folder / "model.safetensors")
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(read_safetensors(folder / shard))
    return tensors


# --------------------------------------------------------------------------------------- folders


def write_folder(
    path: Any,
    model_type: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    num_key_value_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    max_position_embeddings: int = 32,
    tie: bool,
    rng: np.random.Generator,
    dtype: str = "float32",
    sharded: bool = False,
    gpt2_layout: str = "transformer.",
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``config.json`` and random weights of a ``model_type`` decoder into ``path``; returns it.

    ``extra`` adds or overrides config keys (``rope_parameters``, ``attention_bias``, ...). Weights:
    embeddings N(0, 0.5), matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1), biases N(0, 0.1).
    ``gpt2_layout`` ``""`` writes the original OpenAI names (no ``transformer.``) with the
    ``h.{i}.attn.bias`` / ``masked_bias`` buffers those files hold. ``sharded`` writes
    ``model.safetensors.index.json`` and two shards.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kv = num_attention_heads if num_key_value_heads is None else num_key_value_heads
    config = _config(model_type, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, kv,
                     head_dim, intermediate_size, max_position_embeddings, tie, dtype)  # fmt: skip
    config.update(extra or {})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    sizes = _Sizes(config)
    if model_type == "gpt2":
        tensors = _gpt2_weights(sizes, rng, gpt2_layout)
    else:
        tensors = _rotary_weights(sizes, rng)
    if not tie:
        tensors["lm_head.weight"] = rng.normal(0, sizes.h**-0.5, (sizes.v, sizes.h))
    if not sharded:
        _save(path / "model.safetensors", tensors, dtype)
        return path
    names = list(tensors)
    half = len(names) // 2
    files = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, part in files.items():
        _save(path / file, {k: tensors[k] for k in part}, dtype)
        weight_map.update(dict.fromkeys(part, file))
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    total = sum(v.size for v in tensors.values()) * itemsize
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def _config(model_type, v, h, layers, heads, kv, head_dim, inner, positions, tie, dtype) -> Dict[str, Any]:
    """The keys transformers 5.25 writes for the three configs (checked against ``save_pretrained``)."""
    common = {"architectures": [_ARCHITECTURES[model_type]], "dtype": dtype, "model_type": model_type,
              "tie_word_embeddings": tie, "transformers_version": "5.25.0", "use_cache": True,
              "vocab_size": v, "pad_token_id": None, "initializer_range": 0.02}  # fmt: skip
    if model_type == "gpt2":
        return dict(common, activation_function="gelu_new", add_cross_attention=False, attn_pdrop=0.1,
                    bos_token_id=v - 1, embd_pdrop=0.1, eos_token_id=v - 1, layer_norm_epsilon=1e-5,
                    n_embd=h, n_head=heads, n_inner=inner, n_layer=layers, n_positions=positions,
                    reorder_and_upcast_attn=False, resid_pdrop=0.1, scale_attn_by_inverse_layer_idx=False,
                    scale_attn_weights=True, summary_activation=None, summary_first_dropout=0.1,
                    summary_proj_to_labels=True, summary_type="cls_index", summary_use_proj=True)  # fmt: skip
    rotary = dict(common, attention_dropout=0.0, bos_token_id=1, eos_token_id=2, hidden_act="silu",
                  hidden_size=h, intermediate_size=inner, max_position_embeddings=positions,
                  num_attention_heads=heads, num_hidden_layers=layers, num_key_value_heads=kv,
                  rms_norm_eps=1e-6,
                  rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})  # fmt: skip
    if model_type == "llama":
        head_dim = head_dim or h // heads
        return dict(rotary, attention_bias=False, head_dim=head_dim, mlp_bias=False, pretraining_tp=1)
    if head_dim is not None:
        rotary["head_dim"] = head_dim
    return dict(rotary, bos_token_id=None, eos_token_id=None, layer_types=["full_attention"] * layers,
                max_window_layers=28, sliding_window=None, use_sliding_window=False)  # fmt: skip


_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class _Sizes:
    """The sizes and choices of a config dict, as the reference reads them (GPT-2 or generic names)."""

    def __init__(self, c: Dict[str, Any]) -> None:
        self.model_type = c["model_type"]
        gpt2 = self.model_type == "gpt2"
        self.v = c["vocab_size"]
        self.h = c.get("hidden_size") or c["n_embd"]
        self.layers = c.get("num_hidden_layers") or c["n_layer"]
        self.heads = c.get("num_attention_heads") or c["n_head"]
        self.kv = self.heads if gpt2 or c.get("num_key_value_heads") is None else c["num_key_value_heads"]
        self.hd = c.get("head_dim") or self.h // self.heads
        self.inner = (c.get("n_inner") or 4 * self.h) if gpt2 else c["intermediate_size"]
        self.positions = c.get("max_position_embeddings") or c.get("n_positions")
        self.tie = c.get("tie_word_embeddings", gpt2)
        self.eps = c.get("layer_norm_epsilon", 1e-5) if gpt2 else c.get("rms_norm_eps", 1e-6)
        self.act = c.get("activation_function", "gelu_new") if gpt2 else c.get("hidden_act", "silu")
        qwen2 = self.model_type == "qwen2"
        self.qkv_bias = gpt2 or qwen2 or c.get("attention_bias", False)
        self.o_bias = gpt2 or (not qwen2 and c.get("attention_bias", False))
        self.mlp_bias = gpt2 or (not qwen2 and c.get("mlp_bias", False))


def _gpt2_weights(s: _Sizes, rng: np.random.Generator, layout: str) -> Dict[str, np.ndarray]:
    p = layout
    w = {
        p + "wte.weight": rng.normal(0, 0.5, (s.v, s.h)),
        p + "wpe.weight": rng.normal(0, 0.5, (s.positions, s.h)),
    }
    shapes = {"attn.c_attn": (s.h, 3 * s.h), "attn.c_proj": (s.h, s.h), "mlp.c_fc": (s.h, s.inner),
              "mlp.c_proj": (s.inner, s.h)}  # fmt: skip
    for i in range(s.layers):
        for norm in ("ln_1", "ln_2"):
            w[f"{p}h.{i}.{norm}.weight"] = 1 + rng.normal(0, 0.1, s.h)
            w[f"{p}h.{i}.{norm}.bias"] = rng.normal(0, 0.1, s.h)
        for name, shape in shapes.items():  # Conv1D: (in, out)
            w[f"{p}h.{i}.{name}.weight"] = rng.normal(0, shape[0] ** -0.5, shape)
            w[f"{p}h.{i}.{name}.bias"] = rng.normal(0, 0.1, shape[1])
        if layout == "":  # the causal-mask buffers of the original OpenAI checkpoints
            w[f"h.{i}.attn.bias"] = np.tril(np.ones((s.positions, s.positions)))[None, None]
            w[f"h.{i}.attn.masked_bias"] = np.array(-1e4)
    w[p + "ln_f.weight"] = 1 + rng.normal(0, 0.1, s.h)
    w[p + "ln_f.bias"] = rng.normal(0, 0.1, s.h)
    return w


def _rotary_weights(s: _Sizes, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    q, kv = s.heads * s.hd, s.kv * s.hd
    linears = {"self_attn.q_proj": ((q, s.h), s.qkv_bias), "self_attn.k_proj": ((kv, s.h), s.qkv_bias),
               "self_attn.v_proj": ((kv, s.h), s.qkv_bias), "self_attn.o_proj": ((s.h, q), s.o_bias),
               "mlp.gate_proj": ((s.inner, s.h), s.mlp_bias), "mlp.up_proj": ((s.inner, s.h), s.mlp_bias),
               "mlp.down_proj": ((s.h, s.inner), s.mlp_bias)}  # fmt: skip
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (s.v, s.h))}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rng.normal(0, 0.1, s.h)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.normal(0, 0.1, s.h)
        for name, (shape, bias) in linears.items():  # nn.Linear: (out, in)
            w[p + name + ".weight"] = rng.normal(0, shape[1] ** -0.5, shape)
            if bias:
                w[p + name + ".bias"] = rng.normal(0, 0.1, shape[0])
    w["model.norm.weight"] = 1 + rng.normal(0, 0.1, s.h)
    return w


# --------------------------------------------------------------------------------------- the forward


def generate_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' ``generate`` computes them: ``cumsum(mask) - 1``, 1 on padding."""
    mask = np.asarray(attention_mask).astype(np.int64)
    return np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)


def reference_logits(
    folder: Any,
    input_ids: np.ndarray,
    attention_mask: Optional[np.ndarray] = None,
    position_ids: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The logits ``(B, S, V)`` float64 of the decoder in ``folder`` for ``input_ids`` ``(B, S)``.

    ``attention_mask`` ``(B, S)`` 1 keep / 0 pad hides padded keys; ``position_ids`` default to
    ``0 .. S-1`` on every row, as transformers' forward.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    s = _Sizes(config)
    prefix = "transformer." if s.model_type == "gpt2" else "model."
    w = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in _read_weights(folder).items()}
    ids = np.asarray(input_ids)
    batch, seq = ids.shape
    pos = np.broadcast_to(np.arange(seq), (batch, seq)) if position_ids is None else np.asarray(position_ids)
    keep = np.ones((batch, seq), bool) if attention_mask is None else np.asarray(attention_mask) != 0
    visible = np.tril(np.ones((seq, seq), bool))[None, None] & keep[:, None, None, :]  # (B, 1, S, S)
    if s.model_type == "gpt2":
        x = w["wte.weight"][ids] + w["wpe.weight"][pos]  # (B, S, H)
        for i in range(s.layers):
            x = _gpt2_layer(x, w, f"h.{i}.", s, visible)
        x = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], s.eps)
        head = w["wte.weight"] if s.tie else w["lm_head.weight"]
    else:
        cos, sin = _rope_cos_sin(config, s.hd, pos)  # (B, S, hd) each
        x = w["embed_tokens.weight"][ids]  # (B, S, H)
        for i in range(s.layers):
            x = _rotary_layer(x, w, f"layers.{i}.", s, visible, cos, sin)
        x = _rms_norm(x, w["norm.weight"], s.eps)
        head = w["embed_tokens.weight"] if s.tie else w["lm_head.weight"]
    return x @ head.T  # (B, S, V)


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _rms_norm(x, weight, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * weight


def _act(name: str, x: np.ndarray) -> np.ndarray:
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    if name in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(f"activation {name!r}")


def _attend(q, k, v, visible):
    """softmax(q k^T / sqrt(hd), hidden keys at finfo.min) v: q (B, nh, S, hd), k and v (B, nkv, S, hd)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # (B, nh, S, hd): h reads h // group
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # (B, nh, S, S)
    scores = np.where(visible, scores, np.finfo(np.float64).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = probs @ v  # (B, nh, S, hd)
    b, nh, seq, hd = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, seq, nh * hd)  # (B, S, nh * hd)


def _heads(x, n, hd):
    b, seq, _ = x.shape
    return x.reshape(b, seq, n, hd).transpose(0, 2, 1, 3)  # (B, n, S, hd)


def _gpt2_layer(x, w, p, s, visible):
    a = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], s.eps)
    qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # (B, S, 3H)
    q, k, v = (_heads(qkv[..., j * s.h : (j + 1) * s.h], s.heads, s.hd) for j in range(3))
    x = x + _attend(q, k, v, visible) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
    m = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], s.eps)
    inner = _act(s.act, m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])  # (B, S, I)
    return x + inner @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]


def _linear(x, w, name, bias):
    y = x @ w[name + ".weight"].T  # nn.Linear: (out, in)
    return y + w[name + ".bias"] if bias else y


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos[:, None] + rotated * sin[:, None]


def _rotary_layer(x, w, p, s, visible, cos, sin):
    a = _rms_norm(x, w[p + "input_layernorm.weight"], s.eps)
    q = _heads(_linear(a, w, p + "self_attn.q_proj", s.qkv_bias), s.heads, s.hd)
    k = _heads(_linear(a, w, p + "self_attn.k_proj", s.qkv_bias), s.kv, s.hd)
    v = _heads(_linear(a, w, p + "self_attn.v_proj", s.qkv_bias), s.kv, s.hd)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    x = x + _linear(_attend(q, k, v, visible), w, p + "self_attn.o_proj", s.o_bias)
    m = _rms_norm(x, w[p + "post_attention_layernorm.weight"], s.eps)
    gate = _act(s.act, _linear(m, w, p + "mlp.gate_proj", s.mlp_bias))  # (B, S, I)
    gated = gate * _linear(m, w, p + "mlp.up_proj", s.mlp_bias)  # (B, S, I)
    return x + _linear(gated, w, p + "mlp.down_proj", s.mlp_bias)


def _rope_params(config: Dict[str, Any]) -> Tuple[float, Dict[str, Any]]:
    """``(theta, scaling dict)`` from ``rope_parameters`` or the legacy ``rope_theta`` / ``rope_scaling``."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), params


def inv_freq(config: Dict[str, Any], head_dim: int) -> np.ndarray:
    """Rotary inverse frequencies ``(hd/2,)`` in float64, with linear or Llama 3 scaling."""
    theta, params = _rope_params(config)
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return freq
    factor = float(params["factor"])
    if kind == "linear":
        return freq / factor
    assert kind == "llama3", kind
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old = params.get("original_max_position_embeddings", config["max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _rope_cos_sin(config: Dict[str, Any], head_dim: int, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    angles = pos[..., None].astype(np.float64) * inv_freq(config, head_dim)  # (B, S, hd/2)
    emb = np.concatenate([angles, angles], axis=-1)  # (B, S, hd)
    return np.cos(emb), np.sin(emb)
