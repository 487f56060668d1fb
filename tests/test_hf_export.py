"""``save_pretrained``: Hugging Face folders that transformers and our own ``from_pretrained`` load.

Models (random weights, biases and norms included, so a transposed, swapped or dropped tensor
shows) are exported at p = 1 and 3 workers: GPT-2 (tied, Conv1D, fused ``c_attn``), Llama
(grouped-query with fewer K/V heads than workers, so k/v are replicated; untied head; llama3
rotary scaling), Qwen2 (tied, q/k/v biases), BERT (a tiny one and the packaged all-MiniLM-L6-v2).
Without transformers: our ``from_pretrained`` at another worker count gives back every weight bit
for bit, sharded folders included, and a trained model exports its new weights; an existing
folder is overwritten cleanly, a failed save leaves the previous export, bad arguments are refused
before anything is written. With transformers: it loads every folder with no missing, unexpected
or mismatched key, and its outputs equal ours to 1e-6 in float32.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tp_gpu import SGD, TensorParallelConfig, VocabParallelCrossEntropy
from tp_gpu.errors import CheckpointError, CheckpointFileError, ConfigError
from tp_gpu.models import BertConfig, BertModel, DecoderConfig, hf_export, packaged_model_dir
from tp_gpu.models.decoder_loading import MODEL_CLASSES, AutoModelForCausalLM
from tp_gpu.models.hf_export import parse_shard_size

IDS = np.array([[5, 0, 52, 7, 7, 31], [1, 2, 3, 4, 5, 6]])
ROTARY = dict(vocab_size=53, hidden_size=24, intermediate_size=17, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=32,
              bos_token_id=1, eos_token_id=[2, 3])  # fmt: skip
DECODERS = {
    "gpt2": dict(model_type="gpt2", vocab_size=53, n_embd=12, n_layer=2, n_head=3, n_inner=17,
                 n_positions=32, bos_token_id=52, eos_token_id=52),
    "llama": dict(ROTARY, model_type="llama", tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "qwen2": dict(ROTARY, model_type="qwen2", tie_word_embeddings=True, rope_theta=1000.0),
}  # fmt: skip
TINY_BERT = BertConfig(vocab_size=53, hidden_size=12, num_hidden_layers=2, num_attention_heads=3,
                       intermediate_size=20, max_position_embeddings=16, type_vocab_size=2)  # fmt: skip


def tp(n_workers: int, dtype: str = "float32") -> TensorParallelConfig:
    if n_workers == 1:
        return TensorParallelConfig(n_workers=1, backend="numpy", dtype=dtype)
    return TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=2, dtype=dtype)


def randomize(model, seed: int):
    """Every weight random (norm weights near 1, biases small), so each tensor's place matters."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in model.state_dict().items():
        if "norm" in name and name.endswith("weight"):
            state[name] = 1 + 0.1 * rng.standard_normal(value.shape)
        elif value.ndim == 1:
            state[name] = 0.1 * rng.standard_normal(value.shape)
        else:
            state[name] = rng.normal(0, value.shape[-1] ** -0.5 if "embed" not in name else 0.5, value.shape)
    model.load_state_dict(state)
    return model.eval()


def decoder(name: str, n_workers: int, dtype: str = "float32", **kwargs):
    config = DecoderConfig.from_dict(DECODERS[name])
    return randomize(MODEL_CLASSES[name](config, tp(n_workers, dtype), seed=3, **kwargs), 11)


def bert(n_workers: int, dtype: str = "float32"):
    return randomize(BertModel(TINY_BERT, tp(n_workers, dtype), seed=3), 12)


def same_weights(a, b) -> None:
    """The two models' state dicts are equal bit for bit (names, dtypes, values)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and np.array_equal(sa[name], sb[name]), name


def tensor_names(folder: Path) -> set:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    blob = (folder / "model.safetensors").read_bytes()
    return set(json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])) - {"__metadata__"}


# --- our own loaders: exact round trips ------------------------------------------------------------


@pytest.mark.parametrize("p_save, p_load", [(1, 3), (3, 1), (3, 2)])
@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_round_trip_is_exact(tmp_path, name, p_save, p_load):
    model = decoder(name, p_save, pad_to_multiple_of=8 if p_save == 3 else None)
    model.save_pretrained(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", tp(p_load))
    assert type(loaded) is type(model)
    assert loaded.decoder_config == replace(model.decoder_config, torch_dtype="float32")  # as stored
    same_weights(model, loaded)
    np.testing.assert_allclose(np.asarray(loaded(IDS)), np.asarray(model(IDS)), rtol=1e-5, atol=1e-5)
    prefix = "transformer." if name == "gpt2" else "model."
    names = tensor_names(tmp_path / "out")
    assert all(n.startswith(prefix) for n in names - {"lm_head.weight"})
    assert ("lm_head.weight" in names) == (not model.decoder_config.tie_word_embeddings)


def test_llama_kv_heads_are_replicated_at_three_workers():
    """The Llama case exercises ReplicatedLinear k/v (2 K/V heads, 3 workers) and split ones at 2."""
    assert type(decoder("llama", 3).decoder_layers[0].attention.k_proj).__name__ == "ReplicatedLinear"
    assert type(decoder("llama", 2).decoder_layers[0].attention.k_proj).__name__ == "ColumnParallelLinear"


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("p_save, p_load", [(1, 3), (3, 1)])
def test_bert_round_trip_is_exact(tmp_path, p_save, p_load, dtype):
    model = bert(p_save, dtype)
    model.save_pretrained(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert config["dtype"] == dtype and config["architectures"] == ["BertModel"]
    loaded = BertModel.from_pretrained(tmp_path / "bert", tp(p_load, dtype))
    assert loaded.bert_config == TINY_BERT
    same_weights(model, loaded)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_sharded_export(tmp_path, name):
    """A small max_shard_size gives shards named as transformers names them, each within the limit
    (a larger tensor alone), an index mapping every tensor, and the same weights back."""
    model = decoder(name, 3) if name != "bert" else bert(3)
    limit = 3000
    model.save_pretrained(tmp_path / "out", max_shard_size=limit)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 3 and "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    total = 0
    for shard in shards:
        blob = (tmp_path / "out" / shard).read_bytes()
        data = len(blob) - 8 - int.from_bytes(blob[:8], "little")  # bytes of the tensors
        tensors = [t for t, f in index["weight_map"].items() if f == shard]
        assert data <= limit or len(tensors) == 1, (shard, data, tensors)
        total += data
    assert index["metadata"]["total_size"] == total
    loaded = (
        BertModel.from_pretrained(tmp_path / "out", tp(1))
        if name == "bert"
        else AutoModelForCausalLM.from_pretrained(tmp_path / "out", tp(1))
    )
    same_weights(model, loaded)


def test_trained_model_exports_its_new_weights(tmp_path):
    model = decoder("llama", 3).train()
    before = model.state_dict()
    optimizer, loss_fn = SGD(model.parameters(), lr=0.5), VocabParallelCrossEntropy()
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(IDS[:, :-1]), IDS[:, 1:]).backward()
        optimizer.step()
    after = model.state_dict()
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # every weight moved
    model.save_pretrained(tmp_path / "trained", max_shard_size="4KB")
    same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "trained", tp(2)))


# --- the folder: overwriting, failures, refusals ------------------------------------------------------


def test_existing_folder_is_overwritten_and_other_files_kept(tmp_path):
    out = tmp_path / "out"
    first, second = decoder("qwen2", 3), randomize(decoder("qwen2", 1), 99)
    first.save_pretrained(out, max_shard_size=2000)
    (out / "tokenizer.json").write_text("{}")
    second.save_pretrained(out)  # sharded -> single: old shards and index go
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    same_weights(second, AutoModelForCausalLM.from_pretrained(out, tp(3)))
    first.save_pretrained(out, max_shard_size=2000)  # single -> sharded: model.safetensors goes
    assert "model.safetensors" not in os.listdir(out) and "tokenizer.json" in os.listdir(out)
    same_weights(first, AutoModelForCausalLM.from_pretrained(out, tp(1)))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging folder left


def test_empty_folder_and_link_targets(tmp_path):
    """An existing empty folder is replaced whole; a link to a folder is followed and stays a link."""
    (tmp_path / "empty").mkdir()
    model = decoder("gpt2", 3)
    model.save_pretrained(tmp_path / "empty")
    same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path / "empty", tp(1)))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    model.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.safetensors").is_file()


def test_host_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """Tensors are gathered and written one at a time, even into one file: the peak of host
    allocations during the export stays near twice the largest tensor (plus a fixed 200 kB), far
    below the model's size (1.4 MB)."""
    import tracemalloc

    config = DecoderConfig.from_dict(dict(DECODERS["llama"], num_hidden_layers=12, hidden_size=96))
    model = MODEL_CLASSES["llama"](config, tp(3), seed=1)
    weights = sum(p.full().nbytes for p in model.parameters())
    largest = max(p.full().nbytes for p in model.parameters())
    tracemalloc.start()
    try:
        model.save_pretrained(tmp_path / "out")  # one file, streamed
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert weights > 35 * largest
    assert peak < 3 * largest + 200_000, (peak, largest, weights)


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        self.room -= len(memoryview(data).cast("B"))
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


@pytest.mark.parametrize("max_shard_size", [None, 2000])
def test_failed_save_leaves_the_previous_export(tmp_path, monkeypatch, max_shard_size):
    out = tmp_path / "out"
    old = decoder("llama", 1)
    old.save_pretrained(out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    opened = []
    real_open = hf_export._Staging.open

    def failing_open(self, name):
        opened.append(name)
        failing = len(opened) == (1 if max_shard_size is None else 3)  # the file, or the third shard
        return _FullDisk(real_open(self, name), 1000 if failing else 10**9)

    monkeypatch.setattr(hf_export._Staging, "open", failing_open)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with pytest.raises(CheckpointFileError) as info:
        randomize(decoder("llama", 3), 5).save_pretrained(out, **kwargs)
    assert opened[-1].endswith(".safetensors")  # it failed in the weights, before config.json
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging folder is gone
    same_weights(old, AutoModelForCausalLM.from_pretrained(out, tp(2)))


def test_staging_folders_of_killed_saves_are_removed(tmp_path):
    """A staging folder whose lock is free (its save was killed) goes; one still locked stays."""
    fcntl = pytest.importorskip("fcntl")
    dead, live = tmp_path / ".out.0123456789ab.tmp", tmp_path / ".out.ba9876543210.tmp"
    for folder in (dead, live):
        folder.mkdir()
        (folder / ".lock").write_text("")
        (folder / "model.safetensors").write_bytes(b"partial")
    with open(live / ".lock") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        bert(1).save_pretrained(tmp_path / "out")
        assert sorted(os.listdir(tmp_path)) == [live.name, "out"]


def test_refusals_before_anything_is_written(tmp_path):
    model = bert(1)
    for bad in (0, -5, True, 1.5, "", "12XB", "MB", "five GB", None):
        with pytest.raises(ConfigError, match="max_shard_size"):
            model.save_pretrained(tmp_path / "out", max_shard_size=bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointFileError, match="file"):
        model.save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    # A GPT-2 without biases can be built here but not written as a transformers GPT-2.
    gpt2 = replace(DecoderConfig.from_dict(DECODERS["gpt2"]), qkv_bias=False)
    with pytest.raises(ConfigError, match="qkv_bias=False"):
        MODEL_CLASSES["gpt2"](gpt2, tp(1)).save_pretrained(tmp_path / "gpt2")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_parse_shard_size():
    assert parse_shard_size(10) == 10
    assert parse_shard_size("500MB") == 500 * 10**6
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("1.5kb") == 1500


def test_shape_mismatch_is_a_checkpoint_error(tmp_path, monkeypatch):
    """A gathered tensor that does not fit its header (a mapping bug) fails loudly, writes nothing."""
    monkeypatch.setattr(
        hf_export, "bert_tensor_shapes", lambda c: {"embeddings.word_embeddings.weight": (1, 2)}
    )
    with pytest.raises(CheckpointError, match="embeddings.word_embeddings.weight"):
        bert(1).save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


# --- transformers ------------------------------------------------------------------------------------


def _transformers():
    torch = pytest.importorskip("torch")
    return torch, pytest.importorskip("transformers")


def _loaded(info) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def close(ours: np.ndarray, theirs: np.ndarray, tol: float) -> None:
    """``|ours - theirs| <= tol * max(1, max|theirs|)``: float32 sums in another order differ by a
    few units in the last place of the largest value (1.2e-7 relative each)."""
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol * max(1.0, float(np.abs(theirs).max())))


#: dtype -> tolerance (relative to the largest output): float64 shows the export is exact, except
#: that transformers computes the rotary angles in float32 whatever the dtype (test_decoder_models).
DTYPES = {"float32": 1e-6, "float64": 1e-12}
ROTARY_FLOAT64 = 1e-6


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("max_shard_size", ["50GB", 3000])
def test_transformers_loads_decoders(tmp_path, name, p, max_shard_size, dtype):
    torch, transformers = _transformers()
    model = decoder(name, p, dtype)
    model.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    _loaded(info)
    assert type(hf).__name__ == json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
    assert hf.dtype == getattr(torch, dtype) and hf.config.tie_word_embeddings == (name != "llama")
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS)).logits.numpy()
    ours = np.asarray(model(IDS))
    assert ours.dtype == theirs.dtype == np.dtype(dtype) and float(np.abs(ours).std()) > 0.1
    close(ours, theirs, ROTARY_FLOAT64 if name != "gpt2" else DTYPES[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p", [1, 3])
def test_transformers_loads_bert(tmp_path, p, dtype):
    torch, transformers = _transformers()
    model = bert(p, dtype)
    model.save_pretrained(tmp_path / "bert", max_shard_size=5000)
    hf, info = transformers.AutoModel.from_pretrained(
        tmp_path / "bert", output_loading_info=True, add_pooling_layer=False, attn_implementation="eager"
    )
    _loaded(info)
    mask = np.ones_like(IDS)
    mask[1, 4:] = 0
    with torch.no_grad():
        theirs = hf(torch.tensor(IDS), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    close(np.asarray(model(IDS, mask)), theirs, DTYPES[dtype])


def test_transformers_loads_exported_minilm(tmp_path):
    """The packaged all-MiniLM-L6-v2, loaded at 3 workers and exported, is transformers' MiniLM again."""
    torch, transformers = _transformers()
    try:
        source = packaged_model_dir()
    except Exception as exc:  # the weights package is optional
        pytest.skip(f"all-MiniLM-L6-v2 is not installed: {exc}")
    model = BertModel.from_pretrained(source, tp(3))
    model.save_pretrained(tmp_path / "minilm")
    same_weights(model, BertModel.from_pretrained(tmp_path / "minilm", tp(1)))
    hf, info = transformers.AutoModel.from_pretrained(
        tmp_path / "minilm", output_loading_info=True, add_pooling_layer=False, attn_implementation="eager"
    )
    _loaded(info)
    ids = np.array([[101, 7592, 2088, 999, 102], [101, 2023, 2003, 1037, 102]])
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).last_hidden_state.numpy()
    close(np.asarray(model(ids)), theirs, 1e-6)
