"""Class-weighted vocab-parallel cross-entropy.

The loss is checked, forward and gradient, against a dense float64 NumPy
reference written here from the formula in ``tp_gpu/layers/loss.py``'s
docstring, and, where PyTorch imports, against
``torch.nn.functional.cross_entropy(weight=..., ignore_index=...,
label_smoothing=..., reduction=...)``. Vocabularies are split unevenly (and
over more workers than classes), on NumPy and on three simulated devices. Gradients come from the
tape: ``loss.backward(g)``, then ``logits.grad``.
"""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu import ShapeError, ShardedTensor, TensorParallelConfig, VocabParallelCrossEntropy, get_group
from tp_gpu.testing import assert_close

IGNORE = -100

#: (vocab, n_workers): uneven splits; more workers than classes (empty shards, and with
#: (2, 3) on sim3 a device holding no class at all).
SPLITS = [(13, 3), (7, 5), (13, 8), (5, 16), (2, 3)]
BACKENDS = [pytest.param(("numpy", None), id="numpy"), pytest.param(("simulated", 3), id="sim3")]
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1]


# --- the dense float64 reference ---------------------------------------------------------------


def dense_cross_entropy(z, targets, weight=None, ignore_index=IGNORE, label_smoothing=0.0, reduction="mean"):
    """``(loss, dZ for an upstream gradient of ones)`` in float64, from the formula

        loss_r = (1 - eps) w_t (log S - z_t) + (eps / V) (W log S - sum_j w_j z_j)
        dZ_rj  = p_j ((1 - eps) w_t + eps W / V) - (1 - eps) w_t [j == t] - eps w_j / V

    with ``z = Z - max Z``, ``S = sum_j exp z_j``, ``p = softmax(Z)``, ``W = sum_j w_j``;
    ignored rows give 0; ``"mean"`` divides by the summed ``w_t`` of the rows not ignored.
    For ``"none"`` the gradient is that of ``loss.sum()``.
    """
    z = np.asarray(z, np.float64)
    t = np.asarray(targets)
    vocab = z.shape[-1]
    w = np.ones(vocab) if weight is None else np.asarray(weight, np.float64)
    eps = label_smoothing
    z = z - z.max(axis=-1, keepdims=True)
    log_s = np.log(np.exp(z).sum(axis=-1))
    probs = np.exp(z - log_s[..., None])
    valid = t != ignore_index
    safe = np.where(valid, t, 0)
    w_t = np.where(valid, w[safe], 0.0)
    z_t = np.take_along_axis(z, safe[..., None], axis=-1)[..., 0]
    rows = (1 - eps) * w_t * (log_s - z_t) + (eps / vocab) * (w.sum() * log_s - z @ w)
    rows = np.where(valid, rows, 0.0)
    grad = probs * ((1 - eps) * w_t + eps * w.sum() / vocab)[..., None] - (eps / vocab) * w
    np.put_along_axis(
        grad,
        safe[..., None],
        np.take_along_axis(grad, safe[..., None], -1) - ((1 - eps) * w_t)[..., None],
        -1,
    )
    grad = np.where(valid[..., None], grad, 0.0)
    if reduction == "none":
        return rows, grad
    if reduction == "sum":
        return rows.sum(), grad
    denominator = w_t.sum()
    return (rows.sum() / denominator if denominator else np.nan), (
        grad / denominator if denominator else grad * 0
    )


def sharded_logits(z: np.ndarray, n_workers: int, backend_name: str, devices) -> ShardedTensor:
    """``z`` split on its last axis as ``np.array_split`` cuts it, each shard on its worker's device:
    a leaf that requires grad."""
    group = get_group(
        TensorParallelConfig(n_workers=n_workers, backend=backend_name, devices=devices, dtype="float64")
    )
    pieces = np.array_split(z, n_workers, axis=-1)
    shards = [group.backend.asarray(piece, z.dtype, device) for piece, device in zip(pieces, group.devices)]
    return ShardedTensor(shards, -1, group.devices, group.backend).requires_grad_()


def host(tensor: ShardedTensor) -> np.ndarray:
    """A ShardedTensor, gathered, as a float64 host array."""
    return np.asarray(tensor.backend.to_host(tensor.gather()), np.float64)


def problem(rng, vocab: int, rows=(3, 4)):
    """Random logits of a wide range, targets with some ignored rows, positive class weights."""
    z = 3.0 * rng.standard_normal((*rows, vocab))
    targets = rng.integers(0, vocab, size=rows)
    targets[0, 1] = targets[-1, -1] = IGNORE
    weight = rng.uniform(0.2, 3.0, size=vocab)
    return z, targets, weight


# --- the reference itself ----------------------------------------------------------------------


def test_reference_gradient_matches_finite_differences(rng):
    """The hand-written reference's gradient is the derivative of its loss (so it can be trusted)."""
    z, targets, weight = problem(rng, 6, rows=(2, 3))
    targets[0, 0] = IGNORE
    for reduction in ("mean", "sum", "none"):
        _, grad = dense_cross_entropy(z, targets, weight, label_smoothing=0.1, reduction=reduction)
        numeric = np.zeros_like(z)
        h = 1e-6
        for index in np.ndindex(z.shape):
            up, down = z.copy(), z.copy()
            up[index] += h
            down[index] -= h
            f_up = np.sum(
                dense_cross_entropy(up, targets, weight, label_smoothing=0.1, reduction=reduction)[0]
            )
            f_down = np.sum(
                dense_cross_entropy(down, targets, weight, label_smoothing=0.1, reduction=reduction)[0]
            )
            numeric[index] = (f_up - f_down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, atol=1e-7, err_msg=reduction)


# --- tp_gpu against the reference --------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab, n_workers", SPLITS, ids=[f"V{v}-p{p}" for v, p in SPLITS])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_loss_matches_dense_reference(rng, backend, vocab, n_workers, label_smoothing, reduction):
    z, targets, weight = problem(rng, vocab)
    logits = sharded_logits(z, n_workers, *backend)
    assert logits.split_sizes == [len(a) for a in np.array_split(np.arange(vocab), n_workers)]
    loss_fn = VocabParallelCrossEntropy(weight=weight, label_smoothing=label_smoothing, reduction=reduction)
    loss = loss_fn(logits, targets)
    expected, expected_grad = dense_cross_entropy(
        z, targets, weight, label_smoothing=label_smoothing, reduction=reduction
    )
    assert loss.shape == (targets.shape if reduction == "none" else ())
    assert_close(np.asarray(loss), expected, "float64", vocab, what="loss")
    loss.backward(np.ones(targets.shape) if reduction == "none" else 1.0)
    grad = logits.grad
    assert isinstance(grad, ShardedTensor) and grad.split_sizes == logits.split_sizes
    assert_close(host(grad), expected_grad, "float64", vocab, what="dZ")
    assert not host(grad)[targets == IGNORE].any()  # ignored rows get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_change_the_loss_and_the_mean_normalises_by_them(rng, backend):
    """Weighted mean = sum_r w_t loss_r / sum_r w_t, not a plain mean; uniform weights scale away."""
    z, targets, weight = problem(rng, 13)
    plain = float(VocabParallelCrossEntropy()(sharded_logits(z, 4, *backend), targets))
    weighted = float(VocabParallelCrossEntropy(weight=weight)(sharded_logits(z, 4, *backend), targets))
    rows = np.asarray(VocabParallelCrossEntropy(reduction="none")(sharded_logits(z, 4, *backend), targets))
    valid = targets != IGNORE
    w_t = weight[np.where(valid, targets, 0)] * valid
    assert abs(weighted - plain) > 1e-3
    assert_close(weighted, (w_t * rows).sum() / w_t.sum(), "float64", 13)
    uniform = float(
        VocabParallelCrossEntropy(weight=np.full(13, 2.5))(sharded_logits(z, 4, *backend), targets)
    )
    assert_close(uniform, plain, "float64", 13)
    summed = float(
        VocabParallelCrossEntropy(weight=np.full(13, 2.5), reduction="sum")(
            sharded_logits(z, 4, *backend), targets
        )
    )
    assert_close(summed, 2.5 * rows.sum(), "float64", 13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_loss_scales_the_gradient_for_every_reduction(rng, backend):
    z, targets, weight = problem(rng, 7)
    for reduction in REDUCTIONS:
        loss_fn = VocabParallelCrossEntropy(weight=weight, label_smoothing=0.1, reduction=reduction)
        logits = sharded_logits(z, 3, *backend)
        upstream = rng.standard_normal(targets.shape) if reduction == "none" else 0.37
        loss_fn(logits, targets).backward(upstream)
        grad = host(logits.grad)
        _, unit = dense_cross_entropy(z, targets, weight, label_smoothing=0.1, reduction=reduction)
        scale = np.asarray(upstream)[..., None] if reduction == "none" else upstream
        assert_close(grad, scale * unit, "float64", 7, what=reduction)


# --- tp_gpu against PyTorch ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab, n_workers", SPLITS, ids=[f"V{v}-p{p}" for v, p in SPLITS])
@pytest.mark.parametrize("label_smoothing", SMOOTHING)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weighted_loss_matches_torch(torch, rng, backend, vocab, n_workers, label_smoothing, reduction):
    z, targets, weight = problem(rng, vocab)
    upstream = rng.standard_normal(targets.shape) if reduction == "none" else 1.7
    zt = torch.tensor(z.reshape(-1, vocab), dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(
        zt,
        torch.tensor(targets.reshape(-1)),
        weight=torch.tensor(weight, dtype=torch.float64),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    expected.backward(
        torch.tensor(np.reshape(upstream, -1) if reduction == "none" else upstream, dtype=torch.float64)
    )
    loss_fn = VocabParallelCrossEntropy(
        weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction=reduction
    )
    logits = sharded_logits(z, n_workers, *backend)
    loss = loss_fn(logits, targets)
    assert_close(np.asarray(loss).reshape(-1) if reduction == "none" else np.asarray(loss),
                 expected.detach().numpy(), "float64", vocab, what="loss vs torch")  # fmt: skip
    loss.backward(upstream)
    grad = host(logits.grad)
    assert_close(grad.reshape(-1, vocab), zt.grad.numpy(), "float64", vocab, what="dZ vs torch")


def test_torch_agrees_with_the_reference_when_every_row_is_ignored(torch, rng):
    """Mean over no rows is NaN in both (and the gradient is zero)."""
    z, targets, weight = problem(rng, 7)
    targets[...] = IGNORE
    loss_fn = VocabParallelCrossEntropy(weight=weight)
    logits = sharded_logits(z, 3, "numpy", None)
    loss = loss_fn(logits, targets)
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(z.reshape(-1, 7)), torch.tensor(targets.reshape(-1)), weight=torch.tensor(weight)
    )
    assert np.isnan(float(loss)) and bool(torch.isnan(expected))
    loss.backward()
    assert not host(logits.grad).any()


# --- bad weights ---------------------------------------------------------------------------------


def test_weight_of_the_wrong_length_names_got_and_expected(rng):
    z, targets, _ = problem(rng, 13)
    loss_fn = VocabParallelCrossEntropy(weight=np.ones(12))
    with pytest.raises(ShapeError, match=r"\(12,\).*expected \(13,\)"):
        loss_fn(sharded_logits(z, 3, "numpy", None), targets)


@pytest.mark.parametrize(
    "weight",
    [np.ones((13, 1)), np.ones((1, 13)), np.ones(()), [[1.0, 2.0]]],
    ids=["13x1", "1x13", "0-d", "list2d"],
)
def test_weight_that_is_not_1d_names_its_shape(weight):
    shape = np.shape(weight)
    with pytest.raises(ShapeError, match=r"1-D.*got shape " + re_tuple(shape)):
        VocabParallelCrossEntropy(weight=weight)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_names_the_value(bad):
    weight = np.ones(7)
    weight[4] = bad
    with pytest.raises(ShapeError) as info:
        VocabParallelCrossEntropy(weight=weight)
    message = str(info.value)
    assert "finite" in message  # what was expected
    assert str(bad) in message or repr(float(bad)) in message, message  # what was got


def test_non_numeric_weight_is_refused():
    with pytest.raises(ShapeError, match="1-D array of real numbers"):
        VocabParallelCrossEntropy(weight=np.array(["a", "b"]))


def re_tuple(shape) -> str:
    import re

    return re.escape(str(tuple(shape)))
