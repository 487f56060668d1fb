"""Sharded checkpoints in one process: ``save_checkpoint(folder, module, sharded=True)``.

Round trips save at every worker count 1..8 and load at every other (a grouped-query decoder whose
key-value projections are replicated at some counts and split at others, and an embedding + MLP
model) on NumPy and simulated devices. Resumes (Adam, SGD momentum, loss scaler, dropout, float16
master weights) take the next 5 steps bit for bit as the uninterrupted run, or as the single-file
format at another split. A load reads only the rows its blocks need (rounded out to whole hashed
chunks). A save's extra host memory is about the module's shards (here, in one process, the whole
module), not twice it as for the single file. Faults (corruption, interrupted saves): in
test_checkpoint_sharded_faults.py; several processes: test_checkpoint_sharded_mpi.py.
"""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
from test_resume import make_model, make_optimizer, train

import tp_gpu.checkpoint_pieces as pieces
from tp_gpu import (
    Adam,
    CheckpointError,
    ColumnParallelLinear,
    ConfigError,
    GradScaler,
    ParallelMLP,
    TensorParallelConfig,
    load_checkpoint,
    save_checkpoint,
)
from tp_gpu.models import DecoderConfig, DecoderForCausalLM


def config(p: int, dtype: str = "float64", devices=None) -> TensorParallelConfig:
    """NumPy, or ``devices`` simulated devices."""
    backend = "numpy" if devices is None else "simulated"
    return TensorParallelConfig(n_workers=p, backend=backend, devices=devices, dtype=dtype)


def decoder(p: int, devices=None, seed: int = 3) -> DecoderForCausalLM:
    c = DecoderConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 37,
            "hidden_size": 16,
            "intermediate_size": 21,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,  # replicated at more than 2 workers, split by heads at 1 and 2
            "max_position_embeddings": 16,
        }
    )
    return DecoderForCausalLM(c, config(p, devices=devices), seed=seed)


def scramble(model, seed: int = 99) -> None:
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.load(rng.standard_normal(p.shape))


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert np.array_equal(value, sb[name]), name


def index(folder) -> dict:
    with open(os.path.join(folder, "index.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("kind", ["decoder", "mlp"])
def test_save_at_p_load_at_q_for_every_p_and_q_up_to_8(tmp_path, kind):
    build = (
        decoder
        if kind == "decoder"
        else (lambda p, devices=None: make_model(p, "sim3" if devices else "numpy"))
    )
    for p in range(1, 9):
        source = build(p, 3 if p % 2 else None)
        scramble(source, seed=p)
        folder = tmp_path / f"p{p}"
        save_checkpoint(folder, source, sharded=True)
        for q in range(1, 9):
            target = build(q, None if q % 2 else 3)
            scramble(target, seed=100 + q)
            load_checkpoint(folder, target)
            assert_same_state(target, source)
    if kind == "decoder":  # the key projection: whole when replicated (p > 2), split by heads at p = 2
        k_proj = next(n for n in index(tmp_path / "p8")["tensors"] if "k_proj.weight" in n)
        assert index(tmp_path / "p8")["tensors"][k_proj]["axis"] is None
        assert index(tmp_path / "p2")["tensors"][k_proj]["axis"] is not None


def train_with_scaler(model, optimizer, scaler, start, stop):
    return train(model, optimizer, start, stop, scaler=scaler)


@pytest.mark.parametrize(
    "p, q, kind, backend",
    [
        (3, 3, "adam", "numpy"),
        (3, 3, "sgd", "numpy"),
        (2, 5, "adam", "numpy"),
        (4, 1, "sgd", "numpy"),
        (3, 2, "adam", "sim3"),
    ],
)
def test_resume_takes_the_next_5_steps_bit_for_bit(tmp_path, p, q, kind, backend):
    model = make_model(p, backend)
    optimizer, scaler = make_optimizer(kind, model), GradScaler(init_scale=2.0**10, growth_interval=2)
    train_with_scaler(model, optimizer, scaler, 0, 6)
    save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, scaler=scaler, sharded=True)
    save_checkpoint(tmp_path / "single.safetensors", model, optimizer=optimizer, scaler=scaler)
    reference = train_with_scaler(model, optimizer, scaler, 6, 11)

    resumed = {}
    for source in ("ckpt", "single.safetensors"):
        fresh = make_model(q, backend)
        fresh_optimizer, fresh_scaler = make_optimizer(kind, fresh), GradScaler()
        load_checkpoint(tmp_path / source, fresh, optimizer=fresh_optimizer, scaler=fresh_scaler)
        assert fresh[1].step == 6  # the dropout's step
        log = train_with_scaler(fresh, fresh_optimizer, fresh_scaler, 6, 11)
        resumed[source] = (fresh, fresh_optimizer, log)
    fresh, fresh_optimizer, log = resumed["ckpt"]
    twin, twin_optimizer, twin_log = (
        resumed["single.safetensors"] if q != p else (model, optimizer, reference)
    )
    assert log == twin_log  # losses, stepped, scales: exactly
    assert_same_state(fresh, twin)
    mine, theirs = fresh_optimizer.state_dict()["state"], twin_optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys() and mine
    for i, entry in mine.items():
        for key, value in entry.items():
            assert np.array_equal(value, theirs[i][key]), (i, key)


def test_float16_master_weights_are_saved_and_restored(tmp_path):
    model = make_model(3, dtype="float16")
    optimizer = Adam(model.parameters(), lr=0.01)
    train(model, optimizer, 0, 2)
    save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer, sharded=True)
    save_checkpoint(tmp_path / "single.safetensors", model, optimizer=optimizer)
    assert any(n.endswith("/master") for n in index(tmp_path / "ckpt")["tensors"])
    states = []
    for source in ("ckpt", "single.safetensors"):
        fresh = make_model(2, dtype="float16")
        fresh_optimizer = Adam(fresh.parameters(), lr=0.01)
        load_checkpoint(tmp_path / source, fresh, optimizer=fresh_optimizer)
        states.append(fresh_optimizer.state_dict()["state"])
    for i, entry in states[0].items():
        assert entry.keys() == states[1][i].keys() and "master" in entry
        for key, value in entry.items():
            assert (
                np.array_equal(value, states[1][i][key])
                and np.asarray(value).dtype == np.asarray(states[1][i][key]).dtype
            )


def spy_reads(monkeypatch):
    """Record ``(key, first, last)`` of every slice read and ``(key, "whole")`` of every whole read."""
    reads = []
    real_rows, real_whole = pieces._read_rows, pieces._read_whole

    def rows(handle, key, first, last):
        reads.append((key, first, last))
        return real_rows(handle, key, first, last)

    def whole(handle, key):
        reads.append((key, "whole"))
        return real_whole(handle, key)

    monkeypatch.setattr(pieces, "_read_rows", rows)
    monkeypatch.setattr(pieces, "_read_whole", whole)
    return reads


def test_a_load_reads_only_the_rows_its_blocks_need_rounded_to_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(pieces, "CHUNK_BYTES", 96)  # the weight (3 x 40, stored 40 x 3): 4 rows a chunk
    source = ColumnParallelLinear(3, 40, config(1), seed=1)
    save_checkpoint(tmp_path / "ckpt", source, sharded=True)
    described = index(tmp_path / "ckpt")["tensors"]
    assert (
        described["weight"]["pieces"][0]["chunk_rows"] == 4
        and described["bias"]["pieces"][0]["chunk_rows"] == 12
    )
    reads = spy_reads(monkeypatch)
    target = ColumnParallelLinear(3, 40, config(4, devices=4), seed=2)  # 10 columns on each device
    load_checkpoint(tmp_path / "ckpt", target)
    assert_same_state(target, source)
    assert sorted(r for r in reads if r[0] == "weight#0") == [
        ("weight#0", 0, 12),
        ("weight#0", 8, 20),
        ("weight#0", 20, 32),
        ("weight#0", 28, 40),
    ]
    assert sorted(r for r in reads if r[0] == "bias#0") == [
        ("bias#0", 0, 12),
        ("bias#0", 0, 24),
        ("bias#0", 12, 36),
        ("bias#0", 24, 40),
    ]
    reads.clear()  # at the saved split every piece is read whole, once
    load_checkpoint(tmp_path / "ckpt", ColumnParallelLinear(3, 40, config(1), seed=2))
    assert sorted(reads) == [("bias#0", "whole"), ("weight#0", "whole")]


def saved_mlp(tmp_path, p: int = 2):
    model = ParallelMLP(6, 10, 6, config(p), seed=1)
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, sharded=True)
    return model, folder


def rank_file(folder) -> str:
    return next(str(folder / n) for n in os.listdir(folder) if n.endswith(".safetensors"))


def test_strict_dtype_cast_and_the_single_file_format(tmp_path):
    model, folder = saved_mlp(tmp_path)
    float32 = ParallelMLP(6, 10, 6, config(3, dtype="float32"), seed=5)
    with pytest.raises(CheckpointError, match="expected dtype float32, found float64"):
        load_checkpoint(folder, float32)
    load_checkpoint(folder, float32, dtype_cast=True)
    for name, value in float32.state_dict().items():
        assert np.array_equal(value, model.state_dict()[name].astype(np.float32)), name
    other = {"mlp": ParallelMLP(6, 10, 6, config(1), seed=5)}
    with pytest.raises(CheckpointError, match="holds none of the module's tensors"):
        load_checkpoint(folder, other, strict=False)
    embed = ColumnParallelLinear(6, 4, config(2), seed=1)
    save_checkpoint(tmp_path / "both", {"mlp": model, "head": embed}, sharded=True)
    loaded = load_checkpoint(tmp_path / "both", other, strict=False)
    assert sorted(loaded.unexpected_keys) == ["head.bias", "head.weight"] and loaded.missing_keys == []
    assert loaded.metadata["format"] == "tp_gpu-sharded" and loaded.metadata["world_size"] == "1"
    assert_same_state(other["mlp"], model)
    save_checkpoint(tmp_path / "single.safetensors", model)  # the single file still saves and loads
    single = ParallelMLP(6, 10, 6, config(4), seed=7)
    load_checkpoint(tmp_path / "single.safetensors", single)
    assert_same_state(single, model)
    with pytest.raises(ConfigError, match="sharded must be True or False"):
        save_checkpoint(tmp_path / "x", model, sharded="yes")


def peak_extra(call) -> int:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    call()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def test_a_save_holds_about_the_shards_not_twice_the_model(tmp_path):
    model = ParallelMLP(256, 1024, 256, config(4), seed=1)  # 4.2 MB of float64 weights
    weights = sum(int(np.prod(p.shape)) * 8 for p in model.parameters())
    save_checkpoint(tmp_path / "warm", model, sharded=True)  # lazy imports out of the measurement
    save_checkpoint(tmp_path / "warm.safetensors", model)
    extra_sharded = peak_extra(lambda: save_checkpoint(tmp_path / "ckpt", model, sharded=True))
    extra_single = peak_extra(lambda: save_checkpoint(tmp_path / "single.safetensors", model))
    assert extra_sharded < 1.1 * weights + (128 << 10), (extra_sharded, weights)
    assert extra_single > 1.8 * weights, (extra_single, weights)


def test_a_background_sharded_save_holds_the_values_at_the_call(tmp_path):
    model, folder = saved_mlp(tmp_path)
    at_call = model.state_dict()
    handle = save_checkpoint(tmp_path / "bg", model, sharded=True, background=True)
    scramble(model)  # training goes on
    handle.wait()
    loaded = ParallelMLP(6, 10, 6, config(3), seed=5)
    load_checkpoint(tmp_path / "bg", loaded)
    for name, value in loaded.state_dict().items():
        assert np.array_equal(value, at_call[name]), name


def test_padded_and_uneven_layouts_round_trip(tmp_path):
    """Blocks with padding inside (a padded vocabulary split) and empty workers (3 columns on 8)."""
    from tp_gpu import ParallelEmbedding

    source = {
        "embed": ParallelEmbedding(50, 6, config(4, devices=3), seed=1, pad_to_multiple_of=8),
        "narrow": ColumnParallelLinear(5, 3, config(8, devices=3), seed=2),
    }
    save_checkpoint(tmp_path / "ckpt", source, sharded=True)
    for q, devices in ((1, None), (3, 2), (8, 3)):
        target = {
            "embed": ParallelEmbedding(50, 6, config(q, devices=devices), seed=3, pad_to_multiple_of=16),
            "narrow": ColumnParallelLinear(5, 3, config(q, devices=devices), seed=4),
        }
        load_checkpoint(tmp_path / "ckpt", target)
        for key in source:
            assert_same_state(target[key], source[key])
        weight = target["embed"].weight
        for device, block in weight.blocks.items():  # the padding rows of each block stay zero
            mask = weight.layout.logical_mask(np, device)
            padding = weight.backend.to_host(block)[~mask] if mask is not None else np.zeros(0)
            assert padding.size == (mask is not None) * (~mask).sum() * 6 and not padding.any()
