"""The vectorised float32 erf: within 1e-7 of SciPy's exact erf everywhere, shaped and typed as its
input, and chosen only for float32 NumPy arrays."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from tp_gpu.backends import get_backend
from tp_gpu.backends.base import erf_function
from tp_gpu.backends.host_erf import NUMBERS_PER_THREAD, PIECE, erf_float32


def exact(z: np.ndarray) -> np.ndarray:
    return scipy.special.erf(z.astype(np.float64))


def test_within_1e7_on_a_dense_grid():
    z = np.linspace(-6.0, 6.0, 1_200_001).astype(np.float32)  # spans several pieces, not a multiple
    err = np.abs(erf_float32(z) - exact(z))
    assert err.max() < 1e-7, f"max |erf_float32 - erf| = {err.max():.3g} at z = {z[err.argmax()]}"


def test_small_arguments_keep_relative_accuracy():
    """Near 0, erf(z) ~ 2z/sqrt(pi): the result must keep float32's relative precision there."""
    z = np.float32(10.0) ** -np.arange(1, 38, dtype=np.float32)
    z = np.concatenate([z, -z])
    rel = np.abs(erf_float32(z) - exact(z)) / np.abs(exact(z))
    assert rel.max() < 4e-7, f"max relative error {rel.max():.3g} at z = {z[rel.argmax()]}"
    subnormal = np.array([1e-45, -3e-42], dtype=np.float32)  # rounds as the exact value rounds
    np.testing.assert_array_equal(erf_float32(subnormal), exact(subnormal).astype(np.float32))


def test_special_values():
    z = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.0e38, -3.0e38], dtype=np.float32)
    got = erf_float32(z)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[:4], [0.0, 0.0, 1.0, -1.0])
    assert np.signbit(got[1]), "erf(-0) is -0"
    assert np.isnan(got[4])
    np.testing.assert_array_equal(got[5:], [1.0, -1.0])


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (1,), (7, 5, 3), (PIECE + 1,), (2, PIECE // 2 + 3)])
def test_shape_and_dtype_kept(shape):
    z = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    got = erf_float32(z)
    assert got.shape == z.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, exact(z), rtol=0, atol=1e-7)


def test_strided_input_and_input_unchanged():
    base = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)
    view = base.T[::2]
    before = base.copy()
    np.testing.assert_allclose(erf_float32(view), exact(view), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(base, before)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_give_the_same_numbers(threads):
    z = np.random.default_rng(2).standard_normal(3 * NUMBERS_PER_THREAD + 12345).astype(np.float32) * 3
    np.testing.assert_array_equal(erf_float32(z, threads=threads), erf_float32(z))


def test_chosen_only_for_float32_numpy(monkeypatch):
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "3")
    chosen = erf_function(np, np.float32)
    assert chosen.func is erf_float32 and chosen.keywords == {"threads": 3}
    assert erf_function(np, np.float64) is scipy.special.erf
    assert erf_function(np) is scipy.special.erf
    assert erf_function(np, np.float16) is scipy.special.erf
    simulated = get_backend("simulated", 2).xp
    assert erf_function(simulated, np.float32) is scipy.special.erf  # keeps the devices' checks
