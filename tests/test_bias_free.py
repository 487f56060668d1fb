"""Linear layers and the MLP without a bias.

``bias=False`` registers no bias parameter at all: ``named_parameters()``, state dicts, checkpoints
and optimizers see only the weights, ``full_bias()`` is None, and the layer computes ``Y = X A``
forward and backward (checked against a dense float64 reference, and torch where installed).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import forward_backward, to_host

import tp_gpu as tp


def _dense(x, a, dy):
    """``y = x a``, ``dx = dy a^T``, ``da = x^T dy`` over every leading axis, in float64."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return x @ a, dy @ a.T, x2.T @ dy2


def _check_no_bias(layer, names=("weight",)):
    assert layer.bias is None and layer.full_bias() is None and layer.bias_shards is None
    assert [n for n, _ in layer.named_parameters()] == list(names)
    assert list(layer.state_dict()) == list(names)
    assert "bias=False" in repr(layer)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
@pytest.mark.parametrize("cls", [tp.ColumnParallelLinear, tp.RowParallelLinear])
def test_forward_backward_against_dense(make_config, rng, cls, n_workers):
    layer = cls(7, 13, make_config(n_workers), seed=5, bias=False)
    _check_no_bias(layer)
    x, dy = rng.standard_normal((3, 4, 7)), rng.standard_normal((3, 4, 13))
    y, dx, da = _dense(x, layer.full_weight(), dy)
    got_y, got_dx = forward_backward(layer, x, dy)
    assert isinstance(got_y, tp.Tensor) and isinstance(got_dx, tp.Tensor)
    np.testing.assert_allclose(to_host(layer, got_y), y, rtol=0, atol=1e-12)
    np.testing.assert_allclose(to_host(layer, got_dx), dx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.full_grad(), da, rtol=0, atol=1e-12)
    assert list(layer.grads()) == ["weight"]


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_split_activations_and_sequence_parallel(make_config, rng, n_workers):
    """Column (gather_output=False) into row, and both with sequence parallelism, without biases."""
    for sp in (False, True):
        cfg = make_config(n_workers, sequence_parallel=sp)
        col = tp.ColumnParallelLinear(6, 11, make_config(n_workers, gather_output=False), seed=1, bias=False)
        row = tp.RowParallelLinear(11, 6, cfg, seed=2, input_is_parallel=True, bias=False)
        x, dy = rng.standard_normal((2, 9, 6)), rng.standard_normal((2, 9, 6))
        a, b = col.full_weight(), row.full_weight()
        if sp:
            layout = tp.get_group(cfg).split(9)
            x_in = tp.ShardedTensor(
                [
                    col.backend.asarray(x[:, s:e], col.dtype, d)
                    for (s, e), d in zip(layout.ranges, layout.devices)
                ],
                1,
                list(layout.devices),
                col.backend,
            ).requires_grad_()
        else:
            x_in = tp.tensor(x, requires_grad=True)
        y = row(col(x_in))
        got = y.gather() if isinstance(y, tp.ShardedTensor) else y
        np.testing.assert_allclose(to_host(row, got), x @ a @ b, rtol=0, atol=1e-12)
        dy_in = dy
        if sp:
            dy_in = tp.ShardedTensor(
                [
                    row.backend.asarray(dy[:, s:e], row.dtype, d)
                    for (s, e), d in zip(layout.ranges, layout.devices)
                ],
                1,
                list(layout.devices),
                row.backend,
            )
        y.backward(dy_in)
        dx = x_in.grad
        assert isinstance(dx, tp.ShardedTensor) == sp  # dX placed like x: sequence-split with sp
        np.testing.assert_allclose(to_host(col, dx), dy @ b.T @ a.T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            row.weight.full_grad(), (x @ a).reshape(-1, 11).T @ dy.reshape(-1, 6), atol=1e-12
        )
        np.testing.assert_allclose(
            col.weight.full_grad(), x.reshape(-1, 6).T @ (dy @ b.T).reshape(-1, 11), atol=1e-12
        )
        assert col.bias is None and row.bias is None


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_mlp_without_bias(make_config, rng, n_workers):
    mlp = tp.ParallelMLP(5, 9, 4, make_config(n_workers), activation="relu", bias=False)
    assert [n for n, _ in mlp.named_parameters()] == ["fc1.weight", "fc2.weight"]
    assert mlp.fc1.full_bias() is None and mlp.fc2.full_bias() is None
    x, dy = rng.standard_normal((3, 5)), rng.standard_normal((3, 4))
    a, b = mlp.fc1.full_weight(), mlp.fc2.full_weight()
    h = x @ a
    y, dx = forward_backward(mlp, x, dy)
    np.testing.assert_allclose(to_host(mlp, y), np.maximum(h, 0) @ b, rtol=0, atol=1e-12)
    dh = (dy @ b.T) * (h > 0)
    np.testing.assert_allclose(to_host(mlp, dx), dh @ a.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mlp.fc2.weight.full_grad(), np.maximum(h, 0).T @ dy, atol=1e-12)
    np.testing.assert_allclose(mlp.fc1.weight.full_grad(), x.T @ dh, atol=1e-12)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_step_touches_only_the_weight(make_config, rng, n_workers, optimizer):
    layer = tp.RowParallelLinear(6, 5, make_config(n_workers), seed=3, bias=False)
    x, dy = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    w0 = layer.full_weight()
    layer(x).backward(dy)
    g = x.T @ dy
    opt = tp.SGD(layer.parameters(), lr=0.1) if optimizer == "sgd" else tp.Adam(layer.parameters(), lr=0.01)
    assert len(opt.params) == 1
    opt.step()
    want = w0 - 0.1 * g if optimizer == "sgd" else w0 - 0.01 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(layer.full_weight(), want, rtol=1e-10, atol=1e-12)
    assert layer.bias is None and layer.full_bias() is None
    assert set(opt.state_dict()["state"]) <= {0}


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_checkpoint_round_trip(make_config, tmp_path, n_workers):
    src = tp.ColumnParallelLinear(7, 10, make_config(3), seed=4, bias=False)
    path = tmp_path / "bias_free.safetensors"
    tp.save_checkpoint(path, src)
    dst = tp.ColumnParallelLinear(7, 10, make_config(n_workers), seed=9, bias=False)
    tp.load_checkpoint(path, dst)
    np.testing.assert_array_equal(dst.full_weight(), src.full_weight())
    assert dst.bias is None
    with_bias = tp.ColumnParallelLinear(7, 10, make_config(n_workers), seed=9)
    with pytest.raises(tp.TensorParallelError, match="bias"):
        tp.load_checkpoint(path, with_bias)  # strict: the checkpoint has no bias
    loaded = tp.load_checkpoint(path, with_bias, strict=False)
    assert "bias" in str(loaded)


def test_dense_loading(rng):
    cfg = tp.TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    w = rng.standard_normal((4, 6))
    layer = tp.ColumnParallelLinear.from_dense(w, False, cfg)
    _check_no_bias(layer)
    np.testing.assert_array_equal(layer.full_weight(), w)
    layer.load_dense(2 * w)  # None: nothing to load for the bias
    layer.load_dense(3 * w, False)
    np.testing.assert_array_equal(layer.full_weight(), 3 * w)
    with pytest.raises(tp.ConfigError, match=r"built with bias=False.*got a bias of shape \(6,\)"):
        layer.load_dense(w, np.ones(6))
    np.testing.assert_array_equal(layer.full_weight(), 3 * w)  # unchanged
    with_bias = tp.RowParallelLinear.from_dense(w, None, cfg)
    np.testing.assert_array_equal(with_bias.full_bias(), np.zeros(6))  # None is still a zero bias
    with pytest.raises(tp.ConfigError, match="has a bias parameter"):
        with_bias.load_dense(w, False)
    mlp = tp.ParallelMLP.from_dense(w, False, w.T, False, cfg)
    assert [n for n, _ in mlp.named_parameters()] == ["fc1.weight", "fc2.weight"]
    with pytest.raises(tp.ConfigError, match="fc1_bias is False but fc2_bias is given"):
        tp.ParallelMLP.from_dense(w, False, w.T, np.zeros(4), cfg)
    for bad in ("no", None, 0):
        with pytest.raises(tp.ConfigError, match="bias must be True or False"):
            tp.ColumnParallelLinear(4, 6, cfg, bias=bad)


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_from_torch_against_torch(kind, n_workers):
    """A bias-free nn.Linear gave parameters ['weight', 'bias'] and a nonzero bias after
    one SGD step."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(n_workers)
    linear = torch.nn.Linear(8, 6, bias=False, dtype=torch.float64)
    cfg = tp.TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype="float64")
    layer = tp.from_torch(linear, cfg, kind=kind)
    assert [n for n, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(5, 8, dtype=torch.float64)
    dy = torch.randn(5, 6, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    linear(xr).backward(dy)
    y, dx = forward_backward(layer, x.numpy(), dy.numpy())
    np.testing.assert_allclose(np.asarray(y), linear(x).detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), xr.grad.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.full_grad(), linear.weight.grad.numpy().T, rtol=0, atol=1e-12)
    tp.SGD(layer.parameters(), lr=0.1).step()
    torch.optim.SGD(linear.parameters(), lr=0.1).step()
    assert layer.full_bias() is None
    np.testing.assert_allclose(layer.full_weight(), linear.weight.detach().numpy().T, rtol=0, atol=1e-12)


def test_from_torch_mlp():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    seq = nn.Sequential(nn.Linear(5, 7, bias=False), nn.GELU(), nn.Linear(7, 3, bias=False)).double()
    mlp = tp.from_torch(
        seq, tp.TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64")
    )
    assert [n for n, _ in mlp.named_parameters()] == ["fc1.weight", "fc2.weight"]
    x = torch.randn(4, 5, dtype=torch.float64)
    np.testing.assert_allclose(to_host(mlp, mlp(x)), seq(x).detach().numpy(), rtol=0, atol=1e-12)
    mixed = nn.Sequential(nn.Linear(5, 7, bias=False), nn.GELU(), nn.Linear(7, 3)).double()
    with pytest.raises(tp.ConfigError, match="first nn.Linear has no bias and its second a bias"):
        tp.from_torch(mixed)
