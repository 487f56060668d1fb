"""Worker placement (round-robin over devices) and partitioning of split dimensions."""

from __future__ import annotations

import pytest

from tp_gpu import ConfigError, TensorParallelError, worker_devices
from tp_gpu.partition import check_divisible, shard_range, shard_ranges, shard_size
from tp_gpu.placement import workers_by_device

# ---------------------------------------------------------------------------- placement


@pytest.mark.parametrize(
    "n_workers, devices, expected",
    [
        (4, [0, 1, 2, 3], [0, 1, 2, 3]),
        (4, [0], [0, 0, 0, 0]),
        (8, [0, 1, 2], [0, 1, 2, 0, 1, 2, 0, 1]),
        (2, [0, 1, 2, 3], [0, 1]),
        (1, [5, 6], [5]),
        (3, (7, 2), [7, 2, 7]),
        (3, ["cpu"], ["cpu", "cpu", "cpu"]),
    ],
)
def test_worker_devices_examples(n_workers, devices, expected):
    assert worker_devices(n_workers, devices) == expected


@pytest.mark.parametrize("n_devices", range(1, 9))
@pytest.mark.parametrize("n_workers", range(1, 9))
def test_worker_devices_round_robin(n_workers, n_devices):
    # Non-contiguous, unordered ids: placement must follow the given order, not sort it.
    devices = [10 + 3 * k for k in reversed(range(n_devices))]
    placement = worker_devices(n_workers, devices)
    assert len(placement) == n_workers
    for i, device in enumerate(placement):
        assert device == devices[i % n_devices]
    used = set(placement)
    assert len(used) == min(n_workers, n_devices)
    counts = [placement.count(d) for d in used]
    # Balanced: no device carries more than one worker above any other.
    assert max(counts) - min(counts) <= 1
    if n_workers <= n_devices:
        assert placement == devices[:n_workers]


@pytest.mark.parametrize(
    "placement, expected",
    [
        ([0, 1, 2, 0, 1, 2, 0, 1], {0: [0, 3, 6], 1: [1, 4, 7], 2: [2, 5]}),
        ([0, 0, 0, 0], {0: [0, 1, 2, 3]}),
        ([3, 1], {3: [0], 1: [1]}),
        (["cpu", "cpu"], {"cpu": [0, 1]}),
        ([], {}),
    ],
)
def test_workers_by_device_groups(placement, expected):
    groups = workers_by_device(placement)
    assert groups == expected
    assert list(groups) == list(expected)  # first-use order


@pytest.mark.parametrize("n_devices", range(1, 9))
@pytest.mark.parametrize("n_workers", range(1, 9))
def test_workers_by_device_partitions_workers(n_workers, n_devices):
    placement = worker_devices(n_workers, list(range(n_devices)))
    groups = workers_by_device(placement)
    assert list(groups) == list(dict.fromkeys(placement))
    assert sorted(w for ws in groups.values() for w in ws) == list(range(n_workers))
    for device, workers in groups.items():
        assert workers == sorted(workers)
        assert all(placement[w] == device for w in workers)


@pytest.mark.parametrize("n_workers", [0, -1, 2.5, True, "2", None])
def test_worker_devices_bad_worker_count(n_workers):
    with pytest.raises(ConfigError, match="n_workers") as info:
        worker_devices(n_workers, [0, 1])
    assert repr(n_workers) in str(info.value)


@pytest.mark.parametrize("devices", [[], ()])
def test_worker_devices_empty_device_list(devices):
    with pytest.raises(ConfigError, match="empty"):
        worker_devices(2, devices)


# ---------------------------------------------------------------------------- partition


@pytest.mark.parametrize("n_workers", range(1, 9))
@pytest.mark.parametrize("chunk", [1, 2, 7, 13])
def test_shard_ranges_cover_contiguously(n_workers, chunk):
    size = chunk * n_workers
    ranges = shard_ranges(size, n_workers)
    assert len(ranges) == n_workers
    assert ranges[0][0] == 0
    assert ranges[-1][1] == size
    for (first, last), (next_first, _) in zip(ranges, ranges[1:]):
        assert last == next_first  # half-open: no gap, no overlap
    for first, last in ranges:
        assert last - first == chunk == shard_size(size, n_workers)
    covered = [i for first, last in ranges for i in range(first, last)]
    assert covered == list(range(size))
    for worker in range(n_workers):
        assert shard_range(size, n_workers, worker) == ranges[worker]


@pytest.mark.parametrize(
    "size, n_workers", [(10, 3), (7, 2), (13, 4), (1, 2), (9, 8), (100, 7)]
)
def test_check_divisible_message(size, n_workers):
    with pytest.raises(ConfigError) as info:
        check_divisible(size, n_workers, "n_out")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TensorParallelError)
    assert "divisible" in msg
    assert "n_out" in msg
    assert f"({size})" in msg and f"({n_workers})" in msg
    for fn in (shard_size, shard_ranges):
        with pytest.raises(ConfigError, match="divisible"):
            fn(size, n_workers, "n_out")


@pytest.mark.parametrize("size, n_workers", [(10, 5), (8, 8), (7, 1), (12, 3)])
def test_check_divisible_passes(size, n_workers):
    assert check_divisible(size, n_workers, "x") is None


@pytest.mark.parametrize("size", [0, -4, 2.0, "8"])
def test_partition_bad_size(size):
    with pytest.raises(ConfigError, match="vocab_size"):
        shard_ranges(size, 2, "vocab_size")


@pytest.mark.parametrize("n_workers", [0, -2, 2.0, True])
def test_partition_bad_worker_count(n_workers):
    with pytest.raises(ConfigError, match="n_workers"):
        shard_ranges(8, n_workers)


@pytest.mark.parametrize("worker", [-1, 4, 5, 100])
def test_shard_range_bad_worker(worker):
    with pytest.raises(ConfigError) as info:
        shard_range(8, 4, worker)
    assert repr(worker) in str(info.value)
    assert "4" in str(info.value)


@pytest.mark.parametrize("worker", [0.5, True])
def test_shard_range_non_integer_worker(worker):
    with pytest.raises(ConfigError):
        shard_range(10, 2, worker)
