"""DecoderCheckpoint and decoder_tensor_shapes: every layout, dtype and damage a decoder folder can have.

Folders are written with ``safetensors.numpy`` (and by hand, for BF16 and damaged files), so the
reader is tested where CI runs (no torch); with transformers installed, folders that
``save_pretrained`` writes (single file, sharded, bfloat16) are read back and compared with the
model's own state dict.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from tp_gpu.errors import CheckpointError
from tp_gpu.models.decoder_checkpoint import DecoderCheckpoint, decoder_tensor_shapes
from tp_gpu.models.decoder_config import DecoderConfig

GPT2 = {"model_type": "gpt2", "vocab_size": 13, "n_embd": 12, "n_layer": 2, "n_head": 3, "n_positions": 17}
LLAMA = {
    "model_type": "llama",
    "vocab_size": 13,
    "hidden_size": 12,
    "intermediate_size": 7,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "max_position_embeddings": 40,
}
QWEN2 = {**LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}
BASES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2}
PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model."}


def config(raw):
    return DecoderConfig.from_dict(raw)


def random_tensors(cfg, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape).astype(dtype) for name, shape in decoder_tensor_shapes(cfg).items()
    }


def stored(name, prefix):
    return name if name == "lm_head.weight" else prefix + name


def write_folder(path, raw, tensors, prefix="", extra=None):
    """config.json and model.safetensors holding ``tensors`` (canonical names) under ``prefix``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    save_file(
        {**{stored(n, prefix): a for n, a in tensors.items()}, **(extra or {})},
        str(path / "model.safetensors"),
    )
    return path


def write_safetensors(path, tensors):
    """A safetensors file written by hand: ``name -> (dtype, shape, raw bytes)``."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def read_all(path, cfg):
    with DecoderCheckpoint(path, cfg) as ckpt:
        ckpt.check()
        return ckpt.prefix, {name: ckpt.get(name) for name in ckpt.names()}


# --- shapes --------------------------------------------------------------------------------------------


def test_gpt2_shapes_are_conv1d_in_out():
    shapes = decoder_tensor_shapes(config(GPT2))
    assert len(shapes) == 2 + 12 * 2 + 2  # wte, wpe; 12 per block; ln_f (tied: no lm_head)
    assert shapes["wte.weight"] == (13, 12) and shapes["wpe.weight"] == (17, 12)
    assert shapes["h.1.attn.c_attn.weight"] == (12, 36) and shapes["h.1.attn.c_attn.bias"] == (36,)
    assert shapes["h.0.attn.c_proj.weight"] == (12, 12) and shapes["h.0.ln_2.bias"] == (12,)
    assert shapes["h.0.mlp.c_fc.weight"] == (12, 48) and shapes["h.0.mlp.c_fc.bias"] == (48,)
    assert shapes["h.0.mlp.c_proj.weight"] == (48, 12) and shapes["h.0.mlp.c_proj.bias"] == (12,)
    assert shapes["ln_f.weight"] == (12,) and "lm_head.weight" not in shapes
    untied = decoder_tensor_shapes(config({**GPT2, "tie_word_embeddings": False, "n_inner": 5}))
    assert untied["lm_head.weight"] == (13, 12) and untied["h.1.mlp.c_proj.weight"] == (5, 12)


def test_llama_and_qwen2_shapes_are_linear_out_in():
    shapes = decoder_tensor_shapes(config(LLAMA))  # q = 6 * 4 = 24, kv = 2 * 4 = 8
    assert len(shapes) == 1 + 9 * 2 + 1 + 1
    assert shapes["layers.1.self_attn.q_proj.weight"] == (24, 12)
    assert shapes["layers.1.self_attn.k_proj.weight"] == shapes["layers.1.self_attn.v_proj.weight"] == (8, 12)
    assert shapes["layers.0.self_attn.o_proj.weight"] == (12, 24)
    assert shapes["layers.0.mlp.gate_proj.weight"] == shapes["layers.0.mlp.up_proj.weight"] == (7, 12)
    assert shapes["layers.0.mlp.down_proj.weight"] == (12, 7)
    assert shapes["layers.0.input_layernorm.weight"] == shapes["norm.weight"] == (12,)
    assert shapes["lm_head.weight"] == shapes["embed_tokens.weight"] == (13, 12)
    assert not any(name.endswith(".bias") for name in shapes)
    biased = decoder_tensor_shapes(config({**LLAMA, "attention_bias": True, "mlp_bias": True}))
    assert biased["layers.0.self_attn.k_proj.bias"] == (8,) and biased["layers.0.self_attn.o_proj.bias"] == (
        12,
    )
    assert biased["layers.0.mlp.down_proj.bias"] == (12,) and biased["layers.0.mlp.gate_proj.bias"] == (7,)
    qwen = decoder_tensor_shapes(config(QWEN2))
    assert qwen["layers.0.self_attn.q_proj.bias"] == (24,) and qwen["layers.0.self_attn.v_proj.bias"] == (8,)
    assert (
        not any(n.endswith(("o_proj.bias", "mlp.up_proj.bias")) for n in qwen)
        and "lm_head.weight" not in qwen
    )


# --- layouts ---------------------------------------------------------------------------------------------


def _buffers(arch, prefix, cfg):
    if arch == "gpt2":  # the causal-mask buffers of the original openai-community/gpt2 files
        p = cfg.max_position_embeddings
        mask = np.tril(np.ones((p, p), np.uint8))[None, None]
        return {f"{prefix}h.{i}.attn.bias": mask for i in range(2)} | {
            f"{prefix}h.1.attn.masked_bias": np.array(-1e4, np.float32)
        }
    inv = np.ones(2, np.float32)
    return {f"{prefix}layers.0.self_attn.rotary_emb.inv_freq": inv, f"{prefix}rotary_emb.inv_freq": inv}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("buffers", [True, False])
def test_both_prefixes_and_buffers_read_back(tmp_path, arch, with_prefix, buffers):
    cfg = config(BASES[arch])
    tensors = random_tensors(cfg)
    prefix = PREFIX[arch] if with_prefix else ""
    write_folder(tmp_path, BASES[arch], tensors, prefix, _buffers(arch, prefix, cfg) if buffers else None)
    found_prefix, got = read_all(tmp_path, cfg)
    assert found_prefix == prefix and got.keys() == tensors.keys()
    for name, array in tensors.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_tied_lm_head_may_be_present(tmp_path, arch):
    cfg = config(BASES[arch])
    tensors = random_tensors(cfg)
    write_folder(
        tmp_path, BASES[arch], tensors, PREFIX[arch], {"lm_head.weight": np.zeros((13, 12), np.float32)}
    )
    assert read_all(tmp_path, cfg)[1].keys() == tensors.keys()  # present, ignored


def test_untied_lm_head_is_required(tmp_path):
    cfg = config(LLAMA)
    tensors = random_tensors(cfg)
    del tensors["lm_head.weight"]
    write_folder(tmp_path, LLAMA, tensors, "model.")
    with DecoderCheckpoint(tmp_path, cfg) as ckpt, pytest.raises(CheckpointError) as info:
        ckpt.check()
    message = str(info.value)
    assert f"{tmp_path / 'model.safetensors'}: 1 tensors of a llama with 2 layers are missing" in message
    assert "'lm_head.weight' (stored as 'lm_head.weight')" in message


# --- sharded ---------------------------------------------------------------------------------------------


def write_sharded(path, raw, tensors, prefix):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    names = list(tensors)
    shards = {"a-00001.safetensors": names[::2], "a-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, members in shards.items():
        save_file({stored(n, prefix): tensors[n] for n in members}, str(path / shard))
        weight_map.update({stored(n, prefix): shard for n in members})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_index(tmp_path):
    cfg = config(LLAMA)
    tensors = random_tensors(cfg, seed=3)
    weight_map = write_sharded(tmp_path, LLAMA, tensors, "model.")
    with DecoderCheckpoint(tmp_path, cfg) as ckpt:
        ckpt.check()
        assert len(ckpt.files) == 2 and ckpt.source == str(tmp_path / "model.safetensors.index.json")
        for name, array in tensors.items():
            np.testing.assert_array_equal(ckpt.get(name), array)
    index = tmp_path / "model.safetensors.index.json"
    # A weight_map naming a tensor in the wrong shard.
    other = {"a-00001.safetensors": "a-00002.safetensors", "a-00002.safetensors": "a-00001.safetensors"}
    wrong = {**weight_map, "model.norm.weight": other[weight_map["model.norm.weight"]]}
    index.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(
        CheckpointError, match=rf"{index}: weight_map puts tensor 'model.norm.weight' in 'a-0000"
    ):
        DecoderCheckpoint(tmp_path, cfg)
    # A weight_map naming a missing shard file.
    index.write_text(json.dumps({"weight_map": {**weight_map, "model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(
        CheckpointError,
        match=rf"{index}: weight_map names shard files missing from {tmp_path}: \['gone.safetensors'\] "
        r"\(e.g. tensor 'model.norm.weight' is in 'gone.safetensors'\)",
    ):
        DecoderCheckpoint(tmp_path, cfg)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=rf"{index}: expected an object with a 'weight_map'"):
        DecoderCheckpoint(tmp_path, cfg)
    index.write_text("{oops")
    with pytest.raises(CheckpointError, match=rf"{index} is not valid JSON"):
        DecoderCheckpoint(tmp_path, cfg)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    cfg = config(GPT2)
    tensors = random_tensors(cfg)
    weight_map = write_sharded(tmp_path, GPT2, tensors, "")
    first = next(n for n, f in weight_map.items() if f == "a-00001.safetensors")
    shard = {n: tensors[n] for n, f in weight_map.items() if f == "a-00002.safetensors"}
    save_file({**shard, first: tensors[first]}, str(tmp_path / "a-00002.safetensors"))
    with pytest.raises(
        CheckpointError, match=rf"{tmp_path / 'a-00002.safetensors'}: tensor '{first}' is also in .*a-00001"
    ):
        DecoderCheckpoint(tmp_path, cfg)


# --- dtypes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_f16_and_f64_are_returned_as_stored(tmp_path, dtype):
    cfg = config(GPT2)
    tensors = random_tensors(cfg, dtype=dtype)
    write_folder(tmp_path, GPT2, tensors, "transformer.")
    _, got = read_all(tmp_path, cfg)
    for name, array in tensors.items():
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name], array)


def _bf16(array):
    """``array`` (float32) rounded toward zero to bfloat16: (its bytes, its float32 value)."""
    high = (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype("<u2")
    return high.tobytes(), (high.astype(np.uint32) << 16).view(np.float32)


def test_bf16_is_widened_to_float32(tmp_path):
    cfg = config(QWEN2)
    tensors = random_tensors(cfg, seed=5)
    tensors["norm.weight"][:6] = [0.0, -0.0, np.inf, -np.inf, 1e-40, 3.0e38]  # signed zero, inf, subnormal
    raw, expected = {}, {}
    for name, array in tensors.items():
        data, expected[name] = _bf16(array)
        raw[stored(name, "model.")] = ("BF16", array.shape, data)
    (tmp_path / "config.json").write_text(json.dumps(QWEN2))
    write_safetensors(tmp_path / "model.safetensors", raw)
    _, got = read_all(tmp_path, cfg)
    for name in tensors:
        assert got[name].dtype == np.float32 and got[name].shape == tensors[name].shape
        np.testing.assert_array_equal(got[name], expected[name])
        normal = np.isfinite(tensors[name]) & (np.abs(tensors[name]) > 1e-30)  # bfloat16 keeps 8 bits
        np.testing.assert_allclose(got[name][normal], tensors[name][normal], rtol=2**-7, atol=0)
    assert np.signbit(got["norm.weight"][1]) and got["norm.weight"][2] == np.inf


def test_integer_dtype_is_refused(tmp_path):
    cfg = config(GPT2)
    tensors = random_tensors(cfg)
    tensors["h.1.ln_1.weight"] = np.arange(12, dtype=np.int32)
    write_folder(tmp_path, GPT2, tensors, "transformer.")
    path = tmp_path / "model.safetensors"
    match = (
        rf"{path}: 'transformer.h.1.ln_1.weight' has dtype I32; expected one of \['F16', 'F32', 'F64', 'BF16'"
    )
    with DecoderCheckpoint(tmp_path, cfg) as ckpt:
        with pytest.raises(CheckpointError, match=match):
            ckpt.check()
        with pytest.raises(CheckpointError, match=match):
            ckpt.get("h.1.ln_1.weight")


# --- damage ----------------------------------------------------------------------------------------------


def test_missing_tensors_are_named(tmp_path):
    cfg = config(GPT2)
    tensors = random_tensors(cfg)
    del tensors["h.1.mlp.c_fc.bias"], tensors["wpe.weight"]
    write_folder(tmp_path, GPT2, tensors)
    with pytest.raises(CheckpointError) as info:
        DecoderCheckpoint(tmp_path, cfg).check()  # check() reads headers only: no `with` needed
    message = str(info.value)
    assert message.startswith(
        f"{tmp_path / 'model.safetensors'}: 2 tensors of a gpt2 with 2 layers are missing"
    )
    assert "'wpe.weight' (stored as 'wpe.weight')" in message and "'h.1.mlp.c_fc.bias'" in message
    assert len(info.value.problems) == 2


def test_wrong_shapes_are_named_with_got_and_expected(tmp_path):
    cfg = config(LLAMA)
    tensors = random_tensors(cfg)
    tensors["layers.1.self_attn.k_proj.weight"] = np.zeros((12, 12), np.float32)  # MHA-sized K in a GQA model
    tensors["norm.weight"] = np.zeros((1, 12), np.float32)
    write_folder(tmp_path, LLAMA, tensors, "model.")
    path = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        DecoderCheckpoint(tmp_path, cfg).check()
    assert info.value.problems == [
        f"{path}: 'model.layers.1.self_attn.k_proj.weight' has shape (12, 12); expected (8, 12)",
        f"{path}: 'model.norm.weight' has shape (1, 12); expected (12,)",
    ]
    assert f"{path}: tensors do not fit the config (2 problems: " in str(info.value)


def test_unexpected_and_foreign_tensors(tmp_path):
    cfg = config(LLAMA)
    tensors = random_tensors(cfg)
    extra = {
        "model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32),
        "score.weight": np.ones(2, np.float32),
    }
    write_folder(tmp_path / "extra", LLAMA, tensors, "model.", extra)
    with pytest.raises(
        CheckpointError,
        match=r"unexpected tensors for this llama config \(prefix 'model.'\): "
        r"\['model.layers.0.self_attn.q_norm.weight', 'score.weight'\]",
    ):
        DecoderCheckpoint(tmp_path / "extra", cfg).check()
    # GQA config, MHA-sized files: a 3-layer checkpoint for a 2-layer config has layer 2 left over.
    more = random_tensors(config({**LLAMA, "num_hidden_layers": 3}))
    write_folder(tmp_path / "deeper", LLAMA, more, "model.")
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors .*'model.layers.2.input_layernorm.weight'"
    ):
        DecoderCheckpoint(tmp_path / "deeper", cfg).check()
    # A GPT-2 checkpoint read as a Llama.
    write_folder(tmp_path / "gpt2", GPT2, random_tensors(config(GPT2)), "transformer.")
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors is not a llama checkpoint: none of \['model.embed_tokens.weight', "
        r"'embed_tokens.weight'\] is in it; got tensors \['transformer.h.0",
    ):
        DecoderCheckpoint(tmp_path / "gpt2", cfg)


def test_damaged_files_are_named(tmp_path):
    cfg = config(GPT2)
    write_folder(tmp_path, GPT2, random_tensors(cfg))
    path = tmp_path / "model.safetensors"
    whole = path.read_bytes()
    path.write_bytes(whole[:-4])
    with pytest.raises(CheckpointError, match=rf"{path} is truncated or corrupted: tensor '.*' \(F32, shape"):
        DecoderCheckpoint(tmp_path, cfg)
    path.write_bytes(b"This is not a safetensors file, just some text.")
    with pytest.raises(
        CheckpointError, match=rf"{path} is not a safetensors file or is truncated: its header"
    ):
        DecoderCheckpoint(tmp_path, cfg)
    path.write_bytes(b"\x03")
    with pytest.raises(CheckpointError, match=rf"{path} is not a safetensors file or is truncated"):
        DecoderCheckpoint(tmp_path, cfg)
    path.write_bytes((8).to_bytes(8, "little") + b"[1, 2]  ")
    with pytest.raises(
        CheckpointError, match=rf"{path} is not a safetensors file: its header is not a JSON object"
    ):
        DecoderCheckpoint(tmp_path, cfg)
    path.write_bytes((6).to_bytes(8, "little") + b"{nope}")
    with pytest.raises(
        CheckpointError, match=rf"{path} is not a safetensors file: its header cannot be read"
    ):
        DecoderCheckpoint(tmp_path, cfg)
    write_safetensors(path, {"wte.weight": ("F32", (1,), b"\0" * 4), "wpe.weight": ("F32", (1,), b"")})
    path.write_bytes(path.read_bytes().replace(b"[4, 4]", b"[0, 4]") + b"\0" * 4)  # both at bytes 0..4
    with pytest.raises(CheckpointError, match=rf"cannot read {path} as safetensors: .*invalid offset"):
        DecoderCheckpoint(tmp_path, cfg)
    write_safetensors(path, {"wte.weight": ("F32", (2, -1), b"")})
    with pytest.raises(CheckpointError, match=rf"{path}: tensor 'wte.weight' has a malformed header entry"):
        DecoderCheckpoint(tmp_path, cfg)


def test_folders_without_a_checkpoint(tmp_path):
    cfg = config(GPT2)
    with pytest.raises(CheckpointError, match="does not exist"):
        DecoderCheckpoint(tmp_path / "nowhere", cfg)
    (tmp_path / "config.json").write_text(json.dumps(GPT2))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(
        CheckpointError,
        match=rf"{tmp_path} has no model\.safetensors .*convert pytorch_model\.bin.*found \['config",
    ):
        DecoderCheckpoint(tmp_path, cfg)


def test_get_needs_with_and_a_known_name(tmp_path):
    cfg = config(GPT2)
    tensors = random_tensors(cfg)
    write_folder(tmp_path, GPT2, tensors)
    ckpt = DecoderCheckpoint(tmp_path, cfg)
    assert ckpt.shape("h.0.attn.c_attn.weight") == (12, 36) and ckpt.dtype("wte.weight") == "F32"
    with pytest.raises(CheckpointError, match=r"read tensors inside `with DecoderCheckpoint"):
        ckpt.get("wte.weight")
    with ckpt:
        wte = ckpt.get("wte.weight")
        with pytest.raises(CheckpointError, match=r"no tensor 'lm_head.weight' for this gpt2 .*prefix ''"):
            ckpt.get("lm_head.weight")
        with pytest.raises(CheckpointError, match=r"no tensor 'transformer.wte.weight'"):
            ckpt.get("transformer.wte.weight")
    np.testing.assert_array_equal(wte, tensors["wte.weight"])  # a copy: still readable once closed


# --- against transformers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, model_cls, kwargs",
    [
        ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=12, n_layer=2, n_head=3, vocab_size=13, n_positions=9)),
        (
            "LlamaConfig",
            "LlamaForCausalLM",
            dict(hidden_size=12, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=7, vocab_size=13, attention_bias=True),
        ),
        (
            "Qwen2Config",
            "Qwen2ForCausalLM",
            dict(hidden_size=12, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=6, intermediate_size=7, vocab_size=13, tie_word_embeddings=True),
        ),
    ],
)  # fmt: skip
@pytest.mark.parametrize("layout", ["float32", "sharded", "bfloat16"])
def test_save_pretrained_folders_read_back(tmp_path, cls, model_cls, kwargs, layout):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tp_gpu.models.decoder_checkpoint import read_decoder_config

    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cls)(**kwargs))
    if layout == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="2KB" if layout == "sharded" else "50GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    cfg = read_decoder_config(tmp_path)
    if layout == "bfloat16":
        assert cfg.torch_dtype == "bfloat16"
    state = model.state_dict()
    with DecoderCheckpoint(tmp_path, cfg) as ckpt:
        ckpt.check()
        assert ckpt.prefix == PREFIX[cfg.model_type] and (len(ckpt.files) > 1) == (layout == "sharded")
        assert set(ckpt.names()) == set(decoder_tensor_shapes(cfg))
        for name in ckpt.names():
            got = ckpt.get(name)
            assert got.dtype == np.float32
            theirs = state[name if name == "lm_head.weight" else ckpt.prefix + name]
            np.testing.assert_array_equal(got, theirs.float().numpy(), err_msg=name)
