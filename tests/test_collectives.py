"""Collectives over per-device blocks, on NumPy and on 1, 3 and 8 simulated devices (CuPy where a GPU is).

Values are checked against plain NumPy on the host; on the simulated backend
the recorded ``transfers`` show how often, from where to where and how many
bytes cross devices. Expected blocks are built here from ``np.array_split``
and round-robin placement, not from :class:`~tp_gpu.partition.BlockLayout`.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import skip_unless_cupy
from hypothesis import given, settings
from hypothesis import strategies as st

from tp_gpu import collectives, worker_devices
from tp_gpu.backends import NumpyBackend, SimArray, SimulatedBackend, get_backend
from tp_gpu.backends.simulated import current_device
from tp_gpu.collectives import InProcessNcclReduction, PeerCopyReduction
from tp_gpu.errors import ConfigError
from tp_gpu.partition import BlockLayout, split_ranges, split_sizes

# ---------------------------------------------------------------------------- helpers


@pytest.fixture(
    params=[
        pytest.param("numpy", id="numpy"),
        pytest.param(1, id="sim1"),
        pytest.param(3, id="sim3"),
        pytest.param(8, id="sim8"),
        pytest.param("cupy", id="cupy", marks=pytest.mark.gpu),
    ]
)
def backend(request):
    """A fresh backend (its own transfer counter): NumPy, 1/3/8 simulated devices, or every GPU."""
    if request.param == "numpy":
        return NumpyBackend()
    if request.param == "cupy":
        skip_unless_cupy()
        return get_backend("cupy")
    return SimulatedBackend(request.param)


def counts(backend) -> bool:
    """Whether ``backend`` records its transfers (the simulated one does)."""
    return isinstance(backend, SimulatedBackend)


def moves(backend) -> Dict:
    return dict(backend.transfers) if counts(backend) else {}


def reset(backend) -> None:
    if counts(backend):
        backend.reset_transfers()


def host(backend, arr) -> np.ndarray:
    return np.array(backend.to_host(arr))


def distinct(devices) -> List:
    return list(dict.fromkeys(devices))


def put(backend, arrays: Dict) -> Dict:
    """Host ``arrays[d]`` placed on device ``d``; the setup transfers are then forgotten."""
    out = {d: backend.asarray(a, a.dtype, d) for d, a in arrays.items()}
    reset(backend)
    return out


def along(axis: int, index) -> tuple:
    return (slice(None),) * axis + (index,)


def reference_ranges(size: int, n_workers: int):
    """Worker i's ``[first, last)``: ``np.array_split``'s pieces."""
    edges = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(size), n_workers)])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def reference_blocks(x: np.ndarray, axis: int, ranges, placement) -> Dict:
    """Each device's block: its workers' slices of ``x`` side by side, in worker order."""
    axis %= x.ndim
    blocks = {}
    for device in distinct(placement):
        parts = [x[along(axis, slice(*ranges[w]))] for w, d in enumerate(placement) if d == device]
        blocks[device] = np.concatenate(parts, axis=axis)
    return blocks


def workers_consecutive(placement, device) -> bool:
    workers = [w for w, d in enumerate(placement) if d == device]
    return workers == list(range(workers[0], workers[-1] + 1))


# ---------------------------------------------------------------------------- partition


def test_split_sizes_are_array_splits():
    for size in (1, 5, 7, 13, 64, 30522, 50257):
        for parts in WORKER_COUNTS:
            expected = [len(p) for p in np.array_split(np.arange(size), parts)]
            assert split_sizes(size, parts) == expected, (size, parts)
            assert split_ranges(size, parts) == reference_ranges(size, parts), (size, parts)


def test_split_sizes_keep_units_whole():
    assert split_sizes(12 * 64, 8, unit=64) == [128, 128, 128, 128, 64, 64, 64, 64]
    assert split_sizes(3 * 5, 8, unit=5) == [5, 5, 5, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match="multiple of 64"):
        split_sizes(100, 2, unit=64)


def test_block_layout_split_over_processes():
    """Process r of s holds workers [r * k, (r + 1) * k): its span of the global split."""
    sizes = [3, 2, 2, 2, 2, 2]  # 13 over 6 workers, 2 per process
    layouts = [BlockLayout.split(13, [0, 1], rank, 3) for rank in range(3)]
    assert [lay.spans for lay in layouts] == [[(0, 5), (5, 9), (9, 13)]] * 3
    for rank, lay in enumerate(layouts):
        assert lay.sizes == sizes[2 * rank : 2 * rank + 2]
        assert (lay.start, lay.size, lay.total) == (lay.spans[rank][0], sum(lay.sizes), 13)


# ---------------------------------------------------------------------------- broadcast


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_broadcast_one_copy_per_device(backend, rng, n_workers):
    placement = worker_devices(n_workers, backend.devices)
    x = rng.standard_normal((3, 5))
    reset(backend)
    copies = collectives.broadcast(backend, x, placement, np.float32)
    assert list(copies) == distinct(placement)
    for device, arr in copies.items():
        assert backend.device_of(arr) == device
        assert arr.dtype == np.float32 and arr.shape == x.shape
        np.testing.assert_array_equal(host(backend, arr), x.astype(np.float32))
    if counts(backend):
        # One move per distinct device, counted in the bytes read from the source.
        assert moves(backend) == {("host", d): (1, x.nbytes) for d in distinct(placement)}


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_broadcast_from_a_device(rng, n_workers):
    backend = SimulatedBackend(3)
    placement = worker_devices(n_workers, backend.devices)
    x = put(backend, {1: rng.standard_normal((4, 3))})[1]
    copies = collectives.broadcast(backend, x, placement, np.float64)
    if 1 in placement:
        assert copies[1] is x  # already there in the right dtype: no copy
    others = [d for d in distinct(placement) if d != 1]
    assert moves(backend) == {(1, d): (1, x.nbytes) for d in others}
    for d in distinct(placement):
        np.testing.assert_array_equal(host(backend, copies[d]), host(backend, x))


def test_broadcast_converts_dtype_without_a_transfer_on_its_own_device(rng):
    backend = SimulatedBackend(3)
    x = put(backend, {2: rng.standard_normal(7)})[2]
    copies = collectives.broadcast(backend, x, [2, 0, 2, 2, 0], np.float16)
    assert list(copies) == [2, 0]
    assert copies[2] is not x and copies[2].dtype == np.float16
    np.testing.assert_array_equal(host(backend, copies[0]), host(backend, x).astype(np.float16))
    assert moves(backend) == {(2, 0): (1, x.nbytes)}  # the conversion on device 2 crosses nothing


# ------------------------------------------------------------------ to_devices / to_host / on_devices


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_to_devices(rng, n_workers):
    backend = SimulatedBackend(3)
    placement = worker_devices(n_workers, backend.devices)
    values = [rng.standard_normal(3 + i) for i in range(n_workers)]
    arrays = [backend.asarray(v, np.float64, 0) for v in values]
    reset(backend)
    moved = collectives.to_devices(backend, arrays, placement, np.float64)
    assert len(moved) == n_workers
    for a, m, v, d in zip(arrays, moved, values, placement):
        assert backend.device_of(m) == d
        assert (m is a) == (d == 0)  # no copy where it already is
        np.testing.assert_array_equal(host(backend, m), v)
    expected: Dict = {}
    for a, d in zip(arrays, placement):
        if d != 0:
            n, b = expected.get((0, d), (0, 0))
            expected[(0, d)] = (n + 1, b + a.nbytes)
    assert moves(backend) == expected


def test_to_devices_converts_dtype(rng):
    backend = SimulatedBackend(3)
    values = [rng.standard_normal(4) for _ in range(3)]
    arrays = [backend.asarray(v, np.float64, d) for v, d in zip(values, [0, 1, 2])]
    reset(backend)
    moved = collectives.to_devices(backend, arrays, [0, 2, 2], np.float32)
    assert [m.dtype for m in moved] == [np.float32] * 3
    assert [backend.device_of(m) for m in moved] == [0, 2, 2]
    for m, v in zip(moved, values):
        np.testing.assert_array_equal(host(backend, m), v.astype(np.float32))
    assert moves(backend) == {(1, 2): (1, values[1].nbytes)}


def test_to_host_returns_plain_numpy(backend, rng):
    x = rng.standard_normal((2, 5))
    on_device = put(backend, {backend.devices[-1]: x})[backend.devices[-1]]
    out = collectives.to_host(backend, on_device)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, x)
    assert moves(backend) == {}


def test_on_devices_runs_each_call_under_its_device(rng):
    backend = SimulatedBackend(8)
    placement = worker_devices(8, backend.devices)
    a = put(backend, {d: rng.standard_normal(4) for d in placement})
    b = put(backend, {d: rng.standard_normal(4) for d in placement})
    seen = []

    def fn(u, v):
        seen.append(current_device())
        return u * v + 1.0  # would raise DeviceMismatchError off its device

    out = collectives.on_devices(backend, fn, a, b)
    assert list(out) == list(a) and seen == list(a)
    for d in a:
        assert backend.device_of(out[d]) == d
        np.testing.assert_array_equal(host(backend, out[d]), host(backend, a[d]) * host(backend, b[d]) + 1.0)
    assert moves(backend) == {}
    seen.clear()
    some = collectives.on_devices(backend, fn, a, b, keys=[5, 2])
    assert list(some) == [5, 2] and seen == [5, 2]


# ---------------------------------------------------------------------------- scatter_blocks


@pytest.mark.parametrize("size", [5, 13])
@pytest.mark.parametrize("axis", [0, -1])  # the middle axis: in the hypothesis test below
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_scatter_blocks(backend, rng, n_workers, axis, size):
    placement = worker_devices(n_workers, backend.devices)
    shape = [3, 4, 2]
    shape[axis] = size
    x = rng.standard_normal(shape)
    layout = BlockLayout.split(size, placement)
    reset(backend)
    blocks = collectives.scatter_blocks(backend, x, axis, layout, np.float64)
    expected = reference_blocks(x, axis, reference_ranges(size, n_workers), placement)
    assert list(blocks) == list(expected)
    for device, want in expected.items():
        assert backend.device_of(blocks[device]) == device
        assert blocks[device].shape == want.shape and blocks[device].dtype == np.float64
        np.testing.assert_array_equal(host(backend, blocks[device]), want)
    if counts(backend):
        # Only each block's own slices cross to it: exactly x's bytes in all.
        got = moves(backend)
        assert set(got) == {("host", d) for d in expected}
        assert sum(nbytes for _, nbytes in got.values()) == x.nbytes
        for device, want in expected.items():
            n, nbytes = got[("host", device)]
            assert nbytes == want.nbytes
            workers = placement.count(device)
            assert n == 1 if workers_consecutive(placement, device) else 1 <= n <= workers


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_scatter_blocks_converts_dtype(rng, dtype):
    backend = SimulatedBackend(3)
    placement = worker_devices(5, backend.devices)
    for x in (rng.standard_normal((4, 13)), rng.integers(-50, 50, size=(4, 13))):
        blocks = collectives.scatter_blocks(backend, x, 1, BlockLayout.split(13, placement), dtype)
        expected = reference_blocks(x, 1, reference_ranges(13, 5), placement)
        for device, want in expected.items():
            assert blocks[device].dtype == dtype
            np.testing.assert_array_equal(host(backend, blocks[device]), want.astype(dtype))


def test_scatter_blocks_on_one_device_moves_x_once(rng):
    backend = SimulatedBackend(1)
    x = rng.standard_normal((3, 13))
    blocks = collectives.scatter_blocks(backend, x, 1, BlockLayout.split(13, [0] * 8), np.float64)
    np.testing.assert_array_equal(host(backend, blocks[0]), x)
    assert moves(backend) == {("host", 0): (1, x.nbytes)}


# ---------------------------------------------------------------------------- gather_blocks


@pytest.mark.parametrize("size", [5, 13])
@pytest.mark.parametrize("axis", [0, -1])  # the middle axis: in the hypothesis test below
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_gather_blocks(backend, rng, n_workers, axis, size):
    placement = worker_devices(n_workers, backend.devices)
    shape = [2, 3, 4]
    shape[axis] = size
    x = rng.standard_normal(shape)
    blocks = put(backend, reference_blocks(x, axis, reference_ranges(size, n_workers), placement))
    before = {d: host(backend, b) for d, b in blocks.items()}
    layout = BlockLayout.split(size, placement)
    for dst in backend.devices:
        reset(backend)
        out = collectives.gather_blocks(backend, blocks, axis, layout, dst)
        assert backend.device_of(out) == dst
        assert out.shape == x.shape and out.dtype == x.dtype
        np.testing.assert_array_equal(host(backend, out), x)
        for d, b in blocks.items():
            np.testing.assert_array_equal(host(backend, b), before[d], err_msg=f"block on {d!r} changed")
        if len(blocks) == 1 and next(iter(blocks)) == dst:
            assert out is blocks[dst]  # a single whole block already on dst: no copy
        if counts(backend):
            # Each block not on dst crosses once, with exactly its own bytes.
            assert moves(backend) == {(d, dst): (1, b.nbytes) for d, b in blocks.items() if d != dst}


def test_gather_blocks_allocates_a_new_output_for_several_blocks(rng):
    backend = SimulatedBackend(3)
    placement = worker_devices(4, backend.devices)
    x = rng.standard_normal((2, 13))
    blocks = put(backend, reference_blocks(x, 1, reference_ranges(13, 4), placement))
    out = collectives.gather_blocks(backend, blocks, 1, BlockLayout.split(13, placement), 0)
    for b in blocks.values():
        assert not np.shares_memory(out.view(np.ndarray), b.view(np.ndarray))


def test_uneven_layout_13_over_five_workers_on_three_devices(rng):
    """``BlockLayout.split(13, [0, 1, 2, 0, 1])``: sizes 3, 3, 3, 2, 2; workers 0 and 3 share device 0."""
    backend = SimulatedBackend(3)
    layout = BlockLayout.split(13, [0, 1, 2, 0, 1])
    assert layout.ranges == [(0, 3), (3, 6), (6, 9), (9, 11), (11, 13)]
    assert layout.local == [(0, 3), (0, 3), (0, 3), (3, 5), (3, 5)]
    x = rng.standard_normal((2, 13))
    blocks = collectives.scatter_blocks(backend, x, -1, layout, np.float64)
    expected = {0: x[:, [0, 1, 2, 9, 10]], 1: x[:, [3, 4, 5, 11, 12]], 2: x[:, 6:9]}
    assert list(blocks) == [0, 1, 2]
    for d, want in expected.items():
        np.testing.assert_array_equal(host(backend, blocks[d]), want)
    # Device 0's and 1's workers are not consecutive: two slices each; device 2 gets one.
    row = x[:, :1].nbytes
    assert moves(backend) == {("host", 0): (2, 5 * row), ("host", 1): (2, 5 * row), ("host", 2): (1, 3 * row)}
    for dst in backend.devices:
        reset(backend)
        out = collectives.gather_blocks(backend, blocks, -1, layout, dst)
        np.testing.assert_array_equal(host(backend, out), x)
        assert moves(backend) == {(d, dst): (1, b.nbytes) for d, b in blocks.items() if d != dst}
    np.testing.assert_array_equal(collectives.gather_to_host(backend, blocks, -1, layout), x)


def test_explicit_layout_with_an_empty_worker(rng):
    """Sizes [4, 0, 5, 1] on devices [2, 0, 2, 1]: device 0's block is empty, device 2 holds workers 0, 2."""
    backend = SimulatedBackend(3)
    layout = BlockLayout([4, 0, 5, 1], [2, 0, 2, 1])
    x = rng.standard_normal((10, 3))
    blocks = collectives.scatter_blocks(backend, x, 0, layout, np.float32)
    assert list(blocks) == [2, 0, 1]
    np.testing.assert_array_equal(host(backend, blocks[2]), x[:9].astype(np.float32))
    assert blocks[0].shape == (0, 3)
    np.testing.assert_array_equal(host(backend, blocks[1]), x[9:].astype(np.float32))
    for dst in backend.devices:
        out = collectives.gather_blocks(backend, blocks, 0, layout, dst)
        assert backend.device_of(out) == dst and out.dtype == np.float32
        np.testing.assert_array_equal(host(backend, out), x.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=8), data=st.data())
def test_scatter_then_gather_is_the_identity_on_any_layout(sizes, data):
    """Any split sizes (empty ones too), any device per worker: the blocks NumPy builds, and back."""
    n_devices = data.draw(st.integers(1, 4), label="n_devices")
    placement = data.draw(st.lists(st.integers(0, n_devices - 1), min_size=len(sizes), max_size=len(sizes)))
    axis = data.draw(st.sampled_from([0, 1, -1]), label="axis")
    backend = SimulatedBackend(n_devices)
    shape = [2, 3, 2]
    shape[axis] = sum(sizes)
    x = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    layout = BlockLayout(sizes, placement)
    blocks = collectives.scatter_blocks(backend, x, axis, layout, np.float64)
    edges = np.cumsum([0] + sizes)
    expected = reference_blocks(x, axis, list(zip(edges[:-1], edges[1:])), placement)
    assert list(blocks) == list(expected)
    for d, want in expected.items():
        assert backend.device_of(blocks[d]) == d
        np.testing.assert_array_equal(host(backend, blocks[d]), want)
    assert sum(nbytes for _, nbytes in moves(backend).values()) == x.nbytes
    for dst in backend.devices:
        reset(backend)
        out = collectives.gather_blocks(backend, blocks, axis, layout, dst)
        assert backend.device_of(out) == dst
        np.testing.assert_array_equal(host(backend, out), x)
        assert moves(backend) == {(d, dst): (1, b.nbytes) for d, b in blocks.items() if d != dst}
    np.testing.assert_array_equal(collectives.gather_to_host(backend, blocks, axis, layout), x)


# ---------------------------------------------------------------------------- gather_to_host


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_gather_to_host_returns_a_new_host_array(backend, rng, n_workers, dtype):
    placement = worker_devices(n_workers, backend.devices)
    x = rng.standard_normal((13, 3)).astype(dtype)
    blocks = put(backend, reference_blocks(x, 0, reference_ranges(13, n_workers), placement))
    out = collectives.gather_to_host(backend, blocks, 0, BlockLayout.split(13, placement))
    assert type(out) is np.ndarray and out.dtype == dtype
    np.testing.assert_array_equal(out, x)
    for b in blocks.values():
        assert not np.shares_memory(out, backend.to_host(b))
    before = {d: host(backend, b) for d, b in blocks.items()}
    out[...] = 7
    for d, b in blocks.items():
        np.testing.assert_array_equal(host(backend, b), before[d])
    assert moves(backend) == {}  # nothing crossed between devices: the blocks went straight to the host


# ---------------------------------------------------------------------------- reductions


def check_unread_partials_untouched(backend, partials, values, consumed):
    """Every partial but ``consumed`` (the one peer-copy reduction accumulates into) is unchanged."""
    for d, p in partials.items():
        if d != consumed:
            np.testing.assert_array_equal(
                host(backend, p), values[d], err_msg=f"partial on {d!r} was modified"
            )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_sum(backend, rng, n_workers, dtype):
    devices = distinct(worker_devices(n_workers, backend.devices))
    values = {d: rng.standard_normal((3, 5)).astype(dtype) for d in devices}
    expected = np.sum(np.stack(list(values.values())).astype(np.float64), axis=0)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    for dst in backend.devices:
        partials = put(backend, values)
        out = collectives.reduce_sum(backend, partials, dst)
        assert backend.device_of(out) == dst
        assert out.shape == (3, 5) and out.dtype == dtype
        np.testing.assert_allclose(host(backend, out), expected, rtol=tol, atol=tol)
        check_unread_partials_untouched(backend, partials, values, devices[0])
        if counts(backend):
            # Each partial not on dst crosses once.
            nbytes = values[devices[0]].nbytes
            assert moves(backend) == {(d, dst): (1, nbytes) for d in devices if d != dst}


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_max(backend, rng, n_workers):
    devices = distinct(worker_devices(n_workers, backend.devices))
    values = {d: rng.standard_normal((7,)) for d in devices}
    for dst in backend.devices:
        partials = put(backend, values)
        out = collectives.reduce_max(backend, partials, dst)
        assert backend.device_of(out) == dst
        np.testing.assert_array_equal(host(backend, out), np.max(np.stack(list(values.values())), axis=0))
        check_unread_partials_untouched(backend, partials, values, devices[0])
        if counts(backend):
            assert moves(backend) == {(d, dst): (1, values[d].nbytes) for d in devices if d != dst}


def test_reduce_sum_with_an_explicit_peer_copy_reduction(rng):
    backend = SimulatedBackend(8)
    values = {d: rng.standard_normal((2, 3)) for d in backend.devices}
    out = collectives.reduce_sum(backend, put(backend, values), 5, reduction=PeerCopyReduction())
    assert backend.device_of(out) == 5
    np.testing.assert_allclose(host(backend, out), sum(values.values()), rtol=1e-13)
    assert moves(backend) == {(d, 5): (1, values[d].nbytes) for d in backend.devices if d != 5}


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_all_reduce_sum(backend, rng, n_workers):
    devices = distinct(worker_devices(n_workers, backend.devices))
    values = {d: rng.standard_normal((2, 3, 2)) for d in devices}
    expected = np.sum(np.stack(list(values.values())), axis=0)
    outs = collectives.all_reduce_sum(backend, put(backend, values))
    assert list(outs) == devices
    for d, out in outs.items():
        assert backend.device_of(out) == d
        np.testing.assert_allclose(host(backend, out), expected, rtol=1e-13, atol=1e-13)
    if counts(backend):
        # Reduced on the first device (one move from each other), then one copy back to each other.
        first, nbytes = devices[0], values[devices[0]].nbytes
        want = {(d, first): (1, nbytes) for d in devices[1:]}
        want.update({(first, d): (1, nbytes) for d in devices[1:]})
        assert moves(backend) == want


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_all_reduce_max(backend, rng, n_workers):
    devices = distinct(worker_devices(n_workers, backend.devices))
    values = {d: rng.standard_normal((4,)) for d in devices}
    outs = collectives.all_reduce_max(backend, put(backend, values))
    assert list(outs) == devices
    for d, out in outs.items():
        assert backend.device_of(out) == d
        np.testing.assert_array_equal(host(backend, out), np.max(np.stack(list(values.values())), axis=0))
    if counts(backend):
        first, nbytes = devices[0], values[devices[0]].nbytes
        want = {(d, first): (1, nbytes) for d in devices[1:]}
        want.update({(first, d): (1, nbytes) for d in devices[1:]})
        assert moves(backend) == want


def test_simulated_results_are_simarrays(rng):
    backend = SimulatedBackend(3)
    placement = worker_devices(5, backend.devices)
    values = {d: rng.standard_normal(5) for d in distinct(placement)}
    assert isinstance(collectives.reduce_sum(backend, put(backend, values), 1), SimArray)
    blocks = put(backend, reference_blocks(np.arange(13.0), 0, reference_ranges(13, 5), placement))
    assert isinstance(
        collectives.gather_blocks(backend, blocks, 0, BlockLayout.split(13, placement), 2), SimArray
    )


# ---------------------------------------------------------------------------- the in-process NCCL strategy


class FakeNccl:
    """Stands in for InProcessNccl: answers ``can_reduce`` as told, and records every call."""

    def __init__(self, backend, accept: bool) -> None:
        self.backend, self.accept = backend, accept
        self.asked: List = []
        self.reduced: List = []

    def can_reduce(self, per_device, dst, ufunc):
        self.asked.append((dict(per_device), dst, ufunc))
        return self.accept

    def reduce(self, per_device, dst, ufunc):
        self.reduced.append((dict(per_device), dst, ufunc))
        stacked = np.stack([self.backend.to_host(a) for a in per_device.values()])
        self.result = self.backend.asarray(getattr(np, ufunc).reduce(stacked, axis=0), stacked.dtype, dst)
        return self.result


@pytest.mark.parametrize("op, ufunc", [(collectives.reduce_sum, "add"), (collectives.reduce_max, "maximum")])
@pytest.mark.parametrize("accept", [True, False])
def test_nccl_reduction_used_only_when_it_accepts(rng, accept, op, ufunc):
    backend = SimulatedBackend(3)
    nccl = FakeNccl(backend, accept)
    values = {d: rng.standard_normal((2, 3)) for d in backend.devices}
    partials = put(backend, values)
    out = op(backend, partials, 1, reduction=InProcessNcclReduction(nccl))
    expected = getattr(np, ufunc).reduce(np.stack(list(values.values())), axis=0)
    np.testing.assert_allclose(host(backend, out), expected, rtol=1e-13)
    assert backend.device_of(out) == 1
    # NCCL is asked once, with one array per device: the partials themselves.
    ((asked, dst, asked_ufunc),) = nccl.asked
    assert (dst, asked_ufunc) == (1, ufunc)
    assert list(asked) == [0, 1, 2] and all(asked[d] is partials[d] for d in asked)
    peer_copies = {k: v for k, v in moves(backend).items() if k[0] != "host"}
    if accept:
        assert len(nccl.reduced) == 1 and out is nccl.result
        assert peer_copies == {}  # NCCL moved the data, not peer copies
    else:
        assert nccl.reduced == []  # fell back to peer copies
        assert peer_copies == {(0, 1): (1, values[0].nbytes), (2, 1): (1, values[2].nbytes)}


def test_default_reduction_off_cupy_is_peer_copies(monkeypatch):
    monkeypatch.setenv("TP_GPU_NCCL", "1")  # asked for, but only CuPy with several GPUs can use it
    for backend in (NumpyBackend(), SimulatedBackend(3)):
        strategy = collectives.default_reduction(backend)
        assert isinstance(strategy, PeerCopyReduction)
        assert collectives.default_reduction(backend) is strategy


# ------------------------------------------------------------------ several processes (fake communicator)


class FakeComm:
    """Rank ``rank`` of ``size`` simulated processes over the logical array ``x``.

    ``all_gather`` concatenates, in rank order, this rank's array with what the
    other ranks would send: their spans of ``x`` padded to the same length with
    NaN (so padding that is not cut off shows). Like a real communicator it
    requires pieces of one shape. ``all_reduce`` adds the other ranks' ``others``.
    """

    def __init__(self, rank, size, x=None, axis=0, spans=(), others=()):
        self.rank, self.size, self.name = rank, size, "fake"
        self.x, self.axis, self.spans, self.others = x, axis, list(spans), list(others)
        self.gathered: List = []
        self.reduced: List = []

    def all_gather(self, backend, array, axis):
        axis %= array.ndim
        longest = max(last - first for first, last in self.spans)
        assert axis == self.axis % self.x.ndim
        assert array.shape[axis] == longest, "communicators gather pieces of one shape"
        self.gathered.append((backend.device_of(array), tuple(array.shape)))
        pieces = []
        for r, (first, last) in enumerate(self.spans):
            if r == self.rank:
                pieces.append(np.array(backend.to_host(array)))
                continue
            piece = self.x[along(axis, slice(first, last))]
            pad = [(0, 0)] * piece.ndim
            pad[axis] = (0, longest - (last - first))
            pieces.append(np.pad(piece, pad, constant_values=np.nan))
        return backend.asarray(np.concatenate(pieces, axis=axis), array.dtype, backend.device_of(array))

    def all_reduce(self, backend, array, op="sum"):
        self.reduced.append(op)
        total = np.array(backend.to_host(array))
        for other in self.others:
            total = total + other if op == "sum" else np.maximum(total, other)
        return backend.asarray(total, array.dtype, backend.device_of(array))


@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize(
    "size, world",
    [(13, 3), (4, 3), (8, 2), (7, 2)],
    ids=["13-over-3-unequal", "4-over-3-empty-rank", "8-over-2-equal", "7-over-2-unequal"],
)
@pytest.mark.parametrize("n_devices", ["numpy", 1, 3])
def test_gather_across_processes_pads_and_trims_unequal_spans(rng, n_devices, size, world, axis):
    """Each process holds 2 workers; the spans it all-gathers are padded to the longest and trimmed after."""
    backend = NumpyBackend() if n_devices == "numpy" else SimulatedBackend(n_devices)
    local = worker_devices(2, backend.devices)
    shape = [3, 2]
    shape[axis] = size
    x = rng.standard_normal(shape)
    for rank in range(world):
        layout = BlockLayout.split(size, local, rank, world)
        spans = layout.spans
        blocks = collectives.scatter_blocks(backend, x, axis, layout, np.float64)
        for dst in backend.devices:
            comm = FakeComm(rank, world, x, axis, spans)
            out = collectives.gather_blocks(backend, blocks, axis, layout, dst, comm)
            assert backend.device_of(out) == dst and out.shape == x.shape
            np.testing.assert_array_equal(host(backend, out), x)
            longest = max(b - a for a, b in spans)
            padded = list(x.shape)
            padded[axis] = longest
            assert comm.gathered == [(dst, tuple(padded))]
        comm = FakeComm(rank, world, x, axis, spans)
        out = collectives.gather_to_host(backend, blocks, axis, layout, comm)
        assert type(out) is np.ndarray
        np.testing.assert_array_equal(out, x)
        assert len(comm.gathered) == 1


def test_gather_with_one_process_does_not_call_the_communicator(rng):
    backend = SimulatedBackend(3)
    placement = worker_devices(4, backend.devices)
    x = rng.standard_normal(13)
    layout = BlockLayout.split(13, placement)
    blocks = collectives.scatter_blocks(backend, x, 0, layout, np.float64)
    comm = FakeComm(0, 1, x, 0, layout.spans)
    np.testing.assert_array_equal(
        host(backend, collectives.gather_blocks(backend, blocks, 0, layout, 1, comm)), x
    )
    np.testing.assert_array_equal(collectives.gather_to_host(backend, blocks, 0, layout, comm), x)
    assert comm.gathered == []


@pytest.mark.parametrize("op", ["sum", "max"])
def test_reductions_across_processes(rng, op):
    backend = SimulatedBackend(3)
    values = {d: rng.standard_normal(5) for d in backend.devices}
    others = [rng.standard_normal(5) for _ in range(2)]  # the local results of ranks 1 and 2
    combine = np.add if op == "sum" else np.maximum
    local = combine.reduce(np.stack(list(values.values())), axis=0)
    expected = combine.reduce(np.stack([local, *others]), axis=0)
    reduce = collectives.reduce_sum if op == "sum" else collectives.reduce_max
    comm = FakeComm(0, 3, others=others)
    out = reduce(backend, put(backend, values), 2, comm)
    assert backend.device_of(out) == 2 and comm.reduced == [op]
    np.testing.assert_allclose(host(backend, out), expected, rtol=1e-13)
    all_reduce = collectives.all_reduce_sum if op == "sum" else collectives.all_reduce_max
    comm = FakeComm(0, 3, others=others)
    outs = all_reduce(backend, put(backend, values), comm)
    assert comm.reduced == [op]
    for d, o in outs.items():
        assert backend.device_of(o) == d
        np.testing.assert_allclose(host(backend, o), expected, rtol=1e-13)
