"""VocabParallelCrossEntropy against a dense float64 log-softmax reference written here:
loss and gradient (on the tape: ``loss.backward(g)``, then ``logits.grad``) for every reduction,
ignore_index, label smoothing, extreme logits, low precision, the caller's arrays left alone,
communication that never gathers the logits, and an error for every bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    IndexOutOfRangeError,
    ShapeError,
    ShardedTensor,
    TensorParallelConfig,
    TensorParallelError,
    VocabParallelCrossEntropy,
    get_backend,
    worker_devices,
)
from tp_gpu.placements import Dense

TOL64 = dict(rtol=1e-12, atol=1e-14)
#: (shape of the rows, vocabulary per worker): a flat batch and two leading dims, odd sizes.
ROW_SHAPES = [((5,), 7), ((2, 3), 13)]


# --- helpers ----------------------------------------------------------------------


def make_backend(backend_spec):
    name, devices = backend_spec
    return get_backend(name, devices)


def shard_logits(backend, n_workers: int, z: np.ndarray, dtype=np.float64) -> ShardedTensor:
    """Split host logits ``z`` ``(..., V)`` into ``n_workers`` equal vocab pieces on the workers' devices:
    a leaf that requires grad (``logits.grad`` is ``dZ`` after ``loss.backward()``)."""
    placement = worker_devices(n_workers, backend.devices)
    pieces = np.split(z, n_workers, axis=-1)
    logits = ShardedTensor(
        [backend.asarray(p, dtype, d) for p, d in zip(pieces, placement)], -1, placement, backend
    )
    return logits.requires_grad_()


def backward(loss, logits: ShardedTensor, grad_loss=None) -> ShardedTensor:
    """``dZ``: ``logits.grad`` after ``loss.backward(grad_loss)`` (an earlier call's gradient forgotten)."""
    logits.grad = None
    loss.backward(grad_loss)
    return logits.grad


def host(backend, array) -> np.ndarray:
    return np.asarray(backend.to_host(array), dtype=np.float64)


def host_grad(grad: ShardedTensor) -> np.ndarray:
    return host(grad.backend, grad.gather())


def snapshot(logits: ShardedTensor):
    """Exact host copies of every shard (dtype kept)."""
    return [np.array(logits.backend.to_host(s), copy=True) for s in logits.shards]


def reference(z, targets, ignore_index=-100, eps=0.0):
    """Dense float64 per-row loss and per-row gradient ``d loss_row / d z``, plus the valid mask.

    ``loss_row = (1 - eps) * (-log p_t) + eps * (-mean_j log p_j)`` with ``p = softmax(z)`` over
    the whole vocabulary; ignored rows have zero loss and zero gradient.
    """
    z = np.asarray(z, dtype=np.float64)
    vocab = z.shape[-1]
    shifted = z - z.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    valid = targets != ignore_index
    safe = np.where(valid, targets, 0)
    nll = -np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    smooth = -log_p.mean(axis=-1)
    rows = np.where(valid, (1.0 - eps) * nll + eps * smooth, 0.0)
    one_hot = np.arange(vocab) == safe[..., None]
    drow = np.exp(log_p) - (1.0 - eps) * one_hot - eps / vocab
    drow = np.where(valid[..., None], drow, 0.0)
    return rows, drow, valid


def reduced_reference(z, targets, reduction, grad_loss=1.0, ignore_index=-100, eps=0.0):
    """Reference loss and ``dZ`` for ``reduction`` and upstream gradient ``grad_loss``."""
    rows, drow, valid = reference(z, targets, ignore_index, eps)
    if reduction == "none":
        g = np.broadcast_to(np.asarray(grad_loss, dtype=np.float64), rows.shape)
        return rows, drow * g[..., None]
    if reduction == "sum":
        return rows.sum(), drow * grad_loss
    count = int(valid.sum())
    return rows.sum() / count, drow * grad_loss / count


def random_targets(rng, rows_shape, vocab):
    t = rng.integers(0, vocab, size=rows_shape)
    flat = t.reshape(-1)
    flat[0], flat[-1] = 0, vocab - 1  # the first and last id of the vocabulary, on different workers
    return t


def loss_value(backend, loss):
    """A loss tensor (0-d, or per row) as a host float64 array."""
    return np.asarray(loss, dtype=np.float64)


# --- values and gradients ---------------------------------------------------------------


@pytest.mark.parametrize("rows_shape, per_worker", ROW_SHAPES, ids=["rows5-v7", "rows2x3-v13"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_matches_dense_reference(backend_spec, rng, n_workers, reduction, rows_shape, per_worker):
    backend = make_backend(backend_spec)
    vocab = per_worker * n_workers
    z = rng.standard_normal(rows_shape + (vocab,)) * 3
    targets = random_targets(rng, rows_shape, vocab)
    logits = shard_logits(backend, n_workers, z)
    loss_fn = VocabParallelCrossEntropy(reduction=reduction)
    loss = loss_fn(logits, targets)
    grad_loss = rng.standard_normal(rows_shape) if reduction == "none" else 1.7
    expected_loss, expected_grad = reduced_reference(z, targets, reduction, grad_loss)
    assert loss.placement == Dense(logits.devices[0])
    assert backend.device_of(loss.blocks[logits.devices[0]]) == logits.devices[0]
    assert loss.shape == (rows_shape if reduction == "none" else ())
    np.testing.assert_allclose(loss_value(backend, loss), expected_loss, **TOL64)

    grad = backward(loss, logits, grad_loss)
    assert isinstance(grad, ShardedTensor)
    assert grad.shape == z.shape and grad.axis == z.ndim - 1
    assert grad.split_sizes == logits.split_sizes
    assert grad.devices == logits.devices
    assert [backend.device_of(s) for s in grad.shards] == logits.devices
    assert grad.dtype == np.float64
    np.testing.assert_allclose(host_grad(grad), expected_grad, **TOL64)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_gradient_by_finite_differences(backend_spec, rng, n_workers):
    """The analytic gradient against central differences of the layer's own forward (no reference)."""
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((4, vocab))
    targets = random_targets(rng, (4,), vocab)
    targets[1] = -100
    loss_fn = VocabParallelCrossEntropy(label_smoothing=0.2)
    logits = shard_logits(backend, n_workers, z)
    analytic = host_grad(backward(loss_fn(logits, targets), logits))
    h = 1e-6
    for flat in rng.choice(z.size, size=6, replace=False):
        index = np.unravel_index(flat, z.shape)
        values = []
        for sign in (1, -1):
            bumped = z.copy()
            bumped[index] += sign * h
            values.append(
                float(
                    VocabParallelCrossEntropy(label_smoothing=0.2)(
                        shard_logits(backend, n_workers, bumped), targets
                    )
                )
            )
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(numeric - analytic[index]) < 1e-7, (index, numeric, analytic[index])


@pytest.mark.parametrize("n_workers", [1, 2, 5, 8])
def test_after_column_parallel_linear(backend_spec, rng, n_workers):
    """Logits from ColumnParallelLinear(gather_output=False) go in without a gather; dZ goes back into it."""
    name, devices = backend_spec
    cfg = TensorParallelConfig(
        n_workers=n_workers, backend=name, devices=devices, gather_output=False, dtype="float64"
    )
    vocab = 13 * n_workers
    head = ColumnParallelLinear(6, vocab, cfg, seed=3)
    x = rng.standard_normal((2, 3, 6))
    targets = random_targets(rng, (2, 3), vocab)
    targets[0, 1] = -100
    x_leaf = tp_gpu.tensor(x, requires_grad=True)
    logits = head(x_leaf)
    assert isinstance(logits, ShardedTensor)
    loss_fn = VocabParallelCrossEntropy(label_smoothing=0.1)
    z = x @ head.full_weight() + head.full_bias()
    expected_loss, expected_dz = reduced_reference(z, targets, "mean", eps=0.1)
    cut = logits.detach().requires_grad_()  # the same blocks as a leaf: its grad is dZ
    np.testing.assert_allclose(float(loss_fn(cut, targets)), expected_loss, **TOL64)
    np.testing.assert_allclose(host_grad(backward(loss_fn(cut, targets), cut)), expected_dz, **TOL64)
    loss = loss_fn(logits, targets)
    np.testing.assert_allclose(float(loss), expected_loss, **TOL64)
    loss.backward()  # through the head: dZ goes back into it
    np.testing.assert_allclose(
        np.asarray(x_leaf.grad), expected_dz @ head.full_weight().T, rtol=1e-10, atol=1e-12
    )
    grads = head.grads()
    np.testing.assert_allclose(
        grads["weight"], x.reshape(-1, 6).T @ expected_dz.reshape(-1, vocab), rtol=1e-10, atol=1e-12
    )
    np.testing.assert_allclose(grads["bias"], expected_dz.sum(axis=(0, 1)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, -1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_ignored_rows_contribute_nothing(backend_spec, rng, n_workers, reduction, ignore_index):
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((2, 3, vocab))
    targets = rng.integers(0, vocab, size=(2, 3))
    targets[targets == ignore_index] = (ignore_index + 1) % vocab  # only the rows chosen below are ignored
    ignored = np.zeros((2, 3), dtype=bool)
    ignored[0, 1] = ignored[1, 0] = ignored[1, 2] = True
    targets[ignored] = ignore_index
    z[1, 2] *= 1e3  # an ignored row's logits must not matter
    loss_fn = VocabParallelCrossEntropy(ignore_index=ignore_index, reduction=reduction)
    logits = shard_logits(backend, n_workers, z)
    loss_tensor = loss_fn(logits, targets)
    loss = loss_value(backend, loss_tensor)
    grad_loss = rng.standard_normal((2, 3)) if reduction == "none" else 1.0
    expected_loss, expected_grad = reduced_reference(
        z, targets, reduction, grad_loss, ignore_index=ignore_index
    )
    np.testing.assert_allclose(loss, expected_loss, **TOL64)
    if reduction == "mean":  # the mean is over the 3 valid rows only
        kept = reference(z, targets, ignore_index)[0][~ignored]
        np.testing.assert_allclose(loss, kept.mean(), **TOL64)
    if reduction == "none":
        assert np.all(loss[ignored] == 0.0)
    grad = host_grad(backward(loss_tensor, logits, grad_loss))
    assert np.all(grad[ignored] == 0.0)  # exactly zero, not merely small
    assert np.all(np.abs(grad[~ignored]).sum(axis=-1) > 0)
    np.testing.assert_allclose(grad, expected_grad, **TOL64)


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_label_smoothing_over_global_vocab(backend_spec, rng, n_workers, reduction, eps):
    backend = make_backend(backend_spec)
    vocab = 13 * n_workers
    z = rng.standard_normal((5, vocab)) * 2
    targets = random_targets(rng, (5,), vocab)
    targets[2] = -100
    loss_fn = VocabParallelCrossEntropy(label_smoothing=eps, reduction=reduction)
    logits = shard_logits(backend, n_workers, z)
    loss_tensor = loss_fn(logits, targets)
    loss = loss_value(backend, loss_tensor)
    expected_loss, expected_grad = reduced_reference(z, targets, reduction, eps=eps)
    np.testing.assert_allclose(loss, expected_loss, **TOL64)
    grad = host_grad(backward(loss_tensor, logits, np.ones(5) if reduction == "none" else 1.0))
    np.testing.assert_allclose(grad, expected_grad, **TOL64)
    # The smoothed target is a distribution over the global vocabulary: each valid row's gradient sums to 0.
    np.testing.assert_allclose(grad.sum(axis=-1), 0.0, atol=1e-14)


def test_label_smoothing_differs_from_none(rng):
    """Guard for the two tests above: smoothing changes the loss by the documented amount."""
    backend = get_backend("simulated", 3)
    z = rng.standard_normal((5, 21))
    targets = random_targets(rng, (5,), 21)
    plain = float(VocabParallelCrossEntropy()(shard_logits(backend, 3, z), targets))
    smooth = float(VocabParallelCrossEntropy(label_smoothing=0.3)(shard_logits(backend, 3, z), targets))
    rows, _, _ = reference(z, targets)
    uniform = -(
        z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    ).mean(-1)
    np.testing.assert_allclose(smooth, 0.7 * plain + 0.3 * uniform.mean(), **TOL64)
    assert abs(smooth - plain) > 1e-3
    np.testing.assert_allclose(plain, rows.mean(), **TOL64)


# --- extreme values and precision ------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, rtol, grad_rtol",
    [
        (np.float64, 1e-12, 1e-12),
        (np.float32, 1e-5, 1e-5),
        (np.float16, 1e-5, 2e-3),
    ],
    ids=["float64", "float32", "float16"],
)
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_extreme_logits_are_stable(backend_spec, rng, n_workers, dtype, rtol, grad_rtol):
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((5, vocab)) * 1000  # scaled far beyond exp's range
    z[1] = rng.standard_normal(vocab)
    z[1, vocab - 2] += 1e4  # one logit 1e4 above the others, on the last worker
    z[2] = z[1]
    z = z.astype(dtype).astype(np.float64)  # the reference sees exactly the logits the layer sees
    targets = random_targets(rng, (5,), vocab)
    targets[1] = vocab - 2  # the spike is the target: loss ~ 0
    targets[2] = 0  # the spike is not the target: loss ~ 1e4
    loss_fn = VocabParallelCrossEntropy(reduction="none")
    logits = shard_logits(backend, n_workers, z, dtype)
    loss = loss_fn(logits, targets)
    rows = loss_value(backend, loss)
    grad = host_grad(backward(loss, logits, np.ones(5)))
    expected_rows, expected_grad = reduced_reference(z, targets, "none", np.ones(5))
    assert np.all(np.isfinite(rows)) and np.all(np.isfinite(grad))
    assert expected_rows[2] > 5e3  # the case is as extreme as intended
    np.testing.assert_allclose(rows, expected_rows, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(grad, expected_grad, rtol=grad_rtol, atol=grad_rtol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_low_precision_logits(backend_spec, rng, n_workers, dtype, reduction):
    """The loss is accumulated in at least float32, the gradient comes back in the logits' dtype.

    The reference sees the logits already rounded to ``dtype``, so the float32 arithmetic the layer
    promises is accurate to ~1e-6 for float16 logits too (float16 arithmetic would be ~1e-3 off).
    """
    backend = make_backend(backend_spec)
    vocab = 13 * n_workers
    z = (rng.standard_normal((2, 3, vocab)) * 4).astype(dtype).astype(np.float64)
    z[0, 0, 1] = 60.0  # exp(60) overflows float16 and float32: the shift by the max must happen first
    targets = random_targets(rng, (2, 3), vocab)
    targets[1, 1] = -100
    loss_fn = VocabParallelCrossEntropy(reduction=reduction)
    logits = shard_logits(backend, n_workers, z, dtype)
    loss = loss_fn(logits, targets)
    grad_loss = rng.standard_normal((2, 3)) if reduction == "none" else 1.0
    expected_loss, expected_grad = reduced_reference(z, targets, reduction, grad_loss)
    assert np.dtype(loss.dtype).itemsize >= 4 and np.dtype(loss.dtype).kind == "f"
    np.testing.assert_allclose(loss_value(backend, loss), expected_loss, rtol=1e-5, atol=1e-5)
    grad = backward(loss, logits, grad_loss)
    assert grad.dtype == np.dtype(dtype)
    assert all(s.dtype == np.dtype(dtype) for s in grad.shards)
    rtol = 1e-5 if dtype == np.float32 else 2e-3  # one rounding to the output dtype
    np.testing.assert_allclose(
        host_grad(grad), expected_grad, rtol=rtol, atol=rtol * np.abs(expected_grad).max()
    )


# --- the caller's data, scaling, degenerate batches ---------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("reduction, eps", [("mean", 0.0), ("sum", 0.3), ("none", 0.1)])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_callers_logits_and_targets_untouched(backend_spec, rng, n_workers, reduction, eps, dtype):
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((5, vocab)) * 5
    targets = random_targets(rng, (5,), vocab)
    targets[3] = -100
    targets_before = targets.copy()
    logits = shard_logits(backend, n_workers, z, dtype)
    before = snapshot(logits)
    loss_fn = VocabParallelCrossEntropy(label_smoothing=eps, reduction=reduction)
    loss = loss_fn(logits, targets)
    for old, new in zip(before, snapshot(logits)):
        np.testing.assert_array_equal(new, old)
    backward(loss, logits, np.ones(5) if reduction == "none" else 1.0)
    for old, new in zip(before, snapshot(logits)):
        np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(targets, targets_before)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_backward_twice_after_one_forward_raises(backend_spec, rng, n_workers):
    """As PyTorch without retain_graph: a second backward would double gradients downstream."""
    backend = make_backend(backend_spec)
    z = rng.standard_normal((5, 7 * n_workers))
    targets = random_targets(rng, (5,), 7 * n_workers)
    loss_fn = VocabParallelCrossEntropy(label_smoothing=0.1)
    logits = shard_logits(backend, n_workers, z)
    loss = loss_fn(logits, targets)
    first = host_grad(backward(loss, logits))
    with pytest.raises(TensorParallelError, match="second time"):
        loss.backward()
    np.testing.assert_array_equal(host_grad(logits.grad), first)  # the refused call changed nothing
    np.testing.assert_array_equal(host_grad(backward(loss_fn(logits, targets), logits)), first)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_grad_loss_scales(backend_spec, rng, n_workers, reduction):
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((5, vocab))
    targets = random_targets(rng, (5,), vocab)
    targets[0] = -100
    loss_fn = VocabParallelCrossEntropy(reduction=reduction)
    logits = shard_logits(backend, n_workers, z)

    def upstream(value):
        return np.full(5, value) if reduction == "none" else value

    unit = host_grad(backward(loss_fn(logits, targets), logits, upstream(1.0)))
    scaled = host_grad(backward(loss_fn(logits, targets), logits, upstream(2.5)))
    np.testing.assert_allclose(scaled, 2.5 * unit, **TOL64)
    np.testing.assert_allclose(scaled, reduced_reference(z, targets, reduction, 2.5)[1], **TOL64)
    assert np.abs(unit).max() > 1e-3


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_none_reduction_array_grad_loss(backend_spec, rng, n_workers):
    """Per-row upstream gradients, as a host array, a list and a device array, each scale its own row;
    a number is not the per-row loss's shape."""
    backend = make_backend(backend_spec)
    vocab = 13 * n_workers
    z = rng.standard_normal((2, 3, vocab))
    targets = random_targets(rng, (2, 3), vocab)
    targets[1, 0] = -100
    logits = shard_logits(backend, n_workers, z)
    loss_fn = VocabParallelCrossEntropy(reduction="none")
    g = rng.standard_normal((2, 3))
    expected = reduced_reference(z, targets, "none", g)[1]
    for grad_loss in (g, g.tolist(), backend.asarray(g, np.float64, logits.devices[-1])):
        loss = loss_fn(logits, targets)
        np.testing.assert_allclose(host_grad(backward(loss, logits, grad_loss)), expected, **TOL64)
    loss = loss_fn(logits, targets)
    with pytest.raises(ShapeError, match=r"grad has shape \(\); expected the tensor's shape \(2, 3\)"):
        loss.backward(0.5)
    np.testing.assert_allclose(
        host_grad(backward(loss, logits, np.full((2, 3), 0.5))),
        reduced_reference(z, targets, "none", 0.5)[1],
        **TOL64,
    )


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_every_row_ignored(backend_spec, rng, n_workers):
    backend = make_backend(backend_spec)
    vocab = 7 * n_workers
    z = rng.standard_normal((2, 3, vocab))
    targets = np.full((2, 3), -100)
    logits = shard_logits(backend, n_workers, z)
    mean = VocabParallelCrossEntropy()(logits, targets)
    assert np.isnan(float(mean))  # 0 / 0, as in PyTorch
    grad = host_grad(backward(mean, logits))
    assert np.all(grad == 0.0) and grad.shape == z.shape
    total = VocabParallelCrossEntropy(reduction="sum")(logits, targets)
    assert float(total) == 0.0
    assert np.all(host_grad(backward(total, logits)) == 0.0)
    rows = VocabParallelCrossEntropy(reduction="none")(logits, targets)
    assert np.all(loss_value(backend, rows) == 0.0)
    assert np.all(host_grad(backward(rows, logits, np.ones((2, 3)))) == 0.0)


# --- communication ------------------------------------------------------------------------


def _measure(n_workers: int, vocab: int, rows_shape, eps: float, rng):
    backend = get_backend("simulated", n_workers)  # one device per worker
    z = rng.standard_normal(rows_shape + (vocab,))
    targets = random_targets(rng, rows_shape, vocab)
    logits = shard_logits(backend, n_workers, z)
    loss_fn = VocabParallelCrossEntropy(label_smoothing=eps, reduction="none")
    backend.reset_transfers()
    loss = loss_fn(logits, targets)
    forward = dict(backend.transfers)
    grad_loss = backend.asarray(np.ones(rows_shape), np.float64, logits.devices[0])
    backend.reset_transfers()
    loss.backward(grad_loss)
    return forward, dict(backend.transfers)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("n_workers", [2, 3, 5, 8])
def test_logits_are_never_gathered(rng, n_workers, eps):
    """Every copy between devices is one row vector (<= rows * 8 bytes), never a block of logits,
    and the traffic does not depend on the vocabulary size."""
    rows_shape = (2, 3)
    rows = 6
    small = _measure(n_workers, 7 * n_workers, rows_shape, eps, rng)
    large = _measure(n_workers, 70 * n_workers, rows_shape, eps, rng)
    for forward, backward in (small, large):
        assert forward, "the workers must exchange their row statistics"
        for phase in (forward, backward):
            for (src, dst), (count, nbytes) in phase.items():
                assert src != dst
                assert nbytes <= count * rows * 8, ((src, dst), count, nbytes)  # each copy is one row vector
                assert count <= 8, ((src, dst), count)  # a handful of reductions/broadcasts, not per-element
        # One shard of logits is rows * 7 * 8 bytes: no pair of devices exchanges that much in total.
        assert all(nbytes < rows * 7 * 8 for _, nbytes in forward.values())
    assert small == large  # O(rows), independent of the vocabulary


# --- errors -------------------------------------------------------------------------------


@pytest.fixture
def sharded(backend_spec, rng):
    """Logits (5, 12) over 3 workers and valid targets."""
    backend = make_backend(backend_spec)
    return shard_logits(backend, 3, rng.standard_normal((5, 12))), rng.integers(0, 12, size=5)


def test_dense_logits_rejected(rng):
    with pytest.raises(ShapeError, match="ShardedTensor.*got ndarray"):
        VocabParallelCrossEntropy()(rng.standard_normal((5, 12)), np.zeros(5, dtype=int))


def test_logits_split_on_wrong_axis_rejected(rng):
    backend = get_backend("simulated", 2)
    pieces = np.split(rng.standard_normal((4, 6)), 2, axis=0)
    logits = ShardedTensor(
        [backend.asarray(p, np.float64, d) for p, d in zip(pieces, (0, 1))], 0, [0, 1], backend
    )
    with pytest.raises(ShapeError, match="last .*axis 1, got axis 0"):
        VocabParallelCrossEntropy()(logits, np.zeros(4, dtype=int))


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.zeros(4, dtype=int), r"\(5,\).*got \(4,\)"),
        (np.zeros((5, 1), dtype=int), r"\(5,\).*got \(5, 1\)"),
        (np.zeros((), dtype=int), r"\(5,\).*got \(\)"),
    ],
    ids=["short", "extra-axis", "scalar"],
)
def test_targets_of_wrong_shape(sharded, bad, pattern):
    logits, _ = sharded
    with pytest.raises(ShapeError, match=pattern):
        VocabParallelCrossEntropy()(logits, bad)


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.zeros(5), "float64"),
        (np.zeros(5, dtype=np.float32), "float32"),
        (np.zeros(5, dtype=bool), "bool"),
    ],
    ids=["float64", "float32", "bool"],
)
def test_non_integer_targets(sharded, bad, pattern):
    logits, _ = sharded
    with pytest.raises(ShapeError, match=f"integers.*{pattern}"):
        VocabParallelCrossEntropy()(logits, bad)


@pytest.mark.parametrize("bad", [12, 13, -5, -1])
def test_target_out_of_range_names_it(sharded, bad):
    logits, targets = sharded
    targets = targets.copy()
    targets[3] = bad
    with pytest.raises(IndexOutOfRangeError, match=rf"target {bad} .*vocab=12"):
        VocabParallelCrossEntropy()(logits, targets)


def test_ignore_index_itself_is_not_out_of_range(sharded):
    logits, targets = sharded
    targets = targets.copy()
    targets[3] = -5
    loss = VocabParallelCrossEntropy(ignore_index=-5)(logits, targets)
    assert np.isfinite(float(loss))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(ignore_index="a"), "ignore_index.*'a'"),
        (dict(ignore_index=1.5), "ignore_index.*1.5"),
        (dict(ignore_index=True), "ignore_index.*True"),
        (dict(label_smoothing=1.0), r"label_smoothing.*\[0, 1\).*1\.0"),
        (dict(label_smoothing=-0.1), r"label_smoothing.*-0\.1"),
        (dict(label_smoothing="x"), "label_smoothing.*'x'"),
        (dict(label_smoothing=float("nan")), "label_smoothing.*nan"),
        (dict(reduction="avg"), "reduction.*'avg'"),
        (dict(reduction=None), "reduction.*None"),
    ],
    ids=[
        "ignore-str",
        "ignore-float",
        "ignore-bool",
        "eps-1",
        "eps-neg",
        "eps-str",
        "eps-nan",
        "red-avg",
        "red-none",
    ],
)
def test_bad_config(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        VocabParallelCrossEntropy(**kwargs)


def test_backward_of_a_no_grad_result_raises(sharded):
    """Logits that need no gradient, or a forward inside no_grad(): nothing is recorded, nothing kept."""
    logits, targets = sharded
    loss_fn = VocabParallelCrossEntropy()
    plain = logits.detach()
    with pytest.raises(TensorParallelError, match="does not require grad"):
        loss_fn(plain, targets).backward()
    with tp_gpu.no_grad():
        loss = loss_fn(logits, targets)
    assert loss.grad_fn is None and not loss.requires_grad
    with pytest.raises(TensorParallelError, match="does not require grad"):
        loss.backward()
    assert logits.grad is None
    np.testing.assert_allclose(float(loss), float(loss_fn(plain, targets)), **TOL64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("x", "numbers, got 'x'"),
        (True, "numbers, got True"),
        (np.ones(5), r"grad has shape \(5,\); expected the tensor's shape \(\)"),
    ],
    ids=["str", "bool", "array"],
)
def test_reduced_grad_loss_must_be_a_number(sharded, reduction, bad, pattern):
    logits, targets = sharded
    loss = VocabParallelCrossEntropy(reduction=reduction)(logits, targets)
    with pytest.raises(ShapeError, match=pattern):
        loss.backward(bad)
    assert logits.grad is None
    loss.backward(2.0)  # the refused call left the graph as it was
    assert np.abs(host_grad(logits.grad)).max() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_loss_backward_without_grad_is_one(sharded, reduction):
    logits, targets = sharded
    loss_fn = VocabParallelCrossEntropy(reduction=reduction)
    omitted = host_grad(backward(loss_fn(logits, targets), logits))
    np.testing.assert_array_equal(omitted, host_grad(backward(loss_fn(logits, targets), logits, 1.0)))


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.ones(4), r"grad has shape \(4,\); expected the tensor's shape \(5,\)"),
        (np.ones((5, 1)), r"grad has shape \(5, 1\); expected the tensor's shape \(5,\)"),
        (np.ones((5, 12)), r"grad has shape \(5, 12\); expected the tensor's shape \(5,\)"),
    ],
    ids=["short", "extra-axis", "logits-shaped"],
)
def test_none_grad_loss_of_wrong_shape(sharded, bad, pattern):
    logits, targets = sharded
    loss = VocabParallelCrossEntropy(reduction="none")(logits, targets)
    with pytest.raises(ShapeError, match=pattern):
        loss.backward(bad)
    assert logits.grad is None


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("x", "numbers, got 'x'"),
        (None, r"without a gradient needs a scalar .*shape \(5,\)"),
        (object(), "object"),
    ],
    ids=["str", "None", "object"],
)
def test_none_grad_loss_must_be_numeric(sharded, bad, pattern):
    logits, targets = sharded
    loss = VocabParallelCrossEntropy(reduction="none")(logits, targets)
    with pytest.raises(ShapeError, match=pattern):
        loss.backward(bad)
    assert logits.grad is None


# --- inplace=True: dZ in the logits' own memory -------------------------------------------------------


def _padded_logits(n_workers: int, dtype: str, pad, rows: int = 64, vocab: int = 1000):
    """Logits of a padded column head's layout on the host, as a leaf that requires grad, and targets."""
    config = TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype=dtype)
    layout = ColumnParallelLinear(3, vocab, config, pad_to_multiple_of=pad).layout
    block = np.random.default_rng(2).standard_normal((rows, layout.block_lengths["cpu"])).astype(dtype)
    targets = np.random.default_rng(3).integers(0, vocab, size=rows)
    targets[::7] = -100  # some rows ignored
    logits = ShardedTensor.from_blocks({"cpu": block}, -1, layout, get_backend("numpy"))
    return logits.requires_grad_(), targets


@pytest.mark.parametrize("pad", [None, 64])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_inplace_loss_equals_the_default(pad, dtype, smoothing):
    """``inplace=True`` gives the default's loss and dZ; it overwrites float32/float64 logits (and
    returns dZ in their memory), and leaves float16 logits alone (they are widened into a copy)."""
    kept, targets = _padded_logits(3, dtype, pad)
    original = kept.blocks["cpu"].copy()
    default = VocabParallelCrossEntropy(label_smoothing=smoothing)
    expected_loss = float(default(kept, targets))
    expected = backward(default(kept, targets), kept).blocks["cpu"]
    np.testing.assert_array_equal(kept.blocks["cpu"], original)  # the default only reads
    logits, _ = _padded_logits(3, dtype, pad)
    loss = VocabParallelCrossEntropy(label_smoothing=smoothing, inplace=True)(logits, targets)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-12)
    loss.backward()
    grad = logits.grad.blocks["cpu"]
    np.testing.assert_array_equal(grad, expected)
    block = logits.blocks["cpu"]
    assert np.shares_memory(grad, block) == (dtype != "float16")
    if dtype == "float16":
        np.testing.assert_array_equal(block, original)


def test_inplace_loss_allocates_no_logits_sized_array():
    import tracemalloc

    logits, targets = _padded_logits(4, "float32", None, rows=256, vocab=4000)
    loss_fn = VocabParallelCrossEntropy(inplace=True)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss_fn(logits, targets).backward()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 0.1 * logits.blocks["cpu"].nbytes


def test_no_grad_keeps_no_logits_sized_array(rng):
    """Inside no_grad() the forward's one exp(Z - max) buffer is freed when it returns."""
    import tracemalloc

    logits, targets = _padded_logits(4, "float32", None, rows=256, vocab=4000)
    loss_fn = VocabParallelCrossEntropy()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with tp_gpu.no_grad():
            loss = loss_fn(logits, targets)
        kept = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert kept <= 0.1 * logits.blocks["cpu"].nbytes
    assert np.isfinite(float(loss))


def test_inplace_must_be_a_bool():
    with pytest.raises(ConfigError, match="inplace must be True or False"):
        VocabParallelCrossEntropy(inplace="yes")
