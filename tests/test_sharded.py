"""ShardedTensor: shape bookkeeping, gather, map, and every bad construction."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

from tp_gpu import ShapeError, ShardedTensor, TensorParallelError, worker_devices
from tp_gpu.backends import NumpyBackend, SimulatedBackend
from tp_gpu.backends.simulated import current_device


def make(backend, host_shards, placement, axis):
    shards = [backend.asarray(s, s.dtype, d) for s, d in zip(host_shards, placement)]
    return ShardedTensor(shards, axis, placement, backend)


def host_shards_for(rng, n, axis, base=(2, 3, 4)):
    out = []
    for i in range(n):
        shape = list(base)
        shape[axis] = 1 + (2 * i) % 5
        out.append(rng.standard_normal(shape))
    return out


@pytest.fixture(params=["sim3", "sim8", "numpy"])
def backend(request):
    return {"sim3": lambda: SimulatedBackend(3), "sim8": lambda: SimulatedBackend(8), "numpy": NumpyBackend}[
        request.param
    ]()


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_shape_axis_split_sizes_gather(backend, rng, n_workers, axis):
    placement = worker_devices(n_workers, backend.devices)
    hs = host_shards_for(rng, n_workers, axis)
    t = make(backend, hs, placement, axis)
    expected = np.concatenate(hs, axis=axis)
    assert t.axis == axis % 3 and t.axis >= 0
    assert t.shape == expected.shape
    assert t.ndim == 3
    assert t.dtype == np.float64
    assert t.split_sizes == [s.shape[axis] for s in hs]
    assert t.devices == placement
    gathered = t.gather()
    assert backend.device_of(gathered) == placement[0]
    np.testing.assert_array_equal(np.asarray(backend.to_host(gathered)), expected)
    for dst in backend.devices:
        out = t.gather(dst)
        assert backend.device_of(out) == dst
        np.testing.assert_array_equal(np.asarray(backend.to_host(out)), expected)
    text = repr(t)
    assert str(t.shape) in text and str(t.split_sizes) in text


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_map_runs_under_each_device(backend, rng, n_workers):
    placement = worker_devices(n_workers, backend.devices)
    hs = host_shards_for(rng, n_workers, -1)
    t = make(backend, hs, placement, -1)
    seen = []

    def fn(shard):
        seen.append((backend.device_of(shard), current_device()))
        return shard * 2.0 - 1.0  # raises on the simulated backend if run off-device

    out = t.map(fn)
    assert isinstance(out, ShardedTensor)
    assert out.axis == t.axis and out.devices == t.devices and out.split_sizes == t.split_sizes
    if isinstance(backend, SimulatedBackend):
        assert seen == [(d, d) for d in dict.fromkeys(placement)]  # once per device block
    for shard, want, device in zip(out.shards, hs, placement):
        assert backend.device_of(shard) == device
        np.testing.assert_array_equal(np.asarray(backend.to_host(shard)), want * 2.0 - 1.0)
    # the originals are untouched
    for shard, want in zip(t.shards, hs):
        np.testing.assert_array_equal(np.asarray(backend.to_host(shard)), want)


def test_map_changing_dtype_and_shape_is_checked():
    backend = SimulatedBackend(2)
    t = make(backend, [np.ones((2, 3)), np.ones((2, 5))], [0, 1], 1)
    assert t.map(lambda s: s.astype(np.float32)).dtype == np.float32
    with pytest.raises(ShapeError, match=r"elementwise: device 0's block became \(2, 3, 1\)"):
        t.map(lambda s: s[:, :, None] if s.shape[1] == 3 else s)
    with pytest.raises(ShapeError, match="one dtype"):
        t.map(lambda s: s.astype(np.float32) if s.shape[1] == 3 else s)


@pytest.fixture
def sim():
    return SimulatedBackend(3)


def _on(sim, arr, device):
    return sim.asarray(arr, arr.dtype, device)


def _raises_shape_error(make_tensor, *texts):
    with pytest.raises(ShapeError) as info:
        make_tensor()
    assert isinstance(info.value, ValueError) and isinstance(info.value, TensorParallelError)
    for text in texts:
        assert text in str(info.value), (text, str(info.value))


def test_no_shards(sim):
    _raises_shape_error(lambda: ShardedTensor([], 0, [], sim), "none")
    _raises_shape_error(lambda: ShardedTensor(iter([]), 0, [0], sim))


@pytest.mark.parametrize("n_devices", [0, 1, 3])
def test_device_count_mismatch(sim, n_devices):
    shards = [_on(sim, np.ones((2, 2)), 0), _on(sim, np.ones((2, 2)), 1)]
    _raises_shape_error(
        lambda: ShardedTensor(shards, 0, [0, 1, 2][:n_devices], sim), "2 shards", f"{n_devices} devices"
    )


@pytest.mark.parametrize(
    "shape0, shape1, axis",
    [
        ((2, 3), (3, 3), 1),  # differs on axis 0, split on 1
        ((2, 3), (2, 4), 0),  # differs on axis 1, split on 0
        ((2, 3, 4), (2, 3, 5), -2),
        ((2, 3), (2, 3, 1), 0),  # rank differs
        ((2, 3), (5,), 0),
    ],
)
def test_mismatched_non_split_dims(sim, shape0, shape1, axis):
    shards = [_on(sim, np.ones(shape0), 0), _on(sim, np.ones(shape1), 1)]
    _raises_shape_error(lambda: ShardedTensor(shards, axis, [0, 1], sim), "shard 1", str(shape1))


@pytest.mark.parametrize("shape1", [(2,), ()])
def test_lower_rank_shard_beyond_split_axis(sim, shape1):
    shards = [_on(sim, np.ones((2, 3)), 0), _on(sim, np.ones(shape1), 1)]
    _raises_shape_error(lambda: ShardedTensor(shards, 1, [0, 1], sim), "shard 1")


def test_dtype_mismatch(sim):
    shards = [_on(sim, np.ones((2, 3)), 0), _on(sim, np.ones((2, 3), np.float32), 1)]
    _raises_shape_error(lambda: ShardedTensor(shards, 1, [0, 1], sim), "shard 1", "float32", "float64")


@pytest.mark.parametrize("claimed", [[0, 2], [0, 0], [0, "host"]])
def test_shard_on_wrong_device(sim, claimed):
    shards = [_on(sim, np.ones((2, 3)), 0), _on(sim, np.ones((2, 3)), 1)]
    _raises_shape_error(lambda: ShardedTensor(shards, 1, claimed, sim), "lives on device 1", repr(claimed[1]))


def test_host_shard_on_simulated_backend(sim):
    shards = [_on(sim, np.ones((2, 3)), 0), np.ones((2, 3))]
    _raises_shape_error(lambda: ShardedTensor(shards, 1, [0, 1], sim), "'host'")


@pytest.mark.parametrize("axis", [2, 3, -3, -10])
def test_axis_out_of_range(sim, axis):
    shards = [_on(sim, np.ones((2, 3)), 0), _on(sim, np.ones((2, 3)), 1)]
    _raises_shape_error(lambda: ShardedTensor(shards, axis, [0, 1], sim), f"axis {axis}", "rank 2")


def test_zero_dim_shards(sim):
    shards = [_on(sim, np.array(1.0), 0)]
    _raises_shape_error(lambda: ShardedTensor(shards, 0, [0], sim), "rank 0")
