"""LayerNorm: dense float64 reference forward and backward on every backend and worker count,
float32/float16 statistics, torch.nn.LayerNorm, eval mode and bad input.

Also home of the helpers the attention, transformer and embedding tests share:
``placements`` (which backend x worker-count cases to run) and
``directional_check`` (gradients against float64 central differences).
"""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np
import pytest
from conftest import BACKEND_SPECS, WORKER_COUNTS
from helpers import device_of, forward_backward, to_host

import tp_gpu
from tp_gpu import ConfigError, LayerNorm, ShapeError, TensorParallelConfig, TensorParallelError, regions
from tp_gpu.placements import Dense, Partial
from tp_gpu.tensor import new_tensor
from tp_gpu.testing import assert_close

# ---------------------------------------------------------------------------- shared helpers

#: Worker counts run on 1 and 8 simulated devices (every count runs on numpy, sim3 and cupy):
#: one worker, uneven counts and all eight.
FEWER = {"sim1": (1, 5, 8), "sim8": (2, 5, 7, 8)}


def placements(fewer: Dict[str, tuple] = FEWER):
    """``(backend_spec, n_workers)`` cases for ``parametrize(..., indirect=["backend_spec"])``."""
    cases = []
    for spec in BACKEND_SPECS:
        name = spec.id
        for n in fewer.get(name, WORKER_COUNTS):
            cases.append(pytest.param(spec.values[0], n, id=f"{name}-{n}", marks=spec.marks))
    return cases


PLACEMENTS = placements()


def directional_check(loss: Callable[[Dict[str, np.ndarray]], float], point, grads, rng, eps: float = 1e-6):
    """Each gradient in ``grads`` against the central difference of ``loss`` along a random direction.

    ``loss`` maps ``{name: array}`` (``point`` with one entry moved) to a float64
    scalar; ``grads[name]`` must satisfy ``<grad, u> = (loss(p + eps u) - loss(p - eps u)) / 2 eps``
    to 1e-7 relative: a wrong, missing, misplaced or transposed gradient is off by O(1).
    """
    for name, grad in grads.items():
        u = rng.standard_normal(point[name].shape)
        plus = {**point, name: point[name] + eps * u}
        minus = {**point, name: point[name] - eps * u}
        numeric = (loss(plus) - loss(minus)) / (2 * eps)
        analytic = float(np.sum(np.asarray(grad, dtype=np.float64) * u))
        assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(numeric)), (name, numeric, analytic)


def dense_layer_norm(x, weight, bias, eps):
    """float64 reference: (x - mean) / sqrt(var + eps) * weight + bias over the last axis."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# ---------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("backend_spec, n_workers", PLACEMENTS, indirect=["backend_spec"])
def test_matches_dense_forward_and_backward(make_config, rng, n_workers):
    h = 13
    norm = LayerNorm(h, make_config(n_workers), eps=1e-5)
    point = {
        "x": rng.standard_normal((3, 5, h)) * 2 + 0.5,
        "weight": rng.standard_normal(h),
        "bias": rng.standard_normal(h),
    }
    norm.load_dense(point["weight"], point["bias"])
    expected = dense_layer_norm(point["x"], point["weight"], point["bias"], 1e-5)
    g = rng.standard_normal(expected.shape)
    y, dx = forward_backward(norm, point["x"], g)
    assert device_of(norm, y) == norm.output_device
    assert_close(to_host(norm, y), expected, "float64", h, "LayerNorm forward")
    assert device_of(norm, dx) == norm.output_device
    grads = {"x": to_host(norm, dx), **norm.grads()}
    for param in norm.parameters():  # gradients stay with their parameter, on the output device
        assert list(param.grad_blocks) == [norm.output_device]

    def loss(p):
        return float(np.sum(g * dense_layer_norm(p["x"], p["weight"], p["bias"], 1e-5)))

    directional_check(loss, point, grads, rng)


def test_gradients_accumulate_over_backward_calls(rng):
    norm = LayerNorm(6, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64"))
    x, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    norm(x).backward(g)
    once = norm.grads()
    norm(x).backward(g)
    for name, grad in norm.grads().items():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12)
    np.testing.assert_allclose(once["bias"], g.sum(axis=0), rtol=1e-12)  # dbias = sum(dy), independently


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("backend_spec", BACKEND_SPECS[:3], indirect=True)
def test_lower_precision_stays_in_its_dtype(make_config, rng, dtype):
    h = 128  # a float16 sum of 128 values near 600 overflows: the statistics must be float32
    norm = LayerNorm(h, make_config(3, dtype=dtype))
    x = (600 + rng.standard_normal((2, 3, h))).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y, dx = forward_backward(norm, x, g)
    assert y.dtype == np.dtype(dtype)
    expected = dense_layer_norm(x.astype(np.float64), 1.0, 0.0, 1e-5)
    assert np.isfinite(to_host(norm, y)).all()
    assert_close(to_host(norm, y), expected, dtype, h, f"LayerNorm {dtype}")  # the mean sums h terms
    assert dx.dtype == np.dtype(dtype) and norm.weight.grad_blocks[norm.output_device].dtype == np.dtype(
        dtype
    )
    xhat = expected
    g64 = g.astype(np.float64)
    expected_dx = (g64 - g64.mean(-1, keepdims=True) - xhat * (g64 * xhat).mean(-1, keepdims=True)) / np.sqrt(
        x.astype(np.float64).var(-1, keepdims=True) + 1e-5
    )
    assert_close(to_host(norm, dx), expected_dx, dtype, h, f"LayerNorm {dtype} dx")
    assert_close(
        norm.grads()["weight"], (g64 * xhat).sum(axis=(0, 1)), dtype, 6, f"LayerNorm {dtype} dweight"
    )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_matches_torch_layer_norm(rng, n_workers, dtype):
    torch = pytest.importorskip("torch")
    h, eps = 11, 1e-12
    ref = torch.nn.LayerNorm(h, eps=eps, dtype=getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.standard_normal(h)))
        ref.bias.copy_(torch.from_numpy(rng.standard_normal(h)))
    norm = LayerNorm(
        h, TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype=dtype), eps=eps
    )
    norm.load_dense(ref.weight, ref.bias)  # torch tensors, through DLPack
    x = torch.from_numpy(rng.standard_normal((2, 7, h)).astype(dtype)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((2, 7, h)).astype(dtype))
    y_ref = ref(x)
    (y_ref * g).sum().backward()
    y, dx = forward_backward(norm, x.detach(), g)  # torch tensors, through DLPack
    assert_close(to_host(norm, y), y_ref.detach().numpy(), dtype, h, "vs torch forward")
    assert_close(to_host(norm, dx), x.grad.numpy(), dtype, h, "vs torch dx")
    assert_close(norm.grads()["weight"], ref.weight.grad.numpy(), dtype, 14, "vs torch dweight")
    assert_close(norm.grads()["bias"], ref.bias.grad.numpy(), dtype, 14, "vs torch dbias")


def test_parameters_and_output_on_the_output_device(rng):
    config = TensorParallelConfig(
        n_workers=4, backend="simulated", devices=3, output_device=2, dtype="float64"
    )
    norm = LayerNorm(5, config)
    assert [name for name, _ in norm.named_parameters()] == ["weight", "bias"]
    assert {d for p in norm.parameters() for d in p.blocks} == {2}
    np.testing.assert_array_equal(norm.state_dict()["weight"], np.ones(5))
    np.testing.assert_array_equal(norm.state_dict()["bias"], np.zeros(5))
    assert device_of(norm, norm(rng.standard_normal((2, 5)))) == 2


def test_no_grad_keeps_nothing(rng):
    norm = LayerNorm(4, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    recorded = norm(rng.standard_normal((3, 4)))
    assert recorded.grad_fn.ctx.xhat  # recording keeps xhat and rstd for backward
    with tp_gpu.no_grad():
        y = norm(rng.standard_normal((3, 4)))
    assert y.grad_fn is None and not y.requires_grad  # nothing recorded, no activation kept
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(np.ones((3, 4)))
    assert all(g is None for p in norm.parameters() for g in p.grad_blocks.values())


@pytest.mark.parametrize("p", [1, 3, 8])
def test_sequence_slices_equal_the_dense_norm(rng, p):
    """A sequence-split input is normalised where its slices lie, with the parameters copied to each
    device; the per-device parameter gradients are summed onto the output device."""
    config = TensorParallelConfig(
        n_workers=p, backend="simulated", devices=3, output_device=1, dtype="float64"
    )
    dense, norm = LayerNorm(7, config), LayerNorm(7, config)
    weight, bias = rng.standard_normal(7), rng.standard_normal(7)
    for layer in (dense, norm):
        layer.load_dense(weight, bias)
    x, g = rng.standard_normal((2, 6, 7)), rng.standard_normal((2, 6, 7))
    split = regions.scatter_to_sequence_parallel_region(x, norm.group)
    y, dx = forward_backward(norm, split, g)
    y_dense, dx_dense = forward_backward(dense, x, g)
    assert y.placement == split.placement and dx.placement == split.placement
    np.testing.assert_allclose(to_host(norm, y), to_host(dense, y_dense), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(norm, dx), to_host(dense, dx_dense), rtol=1e-12, atol=1e-12)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(norm.grads()[name], grad, rtol=1e-12, atol=1e-12, err_msg=name)
    assert all(list(param.grad_blocks) == [1] for param in norm.parameters())


def test_dense_input_on_another_device_runs_there(rng):
    """A dense input on a device other than the parameters' is normalised where it lies, beside a copy
    of the parameters; their gradients go back to the output device."""
    norm = LayerNorm(5, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64"))
    weight, bias = rng.standard_normal(5), rng.standard_normal(5)
    norm.load_dense(weight, bias)
    x, g = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    on_two = new_tensor({2: norm.backend.asarray(x, np.float64, 2)}, Dense(2), x.shape, x.dtype, norm.backend)
    y, dx = forward_backward(norm, on_two, g)
    assert device_of(norm, y) == 2 and device_of(norm, dx) == 2
    reference = LayerNorm(5, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    reference.load_dense(weight, bias)
    y_ref, dx_ref = forward_backward(reference, x, g)
    np.testing.assert_allclose(to_host(norm, y), to_host(reference, y_ref), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_host(norm, dx), to_host(reference, dx_ref), rtol=1e-12, atol=1e-14)
    for name, grad in reference.grads().items():
        np.testing.assert_allclose(norm.grads()[name], grad, rtol=1e-12, atol=1e-14, err_msg=name)
    assert all(list(param.grad_blocks) == [norm.output_device] for param in norm.parameters())


def test_partial_sums_and_feature_splits_are_refused(rng):
    config = TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64")
    norm = LayerNorm(6, config)
    x = rng.standard_normal((3, 6))
    blocks = {d: norm.backend.asarray(x / 2, np.float64, d) for d in (0, 1)}
    partial = new_tensor(blocks, Partial((0, 1)), x.shape, x.dtype, norm.backend)
    with pytest.raises(ShapeError, match="LayerNorm input must be whole or split on any axis but the last"):
        norm(partial)
    by_feature = regions.scatter_to_region(x, norm.group, norm.group.split(6, what="features"))
    with pytest.raises(ShapeError, match="any axis but the last"):
        norm(by_feature)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"normalized_shape": 0}, "normalized_shape"),
        ({"normalized_shape": 4, "eps": 0.0}, r"eps must be a positive finite number, got 0\.0"),
        ({"normalized_shape": 4, "eps": float("nan")}, "eps"),
        ({"normalized_shape": 4, "eps": "1e-5"}, "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LayerNorm(**kwargs)


def test_bad_input_raises_and_changes_nothing(rng):
    norm = LayerNorm(6, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    x = rng.standard_normal((2, 6))
    norm(x)
    with pytest.raises(ShapeError, match=r"\(\.\.\., 6\), got \(2, 5\)"):
        norm(rng.standard_normal((2, 5)))
    with pytest.raises(ShapeError, match="real numbers"):
        norm(np.ones((2, 6), dtype=complex))
    with pytest.raises(ShapeError, match=r"must have shape \(6,\)"):
        norm.load_dense(np.ones(5), np.zeros(6))
    np.testing.assert_array_equal(norm.state_dict()["weight"], np.ones(6))  # nothing loaded
    g = rng.standard_normal((2, 6))
    y = norm(x)
    with pytest.raises(ShapeError, match=r"grad has shape \(3, 6\); expected the tensor's shape \(2, 6\)"):
        y.backward(rng.standard_normal((3, 6)))
    assert all(g is None for p in norm.parameters() for g in p.grad_blocks.values())
    y.backward(g)  # the layer (and this graph) still works after every error
    expected = LayerNorm(6, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    _, dx = forward_backward(norm, x, g)
    _, expected_dx = forward_backward(expected, x, g)
    np.testing.assert_allclose(to_host(norm, dx), to_host(expected, expected_dx), rtol=1e-12, atol=1e-14)
