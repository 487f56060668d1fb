"""Kept output buffers (tp_gpu.reused_buffers): handed back only while nothing holds them, never shared by
two live values, and the linears, the tied head and the in-place loss computing the same numbers with
them as without, step after step.

The layers keep only host products of at least ``KEEP_BYTES`` (32 MiB); the layer tests lower it so
that small shapes take the kept path.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    TensorParallelConfig,
    TiedLMHead,
    VocabParallelCrossEntropy,
    reused_buffers,
)
from tp_gpu.backends import get_backend
from tp_gpu.reused_buffers import ReusedBuffers, gemm_output

NUMPY = get_backend("numpy")


def test_a_buffer_is_handed_back_only_while_nothing_holds_it():
    buffers = ReusedBuffers()
    first = buffers.take(NUMPY, "cpu", (3, 4), np.float32)
    assert first.shape == (3, 4) and first.dtype == np.float32
    held = first[1:]  # a view keeps it busy
    busy = buffers.take(NUMPY, "cpu", (3, 4), np.float32)
    assert busy is not first and not np.shares_memory(busy, first), "a held buffer is never handed out"
    assert buffers.buffers["cpu"] is first, "the fresh array is not kept"
    del held, first, busy
    again = buffers.take(NUMPY, "cpu", (3, 4), np.float32)
    assert again is buffers.buffers["cpu"], "free again: the kept one"
    kept = again
    del again
    wider = buffers.take(NUMPY, "cpu", (3, 5), np.float32)
    assert wider.shape == (3, 5) and buffers.buffers["cpu"] is wider and wider is not kept
    del wider
    other = buffers.take(NUMPY, "cpu", (3, 5), np.float64)
    assert other.dtype == np.float64 and buffers.buffers["cpu"] is other
    buffers.clear()
    assert buffers.buffers == {}


def test_copies_start_empty():
    buffers = ReusedBuffers()
    buffers.take(NUMPY, "cpu", (2, 2), np.float64)
    assert copy.deepcopy(buffers).buffers == {}
    assert pickle.loads(pickle.dumps(buffers)).buffers == {}


def test_which_products_are_kept(monkeypatch):
    buffers = ReusedBuffers()
    x32, w32 = np.ones((4, 3), np.float32), np.ones((3, 8), np.float32)
    assert gemm_output(buffers, NUMPY, "cpu", x32, w32) is None, "below KEEP_BYTES: a new array"
    monkeypatch.setattr(reused_buffers, "KEEP_BYTES", 4 * 8 * 4)  # exactly this product's bytes
    out = gemm_output(buffers, NUMPY, "cpu", x32.reshape(2, 2, 3), w32)
    assert out.shape == (4, 8) and out.dtype == np.float32, "(N, b) over every leading axis"
    assert gemm_output(None, NUMPY, "cpu", x32, w32) is None, "no buffers: a new array"
    assert gemm_output(buffers, NUMPY, "cpu", x32, w32.astype(np.float64)) is None, "mixed dtypes"
    half = x32.astype(np.float16)
    assert gemm_output(buffers, NUMPY, "cpu", half, w32.astype(np.float16)) is None, "float16: via float32"
    simulated = get_backend("simulated", devices=2)
    with simulated.device(0):
        x_dev, w_dev = simulated.asarray(x32, np.float32, 0), simulated.asarray(w32, np.float32, 0)
        assert gemm_output(buffers, simulated, 0, x_dev, w_dev) is None, "a simulated device's arrays"


@pytest.fixture
def keep_everything(monkeypatch):
    """Every host product takes the kept path."""
    monkeypatch.setattr(reused_buffers, "KEEP_BYTES", 0)


def column_row_pair(n_workers: int):
    config = TensorParallelConfig(n_workers=n_workers, dtype="float64")
    return ColumnParallelLinear(7, 13, config, seed=1), RowParallelLinear(13, 5, config, seed=2)


def linear_step(column, row, x, dy):
    """One forward and backward through column then row: (output, dX, the weights' gradients)."""
    leaf = tp_gpu.tensor(x, requires_grad=True)
    y = row(column(leaf))
    y.backward(dy)
    return (y.numpy(), leaf.grad.numpy(), *(p.full_grad() for p in (column.weight, row.weight, row.bias)))


@pytest.mark.parametrize("n_workers", [1, 3])
def test_linears_compute_the_same_with_kept_outputs(keep_everything, rng, n_workers):
    kept, fresh = column_row_pair(n_workers), column_row_pair(n_workers)
    for layer in fresh:
        layer.output_buffers = None
    for _ in range(3):
        x, dy = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 5))
        for a, b in zip(linear_step(*kept, x, dy), linear_step(*fresh, x, dy)):
            np.testing.assert_array_equal(a, b)
    column, row = kept
    assert column.output_buffers is not None and set(column.output_buffers.buffers) == {"cpu"}
    with tp_gpu.no_grad():
        leaf = tp_gpu.tensor(rng.standard_normal((2, 3, 7)))
        y = column(leaf)
        assert np.shares_memory(y.blocks["cpu"], column.output_buffers.buffers["cpu"]), "the kept buffer"


def test_a_held_output_is_never_overwritten(keep_everything, rng):
    column, _ = column_row_pair(2)
    x1, x2 = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    with tp_gpu.no_grad():
        y1 = column(tp_gpu.tensor(x1))
        before = y1.numpy().copy()
        y2 = column(tp_gpu.tensor(x2))
        np.testing.assert_array_equal(y1.numpy(), before)
        assert not np.shares_memory(y1.blocks["cpu"], y2.blocks["cpu"])
        np.testing.assert_allclose(y2.numpy(), x2 @ column.full_weight() + column.full_bias(), rtol=1e-12)
        kept_output = y1.numpy()  # a host array the user keeps (a copy or a view, either way held)
        del y1, y2
        y3 = column(tp_gpu.tensor(x2))
        np.testing.assert_array_equal(kept_output, before)
        np.testing.assert_array_equal(y3.numpy(), x2 @ column.full_weight() + column.full_bias())


@pytest.mark.parametrize("inplace", [True, False])
def test_tied_head_and_loss_steps_agree_with_fresh_outputs(keep_everything, rng, inplace):
    """The in-place loss writes dZ into the logits, which are the head's kept buffer: three steps of
    embedding -> tied head -> loss give the same losses and gradients as fresh logits every step."""
    config = TensorParallelConfig(n_workers=2, dtype="float64")
    runs = []
    for keep in (True, False):
        embedding = ParallelEmbedding(11, 6, config, seed=3)
        head = TiedLMHead(embedding)
        if not keep:
            head.output_buffers = None
        loss_fn = VocabParallelCrossEntropy(inplace=inplace)
        local = np.random.default_rng(0)
        values, grads = [], []
        for _ in range(3):
            ids, targets = local.integers(0, 11, (3, 4)), local.integers(0, 11, (3, 4))
            loss = loss_fn(head(embedding(ids)), targets)
            loss.backward()
            values.append(float(loss))
            grads.append(embedding.weight.full_grad())
        runs.append((values, grads))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
