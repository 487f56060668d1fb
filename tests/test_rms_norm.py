"""RMSNorm: dense float64 reference forward and backward on every backend and worker count, sequence
slices, replicated input, float16 in transformers' numerics, LlamaRMSNorm, gradcheck and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import device_of, forward_backward, to_host
from test_norm import PLACEMENTS, directional_check

import tp_gpu
from tp_gpu import ConfigError, ShapeError, TensorParallelConfig, regions
from tp_gpu.layers.rms_norm import RMSNorm, RMSNormFunction
from tp_gpu.placements import Partial, Replicated
from tp_gpu.tensor import new_tensor
from tp_gpu.testing import assert_close, gradcheck


def dense_rms_norm(x, weight, eps):
    """float64 reference: x / sqrt(mean(x^2) + eps) * weight over the last axis."""
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


@pytest.mark.parametrize("backend_spec, n_workers", PLACEMENTS, indirect=["backend_spec"])
def test_matches_dense_forward_and_backward(make_config, rng, n_workers):
    h = 13
    norm = RMSNorm(h, make_config(n_workers), eps=1e-5)
    point = {"x": rng.standard_normal((3, 5, h)) * 2 + 0.5, "weight": rng.standard_normal(h)}
    norm.load_dense(point["weight"])
    expected = dense_rms_norm(point["x"], point["weight"], 1e-5)
    g = rng.standard_normal(expected.shape)
    y, dx = forward_backward(norm, point["x"], g)
    assert device_of(norm, y) == norm.output_device and device_of(norm, dx) == norm.output_device
    assert_close(to_host(norm, y), expected, "float64", h, "RMSNorm forward")
    assert list(norm.weight.grad_blocks) == [norm.output_device]
    grads = {"x": to_host(norm, dx), **norm.grads()}

    def loss(p):
        return float(np.sum(g * dense_rms_norm(p["x"], p["weight"], 1e-5)))

    directional_check(loss, point, grads, rng)


def test_backward_is_the_closed_form(rng):
    """dx = rstd (g - xhat mean(g xhat)), g = dy w; dweight = sum(dy xhat): the formula, independently."""
    norm = RMSNorm(7, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    w = rng.standard_normal(7)
    norm.load_dense(w)
    x, dy = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    _, dx = forward_backward(norm, x, dy)
    rstd = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    xhat, g = x * rstd, dy * w
    np.testing.assert_allclose(
        to_host(norm, dx), rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), rtol=1e-12
    )
    np.testing.assert_allclose(norm.grads()["weight"], (dy * xhat).sum(0), rtol=1e-12)


@pytest.mark.parametrize("p", [1, 3, 8])
def test_sequence_slices_equal_the_dense_norm(rng, p):
    """A sequence-split input is normalised where its slices lie; the per-device weight gradients are
    summed onto the output device."""
    config = TensorParallelConfig(
        n_workers=p, backend="simulated", devices=3, output_device=1, dtype="float64"
    )
    norm = RMSNorm(7, config)
    weight = rng.standard_normal(7)
    norm.load_dense(weight)
    x, g = rng.standard_normal((2, 6, 7)), rng.standard_normal((2, 6, 7))
    split = regions.scatter_to_sequence_parallel_region(x, norm.group)
    y, dx = forward_backward(norm, split, g)
    assert y.placement == split.placement and dx.placement == split.placement
    xhat = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    assert_close(to_host(norm, y), xhat * weight, "float64", 7)
    dense = RMSNorm(7, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    dense.load_dense(weight)
    _, dx_dense = forward_backward(dense, x, g)
    np.testing.assert_allclose(to_host(norm, dx), to_host(dense, dx_dense), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(norm.grads()["weight"], dense.grads()["weight"], rtol=1e-12, atol=1e-13)
    assert list(norm.weight.grad_blocks) == [1]


def test_replicated_input_gives_replicated_output(rng):
    norm = RMSNorm(5, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64"))
    weight = rng.standard_normal(5)
    norm.load_dense(weight)
    x, g = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    leaf = tp_gpu.tensor(x, requires_grad=True)
    copies = regions.copy_to_region(leaf, norm.group)
    y = norm(copies)
    assert isinstance(y.placement, Replicated) and y.placement == copies.placement
    for block in y.blocks.values():
        assert_close(norm.backend.to_host(block), dense_rms_norm(x, weight, 1e-6), "float64", 5)
    y.backward(g)  # each copy's dY is one part of the whole: the Partial dX sums them, as does dweight
    dense = RMSNorm(5, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    dense.load_dense(weight)
    _, dx = forward_backward(dense, x, g)
    np.testing.assert_allclose(np.asarray(leaf.grad), to_host(dense, dx), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(norm.grads()["weight"], dense.grads()["weight"], rtol=1e-12)


def test_float16_follows_transformers_numerics(rng):
    """float32 statistics (a float16 sum of 256 squares near 300 overflows), xhat cast to float16 before
    the weight: y is exactly float16(float16(xhat) * weight)."""
    h = 256
    norm = RMSNorm(h, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float16"))
    weight = (1 + rng.standard_normal(h) / 4).astype(np.float16)
    norm.load_dense(weight)
    x = (300 + 5 * rng.standard_normal((2, 3, h))).astype(np.float16)
    g = rng.standard_normal(x.shape).astype(np.float16)
    y, dx = forward_backward(norm, x, g)
    assert (
        y.dtype == dx.dtype == np.float16 and norm.weight.grad_blocks[norm.output_device].dtype == np.float16
    )
    x32 = x.astype(np.float32)
    xhat16 = (x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + np.float32(1e-6))).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(y), xhat16 * weight)
    expected = dense_rms_norm(x.astype(np.float64), weight.astype(np.float64), 1e-6)
    assert_close(to_host(norm, y), expected, "float16", 1, "float16 forward")
    assert np.isfinite(to_host(norm, dx)).all()
    ref = RMSNorm(h, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    ref.load_dense(weight.astype(np.float64))
    _, dx_ref = forward_backward(ref, x.astype(np.float64), g.astype(np.float64))
    assert_close(to_host(norm, dx), to_host(ref, dx_ref), "float16", h, "float16 dx")
    assert_close(norm.grads()["weight"], ref.grads()["weight"], "float16", 6, "float16 dweight")


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_matches_llama_rms_norm_in_float32(rng, n_workers):
    """transformers computes in float32 whatever the input (float64 too): compared in float32."""
    dtype = "float32"
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    h, eps = 11, 1e-6
    ref = modeling.LlamaRMSNorm(h, eps=eps).to(getattr(torch, dtype))
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(rng.standard_normal(h)))
    norm = RMSNorm(
        h, TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype=dtype), eps=eps
    )
    norm.load_dense(ref.weight.detach())  # a torch tensor, through DLPack
    x = torch.from_numpy(rng.standard_normal((2, 7, h)).astype(dtype)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((2, 7, h)).astype(dtype))
    y_ref = ref(x)
    (y_ref * g).sum().backward()
    y, dx = forward_backward(norm, x.detach(), g)
    np.testing.assert_allclose(to_host(norm, y), y_ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(norm, dx), x.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.grads()["weight"], ref.weight.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_gradcheck(rng):
    """dx by finite differences, through the module and through the Function with its parameter
    (dweight is checked by the directional test above)."""
    norm = RMSNorm(5, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), eps=1e-3)
    norm.load_dense(rng.standard_normal(5))
    x0 = rng.standard_normal((3, 5))
    assert gradcheck(lambda x: norm(x), [x0])
    assert gradcheck(lambda x: RMSNormFunction.apply(x, norm.weight, 1e-3, np.dtype("float64")), [x0])


def test_no_grad_keeps_nothing(rng):
    norm = RMSNorm(4, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    assert norm(rng.standard_normal((3, 4))).grad_fn.ctx.xhat
    with tp_gpu.no_grad():
        y = norm(rng.standard_normal((3, 4)))
    assert y.grad_fn is None and not y.requires_grad


def test_parameters_state_and_repr(rng):
    config = TensorParallelConfig(
        n_workers=4, backend="simulated", devices=3, output_device=2, dtype="float64"
    )
    norm = RMSNorm(5, config, eps=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    assert list(norm.weight.blocks) == [2]
    np.testing.assert_array_equal(norm.state_dict()["weight"], np.ones(5))
    assert repr(norm) == "RMSNorm(5, eps=1e-05, dtype='float64', on=2)"
    with pytest.raises(ShapeError, match="weight"):
        norm.load_dense(np.ones(6))
    np.testing.assert_array_equal(norm.state_dict()["weight"], np.ones(5))  # unchanged


def test_partial_sums_and_feature_splits_are_refused(rng):
    norm = RMSNorm(6, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    x = rng.standard_normal((3, 6))
    blocks = {d: norm.backend.asarray(x / 2, np.float64, d) for d in (0, 1)}
    partial = new_tensor(blocks, Partial((0, 1)), x.shape, x.dtype, norm.backend)
    with pytest.raises(ShapeError, match="RMSNorm input must be whole or split on any axis but the last"):
        norm(partial)
    by_feature = regions.scatter_to_region(x, norm.group, norm.group.split(6))
    with pytest.raises(ShapeError, match="any axis but the last"):
        norm(by_feature)
    with pytest.raises(ShapeError, match=r"RMSNorm input must have shape \(\.\.\., 6\), got \(3, 5\)"):
        norm(rng.standard_normal((3, 5)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hidden": 0}, "hidden"),
        ({"hidden": 4, "eps": 0.0}, r"eps must be a positive finite number, got 0\.0"),
        ({"hidden": 4, "eps": float("nan")}, "eps"),
        ({"hidden": 4, "eps": "1e-6"}, "eps"),
        ({"hidden": 4, "eps": True}, "eps"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RMSNorm(**kwargs)
