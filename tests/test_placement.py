"""Worker placement (round-robin over devices) and partitioning of split dimensions."""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu import ConfigError, worker_devices
from tp_gpu.partition import BlockLayout, split_ranges, split_sizes
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


@pytest.mark.parametrize("n_workers", [1, 2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("size", [1, 2, 7, 13, 30522, 50257])
def test_split_matches_array_split(size, n_workers):
    """Balanced, contiguous, covering: the pieces np.array_split makes, empty ones included."""
    ranges = split_ranges(size, n_workers)
    expected = [
        (int(a[0]), int(a[-1]) + 1) if a.size else None for a in np.array_split(np.arange(size), n_workers)
    ]
    sizes = split_sizes(size, n_workers)
    assert sizes == [len(a) for a in np.array_split(np.arange(size), n_workers)]
    assert len(ranges) == n_workers and ranges[0][0] == 0 and ranges[-1][1] == size
    for (first, last), (next_first, _), want in zip(ranges, ranges[1:] + [(size, size)], expected):
        assert last == next_first  # half-open: no gap, no overlap
        assert want is None and first == last or (first, last) == want


@pytest.mark.parametrize(
    "size, parts, unit, expected",
    [
        (12 * 64, 8, 64, [128] * 4 + [64] * 4),  # 12 heads over 8 workers: 2,2,2,2,1,1,1,1
        (12 * 32, 5, 32, [96, 96, 64, 64, 64]),
        (6, 4, 2, [2, 2, 2, 0]),  # more workers than units: an empty shard
        (10, 1, 5, [10]),
    ],
)
def test_whole_unit_splits(size, parts, unit, expected):
    assert split_sizes(size, parts, unit) == expected
    assert all(s % unit == 0 for s in split_sizes(size, parts, unit))


@pytest.mark.parametrize("size, unit", [(10, 3), (7, 2)])
def test_unit_that_does_not_divide_is_a_config_error(size, unit):
    with pytest.raises(ConfigError, match=rf"heads \({size}\) is not a whole number of units of {unit}"):
        split_sizes(size, 2, unit, "heads")


@pytest.mark.parametrize("size", [0, -4, 2.0, "8"])
def test_partition_bad_size(size):
    with pytest.raises(ConfigError, match="vocab_size") as info:
        split_ranges(size, 2, what="vocab_size")
    assert repr(size) in str(info.value)


@pytest.mark.parametrize("n_workers", [0, -2, 2.0, True])
def test_partition_bad_worker_count(n_workers):
    with pytest.raises(ConfigError, match="n_workers"):
        split_ranges(8, n_workers)


def test_layout_of_several_processes_covers_the_dimension():
    """13 columns over 2 processes of 3 workers each: spans (0, 7) and (7, 13); worker ranges as
    array_split gives them."""
    layouts = [BlockLayout.split(13, [0, 1, 0], rank=r, world_size=2) for r in range(2)]
    assert [lay.spans for lay in layouts] == [[(0, 7), (7, 13)]] * 2
    assert layouts[0].ranges + layouts[1].ranges == split_ranges(13, 6)
    assert [(lay.start, lay.size, lay.total) for lay in layouts] == [(0, 7, 13), (7, 6, 13)]
