"""Seeded initialisers, and layers whose logical weights do not depend on the sharding."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

from tp_gpu import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, TensorParallelConfig
from tp_gpu.initializers import EMBEDDING_INIT_RANGE, embedding_uniform, xavier_uniform

# Divisible by every worker count 1..8, so one logical shape serves them all.
SPLIT = 840
BACKENDS = [("numpy", None), ("simulated", 3)]


@pytest.mark.parametrize("n_in, n_out", [(1, 1), (7, 13), (13, 7), (64, 3), (300, 500)])
def test_xavier_bounds(n_in, n_out):
    w = xavier_uniform(n_in, n_out, seed=5)
    limit = np.sqrt(6.0 / (n_in + n_out))
    assert w.shape == (n_in, n_out) and w.dtype == np.float64
    assert np.all(np.abs(w) <= limit)
    if w.size >= 1000:
        # The draw fills the range: not a narrower distribution that trivially passes the bound.
        assert np.abs(w).max() > 0.95 * limit
        assert abs(w.mean()) < 0.05 * limit
        assert w.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_xavier_deterministic(seed):
    np.testing.assert_array_equal(xavier_uniform(9, 11, seed), xavier_uniform(9, 11, seed))


def test_xavier_seeds_differ():
    draws = [xavier_uniform(9, 11, s) for s in range(5)]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.array_equal(draws[i], draws[j])


def test_embedding_uniform():
    e = embedding_uniform(500, 40, seed=3)
    assert EMBEDDING_INIT_RANGE == 0.02
    assert e.shape == (500, 40) and e.dtype == np.float64
    assert np.all(np.abs(e) <= 0.02)
    assert np.abs(e).max() > 0.019
    np.testing.assert_array_equal(e, embedding_uniform(500, 40, seed=3))
    assert not np.array_equal(e, embedding_uniform(500, 40, seed=4))


def _layers(name, devices, n_workers, seed, dtype="float64"):
    cfg = TensorParallelConfig(n_workers=n_workers, backend=name, devices=devices, dtype=dtype)
    return {
        "column": ColumnParallelLinear(7, SPLIT, cfg, seed=seed),
        "row": RowParallelLinear(SPLIT, 5, cfg, seed=seed),
        "embedding": ParallelEmbedding(SPLIT, 6, seed=seed, config=cfg),
    }


REFERENCE = {
    "column": lambda seed: xavier_uniform(7, SPLIT, seed),
    "row": lambda seed: xavier_uniform(SPLIT, 5, seed),
    "embedding": lambda seed: embedding_uniform(SPLIT, 6, seed),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("seed", [0, 7])
def test_full_weight_independent_of_sharding(seed, dtype):
    weights = {}
    for name, devices in BACKENDS:
        for n in WORKER_COUNTS:
            for kind, layer in _layers(name, devices, n, seed, dtype).items():
                w = layer.full_weight()
                assert type(w) is np.ndarray and w.dtype == np.dtype(dtype)
                weights.setdefault(kind, []).append(((name, n), w))
    for kind, got in weights.items():
        want = REFERENCE[kind](seed).astype(dtype)
        for where, w in got:
            assert w.shape == want.shape, (kind, where)
            # Bitwise: same bytes, not merely close.
            assert w.tobytes() == want.tobytes(), (kind, where)


def test_different_seeds_give_different_layers():
    a = _layers("numpy", None, 2, seed=1)
    b = _layers("numpy", None, 2, seed=2)
    for kind in a:
        assert not np.array_equal(a[kind].full_weight(), b[kind].full_weight()), kind


@pytest.mark.parametrize("name, devices", BACKENDS)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_biases_zero_and_embedding_range(name, devices, n_workers):
    layers = _layers(name, devices, n_workers, seed=n_workers)
    for kind in ("column", "row"):
        bias = layers[kind].full_bias()
        assert bias.shape == (layers[kind].n_out,)
        assert np.all(bias == 0.0), kind
    table = layers["embedding"].full_weight()
    assert np.all(np.abs(table) <= EMBEDDING_INIT_RANGE)
    assert np.abs(table).max() > 0.9 * EMBEDDING_INIT_RANGE
    limit = np.sqrt(6.0 / (7 + SPLIT))
    assert np.all(np.abs(layers["column"].full_weight()) <= limit)
