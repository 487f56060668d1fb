"""Backward of every layer and of ParallelMLP through the tape: dense-reference gradients, finite
differences, accumulation, placement of gradient shards and the communication pattern."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import forward_backward, to_host

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    ShardedTensor,
    TensorParallelConfig,
    TensorParallelError,
)
from tp_gpu.layers.activations import ACTIVATIONS
from tp_gpu.placements import Dense

TOL = dict(rtol=1e-10, atol=1e-12)


def host(layer, value):
    return to_host(layer, value.gather() if isinstance(value, ShardedTensor) else value)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
@pytest.mark.parametrize("gather_output", [True, False])
def test_column_gradients_match_dense(make_config, rng, n_workers, gather_output):
    layer = ColumnParallelLinear(
        7, 3 * n_workers, make_config(n_workers, gather_output=gather_output), seed=1
    )
    x = tp_gpu.tensor(rng.standard_normal((2, 5, 7)), requires_grad=True)
    y = layer(x)
    g = rng.standard_normal((2, 5, 3 * n_workers))
    grad_output = g
    if not gather_output:  # hand back a gradient split like the output
        pieces = np.split(g, n_workers, axis=-1)
        grad_output = ShardedTensor(
            [layer.backend.asarray(p, layer.dtype, d) for p, d in zip(pieces, y.devices)],
            -1,
            y.devices,
            layer.backend,
        )
    y.backward(grad_output)
    w = layer.full_weight()
    assert x.grad.placement == Dense(layer.output_device)  # the partial dX reduced on the output device
    np.testing.assert_allclose(host(layer, x.grad), g @ w.T, **TOL)
    grads = layer.grads()
    x = np.asarray(x)
    np.testing.assert_allclose(grads["weight"], x.reshape(-1, 7).T @ g.reshape(-1, 3 * n_workers), **TOL)
    np.testing.assert_allclose(grads["bias"], g.sum(axis=(0, 1)), **TOL)
    for param in layer.parameters():  # each gradient block stays on its parameter block's device
        assert {d: layer.backend.device_of(gr) for d, gr in param.grad_blocks.items()} == {
            d: d for d in param.blocks
        }
        assert set(param.blocks) == set(layer.devices)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_row_gradients_match_dense(make_config, rng, n_workers):
    layer = RowParallelLinear(5 * n_workers, 4, make_config(n_workers), seed=2)
    x = rng.standard_normal((6, 5 * n_workers))
    g = rng.standard_normal((6, 4))
    _, dx = forward_backward(layer, x, g)
    assert not isinstance(dx, ShardedTensor)  # a dense input gets a gathered gradient
    assert dx.placement == Dense(layer.output_device)
    np.testing.assert_allclose(host(layer, dx), g @ layer.full_weight().T, **TOL)
    np.testing.assert_allclose(layer.grads()["weight"], x.T @ g, **TOL)
    np.testing.assert_allclose(layer.grads()["bias"], g.sum(axis=0), **TOL)
    weight, bias = layer.parameters()
    assert {d: layer.backend.device_of(gr) for d, gr in weight.grad_blocks.items()} == {
        d: d for d in set(layer.devices)
    }
    assert {d: layer.backend.device_of(gr) for d, gr in bias.grad_blocks.items()} == {
        layer.output_device: layer.output_device
    }


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_embedding_gradient_accumulates_repeated_ids(make_config, rng, n_workers):
    vocab = 3 * n_workers
    emb = ParallelEmbedding(vocab, 5, config=make_config(n_workers), seed=3)
    ids = rng.integers(0, vocab, size=(4, 9))
    ids[0, :3] = 0  # repeated ids must add up
    y = emb(ids)
    g = rng.standard_normal((4, 9, 5))
    y.backward(g)  # integer ids get no gradient: only the table's accumulates
    expected = np.zeros((vocab, 5))
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, 5))
    np.testing.assert_allclose(emb.grads()["weight"], expected, **TOL)


@pytest.mark.parametrize("devices", [2, 3, 8])
def test_embedding_backward_scatters_each_id_once(rng, devices):
    """Each device scatters only the ids it owns: n_ids row additions in all, not n_ids per device."""
    emb = ParallelEmbedding(
        24, 5, config=TensorParallelConfig(n_workers=8, backend="simulated", devices=devices, dtype="float64")
    )
    ids = rng.integers(0, 24, size=(3, 7))
    y = emb(ids)
    scattered = {}
    real_scatter = type(emb.backend).scatter_add_rows

    def recording_scatter(backend, shape, index, rows, mask=None):
        kept = int(np.asarray(mask).sum()) if mask is not None else index.size
        scattered[backend.device_of(rows)] = kept
        return real_scatter(backend, shape, index, rows, mask)

    type(emb.backend).scatter_add_rows = recording_scatter
    try:
        y.backward(rng.standard_normal((3, 7, 5)))
    finally:
        type(emb.backend).scatter_add_rows = real_scatter
    owner = {d: [w for w in range(8) if emb.devices[w] == d] for d in set(emb.devices)}
    expected = {
        d: int(sum(((ids >= 3 * w) & (ids < 3 * w + 3)).sum() for w in ws)) for d, ws in owner.items()
    }
    assert scattered == expected
    assert sum(scattered.values()) == ids.size


@pytest.mark.parametrize("activation", ["gelu", "relu", None])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_mlp_gradients_match_dense(make_config, rng, n_workers, activation):
    mlp = ParallelMLP(6, 2 * n_workers, 5, make_config(n_workers), seed=4, activation=activation)
    x = rng.standard_normal((3, 6))
    act = ACTIVATIONS[activation]
    w1, b1, w2, b2 = mlp.fc1.full_weight(), mlp.fc1.full_bias(), mlp.fc2.full_weight(), mlp.fc2.full_bias()
    pre = x @ w1 + b1
    a = act.forward(np, pre)
    g = rng.standard_normal((3, 5))
    y, dx = forward_backward(mlp, x, g)
    assert isinstance(y, tp_gpu.Tensor) and isinstance(dx, tp_gpu.Tensor)
    np.testing.assert_allclose(to_host(mlp.fc2, y), a @ w2 + b2, **TOL)
    dx = to_host(mlp.fc2, dx)
    g_pre = act.grad(np, pre, g @ w2.T)
    np.testing.assert_allclose(dx, g_pre @ w1.T, **TOL)
    grads = mlp.grads()
    assert list(grads) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    np.testing.assert_allclose(grads["fc2.weight"], a.T @ g, **TOL)
    np.testing.assert_allclose(grads["fc2.bias"], g.sum(0), **TOL)
    np.testing.assert_allclose(grads["fc1.weight"], x.T @ g_pre, **TOL)
    np.testing.assert_allclose(grads["fc1.bias"], g_pre.sum(0), **TOL)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_activation_derivatives_by_finite_differences(rng, activation):
    act = ACTIVATIONS[activation]
    x = rng.standard_normal(200) * 3
    x = x[np.abs(x) > 1e-3]  # ReLU has no derivative at 0
    h = 1e-6
    numeric = (act.forward(np, x + h) - act.forward(np, x - h)) / (2 * h)
    np.testing.assert_allclose(act.grad(np, x, np.ones_like(x)), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_mlp_weight_gradient_by_finite_differences(backend_spec, rng, n_workers):
    """Perturb single entries of the logical weights and compare with the analytic gradient."""
    name, devices = backend_spec
    cfg = TensorParallelConfig(n_workers=n_workers, backend=name, devices=devices, dtype="float64")
    mlp = ParallelMLP(4, 2 * n_workers, 3, cfg, seed=5)
    x = rng.standard_normal((5, 4))
    g = rng.standard_normal((5, 3))
    mlp(x).backward(g)
    analytic = mlp.grads()

    def objective() -> float:
        with tp_gpu.no_grad():
            return float((to_host(mlp.fc2, mlp(x)) * g).sum())

    h = 1e-6
    for pname, param in mlp.named_parameters():
        full = param.full()
        for flat_index in rng.choice(full.size, size=min(3, full.size), replace=False):
            index = np.unravel_index(flat_index, full.shape)
            values = []
            for sign in (1, -1):
                bumped = full.copy()
                bumped[index] += sign * h
                param.load(bumped)
                values.append(objective())
            param.load(full)
            numeric = (values[0] - values[1]) / (2 * h)
            assert abs(numeric - analytic[pname][index]) < 1e-6 * max(1.0, abs(numeric)), (pname, index)


def test_gradients_accumulate_until_zero_grad(make_config, rng):
    layer = ColumnParallelLinear(3, 4, make_config(2), seed=0)
    x, g = rng.standard_normal((2, 3)), rng.standard_normal((2, 4))
    layer(x).backward(g)
    once = layer.grads()
    layer(x).backward(g)
    twice = layer.grads()
    for key in once:
        np.testing.assert_allclose(twice[key], 2 * once[key], **TOL)
    layer.zero_grad()
    assert all(not v.any() for v in layer.grads().values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("n_workers", [1, 3])
def test_weight_gradients_add_up_over_backward_calls(make_config, kind, rows, dtype, n_workers, monkeypatch):
    """The second and third backward add X^T dY into the gradient already there (on the host in place,
    by BLAS: ger for one row, gemm with beta = 1 for more), as the first one set it."""
    from tp_gpu.layers import linear_functions

    fused = []
    add = linear_functions.accumulate_weight_grad
    monkeypatch.setattr(linear_functions, "accumulate_weight_grad", lambda *a: fused.append(a) or add(*a))
    rng = np.random.default_rng([rows, n_workers, len(kind)])
    n_in, n_out = (5, 7) if kind == "column" else (7, 5)
    layer_class = ColumnParallelLinear if kind == "column" else RowParallelLinear
    layer = layer_class(n_in, n_out, make_config(n_workers, dtype=dtype), seed=1)
    xs = [rng.standard_normal((rows, n_in)) for _ in range(3)]
    gs = [rng.standard_normal((rows, n_out)) for _ in range(3)]
    for x, g in zip(xs, gs):
        layer(x.astype(dtype)).backward(g.astype(dtype))
    expected = sum(x.T @ g for x, g in zip(xs, gs))  # (n_in, rows) @ (rows, n_out), float64
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == "float32" else TOL
    np.testing.assert_allclose(layer.grads()["weight"], expected, **tol)
    np.testing.assert_allclose(layer.grads()["bias"], sum(g.sum(0) for g in gs), **tol)
    on_host = layer.backend.name == "numpy"  # device arrays (simulated, CuPy) keep dA + add
    assert len(fused) == (2 * len(layer.weight.blocks) if on_host else 0)
    layer.zero_grad()
    layer(xs[0].astype(dtype)).backward(gs[0].astype(dtype))  # after zero_grad: the first one's alone
    np.testing.assert_allclose(layer.grads()["weight"], xs[0].T @ gs[0], **tol)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_mlp_needs_one_reduction_each_way(rng, n_workers):
    """Forward: only the row layer's partial sums cross devices; backward: only fc1's dX partials
    (besides the input copies and the dY broadcast). Nothing moves between fc1 and fc2."""
    cfg = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=n_workers, dtype="float64")
    mlp = ParallelMLP(6, 3 * n_workers, 5, cfg, seed=0)
    x = tp_gpu.tensor(rng.standard_normal((4, 6)), requires_grad=True)  # so that fc1 computes dX
    assert mlp.fc1.backend is mlp.fc2.backend  # layers built from equal configs share one backend
    backend = mlp.backend
    backend.reset_transfers()
    y = mlp(x)
    others = n_workers - 1
    moves = sum(c for (src, _), (c, _) in backend.transfers.items() if src != "host")
    assert moves == others  # only fc2's reduction
    # dY arrives on the output device, as it would from the next layer.
    grad = mlp.backend.asarray(rng.standard_normal((4, 5)), np.float64, mlp.fc2.output_device)
    backend.reset_transfers()
    y.backward(grad)
    moves = sum(c for (src, _), (c, _) in backend.transfers.items())
    assert moves == 2 * others  # dY to every other device (fc2), then the reduction of dX (fc1)
    assert x.grad.placement == Dense(mlp.output_device)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, inp",
    [
        (lambda cfg: ColumnParallelLinear(4, 4, cfg), np.ones((1, 4))),
        (lambda cfg: RowParallelLinear(4, 4, cfg), np.ones((1, 4))),
        (lambda cfg: ParallelEmbedding(4, 4, config=cfg), np.array([[1, 2, 3, 0]])),
        (lambda cfg: ParallelMLP(4, 4, 4, cfg), np.ones((1, 4))),
    ],
    ids=["column", "row", "embedding", "mlp"],
)
def test_backward_of_a_no_grad_result_raises(make_config, factory, inp):
    """A module has no backward of its own; under no_grad nothing is recorded, so there is nothing
    to run backward through, and no gradient appears."""
    layer = factory(make_config(2))
    assert not hasattr(layer, "backward")
    with tp_gpu.no_grad():
        y = layer(inp)
    assert isinstance(y, tp_gpu.Tensor) and y.grad_fn is None and not y.requires_grad
    with pytest.raises(TensorParallelError, match="does not require grad .*ran inside no_grad"):
        y.backward(np.ones(y.shape))
    assert all(not v.any() for v in layer.grads().values())


def test_eval_mode_records_and_no_grad_does_not(make_config, rng):
    """``eval()`` only switches dropout off: an eval forward still records and backward gives the
    dense gradients; an eval forward under no_grad keeps nothing, and backward on it raises."""
    layer = ColumnParallelLinear(4, 4, make_config(2)).eval()
    x, g = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    _, dx = forward_backward(layer, x, g)
    np.testing.assert_allclose(host(layer, dx), g @ layer.full_weight().T, **TOL)
    np.testing.assert_allclose(layer.grads()["weight"], x.T @ g, **TOL)
    layer.zero_grad()
    with tp_gpu.no_grad():
        y = layer(x)
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(g)
    assert all(not v.any() for v in layer.grads().values())


@pytest.mark.parametrize(
    "factory, inp, bad_grad, expected",
    [
        (
            lambda cfg: ColumnParallelLinear(4, 6, cfg),
            np.ones((2, 4)),
            np.ones((2, 5)),
            r"grad has shape \(2, 5\); expected the tensor's shape \(2, 6\)",
        ),
        (
            lambda cfg: RowParallelLinear(4, 6, cfg),
            np.ones((2, 4)),
            np.ones((3, 6)),
            r"grad has shape \(3, 6\); expected the tensor's shape \(2, 6\)",
        ),
        (
            lambda cfg: ParallelEmbedding(4, 6, config=cfg),
            np.array([1, 2]),
            np.ones((2, 5)),
            r"grad has shape \(2, 5\); expected the tensor's shape \(2, 6\)",
        ),
    ],
    ids=["column", "row", "embedding"],
)
def test_backward_rejects_wrong_grad_shape(make_config, factory, inp, bad_grad, expected):
    layer = factory(make_config(2))
    y = layer(inp)
    with pytest.raises(ShapeError, match=expected):
        y.backward(bad_grad)
    assert all(not v.any() for v in layer.grads().values())  # nothing accumulated


def test_column_rejects_sharded_grad_of_wrong_split(make_config, rng):
    layer = ColumnParallelLinear(4, 6, make_config(2, gather_output=False))
    y = layer(rng.standard_normal((2, 4)))
    other = ColumnParallelLinear(4, 6, make_config(3, gather_output=False))(rng.standard_normal((2, 4)))
    with pytest.raises(ShapeError, match=r"sizes \[2, 2, 2\].*expected.*\[3, 3\]"):
        y.backward(other)
    assert all(not v.any() for v in layer.grads().values())
    assert isinstance(y, ShardedTensor)


def test_row_input_is_parallel_requires_sharded_input(make_config):
    layer = RowParallelLinear(4, 4, make_config(2), input_is_parallel=True)
    with pytest.raises(ShapeError, match="expects a ShardedTensor"):
        layer(np.ones((2, 4)))


def test_mlp_rejects_bad_activation():
    from tp_gpu import ConfigError

    with pytest.raises(ConfigError, match="'tanh'"):
        ParallelMLP(4, 4, 4, TensorParallelConfig(backend="numpy", dtype="float64"), activation="tanh")
