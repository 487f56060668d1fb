"""Every test of the Rust original (scirs2_neural::training::tensor_parallel), translated.

The original used ``Array2::ones`` and ``(i * n_in + j) * 0.1`` inputs; those are kept
here, as in the original. The dense-reference tests on random data live in
test_linear.py and test_embedding.py. Outputs are brought to the host with
``to_host`` so the tests also hold when the default backend is CuPy.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_host

from tp_gpu import (
    ColumnParallelLinear,
    IndexOutOfRangeError,
    ParallelEmbedding,
    RowParallelLinear,
    TensorParallelConfig,
)


def ramp(batch: int, n_in: int) -> np.ndarray:
    """The original's test input: element (i, j) is (i * n_in + j) * 0.1."""
    return np.arange(batch * n_in, dtype=np.float64).reshape(batch, n_in) * 0.1


def test_doc_example():
    cfg = TensorParallelConfig(dtype="float64")
    assert cfg.n_workers == 2
    col = ColumnParallelLinear(8, 4, cfg, seed=0)
    assert col.forward(np.ones((3, 8))).shape == (3, 4)


# --- TensorParallelConfig ---


def test_default_config_n_workers_2():
    cfg = TensorParallelConfig(dtype="float64")
    assert cfg.n_workers == 2, "default n_workers must be 2"
    assert cfg.gather_output is True, "default gather_output must be true"


# --- ColumnParallelLinear ---


def test_column_parallel_output_shape():
    layer = ColumnParallelLinear(
        8, 4, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=0
    )
    out = layer.forward(np.ones((5, 8)))
    assert out.shape == (5, 4), "output shape should be [batch, n_out]"


def test_column_parallel_n_out():
    layer = ColumnParallelLinear(
        6, 8, TensorParallelConfig(n_workers=4, gather_output=True, dtype="float64"), seed=1
    )
    assert layer.n_out == 8
    assert layer.n_workers == 4


def test_column_parallel_n_workers_1_equivalent_to_linear():
    n_in, n_out = 4, 6
    layer = ColumnParallelLinear(
        n_in, n_out, TensorParallelConfig(n_workers=1, gather_output=True, dtype="float64"), seed=42
    )
    x = ramp(3, n_in)
    out = to_host(layer, layer.forward(x))
    expected = x @ to_host(layer, layer.weight_shards[0]) + to_host(layer, layer.bias_shards[0])
    diff = np.abs(out - expected).sum()
    assert diff < 1e-12, f"n_workers=1 must match single linear; diff={diff}"


def test_column_parallel_uneven_n_out_is_split_like_array_split():
    """The original refused n_out=7 on 3 workers; it now splits 3, 2, 2."""
    layer = ColumnParallelLinear(
        4, 7, TensorParallelConfig(n_workers=3, gather_output=True, dtype="float64"), seed=0
    )
    assert [w.shape for w in layer.weight_shards] == [(4, 3), (4, 2), (4, 2)]
    assert layer.partition == [(0, 3), (3, 5), (5, 7)]
    x = ramp(2, 4)
    np.testing.assert_allclose(to_host(layer, layer(x)), x @ layer.full_weight(), rtol=1e-12, atol=1e-12)


# --- RowParallelLinear ---


def test_row_parallel_output_shape():
    layer = RowParallelLinear(
        8, 4, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=0
    )
    out = layer.forward(np.ones((5, 8)))
    assert out.shape == (5, 4), "output shape should be [batch, n_out]"


def test_row_parallel_n_in():
    layer = RowParallelLinear(
        6, 3, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=0
    )
    assert layer.n_in == 6


def test_row_parallel_all_reduce_equals_full_matmul():
    n_in, n_out = 8, 4
    layer = RowParallelLinear(
        n_in, n_out, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=7
    )
    x = ramp(3, n_in)
    out_parallel = to_host(layer, layer.forward(x))
    full_w = np.concatenate([to_host(layer, w) for w in layer.weight_shards], axis=0)
    out_full = x @ full_w + to_host(layer, layer.bias_shards[0])
    diff = np.abs(out_parallel - out_full).sum()
    assert diff < 1e-12, f"row-parallel must equal full matmul; diff={diff}"


def test_col_row_composition_shape():
    n_in, hidden, n_out = 8, 16, 4
    col = ColumnParallelLinear(
        n_in, hidden, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=0
    )
    row = RowParallelLinear(
        hidden, n_out, TensorParallelConfig(n_workers=2, gather_output=True, dtype="float64"), seed=1
    )
    mid = col.forward(np.ones((5, n_in)))
    out = row.forward(mid)
    assert out.shape == (5, n_out)


# --- ParallelEmbedding ---


def test_parallel_embedding_output_shape():
    emb = ParallelEmbedding(8, 16, TensorParallelConfig(n_workers=2, dtype="float64"), seed=0)
    out = emb.forward([0, 1, 3, 7])
    assert out.shape == (4, 16), "shape should be [n_indices, embed_dim]"


def test_parallel_embedding_vocab_and_dim():
    emb = ParallelEmbedding(100, 32, TensorParallelConfig(n_workers=4, dtype="float64"), seed=0)
    assert emb.vocab_size == 100
    assert emb.embed_dim == 32


def test_parallel_embedding_same_index_same_vector():
    emb = ParallelEmbedding(8, 4, TensorParallelConfig(n_workers=2, dtype="float64"), seed=99)
    out1 = to_host(emb, emb.forward([3]))
    out2 = to_host(emb, emb.forward([3]))
    assert np.abs(out1 - out2).sum() < 1e-15, "same index must always return same embedding"


def test_parallel_embedding_out_of_range_error():
    emb = ParallelEmbedding(8, 4, TensorParallelConfig(n_workers=2, dtype="float64"), seed=0)
    with pytest.raises(IndexOutOfRangeError, match="8"):
        emb.forward([8])


def test_parallel_embedding_uneven_vocab_is_split_like_array_split():
    """The original refused vocab 7 on 2 workers; it now splits 4, 3."""
    emb = ParallelEmbedding(7, 4, TensorParallelConfig(n_workers=2, dtype="float64"), seed=0)
    assert emb.partition == [(0, 4), (4, 7)]
    np.testing.assert_array_equal(to_host(emb, emb([6, 0, 3, 4])), emb.full_weight()[[6, 0, 3, 4]])
