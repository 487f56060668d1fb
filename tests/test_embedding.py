"""ParallelEmbedding against the dense lookup ``full_weight()[ids]``.

A lookup involves no rounding (one worker owns each id; the others add exact
zeros), so the comparison is exact equality, in every dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

from tp_gpu import (
    ConfigError,
    IndexOutOfRangeError,
    ParallelEmbedding,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
)


def lookup(emb, ids) -> np.ndarray:
    return emb.backend.to_host(emb(ids))


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_matches_dense_lookup(make_config, rng, n_workers, dtype):
    vocab = 7 * n_workers
    emb = ParallelEmbedding(vocab, 13, config=make_config(n_workers, dtype=dtype), seed=n_workers)
    ids = rng.integers(0, vocab, size=(3, 11))
    out = lookup(emb, ids)
    assert out.shape == (3, 11, 13)
    assert out.dtype == np.dtype(dtype)
    assert emb.backend.device_of(emb(ids)) == emb.devices[0]
    np.testing.assert_array_equal(out, emb.full_weight()[ids])


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
