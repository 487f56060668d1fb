"""tp_gpu.to_numpy: the documented way to bring any result to the host, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import tp_gpu as tp
from tp_gpu.errors import DeviceMismatchError


def test_a_device_output_mixes_with_host_arrays_only_through_to_numpy(make_config, rng):
    fc1 = tp.ColumnParallelLinear(6, 11, make_config(3, gather_output=False), seed=0)
    fc2 = tp.RowParallelLinear(11, 5, make_config(3), seed=1)
    x = rng.standard_normal((4, 6))
    h, y = fc1(x), fc2(fc1(x))
    expected = x @ fc1.full_weight() @ fc2.full_weight() + fc2.full_bias()  # (4, 6) @ (6, 11) @ (11, 5)
    for value in (tp.to_numpy(y), tp.to_numpy(h) @ fc2.full_weight() + fc2.full_bias()):
        assert type(value) is np.ndarray
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-12)


def test_a_tensor_moves_a_host_operand_and_a_raw_device_block_refuses_one(rng):
    """``Tensor - host array`` copies the host array where the tensor lives (tp_gpu.ops); the raw
    device block underneath refuses to mix with host arrays, as CuPy does: the reason to_numpy exists."""
    layer = tp.RowParallelLinear(7, 3, tp.TensorParallelConfig(n_workers=2, backend="simulated", devices=2))
    y = layer(rng.standard_normal((2, 7)))
    offset = rng.standard_normal((2, 3))
    diff = y - offset
    assert isinstance(diff, tp.Tensor) and diff.placement == y.placement
    np.testing.assert_allclose(tp.to_numpy(diff), tp.to_numpy(y) - offset, rtol=1e-6)
    (block,) = y.blocks.values()
    with pytest.raises(DeviceMismatchError):
        block - np.zeros((2, 3))
    assert np.array_equal(tp.to_numpy(y) - np.zeros((2, 3)), tp.to_numpy(y))


def test_a_sharded_tensor_is_gathered_in_logical_order(rng):
    cfg = tp.TensorParallelConfig(
        n_workers=4, backend="simulated", devices=3, gather_output=False, dtype="float64"
    )
    layer = tp.ColumnParallelLinear(5, 13, cfg)
    x = rng.standard_normal((2, 3, 5))
    np.testing.assert_allclose(tp.to_numpy(layer(x)), x @ layer.full_weight() + layer.full_bias(), rtol=1e-12)


@pytest.mark.parametrize("value", [[1.0, 2.0], 3.5, np.arange(4.0)])
def test_host_values_pass_through(value):
    out = tp.to_numpy(value)
    assert type(out) is np.ndarray and np.array_equal(out, np.asarray(value))


def test_a_host_array_is_not_copied():
    a = np.arange(6.0)
    assert tp.to_numpy(a) is a


def test_a_torch_tensor():
    torch = pytest.importorskip("torch")
    t = torch.arange(6.0).reshape(2, 3).t()  # strided
    np.testing.assert_array_equal(tp.to_numpy(t), t.numpy())
