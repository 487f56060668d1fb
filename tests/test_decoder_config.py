"""DecoderConfig: GPT-2, Llama and Qwen2 config.json files, both rotary layouts, every refusal.

Hand-written configs run everywhere (CI has no torch); with transformers installed, the parse is
compared with what transformers 5.x reads from the same file (sizes, defaults, rotary frequencies),
and the settings accepted as "no change" are shown not to change transformers' outputs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tp_gpu.errors import CheckpointError, ConfigError
from tp_gpu.models.decoder_checkpoint import read_decoder_config
from tp_gpu.models.decoder_config import DecoderConfig, RopeScaling

GPT2 = {"model_type": "gpt2", "vocab_size": 13, "n_embd": 12, "n_layer": 2, "n_head": 3, "n_positions": 17}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 13,
    "hidden_size": 12,
    "intermediate_size": 7,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "max_position_embeddings": 40,
}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
BASES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2}


def parse(base, **change):
    """The DecoderConfig of ``base`` with ``change`` applied (a value ``...`` deletes the key)."""
    raw = {**base, **change}
    return DecoderConfig.from_dict({k: v for k, v in raw.items() if v is not ...}, where="cfg.json")


# --- each architecture ----------------------------------------------------------------------------


def test_gpt2_sizes_and_transformers_defaults():
    c = parse(GPT2)
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.max_position_embeddings) == (13, 12, 2, 17)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (3, 3, 4, 48)
    assert (c.norm, c.norm_eps, c.hidden_act, c.gated_mlp, c.learned_positions) == (
        "layernorm", 1e-5, "gelu_tanh", False, True
    )  # fmt: skip
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (True, True, True, True)
    assert (c.rope_scaling, c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (None, 50256, (50256,), None)
    assert c.torch_dtype is None


def test_gpt2_options_and_generic_names():
    c = parse(GPT2, n_inner=5, activation_function="relu", layer_norm_epsilon=1e-3, tie_word_embeddings=False)
    assert (c.intermediate_size, c.hidden_act, c.norm_eps, c.tie_word_embeddings) == (5, "relu", 1e-3, False)
    assert parse(GPT2, n_inner=None).intermediate_size == 48
    # As transformers' attribute_map: hidden_size / num_attention_heads ... win over n_embd / n_head.
    c = parse(GPT2, hidden_size=10, n_embd=12, num_attention_heads=5, n_layer=..., num_hidden_layers=4)
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_hidden_layers) == (10, 5, 2, 4)
    assert parse(GPT2, reorder_and_upcast_attn=True).hidden_size == 12  # accepted: see the transformers test


def test_llama_fields_and_defaults():
    c = parse(LLAMA)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (6, 2, 2, 7)
    assert (c.norm, c.norm_eps, c.hidden_act, c.gated_mlp, c.learned_positions) == (
        "rmsnorm", 1e-6, "silu", True, False
    )  # fmt: skip
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (False, False, False, False)
    assert (c.rope_theta, c.rope_scaling, c.bos_token_id, c.eos_token_ids) == (10000.0, None, 1, (2,))
    c = parse(
        LLAMA, attention_bias=True, mlp_bias=True, head_dim=10, num_key_value_heads=None, pretraining_tp=4
    )
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.head_dim, c.num_key_value_heads) == (True, True, True, 10, 6)
    assert parse(LLAMA, num_key_value_heads=...).num_key_value_heads == 6
    assert parse(LLAMA, hidden_act="swish", rms_norm_eps=1e-5).hidden_act == "silu"


def test_qwen2_fields_and_defaults():
    c = parse(QWEN2, attention_bias=False, tie_word_embeddings=True)
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.tie_word_embeddings) == (True, False, False, True)
    assert (c.bos_token_id, c.eos_token_ids, c.head_dim) == (None, (), 2)
    assert parse(QWEN2, head_dim=8).head_dim == 8
    # Qwen2Config: a missing num_key_value_heads is 32 (null: = heads).
    assert (
        parse(QWEN2, num_attention_heads=64, num_key_value_heads=..., hidden_size=128).num_key_value_heads
        == 32
    )
    assert parse(QWEN2, num_key_value_heads=None).num_key_value_heads == 6
    with pytest.raises(
        ConfigError, match=r"\(6\) must be a multiple of num_key_value_heads \(32, qwen2's default"
    ):
        parse(QWEN2, num_key_value_heads=...)
    # Sliding windows that no layer uses change nothing.
    assert parse(QWEN2, use_sliding_window=True, max_window_layers=2, sliding_window=4).num_hidden_layers == 2
    assert (
        parse(QWEN2, use_sliding_window=True, sliding_window=None, max_window_layers=0).model_type == "qwen2"
    )
    assert parse(QWEN2, layer_types=["full_attention"] * 2).model_type == "qwen2"


def test_token_ids_and_dtype():
    c = parse(LLAMA, eos_token_id=[7, 9], bos_token_id=None, pad_token_id=0, dtype="bfloat16")
    assert (c.eos_token_ids, c.bos_token_id, c.pad_token_id, c.torch_dtype) == ((7, 9), None, 0, "bfloat16")
    assert parse(GPT2, eos_token_id=None, torch_dtype="float16").eos_token_ids == ()
    assert parse(GPT2, torch_dtype="float16").torch_dtype == "float16"
    for key, value in [("eos_token_id", [1, True]), ("bos_token_id", -1), ("pad_token_id", "0")]:
        with pytest.raises(
            ConfigError, match=rf"cfg\.json: {key} must be a non-negative integer or null, got"
        ):
            parse(LLAMA, **{key: value})
    with pytest.raises(ConfigError, match=r"dtype \(torch_dtype\) must be a name such as 'float32', got 32"):
        parse(LLAMA, dtype=32)


# --- rotary layouts --------------------------------------------------------------------------------


def lin(factor, **more):
    return {"rope_type": "linear", "factor": factor, **more}


L3 = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4}


@pytest.mark.parametrize(
    "change, theta, scaling",
    [
        ({}, 10000.0, None),
        ({"rope_theta": 5e5}, 5e5, None),  # legacy, no scaling
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, 1e6, None),  # transformers 5
        (
            {"rope_theta": 7.0, "rope_scaling": {"type": "linear", "factor": 2}},
            7.0,
            RopeScaling("linear", 2.0),
        ),
        ({"rope_parameters": lin(0.5, rope_theta=3.0)}, 3.0, RopeScaling("linear", 0.5)),
        ({"rope_theta": 9.0, "rope_parameters": lin(4)}, 9.0, RopeScaling("linear", 4.0)),
        ({"rope_theta": 9.0, "rope_parameters": {"rope_theta": 8.0}}, 8.0, None),  # the nested one wins
        ({"rope_scaling": {"type": "default"}, "rope_parameters": lin(3)}, 1e4, None),  # rope_scaling wins
        ({"rope_scaling": None, "rope_parameters": lin(3)}, 1e4, RopeScaling("linear", 3.0)),
        ({"rope_scaling": {}, "rope_parameters": lin(3)}, 1e4, RopeScaling("linear", 3.0)),
        (
            {"rope_scaling": {**L3, "original_max_position_embeddings": 16}, "rope_theta": 5e5},
            5e5,
            RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
        ),
        (  # transformers' default original_max_position_embeddings: max_position_embeddings
            {"rope_parameters": {**L3, "factor": 2.0, "low_freq_factor": 0.5, "high_freq_factor": 2}},
            1e4,
            RopeScaling("llama3", 2.0, 0.5, 2.0, 40),
        ),
        ({"partial_rotary_factor": 1.0, "rope_parameters": {"partial_rotary_factor": 1}}, 1e4, None),
    ],
)
@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_rope_layouts(base, change, theta, scaling):
    c = parse(BASES[base], **change)
    assert (c.rope_theta, c.rope_scaling) == (theta, scaling)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling rope_type 'dynamic' is not"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope_parameters rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "longrope"}}, r"rope_type 'longrope' is not supported"),
        ({"rope_parameters": {"rope_type": "wobbly"}}, r"rope_type 'wobbly' is not supported; expected one"),
        ({"rope_parameters": {"rope_type": None}}, r"rope_type None is not supported"),
        (
            {"rope_parameters": {"rope_type": "linear"}},
            r"rope_parameters\.factor must be a positive number, got None",
        ),
        ({"rope_parameters": lin(0)}, r"rope_parameters\.factor must be a positive number, got 0"),
        ({"rope_parameters": lin(True)}, r"rope_parameters\.factor must be a positive number, got True"),
        ({"rope_scaling": {**L3, "low_freq_factor": None}}, r"rope_scaling\.low_freq_factor .* got None"),
        (
            {"rope_scaling": {**L3, "high_freq_factor": 1}},
            r"rope_scaling\.high_freq_factor \(1\.0\) must exceed",
        ),
        (
            {"rope_scaling": {**L3, "original_max_position_embeddings": 0}},
            r"rope_scaling\.original_max_position_embeddings must be a positive integer, got 0",
        ),
        ({"rope_parameters": [1, 2]}, r"rope_parameters must be an object or null, got \[1, 2\]"),
        (
            {"rope_parameters": {"full_attention": lin(2)}},
            r"rope_parameters nested by layer type is not supported",
        ),
        ({"rope_theta": -1.0}, r"rope_theta must be a positive number, got -1\.0"),
        (
            {"rope_parameters": {"rope_theta": float("nan")}},
            r"rope_parameters\.rope_theta must be a positive",
        ),
        ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor must be 1 .* got 0\.5"),
        (
            {"rope_parameters": {"partial_rotary_factor": 0.25}},
            r"partial_rotary_factor must be 1 .* got 0\.25",
        ),
        ({"head_dim": 3}, r"head_dim must be even for rotary embeddings .* got 3"),
    ],
)
@pytest.mark.parametrize("base", ["llama", "qwen2"])
def test_rope_refusals(base, change, match):
    with pytest.raises(ConfigError, match=r"cfg\.json: .*" + match):
        parse(BASES[base], **change)


# --- refusals and bad values -----------------------------------------------------------------------


SLIDING = {"use_sliding_window": True, "sliding_window": 8}


@pytest.mark.parametrize(
    "base, change, match",
    [
        (
            "gpt2",
            {"scale_attn_by_inverse_layer_idx": True},
            r"scale_attn_by_inverse_layer_idx must be false, got",
        ),
        ("gpt2", {"scale_attn_weights": False}, r"scale_attn_weights must be true .* got false"),
        ("gpt2", {"add_cross_attention": True}, r"add_cross_attention must be false, got true"),
        (
            "gpt2",
            {"reorder_and_upcast_attn": "yes"},
            r"reorder_and_upcast_attn must be true or false, got 'yes'",
        ),
        ("gpt2", {"is_causal": False}, r"is_causal must be true, got False"),
        ("llama", {"is_causal": False}, r"is_causal must be true, got False"),
        (
            "qwen2",
            {**SLIDING, "max_window_layers": 1},
            r"sliding_window=8, max_window_layers=1: layers 1\.\.1",
        ),
        (
            "qwen2",
            {"layer_types": ["full_attention", "sliding_attention"]},
            r"layer_types makes layers \[1\]",
        ),
        ("qwen2", {"layer_types": ["full_attention"]}, r"layer_types must list num_hidden_layers \(2\)"),
        ("qwen2", {"layer_types": ["full_attention", "chunked"]}, r"got \['full_attention', 'chunked'\]"),
        (
            "qwen2",
            {**SLIDING, "max_window_layers": -1},
            r"max_window_layers must be a non-negative integer, got -1",
        ),
        ("llama", {"attention_bias": 1}, r"attention_bias must be true or false, got 1"),
        (
            "llama",
            {"hidden_act": "gelu_accurate"},
            r"hidden_act must be one of \[.*'silu'.*\], got 'gelu_accurate'",
        ),
        ("gpt2", {"activation_function": "tanh"}, r"activation_function must be one of .* got 'tanh'"),
        ("gpt2", {"layer_norm_epsilon": 0}, r"layer_norm_epsilon must be a positive number, got 0"),
        ("llama", {"rms_norm_eps": "1e-6"}, r"rms_norm_eps must be a positive number, got '1e-6'"),
        ("gpt2", {"tie_word_embeddings": None}, r"tie_word_embeddings must be true or false, got None"),
    ],
)
def test_refusals_name_key_and_value(base, change, match):
    with pytest.raises(ConfigError, match=r"cfg\.json: .*" + match):
        parse(BASES[base], **change)


def test_qwen2_sliding_defaults():
    # Qwen2Config's sliding_window defaults to 4096 and max_window_layers to 28.
    match = (
        r"cfg\.json: use_sliding_window is true, sliding_window=4096, max_window_layers=28: layers 28\.\.29"
    )
    with pytest.raises(ConfigError, match=match):
        parse(QWEN2, use_sliding_window=True, num_hidden_layers=30)
    assert parse(QWEN2, use_sliding_window=True, num_hidden_layers=28).num_hidden_layers == 28


@pytest.mark.parametrize("base", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("bad", [0, -3, True, 2.0, "4", None])
def test_sizes_must_be_positive_integers(base, bad):
    key = "vocab_size"
    if bad is None:
        with pytest.raises(ConfigError, match=rf"cfg\.json: missing keys \['{key}'\]; a {base} config needs"):
            parse(BASES[base], **{key: bad})
    else:
        with pytest.raises(ConfigError, match=rf"cfg\.json: {key} must be a positive integer, got {bad!r}"):
            parse(BASES[base], **{key: bad})


def test_missing_keys_are_listed_with_aliases():
    with pytest.raises(
        ConfigError, match=r"missing keys \['hidden_size or n_embd', 'num_hidden_layers or n_layer'\]"
    ):
        parse(GPT2, n_embd=..., n_layer=...)
    with pytest.raises(ConfigError, match=r"missing keys \['intermediate_size', 'max_position_embeddings'\]"):
        parse(LLAMA, intermediate_size=..., max_position_embeddings=...)


def test_head_arithmetic():
    with pytest.raises(ConfigError, match=r"cfg\.json: n_embd \(12\) must be a multiple of n_head \(5\)"):
        parse(GPT2, n_head=5)
    with pytest.raises(
        ConfigError, match=r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"
    ):
        parse(LLAMA, num_key_value_heads=4)
    with pytest.raises(
        ConfigError, match=r"hidden_size \(12\) must be a multiple of num_attention_heads \(5\) when"
    ):
        parse(LLAMA, num_attention_heads=5, num_key_value_heads=1)
    c = parse(LLAMA, num_attention_heads=5, num_key_value_heads=1, head_dim=4)  # head_dim given: any hidden
    assert (c.num_attention_heads, c.head_dim) == (5, 4)
    with pytest.raises(ConfigError, match=r"head_dim must be a positive integer, got 0"):
        parse(LLAMA, head_dim=0)


@pytest.mark.parametrize(
    "model_type, got", [(..., "no model_type"), ("bert", "model_type 'bert'"), (3, "model_type 3")]
)
def test_unsupported_model_types_list_the_supported(model_type, got):
    with pytest.raises(
        ConfigError, match=rf"cfg\.json: {got} is not a supported decoder; .*'gpt2', 'llama', 'qwen2'"
    ):
        parse(LLAMA, model_type=model_type)


def test_files(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{path} is not valid JSON"):
        DecoderConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{path}: expected a JSON object, got list"):
        DecoderConfig.from_json(path)
    path.write_text(json.dumps({**LLAMA, "rope_scaling": {"type": "yarn", "factor": 4}}))
    with pytest.raises(ConfigError, match=rf"{path}: rope_scaling rope_type 'yarn'"):
        read_decoder_config(tmp_path)
    path.write_text(json.dumps(GPT2))
    assert read_decoder_config(str(tmp_path)) == DecoderConfig.from_json(str(path))
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        read_decoder_config((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_decoder_config(tmp_path / "nowhere")


def test_direct_construction_is_checked():
    c = parse(LLAMA)
    fields = dict(c.__dict__)
    assert DecoderConfig(**fields) == c
    for key, value, match in [
        ("num_key_value_heads", 4, r"must be a multiple of num_key_value_heads \(4\)"),
        ("head_dim", 0, r"head_dim must be a positive integer, got 0"),
        ("norm", "batchnorm", r"norm must be one of \['layernorm', 'rmsnorm'\], got 'batchnorm'"),
        ("hidden_act", "gelu_new", r"hidden_act must be one of .*got 'gelu_new'"),
        ("model_type", "mistral", r"model_type must be one of \['gpt2', 'llama', 'qwen2'\], got 'mistral'"),
    ]:
        with pytest.raises(ConfigError, match=r"DecoderConfig: .*" + match):
            DecoderConfig(**{**fields, key: value})


# --- against transformers --------------------------------------------------------------------------


def _transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _inv_freq(c: DecoderConfig) -> np.ndarray:
    """The rotary inverse frequencies of ``c``, as RopeScaling's docstring states them (float64)."""
    f = c.rope_theta ** (-np.arange(0, c.head_dim, 2) / c.head_dim)
    s = c.rope_scaling
    if s is None:
        return f
    if s.rope_type == "linear":
        return f / s.factor
    wavelen, old = 2 * math.pi / f, s.original_max_position_embeddings
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    out = np.where(wavelen > old / s.low_freq_factor, f / s.factor, f)
    medium = (wavelen >= old / s.high_freq_factor) & (wavelen <= old / s.low_freq_factor)
    return np.where(medium, (1 - smooth) * f / s.factor + smooth * f, out)


@pytest.mark.parametrize(
    "raw",
    [
        {**LLAMA, "head_dim": 16, "rope_theta": 500.0},
        {**LLAMA, "head_dim": 16, "rope_theta": 50.0, "rope_scaling": {"type": "linear", "factor": 3.0}},
        {**LLAMA, "head_dim": 32, "rope_scaling": {**L3, "original_max_position_embeddings": 20}},
        {
            **QWEN2,
            "head_dim": 32,
            "rope_parameters": {**L3, "factor": 4.0, "rope_theta": 900.0, "low_freq_factor": 2.0},
        },
        {**QWEN2, "head_dim": 16, "rope_parameters": lin(2.5)},
    ],
)
def test_rotary_frequencies_equal_transformers(tmp_path, raw):
    transformers = _transformers()
    import torch

    (tmp_path / "config.json").write_text(json.dumps(raw))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    ours = read_decoder_config(tmp_path)
    rotary = transformers.AutoModelForCausalLM.from_config(hf).model.rotary_emb
    torch.testing.assert_close(torch.from_numpy(_inv_freq(ours)).float(), rotary.inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == 1.0


ROTARY = dict(hidden_size=12, num_hidden_layers=2, num_attention_heads=6, intermediate_size=7, vocab_size=13)


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("GPT2Config", dict(n_embd=12, n_layer=2, n_head=3, vocab_size=13, n_positions=9, n_inner=5)),
        (
            "GPT2Config",
            dict(
                n_embd=8, n_layer=1, n_head=2, vocab_size=7, activation_function="gelu", eos_token_id=[3, 4]
            ),
        ),
        (
            "GPT2Config",
            dict(n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=False, layer_norm_epsilon=1e-3),
        ),
        (
            "LlamaConfig",
            dict(
                ROTARY,
                num_key_value_heads=2,
                attention_bias=True,
                mlp_bias=True,
                head_dim=4,
                rope_theta=123.0,
            ),
        ),
        ("LlamaConfig", dict(ROTARY, rms_norm_eps=1e-5, tie_word_embeddings=True)),
        (
            "LlamaConfig",
            dict(ROTARY, head_dim=8, rope_scaling={**L3, "original_max_position_embeddings": 64}),
        ),
        ("Qwen2Config", dict(ROTARY, num_key_value_heads=3, rope_scaling={"type": "linear", "factor": 2.0})),
    ],
)
def test_save_pretrained_configs_parse_as_transformers_reads_them(tmp_path, cls, kwargs):
    transformers = _transformers()
    hf = getattr(transformers, cls)(**kwargs)
    hf.save_pretrained(tmp_path)
    c = read_decoder_config(tmp_path)
    assert c.model_type == hf.model_type
    for ours, theirs in [
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("num_hidden_layers", "num_hidden_layers"),
        ("num_attention_heads", "num_attention_heads"),
        ("max_position_embeddings", "max_position_embeddings"),
        ("tie_word_embeddings", "tie_word_embeddings"),
        ("bos_token_id", "bos_token_id"),
        ("pad_token_id", "pad_token_id"),
    ]:
        assert getattr(c, ours) == getattr(hf, theirs), ours
    eos = hf.eos_token_id
    assert c.eos_token_ids == (tuple(eos) if isinstance(eos, list) else (eos,) if eos is not None else ())
    if c.model_type == "gpt2":
        assert c.intermediate_size == (hf.n_inner or 4 * hf.n_embd)
        assert c.norm_eps == hf.layer_norm_epsilon
    else:
        assert (c.num_key_value_heads, c.head_dim) == (
            hf.num_key_value_heads,
            getattr(hf, "head_dim", c.head_dim),
        )
        assert (c.intermediate_size, c.norm_eps) == (hf.intermediate_size, hf.rms_norm_eps)
        assert c.rope_theta == hf.rope_parameters["rope_theta"]
        assert (c.rope_scaling.rope_type if c.rope_scaling else "default") == hf.rope_parameters["rope_type"]


def _logits(transformers, cls, config_kwargs, model_cls, seed=0):
    import torch

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cls)(**config_kwargs)).eval()
    model.config._attn_implementation = "eager"  # the flag is read by the eager kernel only
    with torch.no_grad():  # weights large enough for attention far from uniform (same seed: same weights)
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    ids = torch.tensor([[1, 4, 2, 6, 3, 5]])
    with torch.no_grad():
        return model(ids).logits


def test_accepted_flags_do_not_change_transformers_outputs():
    """reorder_and_upcast_attn (GPT-2) and pretraining_tp (Llama) are accepted and ignored: in float32
    transformers' eager outputs do not change with them."""
    import_ok = _transformers()
    import torch

    gpt2 = dict(n_embd=16, n_layer=2, n_head=4, vocab_size=8, n_positions=8)
    plain = _logits(import_ok, "GPT2Config", gpt2, "GPT2LMHeadModel")
    upcast = _logits(import_ok, "GPT2Config", {**gpt2, "reorder_and_upcast_attn": True}, "GPT2LMHeadModel")
    torch.testing.assert_close(upcast, plain, rtol=1e-5, atol=1e-6)
    scaled = _logits(
        import_ok, "GPT2Config", {**gpt2, "scale_attn_by_inverse_layer_idx": True}, "GPT2LMHeadModel"
    )
    assert not torch.allclose(scaled, plain, rtol=1e-2, atol=1e-2)  # the refused one does change them
    llama = dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8, vocab_size=8
    )
    one = _logits(import_ok, "LlamaConfig", llama, "LlamaForCausalLM")
    four = _logits(import_ok, "LlamaConfig", {**llama, "pretraining_tp": 4}, "LlamaForCausalLM")
    torch.testing.assert_close(four, one, rtol=0, atol=0)
