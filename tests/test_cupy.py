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
    cfg = TensorParallelConfig(n_workers=4, backend="cupy", dtype="float64")
    layer = ColumnParallelLinear(16, 8, cfg)
    y = layer(np.ones((3, 16)))
    assert isinstance(y, cupy.ndarray)
    assert y.device.id == layer.devices[0]
    for w, device in zip(layer.weight_shards, layer.devices):
        assert w.device.id == device


def test_cupy_input_on_every_gpu(cupy):
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    cfg = TensorParallelConfig(n_workers=2, backend="cupy", dtype="float64")
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
    emb = ParallelEmbedding(
        32, 6, config=TensorParallelConfig(n_workers=4, backend="cupy", dtype="float64"), seed=4
    )
    ids = cupy.asarray(np.random.default_rng(2).integers(0, 32, size=(5, 7)))
    np.testing.assert_array_equal(cupy.asnumpy(emb(ids)), emb.full_weight()[cupy.asnumpy(ids)])


@pytest.fixture
def nccl(cupy):
    """CuPy's NCCL module; skips, saying why, where CuPy was built or installed without NCCL."""
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip(
            "cupy.cuda.nccl.available is False: NCCL is not installed for this CuPy "
            "(pip install nvidia-nccl-cu12 or nvidia-nccl-cu13)"
        )
    return nccl


def test_in_process_nccl_reduce_on_one_gpu(cupy, nccl):
    """InProcessNccl's calls (initAll, a grouped reduce on the current stream) on a one-rank communicator."""
    from tp_gpu.comm.nccl_local import InProcessNccl

    comm = InProcessNccl(cupy, [0])
    with cupy.cuda.Device(0):
        x = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
        scalar = cupy.asarray(np.float64(2.5))
    assert comm.can_reduce({0: x}, 0, "add")
    np.testing.assert_array_equal(cupy.asnumpy(comm.reduce({0: x}, 0, "add")), np.arange(12).reshape(3, 4))
    out = comm.reduce({0: scalar}, 0, "maximum")
    assert out.shape == () and float(out) == 2.5


def test_in_process_nccl_reduction(cupy, nccl, monkeypatch):
    """TP_GPU_NCCL=1: the reduction across GPUs goes through NCCL, and the row layer stays exact."""
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    if n_gpus < 2:
        pytest.skip(f"in-process NCCL needs two GPUs; {n_gpus} visible")
    from tp_gpu.comm import nccl_local

    monkeypatch.setenv("TP_GPU_NCCL", "1")
    devices = list(range(n_gpus))
    comm = nccl_local.maybe_in_process_nccl(cupy, devices)
    assert comm is not None
    parts = {}
    for d in devices:
        with cupy.cuda.Device(d):
            parts[d] = cupy.full((5, 3), float(d + 1))
    assert comm.can_reduce(parts, 1, "add")
    total = comm.reduce(parts, 1, "add")
    assert total.device.id == 1
    np.testing.assert_array_equal(cupy.asnumpy(total), np.full((5, 3), n_gpus * (n_gpus + 1) / 2))
    layer = RowParallelLinear(
        8 * n_gpus, 5, TensorParallelConfig(n_workers=n_gpus, backend="cupy", dtype="float64"), seed=1
    )
    x = np.random.default_rng(3).standard_normal((4, 8 * n_gpus))
    expected = x @ layer.full_weight() + layer.full_bias()
    np.testing.assert_allclose(cupy.asnumpy(layer(x)), expected, rtol=1e-12, atol=1e-12)


def test_a_dropped_source_survives_its_peer_copy(cupy):
    """The source of a peer copy, dropped at once, is not reused before the copy has read it."""
    n_gpus = cupy.cuda.runtime.getDeviceCount()
    if n_gpus < 2:
        pytest.skip(f"peer copies need two GPUs; {n_gpus} visible")
    from tp_gpu.backends import get_backend

    backend = get_backend("cupy")
    on_src = backend.asarray(np.arange(1 << 20, dtype=np.float32), np.float32, 1)
    moved = backend.to_device(on_src, 0)
    del on_src  # its memory must stay reserved until the copy has read it
    with cupy.cuda.Device(1):
        overwrite = cupy.zeros(1 << 20, dtype=cupy.float32)  # may reuse a freed block of the same size
    np.testing.assert_array_equal(cupy.asnumpy(moved), np.arange(1 << 20, dtype=np.float32))
    backend.synchronize()
    del overwrite


def test_host_array_on_another_current_device(cupy):
    from tp_gpu.backends import host_array

    n_gpus = cupy.cuda.runtime.getDeviceCount()
    with cupy.cuda.Device(n_gpus - 1):
        x = cupy.arange(5.0) * 2
    with cupy.cuda.Device(0):
        np.testing.assert_array_equal(host_array(x), np.arange(5.0) * 2)
