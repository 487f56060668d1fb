"""ParallelEmbedding against the dense lookup ``full_weight()[ids]`` and its gradient
``dE[ids] += dOut`` (``np.add.at``), on the tape; the tied head's shared table; ids on a device
checked there without a device-to-host copy.

A lookup involves no rounding (one worker owns each id; the others add exact
zeros), so the comparison is exact equality, in every dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

import tp_gpu
from tp_gpu import (
    ConfigError,
    IndexOutOfRangeError,
    ParallelEmbedding,
    ShapeError,
    ShardedTensor,
    TensorParallelConfig,
    TensorParallelError,
    TiedLMHead,
    VocabParallelCrossEntropy,
)
from tp_gpu.placements import Dense


def lookup(emb, ids) -> np.ndarray:
    return np.asarray(emb(ids))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_matches_dense_lookup(make_config, rng, n_workers, dtype):
    vocab = 7 * n_workers
    emb = ParallelEmbedding(vocab, 13, config=make_config(n_workers, dtype=dtype), seed=n_workers)
    ids = rng.integers(0, vocab, size=(3, 11))
    out = lookup(emb, ids)
    assert out.shape == (3, 11, 13)
    assert out.dtype == np.dtype(dtype)
    y = emb(ids)
    assert y.placement == Dense(emb.devices[0])
    assert emb.backend.device_of(y.blocks[emb.devices[0]]) == emb.devices[0]
    np.testing.assert_array_equal(out, emb.full_weight()[ids])


def dense_table_grad(vocab: int, dim: int, ids, grad) -> np.ndarray:
    """``dE[ids[k]] += grad[k]`` in float64, repeated ids accumulating."""
    expected = np.zeros((vocab, dim))
    np.add.at(expected, np.asarray(ids), np.asarray(grad, np.float64))
    return expected


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_table_gradient_matches_dense_scatter_add(make_config, rng, n_workers):
    """``y.backward(g)`` accumulates ``dE[ids] += g`` (repeated ids summed); a second step adds to it."""
    vocab = 5 * n_workers + 2  # uneven shards
    emb = ParallelEmbedding(vocab, 6, config=make_config(n_workers), seed=n_workers)
    ids = rng.integers(0, vocab, size=(4, 9))
    ids[0, :3] = ids[1, 0] = vocab - 1  # a repeated id
    g = rng.standard_normal((4, 9, 6))
    y = emb(ids)
    assert y.requires_grad and y.grad_fn is not None
    y.backward(g)
    expected = dense_table_grad(vocab, 6, ids, g)
    np.testing.assert_allclose(emb.weight.full_grad(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(emb.grads()["weight"], expected, rtol=1e-12, atol=1e-12)
    emb(ids).backward(g)  # a second step accumulates
    np.testing.assert_allclose(emb.weight.full_grad(), 2 * expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_sequence_parallel_output_is_reduce_scattered(backend_spec, rng, n_workers):
    """With config.sequence_parallel the rows come out split along the sequence; backward gathers dY."""
    name, devices = backend_spec
    cfg = TensorParallelConfig(
        n_workers=n_workers, backend=name, devices=devices, dtype="float64", sequence_parallel=True
    )
    vocab = 4 * n_workers + 1
    emb = ParallelEmbedding(vocab, 5, config=cfg, seed=4)
    ids = rng.integers(0, vocab, size=(2, 7))
    y = emb(ids)
    assert isinstance(y, ShardedTensor) and y.axis == 1 and y.shape == (2, 7, 5)
    assert sum(y.split_sizes) == 7
    np.testing.assert_array_equal(np.asarray(y), emb.full_weight()[ids])
    g = rng.standard_normal((2, 7, 5))
    y.backward(g)
    np.testing.assert_allclose(
        emb.weight.full_grad(), dense_table_grad(vocab, 5, ids, g), rtol=1e-12, atol=1e-12
    )


def test_no_grad_keeps_nothing_and_backward_raises(make_config, rng):
    emb = ParallelEmbedding(11, 4, config=make_config(3), seed=1)
    ids = rng.integers(0, 11, size=(2, 3))
    with tp_gpu.no_grad():
        y = emb(ids)
    assert y.grad_fn is None and not y.requires_grad
    np.testing.assert_array_equal(np.asarray(y), emb.full_weight()[ids])
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(np.ones((2, 3, 4)))
    assert np.all(emb.weight.full_grad() == 0.0)


def test_backward_twice_after_one_forward_raises(make_config, rng):
    emb = ParallelEmbedding(11, 4, config=make_config(3), seed=1)
    ids = rng.integers(0, 11, size=5)
    g = rng.standard_normal((5, 4))
    y = emb(ids)
    y.backward(g)
    before = emb.weight.full_grad()
    with pytest.raises(TensorParallelError, match="second time"):
        y.backward(g)
    np.testing.assert_array_equal(emb.weight.full_grad(), before)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_tied_head_sums_the_gradients_of_both_uses(make_config, rng, n_workers):
    """``wte`` used twice (lookup and tied head): its one gradient is the sum of both, as in torch."""
    vocab, dim = 6 * n_workers + 1, 5
    emb = ParallelEmbedding(vocab, dim, config=make_config(n_workers), seed=2, pad_to_multiple_of=4)
    head = TiedLMHead(emb)
    assert head.weight is emb.weight and list(head.state_dict()) == ["weight"]
    ids = rng.integers(0, vocab, size=(2, 4))
    targets = rng.integers(0, vocab, size=(2, 4))
    loss = VocabParallelCrossEntropy()(head(emb(ids) * 2.0), targets)
    loss.backward()
    table = emb.full_weight()
    x = table[ids] * 2.0  # (B, S, H)
    z = x @ table.T  # (B, S, H) @ (H, V) -> (B, S, V)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dz = p.copy()
    np.put_along_axis(dz, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1, -1)
    dz /= targets.size
    head_use = dz.reshape(-1, vocab).T @ x.reshape(-1, dim)  # (V, N) @ (N, H) -> (V, H)
    lookup_use = dense_table_grad(vocab, dim, ids, 2.0 * (dz @ table))  # (B, S, V) @ (V, H)
    expected_loss = -np.log(np.take_along_axis(p, targets[..., None], -1)).mean()
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-12)
    np.testing.assert_allclose(emb.weight.full_grad(), head_use + lookup_use, rtol=1e-10, atol=1e-13)
    assert np.abs(head_use).max() > 1e-4 and np.abs(lookup_use).max() > 1e-4


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_every_id_of_every_shard(make_config, n_workers):
    """Each id, including the first and last of every shard, returns its own row."""
    vocab = 5 * n_workers
    emb = ParallelEmbedding(vocab, 3, config=make_config(n_workers), seed=1)
    ids = np.arange(vocab)[::-1]
    np.testing.assert_array_equal(lookup(emb, ids), emb.full_weight()[ids])
    assert len({row.tobytes() for row in emb.full_weight()}) == vocab


@pytest.mark.parametrize(
    "ids",
    [
        np.int64(3),
        np.array(3),
        np.zeros((0,), np.int64),
        np.zeros((2, 0, 3), np.int32),
        [[1, 2], [3, 0]],
        [5],
    ],
    ids=["numpy-scalar", "0-d", "empty", "empty-3d", "nested-list", "list"],
)
def test_any_id_shape(make_config, ids):
    emb = ParallelEmbedding(6, 4, config=make_config(3), seed=2)
    expected = emb.full_weight()[np.asarray(ids)]
    out = lookup(emb, ids)
    assert out.shape == np.shape(ids) + (4,)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("id_dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64, np.uint64])
def test_integer_dtypes(make_config, rng, id_dtype):
    emb = ParallelEmbedding(8, 3, config=make_config(4), seed=3)
    ids = rng.integers(0, 8, size=9).astype(id_dtype)
    np.testing.assert_array_equal(lookup(emb, ids), emb.full_weight()[ids.astype(np.int64)])


def test_properties_and_shards(make_config):
    emb = ParallelEmbedding(12, 5, config=make_config(3), seed=0)
    assert (emb.vocab_size, emb.embed_dim, emb.n_workers) == (12, 5, 3)
    assert [t.shape for t in emb.weight_shards] == [(4, 5)] * 3
    assert [emb.backend.device_of(t) for t in emb.weight_shards] == emb.devices
    full = emb.full_weight()
    assert full.shape == (12, 5) and isinstance(full, np.ndarray)
    for i, shard in enumerate(emb.weight_shards):
        np.testing.assert_array_equal(emb.backend.to_host(shard), full[4 * i : 4 * (i + 1)])


def test_worker_count_comes_from_the_config():
    assert ParallelEmbedding(8, 2).n_workers == 2
    cfg = TensorParallelConfig(n_workers=4, backend="numpy", dtype="float64")
    assert ParallelEmbedding(8, 2, cfg).n_workers == 4
    assert ParallelEmbedding(8, 2, config=cfg).n_workers == 4
    with pytest.raises(ConfigError, match=r"config must be a TensorParallelConfig or None, got int"):
        ParallelEmbedding(8, 2, 4)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_ids_copied_once_per_device(rng, n_workers):
    cfg = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float64")
    emb = ParallelEmbedding(2 * n_workers, 4, config=cfg)
    emb.backend.reset_transfers()
    emb(rng.integers(0, 2 * n_workers, size=10))
    into = {}
    for (_src, dst), (count, _) in emb.backend.transfers.items():
        into[dst] = into.get(dst, 0) + count
    # Ids: host -> worker 0's device, then one copy to each other used device;
    # partial sums: one per other used device back to the output device.
    others = set(emb.devices) - {emb.output_device}
    assert into.get(emb.output_device, 0) == 1 + len(others)
    assert all(into[d] == 1 for d in others)


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, error, match",
    [
        ([8], IndexOutOfRangeError, r"token id 8 out of range; expected 0 <= id < vocab_size=8"),
        ([0, 3, -1], IndexOutOfRangeError, r"token id -1 out of range"),
        (np.array([[1, 2], [9, 100]]), IndexOutOfRangeError, r"token id 100"),
        (np.array([1.0, 2.0]), ShapeError, r"integers, got dtype float64"),
        (np.array([True, False]), ShapeError, r"integers, got dtype bool"),
        (["a", "b"], ShapeError, r"integers, got dtype <U1"),
        ([[1, 2], [3]], ShapeError, r"rectangular"),
    ],
)
def test_bad_ids(make_config, ids, error, match):
    emb = ParallelEmbedding(8, 4, config=make_config(2))
    before = emb.full_weight()
    with pytest.raises(error, match=match) as info:
        emb(ids)
    assert isinstance(info.value, TensorParallelError) and isinstance(info.value, ValueError)
    np.testing.assert_array_equal(emb.full_weight(), before)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((8, 0), {}, r"embed_dim.*0"),
        ((0, 4), {}, r"vocab_size.*0"),
        ((-3, 4), {}, r"vocab_size.*-3"),
        ((8.0, 4), {}, r"vocab_size.*8.0"),
        ((8, 4), {"seed": -3}, r"seed.*-3"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParallelEmbedding(*args, **kwargs)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_sequence_parallel_tied_model_equals_the_plain_one(backend_spec, rng, n_workers):
    """Embedding (reduce-scattered) -> tied head (all-gathered input) -> loss: the same loss and
    table gradient as without sequence parallelism."""
    name, devices = backend_spec
    results = []
    for sequence_parallel in (True, False):
        cfg = TensorParallelConfig(
            n_workers=n_workers,
            backend=name,
            devices=devices,
            dtype="float64",
            sequence_parallel=sequence_parallel,
        )
        emb = ParallelEmbedding(13, 4, config=cfg, seed=3, pad_to_multiple_of=4)
        ids = np.random.default_rng(n_workers).integers(0, 13, size=(2, 7))
        targets = np.random.default_rng(n_workers + 1).integers(0, 13, size=(2, 7))
        loss = VocabParallelCrossEntropy()(TiedLMHead(emb)(emb(ids)), targets)
        loss.backward()
        results.append((float(loss), emb.weight.full_grad()))
    (split_loss, split_grad), (plain_loss, plain_grad) = results
    np.testing.assert_allclose(split_loss, plain_loss, rtol=1e-12)
    np.testing.assert_allclose(split_grad, plain_grad, rtol=1e-12, atol=1e-15)
    assert np.abs(plain_grad).max() > 1e-4
