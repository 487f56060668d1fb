"""DLPack input without PyTorch: a minimal producer stands in for a torch tensor or JAX array.

``Producer`` exposes only ``__dlpack__`` and ``__dlpack_device__`` (no
``__array__``, no ``shape``), so these tests prove that the layers go through
DLPack, and they run wherever NumPy does. tests/test_torch_interop.py repeats
the important ones with real PyTorch tensors.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import forward_backward, to_host

from tp_gpu import (
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    TensorParallelError,
)
from tp_gpu.backends import from_dlpack, host_array
from tp_gpu.layers.base import as_array_like


class Producer:
    """A foreign array that can only be read through DLPack."""

    def __init__(self, array: np.ndarray, device=None, fail: Exception = None) -> None:
        self._array = array
        self._device = device
        self._fail = fail

    def __dlpack__(self, *args, **kwargs):
        if self._fail is not None:
            raise self._fail
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._device if self._device is not None else self._array.__dlpack_device__()


class NeedsDetach(Producer):
    """Like a torch tensor with requires_grad=True: it refuses export until detached."""

    requires_grad = True

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("Can't export tensors that require gradient, use tensor.detach()")

    def detach(self):
        return Producer(self._array)


def test_host_import_shares_memory(rng):
    a = rng.standard_normal((3, 4))
    for imported in (from_dlpack(Producer(a)), as_array_like(Producer(a), "x"), host_array(Producer(a))):
        assert type(imported) is np.ndarray
        assert np.shares_memory(imported, a)  # zero copy
        np.testing.assert_array_equal(imported, a)


def test_non_contiguous_producer(rng):
    a = rng.standard_normal((4, 6))[:, ::2].T  # strided view
    np.testing.assert_array_equal(from_dlpack(Producer(a)), a)


def test_requires_grad_is_read_through_detach(rng):
    a = rng.standard_normal((2, 3))
    np.testing.assert_array_equal(from_dlpack(NeedsDetach(a)), a)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_layers_accept_dlpack_input(make_config, rng, n_workers):
    column = ColumnParallelLinear(5, 3 * n_workers, make_config(n_workers), seed=1)
    row = RowParallelLinear(3 * n_workers, 4, make_config(n_workers), seed=2)
    embedding = ParallelEmbedding(3 * n_workers, 4, seed=3, config=make_config(n_workers))
    mlp = ParallelMLP(5, 3 * n_workers, 4, make_config(n_workers), seed=4)
    x5, xr = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 3 * n_workers))
    ids = rng.integers(0, 3 * n_workers, size=(2, 5))
    for layer, x, foreign in (
        (column, x5, Producer(x5)),
        (column, x5, NeedsDetach(x5)),
        (row, xr, Producer(xr)),
        (embedding, ids, Producer(ids)),
        (mlp, x5, Producer(x5)),
    ):
        np.testing.assert_array_equal(to_host(layer, layer(foreign)), to_host(layer, layer(x)))


def test_backward_accepts_dlpack_gradients(make_config, rng):
    layer = ColumnParallelLinear(4, 6, make_config(3), seed=0)
    x, g = rng.standard_normal((5, 4)), rng.standard_normal((5, 6))
    _, dx = forward_backward(layer, x, Producer(g))  # y.backward(a DLPack gradient)
    dx = to_host(layer, dx)
    np.testing.assert_allclose(dx, g @ layer.full_weight().T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads()["weight"], x.T @ g, rtol=1e-12, atol=1e-12)


def test_load_dense_accepts_dlpack(make_config, rng):
    weight, bias = rng.standard_normal((6, 4)), rng.standard_normal(6)
    layer = ColumnParallelLinear.from_dense(Producer(weight), Producer(bias), make_config(2), layout="out_in")
    np.testing.assert_array_equal(layer.full_weight(), weight.T)
    np.testing.assert_array_equal(layer.full_bias(), bias)
    layer.load_state_dict({"weight": Producer(weight.T), "bias": NeedsDetach(bias)})
    np.testing.assert_array_equal(layer.full_weight(), weight.T)


def test_gpu_array_without_cupy_is_a_clear_error(make_config, rng, monkeypatch):
    layer = ColumnParallelLinear(4, 6, make_config(2), seed=0)  # built first: the cupy backend imports CuPy
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes ``import cupy`` raise ImportError
    gpu = Producer(rng.standard_normal((2, 4)), device=(2, 1))  # kDLCUDA, GPU 1
    with pytest.raises(TensorParallelError) as info:
        layer(gpu)
    message = str(info.value)
    assert "CUDA device 1" in message and "CuPy" in message and "tensor.cpu()" in message
    with pytest.raises(TensorParallelError, match="CUDA device 1"):
        layer.load_dense(Producer(rng.standard_normal((4, 6)), device=(2, 1)))


def test_unreadable_device_type(rng):
    with pytest.raises(TensorParallelError, match="DLPack device type 7"):  # kDLVulkan
        from_dlpack(Producer(rng.standard_normal(3), device=(7, 0)))


def test_refused_export_is_a_shape_error_naming_the_input(make_config, rng):
    layer = RowParallelLinear(4, 2, make_config(2), seed=0)
    refused = Producer(rng.standard_normal((3, 4)), fail=BufferError("Unsupported dtype in DLTensor"))
    with pytest.raises(ShapeError) as info:
        layer(refused)
    assert "RowParallelLinear input" in str(info.value) and "Unsupported dtype" in str(info.value)


def test_broken_dlpack_device(rng):
    class Broken(Producer):
        def __dlpack_device__(self):
            raise RuntimeError("no device")

    with pytest.raises(ShapeError, match="could not read the DLPack device of a Broken"):
        from_dlpack(Broken(rng.standard_normal(2)))
