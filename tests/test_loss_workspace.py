"""The kept-logits loss's workspace: ``VocabParallelCrossEntropy()`` (``inplace=False``) writes
``exp(Z - max)`` and then ``dZ`` into one buffer per device that it keeps from one call to the next.

Checked on the numpy and simulated backends, in float16, float32 and float64: the caller's logits
are never modified; losses and gradients equal, bit for bit, those of the fresh-array path
(``workspace = None``); the buffer is reused across steps and re-allocated when the shape or dtype
changes; two losses alive at once (two forwards before one backward), or a ``dZ`` still held, never
share a buffer; nothing is kept outside the tape; copies of the module start empty."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    get_backend,
    worker_devices,
)

DTYPES = ["float16", "float32", "float64"]
#: (backend, devices, workers, padded head): one host device, and three simulated devices.
CASES = [("numpy", None, 3, None), ("numpy", None, 3, 64), ("simulated", 3, 3, None)]


def make_logits(case, dtype: str, rows: int = 12, vocab: int = 30, seed: int = 0):
    """A leaf that requires grad, split on the vocabulary as ``case`` says, and its targets."""
    name, devices, n_workers, pad = case
    backend = get_backend(name, devices)
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, vocab, size=rows)
    targets[::5] = -100  # some rows ignored
    if pad is not None:  # a padded column head's layout: the masked copy goes into the buffer
        config = TensorParallelConfig(n_workers=n_workers, backend=name, dtype=dtype)
        layout = ColumnParallelLinear(3, vocab, config, pad_to_multiple_of=pad).layout
        block = (4 * rng.standard_normal((rows, layout.block_lengths["cpu"]))).astype(dtype)
        return ShardedTensor.from_blocks({"cpu": block}, -1, layout, backend).requires_grad_(), targets
    z = 4 * rng.standard_normal((rows, vocab))
    placement = worker_devices(n_workers, backend.devices)
    pieces = np.split(z, n_workers, axis=-1)
    blocks = [backend.asarray(p, dtype, d) for p, d in zip(pieces, placement)]
    return ShardedTensor(blocks, -1, placement, backend).requires_grad_(), targets


def host_blocks(tensor) -> dict:
    """Exact host copies of every block (dtype kept)."""
    return {d: np.array(tensor.backend.to_host(b), copy=True) for d, b in tensor.blocks.items()}


def step(loss_fn, logits, targets) -> tuple[float, dict]:
    """One loss + backward: the loss and host copies of ``dZ``; ``logits.grad`` is dropped after."""
    logits.grad = None
    loss = loss_fn(logits, targets)
    value = float(loss)
    loss.backward()
    grads = host_blocks(logits.grad)
    logits.grad = None
    return value, grads


def fresh_step(logits, targets, **kwargs) -> tuple[float, dict]:
    """The same step on the fresh-array path (no workspace)."""
    loss_fn = VocabParallelCrossEntropy(**kwargs)
    loss_fn.workspace = None
    return step(loss_fn, logits, targets)


def assert_blocks_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for d in expected:
        assert got[d].dtype == expected[d].dtype
        np.testing.assert_array_equal(got[d], expected[d])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_steps_leave_the_logits_alone_and_equal_the_fresh_path(case, dtype, smoothing):
    """Three steps on a reused buffer: the logits unchanged, the loss and dZ bit for bit the fresh path's."""
    loss_fn = VocabParallelCrossEntropy(label_smoothing=smoothing)
    for seed in range(3):
        logits, targets = make_logits(case, dtype, seed=seed)
        original = host_blocks(logits)
        expected_loss, expected = fresh_step(logits, targets, label_smoothing=smoothing)
        got_loss, got = step(loss_fn, logits, targets)
        assert got_loss == expected_loss
        assert_blocks_equal(got, expected)
        assert_blocks_equal(host_blocks(logits), original)  # read, never written
    assert loss_fn.workspace is not None and len(loss_fn.workspace.buffers) == len(logits.blocks)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_buffer_is_reused_and_reallocated_on_a_new_shape_or_dtype(case, dtype):
    loss_fn = VocabParallelCrossEntropy()
    workspace = loss_fn.workspace
    assert workspace is not None
    logits, targets = make_logits(case, dtype)
    step(loss_fn, logits, targets)
    first = dict(workspace.buffers)
    accumulator = np.promote_types(dtype, np.float32)  # float16 logits compute in float32
    for d, block in logits.blocks.items():
        assert first[d].shape == block.shape and first[d].dtype == accumulator
    step(loss_fn, logits, targets)
    assert {d: id(b) for d, b in workspace.buffers.items()} == {d: id(b) for d, b in first.items()}
    taller, taller_targets = make_logits(case, dtype, rows=7)  # a new shape: new buffers, kept
    step(loss_fn, taller, taller_targets)
    assert all(workspace.buffers[d] is not first[d] for d in first)
    assert all(workspace.buffers[d].shape == b.shape for d, b in taller.blocks.items())
    other = "float64" if dtype != "float64" else "float32"  # a new accumulator dtype: new buffers
    wide, wide_targets = make_logits(case, other, rows=7)
    step(loss_fn, wide, wide_targets)
    assert all(workspace.buffers[d].dtype == np.promote_types(other, np.float32) for d in first)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["first-last", "last-first"])
def test_two_live_losses_get_two_buffers_and_correct_gradients(case, dtype, order):
    """Two forwards before one backward: the second cannot take the first's buffer (still alive
    on the tape), so it gets a fresh one; both backwards give the fresh path's dZ."""
    loss_fn = VocabParallelCrossEntropy()
    a, ta = make_logits(case, dtype, seed=1)
    b, tb = make_logits(case, dtype, seed=2)
    expected_a, expected_b = fresh_step(a, ta)[1], fresh_step(b, tb)[1]
    original_a, original_b = host_blocks(a), host_blocks(b)
    loss_a, loss_b = loss_fn(a, ta), loss_fn(b, tb)
    for loss in (loss_a, loss_b) if order == "first-last" else (loss_b, loss_a):
        loss.backward()
    assert_blocks_equal(host_blocks(a.grad), expected_a)
    assert_blocks_equal(host_blocks(b.grad), expected_b)
    for d, grad in a.grad.blocks.items():
        assert not np.shares_memory(np.asarray(grad), np.asarray(b.grad.blocks[d]))
    assert_blocks_equal(host_blocks(a), original_a)
    assert_blocks_equal(host_blocks(b), original_b)


@pytest.mark.parametrize("case", CASES)
def test_a_held_gradient_is_not_overwritten_by_the_next_step(case):
    """``dZ`` is written into the buffer: while the caller holds it (a leaf's ``.grad``, or a view),
    the next call allocates a fresh buffer instead of writing over it."""
    loss_fn = VocabParallelCrossEntropy()
    a, ta = make_logits(case, "float32", seed=1)
    b, tb = make_logits(case, "float32", seed=2)
    loss_fn(a, ta).backward()
    held = host_blocks(a.grad)
    views = {d: g[1:] for d, g in a.grad.blocks.items()}  # a view keeps it busy too
    a.grad = None
    loss_fn(b, tb).backward()
    assert_blocks_equal({d: np.array(b.backend.to_host(v)) for d, v in views.items()},
                        {d: g[1:] for d, g in held.items()})  # fmt: skip
    assert_blocks_equal(host_blocks(b.grad), fresh_step(b, tb)[1])


def test_nothing_is_kept_outside_the_tape_and_copies_start_empty():
    loss_fn = VocabParallelCrossEntropy()
    logits, targets = make_logits(CASES[0], "float32")
    with tp_gpu.no_grad():
        float(loss_fn(logits, targets))
    assert loss_fn.workspace is not None and loss_fn.workspace.buffers == {}
    step(loss_fn, logits, targets)
    assert len(loss_fn.workspace.buffers) == 1
    twin = copy.deepcopy(loss_fn)
    assert twin.workspace is not None and twin.workspace.buffers == {}
    assert_blocks_equal(step(twin, logits, targets)[1], fresh_step(logits, targets)[1])
    loss_fn.workspace.clear()
    assert loss_fn.workspace.buffers == {}


def test_inplace_uses_no_workspace():
    """``inplace=True`` computes in the float32/float64 logits themselves: no buffer is kept."""
    loss_fn = VocabParallelCrossEntropy(inplace=True)
    logits, targets = make_logits(CASES[0], "float32")
    step(loss_fn, logits, targets)
    assert loss_fn.workspace is not None and loss_fn.workspace.buffers == {}
