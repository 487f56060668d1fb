"""layers.gemm.product: float16 on the host multiplies in float32 and rounds once."""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu.backends import get_backend
from tp_gpu.layers.gemm import accumulate_weight_grad, can_accumulate_weight_grad, product, weight_grad


@pytest.mark.parametrize("shapes", [((7, 13), (13, 5)), ((2, 3, 7, 4), (2, 3, 4, 6)), ((1, 1), (1, 1))])
def test_float16_is_the_float32_product_rounded_once(rng, shapes):
    a, b = (rng.standard_normal(s).astype(np.float16) for s in shapes)
    out = product(a, b)
    expected = np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float16)
    assert out.dtype == np.float16 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)
    exact = np.matmul(a.astype(np.float64), b.astype(np.float64))  # the float64 product of the inputs
    assert np.abs(out - exact).max() <= np.abs(np.matmul(a, b) - exact).max() + 1e-3 * np.abs(exact).max()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_other_dtypes_multiply_as_they_are(rng, dtype):
    a, b = rng.standard_normal((5, 9)).astype(dtype), rng.standard_normal((9, 4)).astype(dtype)
    np.testing.assert_array_equal(product(a, b), a @ b)
    assert product(a, b).dtype == np.dtype(dtype)


def test_simulated_device_arrays_stay_on_their_device(rng):
    backend = get_backend("simulated", 2)
    device = backend.devices[1]
    a = backend.to_device(rng.standard_normal((4, 6)).astype(np.float16), device)
    b = backend.to_device(rng.standard_normal((6, 3)).astype(np.float16), device)
    with backend.device(device):
        out = product(a, b)
    assert out.dtype == np.float16 and backend.device_of(out) == device


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2,), (3, 2)])
def test_weight_grad_of_one_row_is_the_outer_product(rng, dtype, lead):
    """One row takes the broadcast product; it must equal the GEMM's numbers (each a single product) and
    keep the dtype; several rows still take the GEMM."""
    inp = rng.standard_normal((*lead, 7)).astype(dtype)
    grad = rng.standard_normal((*lead, 5)).astype(dtype)
    out = weight_grad(inp, grad)
    rows_in, rows_grad = inp.reshape(-1, 7), grad.reshape(-1, 5)
    assert out.shape == (7, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, product(rows_in.T, rows_grad))
    exact = rows_in.astype(np.float64).T @ rows_grad.astype(np.float64)  # (7, N) @ (N, 5)
    np.testing.assert_allclose(out, exact, rtol=1e-3 if dtype == "float16" else 1e-6, atol=1e-6)


def test_weight_grad_of_one_row_stays_on_its_simulated_device(rng):
    backend = get_backend("simulated", 2)
    device = backend.devices[1]
    inp = backend.to_device(rng.standard_normal((1, 6)).astype(np.float32), device)
    grad = backend.to_device(rng.standard_normal((1, 3)).astype(np.float32), device)
    with backend.device(device):
        out = weight_grad(inp, grad)
    assert out.shape == (6, 3) and backend.device_of(out) == device


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lead", [(0,), (2, 0), (1,), (1, 1), (5,), (2, 3)])
def test_accumulate_weight_grad_adds_in_place(rng, dtype, lead):
    """BLAS's ger (one row) or gemm with beta = 1 (more) adds inp^T grad into the target's own memory."""
    target = rng.standard_normal((7, 5)).astype(dtype)
    before, memory = target.copy(), target
    inp = rng.standard_normal((*lead, 7)).astype(dtype)
    grad = rng.standard_normal((*lead, 5)).astype(dtype)
    assert can_accumulate_weight_grad(target, inp, grad)
    accumulate_weight_grad(target, inp, grad)
    assert target is memory and target.flags.c_contiguous
    rows_in, rows_grad = inp.reshape(-1, 7).astype(np.float64), grad.reshape(-1, 5).astype(np.float64)
    exact = before.astype(np.float64) + rows_in.T @ rows_grad  # (7, N) @ (N, 5)
    np.testing.assert_allclose(target, exact, rtol=1e-5 if dtype == "float32" else 1e-13, atol=1e-6)


def test_accumulate_weight_grad_refuses_what_blas_cannot_take_in_place(rng):
    inp, grad = rng.standard_normal((1, 4)), rng.standard_normal((1, 3))
    assert not can_accumulate_weight_grad(np.zeros((4, 3), np.float16), inp, grad)
    assert not can_accumulate_weight_grad(np.zeros((3, 4)).T, inp, grad)  # not C-contiguous
    frozen = np.zeros((4, 3))
    frozen.flags.writeable = False
    assert not can_accumulate_weight_grad(frozen, inp, grad)
    assert not can_accumulate_weight_grad(np.zeros((4, 3), np.float32), inp, grad)  # dtypes differ
    simulated = get_backend("simulated", 2)
    on_device = simulated.to_device(np.zeros((4, 3)), simulated.devices[0])
    assert not can_accumulate_weight_grad(on_device, inp, grad)  # a device array keeps its own path
