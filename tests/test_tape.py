"""The tape: reused modules, user Functions, no_grad, freed graphs, bad gradients, threads.

Every gradient here is compared with PyTorch's (float64; those tests skip without it) or with a
dense NumPy reference built from the layers' own logical weights.
"""

from __future__ import annotations

import dataclasses
import threading
import tracemalloc

import numpy as np
import pytest

import tp_gpu
from tp_gpu.testing import GradcheckError, gradcheck


@pytest.fixture
def torch():
    """PyTorch, for the tests that compare with its gradients (they skip without it; the rest run)."""
    return pytest.importorskip("torch")


def _torch_linear(torch, layer: tp_gpu.ColumnParallelLinear):
    lin = torch.nn.Linear(layer.n_in, layer.n_out).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(layer.full_weight().T))
        lin.bias.copy_(torch.tensor(layer.full_bias()))
    return lin


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5, 8])
def test_module_used_twice_sums_its_gradients_like_torch(torch, make_config, rng, n_workers):
    """``lin(lin(x))`` then backward: each parameter gets the sum of both uses' gradients."""
    lin = tp_gpu.ColumnParallelLinear(6, 6, make_config(n_workers), seed=3)
    lin.bias.load(rng.standard_normal(6))
    x_np, w_np = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))
    x = tp_gpu.tensor(x_np, requires_grad=True)
    y = lin(lin(x))
    (y * w_np).sum().backward()

    ref = _torch_linear(torch, lin)
    xt = torch.tensor(x_np, requires_grad=True)
    (ref(ref(xt)) * torch.tensor(w_np)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), ref(ref(xt)).detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(x.grad), xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.weight.full_grad(), ref.weight.grad.numpy().T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.bias.full_grad(), ref.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", list(range(1, 9)))
def test_module_used_twice_equals_the_dense_chain_rule(make_config, rng, n_workers):
    """Without PyTorch: ``y = (x W + b) W + b``, ``L = sum(y * w)`` by hand in float64:
    ``dW = h^T dy + x^T dh`` and ``db = sum(dy) + sum(dh)`` with ``dh = dy W^T``."""
    lin = tp_gpu.RowParallelLinear(5, 5, make_config(n_workers), seed=2)
    lin.bias.load(rng.standard_normal(5))
    x_np, w_np = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    x = tp_gpu.tensor(x_np, requires_grad=True)
    (lin(lin(x)) * w_np).sum().backward()
    W, b = lin.full_weight(), lin.full_bias()
    h = x_np @ W + b  # (3, 5) @ (5, 5)
    dh = w_np @ W.T  # (3, 5) @ (5, 5)
    np.testing.assert_allclose(np.asarray(x.grad), dh @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.weight.full_grad(), h.T @ w_np + x_np.T @ dh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lin.bias.full_grad(), w_np.sum(0) + dh.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 3, 4])
def test_weight_shared_block_applied_three_times(torch, make_config, rng, n_workers):
    """A residual MLP block reused three times in one step (a weight-shared block) equals PyTorch's."""
    mlp = tp_gpu.ParallelMLP(5, 7, 5, make_config(n_workers), seed=1)
    block = tp_gpu.Residual(mlp)
    x_np = rng.standard_normal((4, 5))
    x = tp_gpu.tensor(x_np, requires_grad=True)
    y = block(block(block(x)))
    (y * y).sum().backward()

    state = mlp.state_dict()
    fc1, fc2 = torch.nn.Linear(5, 7).double(), torch.nn.Linear(7, 5).double()
    with torch.no_grad():
        for layer, name in ((fc1, "fc1"), (fc2, "fc2")):
            layer.weight.copy_(torch.tensor(state[f"{name}.weight"].T))
            layer.bias.copy_(torch.tensor(state[f"{name}.bias"]))
    xt = torch.tensor(x_np, requires_grad=True)
    h = xt
    for _ in range(3):
        h = h + fc2(torch.nn.functional.gelu(fc1(h)))
    (h * h).sum().backward()
    np.testing.assert_allclose(np.asarray(x.grad), xt.grad.numpy(), rtol=1e-11, atol=1e-11)
    grads = mlp.grads()
    np.testing.assert_allclose(grads["fc1.weight"], fc1.weight.grad.numpy().T, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(grads["fc2.bias"], fc2.bias.grad.numpy(), rtol=1e-11, atol=1e-11)


class Cube(tp_gpu.Function):
    """``y = x^3`` written by a user: forward on Tensors, backward ``3 x^2 dy``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class WrongCube(Cube):
    """A user's mistake: the derivative of ``x^3`` written as ``2 x^2``."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * x * grad


class ScaledProduct(tp_gpu.Function):
    """``y = a * b * scale`` on raw blocks: a user's Function with two inputs and a constant."""

    @staticmethod
    def forward(ctx, a, b, scale):
        ctx.a, ctx.b, ctx.scale = a, b, scale
        return (a * b) * scale

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.b * ctx.scale, grad * ctx.a * ctx.scale, None


def test_user_function_passes_the_gradient_check(rng):
    assert gradcheck(Cube.apply, [rng.standard_normal((3, 4))])
    inputs = [rng.standard_normal(5), rng.standard_normal(5)]
    assert gradcheck(lambda a, b: ScaledProduct.apply(a, b, 2.5), inputs)


def test_the_gradient_check_catches_a_wrong_backward(rng):
    with pytest.raises(GradcheckError, match="input 0 element"):
        gradcheck(WrongCube.apply, [rng.standard_normal((2, 2))])


def test_gradient_check_of_a_layer(make_config, rng):
    """A column layer split three ways: the tape's dX equals finite differences."""
    lin = tp_gpu.ColumnParallelLinear(3, 5, make_config(3))
    assert gradcheck(lin, [rng.standard_normal((2, 3))])


def test_function_backward_of_the_wrong_shape_is_named(rng):
    class Broken(tp_gpu.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad.sum()

    x = tp_gpu.tensor(rng.standard_normal(3), requires_grad=True)
    with pytest.raises(tp_gpu.ShapeError, match=r"Broken.backward returned a gradient of shape \(\) .*\(3,"):
        Broken.apply(x).sum().backward()


def _activation_bytes(mlp, x, grad_mode: bool) -> int:
    """Host bytes still held after a forward whose output is kept, beyond the output itself."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        if grad_mode:
            y = mlp(x)
        else:
            with tp_gpu.no_grad():
                y = mlp(x)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held - y.numpy().nbytes


def test_no_grad_keeps_no_activation(rng):
    """Measured: under no_grad the forward holds nothing but its output; recording holds the
    hidden activations (4 MiB here)."""
    config = tp_gpu.TensorParallelConfig(n_workers=2, dtype="float64", backend="numpy")
    mlp = tp_gpu.ParallelMLP(64, 1024, 64, config)
    x = rng.standard_normal((512, 64))
    hidden_bytes = 512 * 1024 * 8
    recorded = _activation_bytes(mlp, x, grad_mode=True)
    assert recorded >= hidden_bytes  # the pre-activation is kept for backward
    assert _activation_bytes(mlp, x, grad_mode=False) < 64 * 1024  # a few Python objects, no array
    with tp_gpu.no_grad():
        y = mlp(x)
    assert y.grad_fn is None and not y.requires_grad
    with pytest.raises(tp_gpu.TensorParallelError, match="does not require grad"):
        y.sum().backward()


def test_second_backward_raises_and_retain_graph_allows_it(rng):
    lin = tp_gpu.ColumnParallelLinear(3, 2, tp_gpu.TensorParallelConfig(n_workers=2, dtype="float64"))
    loss = lin(rng.standard_normal((4, 3))).sum()
    loss.backward(retain_graph=True)
    once = lin.weight.full_grad()
    loss.backward()
    np.testing.assert_allclose(lin.weight.full_grad(), 2 * once)
    with pytest.raises(tp_gpu.TensorParallelError, match="a second time"):
        loss.backward()
    np.testing.assert_allclose(lin.weight.full_grad(), 2 * once)  # nothing accumulated by the failed call


def test_wrong_gradient_raises_before_anything_is_consumed(make_config, rng):
    lin = tp_gpu.RowParallelLinear(6, 4, make_config(3))
    x = tp_gpu.tensor(rng.standard_normal((2, 6)), requires_grad=True)
    y = lin(x)
    with pytest.raises(
        tp_gpu.ShapeError, match=r"grad has shape \(4, 2\); expected the tensor's shape \(2, 4"
    ):
        y.backward(np.ones((4, 2)))
    assert x.grad is None and not lin.weight.full_grad().any()
    g = rng.standard_normal((2, 4))
    y.backward(g)  # the corrected retry works
    np.testing.assert_allclose(np.asarray(x.grad), g @ lin.full_weight().T, rtol=1e-12, atol=1e-12)


def test_backward_of_a_non_scalar_needs_a_gradient():
    lin = tp_gpu.ColumnParallelLinear(3, 2, tp_gpu.TensorParallelConfig(dtype="float64"))
    y = lin(np.ones((4, 3)))
    with pytest.raises(tp_gpu.ShapeError, match=r"needs a scalar .* got shape \(4, 2\)"):
        y.backward()


@pytest.mark.parametrize("backend_devices", [("numpy", None), ("simulated", 3)])
def test_two_threads_build_their_own_graphs(rng, backend_devices):
    """Two threads each run forward, wait for the other's forward, then backward, through one
    module: each gets its own dX, and the parameters get the sum of both."""
    name, devices = backend_devices
    config = tp_gpu.TensorParallelConfig(n_workers=3, dtype="float64", backend=name, devices=devices)
    mlp = tp_gpu.ParallelMLP(5, 9, 5, config)
    inputs = [rng.standard_normal((4, 5)) for _ in range(2)]
    grads = [rng.standard_normal((4, 5)) for _ in range(2)]
    both_forward = threading.Barrier(2)
    results: dict = {}

    def run(k: int) -> None:
        x = tp_gpu.tensor(inputs[k], requires_grad=True)
        y = mlp(x)
        both_forward.wait()
        y.backward(grads[k])
        results[k] = np.asarray(x.grad)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    threaded = mlp.grads()

    mlp.zero_grad()
    for k in range(2):
        x = tp_gpu.tensor(inputs[k], requires_grad=True)
        mlp(x).backward(grads[k])
        np.testing.assert_allclose(results[k], np.asarray(x.grad), rtol=1e-12, atol=1e-12)
    for name_, grad in mlp.grads().items():
        np.testing.assert_allclose(threaded[name_], grad, rtol=1e-12, atol=1e-12, err_msg=name_)


def test_tensor_arithmetic_on_split_tensors(make_config, rng):
    """Split + Split runs per device; a Replicated bias broadcasts over a Split tensor and its
    gradient is summed over the devices; differing placements raise naming both."""
    config = make_config(3, gather_output=False)
    col = tp_gpu.ColumnParallelLinear(4, 7, config)
    x_np = rng.standard_normal((5, 4))
    y = col(x_np)
    z = col(x_np * 2)
    both = y * z + y
    np.testing.assert_allclose(np.asarray(both), np.asarray(y) * np.asarray(z) + np.asarray(y), rtol=1e-12)

    dense = tp_gpu.ColumnParallelLinear(4, 7, dataclasses.replace(config, gather_output=True))(x_np)
    with pytest.raises(tp_gpu.ShapeError, match=r"placed differently: Split\(axis=1.*Dense"):
        y + dense


def test_host_operand_moves_where_the_tensor_lives(make_config, rng):
    lin = tp_gpu.ColumnParallelLinear(3, 3, make_config(2))
    x = tp_gpu.tensor(rng.standard_normal((2, 3)), requires_grad=True)
    y = x + lin(x)  # x is a host tensor; the sum runs on the output device
    y.backward(np.ones((2, 3)))
    expected = np.ones((2, 3)) + np.ones((2, 3)) @ lin.full_weight().T
    np.testing.assert_allclose(np.asarray(x.grad), expected, rtol=1e-12)


def test_broadcast_gradients_are_summed_like_torch(torch, rng):
    a = tp_gpu.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    b = tp_gpu.tensor(rng.standard_normal((3, 1)), requires_grad=True)
    ((a * b) / (b + 3.0) - a).sum().backward()
    at, bt = (torch.tensor(np.asarray(v), requires_grad=True) for v in (a, b))
    ((at * bt) / (bt + 3.0) - at).sum().backward()
    np.testing.assert_allclose(np.asarray(a.grad), at.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(b.grad), bt.grad.numpy(), rtol=1e-12)


def test_shape_operations_record_their_gradients(torch, rng):
    x_np = rng.standard_normal((3, 4))
    x = tp_gpu.tensor(x_np, requires_grad=True)
    corner = x.transpose()[:1].reshape(1, 3).transpose().reshape(1, 3)[:, :1].reshape(1, 1)
    y = tp_gpu.cat([x[1:], corner * x[:1]], 0)
    (y * y).sum().backward()
    xt = torch.tensor(x_np, requires_grad=True)
    corner_t = xt.T[:1].reshape(1, 3).T.reshape(1, 3)[:, :1].reshape(1, 1)
    yt = torch.cat([xt[1:], corner_t * xt[:1]], 0)
    (yt * yt).sum().backward()
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy())
    np.testing.assert_allclose(np.asarray(x.grad), xt.grad.numpy(), rtol=1e-12)


def test_host_copies_of_every_placement(make_config, rng):
    config = make_config(3, gather_output=False)
    col = tp_gpu.ColumnParallelLinear(4, 7, config, pad_to_multiple_of=4)
    x_np = rng.standard_normal((2, 4))
    split = col(x_np)
    expected = x_np @ col.full_weight() + col.full_bias()
    np.testing.assert_allclose(split.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(tp_gpu.to_numpy(split), expected, rtol=1e-12)
    assert float(split.sum()) == pytest.approx(expected.sum(), rel=1e-12)  # padding left out
    assert float(tp_gpu.tensor(np.array([2.5]))) == 2.5
    with pytest.raises(tp_gpu.ShapeError, match="one element"):
        float(split)
