"""Property tests: random worker counts, shard sizes, device counts, batch shapes and ids.

Every layer runs on the simulated backend with 1..8 devices, so placements with
more workers than devices, as many, and more devices than workers all occur.
Outputs are compared with a float64 dense reference built from the layer's own
logical weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import device_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tp_gpu import (
    SGD,
    ColumnParallelLinear,
    IndexOutOfRangeError,
    ParallelEmbedding,
    RowParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
)

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

n_workers_st = st.integers(1, 8)
n_devices_st = st.integers(1, 8)
# Leading (batch) dims: none (1-D input), one, or several such as (2, 3); zero-size included.
batch_st = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def dense(layer, x):
    return np.asarray(x, np.float64) @ layer.full_weight().astype(np.float64) + layer.full_bias().astype(
        np.float64
    )


def perturb(layer, rng):
    """One SGD step on a random gradient, so the bias is no longer zero and the weight moves."""
    x = rng.standard_normal((3, layer.n_in))
    y = layer(x)
    y.backward(rng.standard_normal(y.shape))
    SGD(layer.parameters(), lr=0.5).step()
    assert np.any(layer.full_bias() != 0)


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * scale)


def config(n_workers, n_devices, out_index, **kwargs):
    out_device = None if out_index is None else out_index % n_devices
    return TensorParallelConfig(
        n_workers=n_workers,
        backend="simulated",
        devices=n_devices,
        output_device=out_device,
        **{"dtype": "float64", **kwargs},
    )


@settings(max_examples=120, **SETTINGS)
@given(
    n_workers=n_workers_st,
    shard=st.integers(1, 5),
    n_in=st.integers(1, 9),
    batch=batch_st,
    n_devices=n_devices_st,
    gather=st.booleans(),
    out_index=st.none() | st.integers(0, 7),
    trained=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_column_matches_dense(n_workers, shard, n_in, batch, n_devices, gather, out_index, trained, seed):
    cfg = config(n_workers, n_devices, out_index, gather_output=gather)
    n_out = n_workers * shard
    layer = ColumnParallelLinear(n_in, n_out, cfg, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    if trained:
        perturb(layer, rng)
    x = rng.standard_normal(batch + (n_in,))
    y = layer(x)
    expected = dense(layer, x)
    assert expected.shape == batch + (n_out,)
    if gather:
        assert device_of(layer, y) == layer.output_device
        out = np.asarray(layer.backend.to_host(y))
    else:
        assert isinstance(y, ShardedTensor)
        assert y.shape == batch + (n_out,)
        assert y.axis == len(batch)
        assert y.split_sizes == [shard] * n_workers
        for piece, device in zip(y.shards, layer.devices):
            assert layer.backend.device_of(piece) == device
        out = np.asarray(layer.backend.to_host(y.gather()))
    assert_close(out, expected)


@settings(max_examples=120, **SETTINGS)
@given(
    n_workers=n_workers_st,
    shard=st.integers(1, 5),
    n_out=st.integers(1, 9),
    batch=batch_st,
    n_devices=n_devices_st,
    sharded_input=st.booleans(),
    out_index=st.none() | st.integers(0, 7),
    trained=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_row_matches_dense(
    n_workers, shard, n_out, batch, n_devices, sharded_input, out_index, trained, seed
):
    cfg = config(n_workers, n_devices, out_index)
    n_in = n_workers * shard
    layer = RowParallelLinear(n_in, n_out, cfg, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    if trained:
        perturb(layer, rng)
    x = rng.standard_normal(batch + (n_in,))
    if sharded_input:
        pieces = [
            layer.backend.asarray(p, np.float64, d)
            for p, d in zip(np.split(x, n_workers, axis=-1), layer.devices)
        ]
        inp = ShardedTensor(pieces, -1, layer.devices, layer.backend)
    else:
        inp = x
    y = layer(inp)
    assert device_of(layer, y) == layer.output_device
    assert_close(np.asarray(layer.backend.to_host(y)), dense(layer, x))


@settings(max_examples=60, **SETTINGS)
@given(
    n_workers=n_workers_st,
    hidden_shard=st.integers(1, 4),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    batch=batch_st,
    n_devices=n_devices_st,
    seed=st.integers(0, 2**31),
)
def test_column_row_chain_matches_dense(n_workers, hidden_shard, n_in, n_out, batch, n_devices, seed):
    hidden = n_workers * hidden_shard
    col = ColumnParallelLinear(n_in, hidden, config(n_workers, n_devices, None, gather_output=False), seed=1)
    row = RowParallelLinear(hidden, n_out, config(n_workers, n_devices, None), seed=2)
    x = np.random.default_rng(seed).standard_normal(batch + (n_in,))
    y = row(col(x))
    assert_close(np.asarray(row.backend.to_host(y)), dense(row, dense(col, x)))


ID_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@st.composite
def embedding_case(draw, min_side=0):
    n_workers = draw(n_workers_st)
    vocab = n_workers * draw(st.integers(1, 40))
    dtype = np.dtype(draw(st.sampled_from(ID_DTYPES)))
    high = min(vocab - 1, int(np.iinfo(dtype).max))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=min_side, max_side=4))
    ids = draw(hnp.arrays(dtype, shape, elements=st.integers(0, high)))
    return n_workers, vocab, ids


@settings(max_examples=150, **SETTINGS)
@given(
    case=embedding_case(),
    embed_dim=st.integers(1, 6),
    n_devices=n_devices_st,
    out_index=st.none() | st.integers(0, 7),
    as_list=st.booleans(),
    dtype=st.sampled_from(["float64", "float32", "float16"]),
    seed=st.integers(0, 1000),
)
def test_embedding_matches_table(case, embed_dim, n_devices, out_index, as_list, dtype, seed):
    n_workers, vocab, ids = case
    # An empty Python list reads as float64 ([] has no integer dtype) and is rejected; arrays only there.
    as_list = as_list and ids.size > 0
    layer = ParallelEmbedding(
        vocab, embed_dim, seed=seed, config=config(n_workers, n_devices, out_index, dtype=dtype)
    )
    inp = ids.tolist() if as_list else ids
    out = layer(inp)
    assert tuple(out.shape) == ids.shape + (embed_dim,)
    assert out.dtype == np.dtype(dtype)
    assert device_of(layer, out) == layer.output_device
    expected = layer.full_weight()[ids.astype(np.int64)]
    np.testing.assert_array_equal(np.asarray(layer.backend.to_host(out)), expected)  # exact


@settings(max_examples=100, **SETTINGS)
@given(
    case=embedding_case(min_side=1),
    n_devices=n_devices_st,
    data=st.data(),
)
def test_embedding_out_of_range(case, n_devices, data):
    n_workers, vocab, ids = case
    ids = ids.astype(np.int64)
    bad = data.draw(st.integers(-(10**6), -1) | st.integers(vocab, vocab + 10**6), label="bad id")
    position = data.draw(st.integers(0, ids.size - 1), label="position")
    ids.reshape(-1)[position] = bad
    layer = ParallelEmbedding(vocab, 3, config=config(n_workers, n_devices, None))
    with pytest.raises(IndexOutOfRangeError) as info:
        layer(ids)
    assert str(bad) in str(info.value)
    assert str(vocab) in str(info.value)
