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
from helpers import to_host

from tp_gpu import ConfigError, LayerNorm, ShapeError, TensorParallelConfig, TensorParallelError
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
    y = norm(point["x"])
    assert norm.backend.device_of(y) == norm.output_device
    expected = dense_layer_norm(point["x"], point["weight"], point["bias"], 1e-5)
    assert_close(to_host(norm, y), expected, "float64", h, "LayerNorm forward")
    g = rng.standard_normal(expected.shape)
    dx = norm.backward(g)
    assert norm.backend.device_of(dx) == norm.output_device
    grads = {"x": to_host(norm, dx), **norm.grads()}
    for param in norm.parameters():  # gradients stay with their parameter, on the output device
        assert list(param.grad_blocks) == [norm.output_device]

    def loss(p):
        return float(np.sum(g * dense_layer_norm(p["x"], p["weight"], p["bias"], 1e-5)))

    directional_check(loss, point, grads, rng)


def test_gradients_accumulate_over_backward_calls(rng):
    norm = LayerNorm(6, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64"))
    x, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    norm(x)
    norm.backward(g)
    once = norm.grads()
    norm(x)
    norm.backward(g)
    for name, grad in norm.grads().items():
        np.testing.assert_allclose(grad, 2 * once[name], rtol=1e-12)
    np.testing.assert_allclose(once["bias"], g.sum(axis=0), rtol=1e-12)  # dbias = sum(dy), independently


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("backend_spec", BACKEND_SPECS[:3], indirect=True)
def test_lower_precision_stays_in_its_dtype(make_config, rng, dtype):
    h = 128  # a float16 sum of 128 values near 600 overflows: the statistics must be float32
    norm = LayerNorm(h, make_config(3, dtype=dtype))
    x = (600 + rng.standard_normal((2, 3, h))).astype(dtype)
    y = norm(x)
    assert y.dtype == np.dtype(dtype)
    expected = dense_layer_norm(x.astype(np.float64), 1.0, 0.0, 1e-5)
    assert np.isfinite(to_host(norm, y)).all()
    assert_close(to_host(norm, y), expected, dtype, h, f"LayerNorm {dtype}")  # the mean sums h terms
    g = rng.standard_normal(x.shape).astype(dtype)
    dx = norm.backward(g)
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
    assert_close(to_host(norm, norm(x)), y_ref.detach().numpy(), dtype, h, "vs torch forward")
    assert_close(to_host(norm, norm.backward(g)), x.grad.numpy(), dtype, h, "vs torch dx")
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
    assert norm.backend.device_of(norm(rng.standard_normal((2, 5)))) == 2


def test_eval_keeps_nothing(rng):
    norm = LayerNorm(4, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    norm(rng.standard_normal((3, 4)))
    norm.eval()
    assert norm._saved is None
    norm(rng.standard_normal((3, 4)))
    assert norm._saved is None
    with pytest.raises(TensorParallelError, match="without a preceding forward"):
        norm.backward(np.ones((3, 4)))


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
    with pytest.raises(ShapeError, match=r"grad_output must have shape \(2, 6\), got \(3, 6\)"):
        norm.backward(rng.standard_normal((3, 6)))
    norm(x)
    dx = to_host(norm, norm.backward(g))  # the layer still works after every error
    expected = LayerNorm(6, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    expected(x)
    np.testing.assert_allclose(dx, to_host(expected, expected.backward(g)), rtol=1e-12, atol=1e-14)
