"""CuPy-only checks: peer copies, CuPy inputs on any GPU, outputs as CuPy arrays.

The layer tests already run on the CuPy backend through ``backend_spec``; these
cover what only real GPUs have. Every test is marked ``gpu`` and skips, with
the reason, where CuPy cannot run.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import skip_unless_cupy
from tp_gpu import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, TensorParallelConfig

pytestmark = pytest.mark.gpu


@pytest.fixture
def cupy():
    skip_unless_cupy()
    import cupy

    return cupy


def test_outputs_are_cupy_arrays_on_worker0_gpu(cupy):
    cfg = TensorParallelConfig(n_workers=4, backend="cupy")
    layer = ColumnParallelLinear(16, 8, cfg)
    y = layer(np.ones((3, 16)))
    assert isinstance(y, cupy.ndarray)
    assert y.device.id == layer.devices[0]
    for w, device in zip(layer.weight_shards, layer.devices):
        assert w.device.id == device


def test_cupy_input_on_every_gpu(cupy):
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    cfg = TensorParallelConfig(n_workers=2, backend="cupy")
    layer = RowParallelLinear(8, 5, cfg, seed=3)
    x = np.random.default_rng(0).standard_normal((4, 8))
    expected = x @ layer.full_weight() + layer.full_bias()
    for gpu in range(n_gpus):
        with cupy.cuda.Device(gpu):
            x_gpu = cupy.asarray(x)
        np.testing.assert_allclose(cupy.asnumpy(layer(x_gpu)), expected, rtol=1e-12, atol=1e-12)


def test_peer_copy_round_trip_between_every_pair(cupy):
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    if n_gpus < 2:
        pytest.skip(f"peer copies need two GPUs; {n_gpus} visible")
    from tp_gpu.backends import get_backend

    backend = get_backend("cupy")
    data = np.random.default_rng(1).standard_normal((257, 33))
    for src in range(n_gpus):
        on_src = backend.asarray(data, np.float64, src)
        for dst in range(n_gpus):
            moved = backend.to_device(on_src, dst)
            assert moved.device.id == dst
            np.testing.assert_array_equal(cupy.asnumpy(moved), data)


def test_embedding_with_cupy_ids(cupy):
    emb = ParallelEmbedding(32, 6, config=TensorParallelConfig(n_workers=4, backend="cupy"), seed=4)
    ids = cupy.asarray(np.random.default_rng(2).integers(0, 32, size=(5, 7)))
    np.testing.assert_array_equal(cupy.asnumpy(emb(ids)), emb.full_weight()[cupy.asnumpy(ids)])


def test_in_process_nccl_reduction(cupy, monkeypatch):
    """TP_GPU_NCCL=1: the row layer's reduction across GPUs goes through NCCL and stays exact."""
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    if n_gpus < 2:
        pytest.skip(f"in-process NCCL needs two GPUs; {n_gpus} visible")
    monkeypatch.setenv("TP_GPU_NCCL", "1")
    layer = RowParallelLinear(8 * n_gpus, 5, TensorParallelConfig(n_workers=n_gpus, backend="cupy"), seed=1)
    assert layer.backend.nccl is not None
    x = np.random.default_rng(3).standard_normal((4, 8 * n_gpus))
    expected = x @ layer.full_weight() + layer.full_bias()
    np.testing.assert_allclose(cupy.asnumpy(layer(x)), expected, rtol=1e-12, atol=1e-12)
