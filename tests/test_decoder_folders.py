"""Loading decoder folders with ``AutoModelForCausalLM.from_pretrained``: what loads, and what is refused.

Good folders in every layout load to the same logits (GPT-2 with and without ``transformer.``,
sharded and single-file, bfloat16 and float16 storage). Bad folders raise a typed error naming the
file and the value before any weight is split: the tests replace ``load_weights`` and the model's
constructor by functions that fail the test if they are reached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dense_decoder import read_safetensors, reference_logits, to_bf16, write_folder
from safetensors.numpy import save_file

from tp_gpu import ConfigError, IndexOutOfRangeError, TensorParallelConfig, TensorParallelError
from tp_gpu.errors import CheckpointError
from tp_gpu.models import decoder_loading
from tp_gpu.models.decoder import DecoderForCausalLM
from tp_gpu.models.decoder_loading import (
    AutoModelForCausalLM,
    GPT2ForCausalLM,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)

SMALL = dict(vocab_size=53, hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=17)
IDS = np.array([[5, 0, 52, 7, 7, 31], [1, 2, 3, 4, 5, 6]])
CONFIG = TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float32")


def folder_of(tmp_path: Path, model_type: str, rng, name: str = "model", **kwargs) -> Path:
    sizes = dict(SMALL, num_key_value_heads=1) if model_type != "gpt2" else dict(SMALL)
    kwargs.setdefault("tie", model_type == "gpt2")
    return write_folder(tmp_path / name, model_type, rng=rng, **sizes, **kwargs)


def logits(folder: Path, config: TensorParallelConfig = CONFIG) -> np.ndarray:
    return np.asarray(AutoModelForCausalLM.from_pretrained(folder, config)(IDS))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model is built or a weight read: errors must come before both."""

    def reached(*args, **kwargs):
        raise AssertionError("a weight was split or read before the folder was refused")

    monkeypatch.setattr(decoder_loading, "load_weights", reached)
    monkeypatch.setattr(DecoderForCausalLM, "__init__", reached)


def refused(folder: Path, error: type, *fragments: str) -> str:
    """``from_pretrained(folder)`` raises ``error`` whose message holds every fragment; returns it."""
    with pytest.raises(error) as info:
        AutoModelForCausalLM.from_pretrained(folder, CONFIG)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def rewrite_tensors(path: Path, change) -> None:
    """Rewrite the safetensors file ``path`` with ``change(tensors)`` (float32)."""
    tensors = {k: v.astype(np.float32) for k, v in read_safetensors(path).items()}
    change(tensors)
    save_file(tensors, str(path))


def stored_dtypes(path: Path) -> list:
    blob = path.read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    return [entry["dtype"] for name, entry in header.items() if name != "__metadata__"]


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# --- layouts that load ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type, cls", [("gpt2", GPT2ForCausalLM), ("llama", LlamaForCausalLM),
                                             ("qwen2", Qwen2ForCausalLM)])  # fmt: skip
def test_auto_picks_the_class(tmp_path, rng, model_type, cls):
    """The class follows model_type, and the class's own from_pretrained loads the same model."""
    folder = folder_of(tmp_path, model_type, rng)
    model = AutoModelForCausalLM.from_pretrained(folder, CONFIG)
    assert type(model) is cls and not model.training
    np.testing.assert_array_equal(
        np.asarray(cls.from_pretrained(folder, CONFIG)(IDS)), np.asarray(model(IDS))
    )
    np.testing.assert_allclose(np.asarray(model(IDS)), reference_logits(folder, IDS), atol=2e-5, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_both_key_layouts(tmp_path, tie):
    """save_pretrained's ``transformer.wte.weight`` and the OpenAI files' ``wte.weight`` (with the
    ``h.{i}.attn.bias`` / ``masked_bias`` buffers) load to identical logits."""
    folders = [
        folder_of(
            tmp_path, "gpt2", np.random.default_rng(7), name=layout or "openai", tie=tie, gpt2_layout=layout
        )
        for layout in ("transformer.", "")
    ]
    names = [set(read_safetensors(f / "model.safetensors")) for f in folders]
    assert "transformer.wte.weight" in names[0] and {"wte.weight", "h.1.attn.masked_bias"} <= names[1]
    assert ("lm_head.weight" in names[1]) is not tie
    got = [logits(f) for f in folders]
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_allclose(got[0], reference_logits(folders[1], IDS), atol=2e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_sharded_index_loads_identically(tmp_path, model_type):
    single = folder_of(tmp_path, model_type, np.random.default_rng(3), name="single")
    sharded = folder_of(tmp_path, model_type, np.random.default_rng(3), name="sharded", sharded=True)
    assert not (sharded / "model.safetensors").exists()
    assert (
        len(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
        == 2
    )
    np.testing.assert_array_equal(logits(single), logits(sharded))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bfloat16_folder(tmp_path, model_type):
    """A BF16 folder loads as the float32 folder holding the same values rounded to bfloat16."""
    bf16 = folder_of(tmp_path, model_type, np.random.default_rng(5), name="bf16", dtype="bfloat16")
    plain = folder_of(tmp_path, model_type, np.random.default_rng(5), name="f32")
    rewrite_tensors(plain / "model.safetensors", lambda t: t.update({k: to_bf16(v) for k, v in t.items()}))
    stored = read_safetensors(bf16 / "model.safetensors")
    assert set(stored_dtypes(bf16 / "model.safetensors")) == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(bf16, CONFIG)
    table = stored["transformer.wte.weight" if model_type == "gpt2" else "model.embed_tokens.weight"]
    np.testing.assert_array_equal(model.embed_tokens.full_weight(), table.astype(np.float32))
    got = np.asarray(model(IDS))
    np.testing.assert_array_equal(got, logits(plain))
    unrounded = reference_logits(folder_of(tmp_path, model_type, np.random.default_rng(5), name="raw"), IDS)
    assert np.abs(got - unrounded).max() > 1e-4  # the rounding really happened


def test_float16_and_float64_folders(tmp_path):
    """F16 and F64 storage load; a float64 model of an F64 folder matches the reference to 1e-10."""
    f64 = folder_of(tmp_path, "qwen2", np.random.default_rng(9), name="f64", dtype="float64")
    f16 = folder_of(tmp_path, "qwen2", np.random.default_rng(9), name="f16", dtype="float16")
    config64 = TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64")
    np.testing.assert_allclose(logits(f64, config64), reference_logits(f64, IDS), atol=1e-10, rtol=0)
    np.testing.assert_allclose(logits(f16, config64), reference_logits(f16, IDS), atol=1e-10, rtol=0)


def test_legacy_rope_layout(tmp_path):
    """Older folders' top-level ``rope_theta`` and ``rope_scaling: {type: linear}`` load as the
    ``rope_parameters`` of transformers 5 do."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    new = folder_of(tmp_path, "llama", np.random.default_rng(4), name="new", extra={"rope_parameters": rope})
    old = folder_of(tmp_path, "llama", np.random.default_rng(4), name="old", extra={"rope_parameters": None})
    edit_config(old, rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    np.testing.assert_array_equal(logits(new), logits(old))
    np.testing.assert_allclose(logits(old), reference_logits(new, IDS), atol=2e-5, rtol=0)
    plain = folder_of(tmp_path, "llama", np.random.default_rng(4), name="plain")
    assert np.abs(logits(plain) - logits(new)).max() > 1e-3  # the scaling and theta are applied


def test_transformers_sharded_save(tmp_path):
    """A Llama that transformers saves in several shards loads; float32 logits within 1e-4 of its own."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(initializer_range=0.3, num_key_value_heads=1, **SMALL)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path, max_shard_size="4KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits.double().numpy()
    assert float(expected.std()) > 0.3
    np.testing.assert_allclose(logits(tmp_path), expected, atol=1e-4, rtol=0)


# --- folders refused ------------------------------------------------------------------------------


def test_missing_tensor(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "llama", rng)
    rewrite_tensors(folder / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    refused(folder, CheckpointError, str(folder / "model.safetensors"), "model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "qwen2", rng)
    name = "model.layers.0.self_attn.k_proj.weight"  # (kv * hd, H) = (4, 12), stored transposed
    rewrite_tensors(folder / "model.safetensors", lambda t: t.update({name: t[name].T.copy()}))
    refused(folder, CheckpointError, str(folder / "model.safetensors"), name, "(12, 4)", "(4, 12)")


def test_wrong_dtype_and_unexpected_tensor(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "gpt2", rng)
    path = folder / "model.safetensors"
    tensors = read_safetensors(path)
    save_file(dict(tensors, **{"transformer.h.0.ln_1.weight": np.ones(12, np.int32)}), str(path))
    refused(folder, CheckpointError, str(path), "transformer.h.0.ln_1.weight", "I32")
    save_file(dict(tensors, **{"transformer.h.2.ln_1.weight": np.ones(12)}), str(path))
    refused(folder, CheckpointError, "transformer.h.2.ln_1.weight", "unexpected")


def test_missing_shard_file(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "llama", rng, sharded=True)
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(
        folder,
        CheckpointError,
        "model-00002-of-00002.safetensors",
        str(folder / "model.safetensors.index.json"),
    )


def test_truncated_file(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "gpt2", rng)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    refused(folder, CheckpointError, str(path), "truncated")


def test_no_weights_or_no_config(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "llama", rng)
    (folder / "model.safetensors").rename(folder / "weights.bin")
    refused(folder, CheckpointError, str(folder), "model.safetensors", "weights.bin")
    (folder / "config.json").unlink()
    refused(folder, CheckpointError, "config.json")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "'yarn'"),
        ({"rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"model_type": "mistral"}, "'mistral'"),
        ({"head_dim": 5}, "head_dim must be even"),
        ({"num_key_value_heads": 2}, "num_key_value_heads (2)"),
    ],
    ids=["yarn", "dynamic", "mistral", "odd-head-dim", "heads-not-multiple-of-kv"],
)
def test_config_refused(tmp_path, rng, no_weights, changes, fragment):
    folder = folder_of(tmp_path, "llama", rng)
    edit_config(folder, **changes)
    refused(folder, ConfigError, str(folder / "config.json"), fragment)


def test_config_not_json(tmp_path, rng, no_weights):
    folder = folder_of(tmp_path, "qwen2", rng)
    (folder / "config.json").write_text('{"model_type": "qwen2", ')
    message = refused(folder, TensorParallelError, str(folder / "config.json"))
    assert "JSON" in message


def test_class_must_match_model_type(tmp_path, rng, no_weights):
    """LlamaForCausalLM.from_pretrained refuses a GPT-2 folder, naming both classes."""
    folder = folder_of(tmp_path, "gpt2", rng)
    with pytest.raises(ConfigError) as info:
        LlamaForCausalLM.from_pretrained(folder, CONFIG)
    for fragment in ("'gpt2'", "GPT2ForCausalLM", "LlamaForCausalLM", str(folder)):
        assert fragment in str(info.value)
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM"):
        Qwen2ForCausalLM.from_pretrained(folder, CONFIG)


def test_no_weights_fixture_bites(tmp_path, rng, no_weights):
    """The guard the refusals run under does stop a good folder from loading."""
    with pytest.raises(AssertionError, match="before the folder was refused"):
        AutoModelForCausalLM.from_pretrained(folder_of(tmp_path, "gpt2", rng), CONFIG)


def test_ids_and_positions_out_of_range(tmp_path, rng):
    """Token ids outside the vocabulary and GPT-2 positions past n_positions (32) are typed errors."""
    model = AutoModelForCausalLM.from_pretrained(folder_of(tmp_path, "gpt2", rng), CONFIG)
    with pytest.raises(IndexOutOfRangeError, match="53"):
        model(np.array([[0, 53]]))
    with pytest.raises(IndexOutOfRangeError, match="32"):
        model(np.zeros((1, 33), np.int64))
    with pytest.raises(IndexOutOfRangeError, match="32"):
        model(np.array([[1, 2]]), position_ids=np.array([[0, 32]]))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nowhere", CONFIG)
