"""Collectives on the simulated backend (3 devices, 1..8 workers) and on NumPy.

On the simulated backend the recorded ``transfers`` show how often data crosses
devices; the values are checked against plain NumPy on the host.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import WORKER_COUNTS
from tp_gpu import collectives, worker_devices
from tp_gpu.backends import NumpyBackend, SimArray, SimulatedBackend
from tp_gpu.partition import shard_ranges
from tp_gpu.placement import workers_by_device

N_DEVICES = 3


def host(backend, arr) -> np.ndarray:
    return np.array(backend.to_host(arr))


def total_transfers(backend) -> int:
    return sum(count for count, _ in getattr(backend, "transfers", {}).values())


@pytest.fixture(params=["simulated", "numpy"])
def setup(request):
    """``(backend, placement_for(n_workers))`` on 3 simulated devices or on NumPy."""
    backend = SimulatedBackend(N_DEVICES) if request.param == "simulated" else NumpyBackend()
    return backend, lambda n: worker_devices(n, backend.devices)


def check_operands_untouched(backend, partials, partials_host, placement):
    """The partials a reduction only reads are unchanged.

    Those are all but the first partial of each device: the working-tree
    contract of ``collectives._reduce`` lets a reduction accumulate into (consume)
    the first partial of each device, which callers pass as temporaries.
    """
    accumulators = {workers[0] for workers in workers_by_device(placement).values()}
    for i, (p, want) in enumerate(zip(partials, partials_host)):
        if i not in accumulators:
            np.testing.assert_array_equal(host(backend, p), want, err_msg=f"partial {i} was modified")


def on_devices(backend, arrays, placement):
    """Put host ``arrays[i]`` on ``placement[i]``, then forget those setup transfers."""
    out = [backend.asarray(a, a.dtype, d) for a, d in zip(arrays, placement)]
    if isinstance(backend, SimulatedBackend):
        backend.reset_transfers()
    return out


# ---------------------------------------------------------------------------- broadcast


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_broadcast_one_copy_per_device(setup, rng, n_workers):
    backend, place = setup
    placement = place(n_workers)
    x = rng.standard_normal((3, 5))
    copies = collectives.broadcast(backend, x, placement, np.float32)
    distinct = list(dict.fromkeys(placement))
    assert list(copies) == distinct
    for device, arr in copies.items():
        assert backend.device_of(arr) == device
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(host(backend, arr), x.astype(np.float32))
    if isinstance(backend, SimulatedBackend):
        # One move per distinct device, counted in the bytes read from the source.
        assert backend.transfers == {("host", d): (1, x.nbytes) for d in distinct}


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_broadcast_from_a_device(rng, n_workers):
    backend = SimulatedBackend(N_DEVICES)
    placement = worker_devices(n_workers, backend.devices)
    x = backend.asarray(rng.standard_normal((4, 2)), np.float64, 0)
    backend.reset_transfers()
    copies = collectives.broadcast(backend, x, placement, np.float64)
    assert copies[0] is x  # already there with the right dtype: no copy
    others = [d for d in dict.fromkeys(placement) if d != 0]
    assert backend.transfers == {(0, d): (1, x.nbytes) for d in others}
    for d in others:
        np.testing.assert_array_equal(host(backend, copies[d]), host(backend, x))


# ---------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_scatter_pieces(setup, rng, n_workers, axis):
    backend, place = setup
    placement = place(n_workers)
    shape = [3, 5, 2]
    shape[axis] = 7 * n_workers
    x = rng.standard_normal(shape)
    ranges = shard_ranges(shape[axis], n_workers)
    pieces = collectives.scatter(backend, x, axis, ranges, placement, np.float64)
    assert len(pieces) == n_workers
    expected = np.split(x, n_workers, axis=axis)
    for piece, want, device in zip(pieces, expected, placement):
        assert backend.device_of(piece) == device
        assert piece.shape == want.shape
        np.testing.assert_array_equal(host(backend, piece), want)
    if isinstance(backend, SimulatedBackend):
        # Only the pieces cross: each moves once, with exactly its own bytes.
        assert total_transfers(backend) == n_workers
        assert sum(b for _, b in backend.transfers.values()) == x.nbytes


def test_scatter_converts_dtype(rng):
    backend = SimulatedBackend(2)
    x = rng.standard_normal((4, 6))
    pieces = collectives.scatter(backend, x, 1, shard_ranges(6, 3), [0, 1, 0], np.float16)
    for piece, want in zip(pieces, np.split(x, 3, axis=1)):
        assert piece.dtype == np.float16
        np.testing.assert_array_equal(host(backend, piece), want.astype(np.float16))


# ---------------------------------------------------------------------------- all_gather


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_all_gather(setup, rng, n_workers, axis):
    backend, place = setup
    placement = place(n_workers)
    # Uneven split sizes on purpose: all_gather does not need equal shards.
    shards = []
    for i in range(n_workers):
        shape = [2, 3, 4]
        shape[axis] = 1 + (i * 3) % 5
        shards.append(rng.standard_normal(shape))
    expected = np.concatenate(shards, axis=axis)
    before = [s.copy() for s in shards]
    for dst in backend.devices:
        on_dev = on_devices(backend, shards, placement)
        out = collectives.all_gather(backend, on_dev, axis, dst)
        assert backend.device_of(out) == dst
        assert out.shape == expected.shape and out.dtype == expected.dtype
        np.testing.assert_array_equal(host(backend, out), expected)
        for shard, want in zip(on_dev, before):
            np.testing.assert_array_equal(host(backend, shard), want)
        if isinstance(backend, SimulatedBackend):
            remote = [s for s, d in zip(on_dev, placement) if d != dst]
            assert total_transfers(backend) == len(remote)
            assert all(key[1] == dst for key in backend.transfers)
            assert sum(b for _, b in backend.transfers.values()) == sum(s.nbytes for s in remote)


# ---------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_sum(setup, rng, n_workers):
    backend, place = setup
    placement = place(n_workers)
    partials_host = [rng.standard_normal((3, 4)) for _ in range(n_workers)]
    expected = np.sum(np.stack(partials_host), axis=0, dtype=np.float64)
    distinct = set(placement)
    for dst in backend.devices:
        partials = on_devices(backend, partials_host, placement)
        out = collectives.reduce_sum(backend, partials, placement, dst)
        assert backend.device_of(out) == dst
        assert out.shape == (3, 4) and out.dtype == np.float64
        np.testing.assert_allclose(host(backend, out), expected, rtol=1e-13, atol=1e-13)
        check_operands_untouched(backend, partials, partials_host, placement)
        if isinstance(backend, SimulatedBackend):
            remote_devices = distinct - {dst}
            assert total_transfers(backend) <= len(remote_devices)
            for (src, to), (count, nbytes) in backend.transfers.items():
                assert to == dst and src in remote_devices and count == 1
                assert nbytes == partials_host[0].nbytes


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_max(setup, rng, n_workers):
    backend, place = setup
    placement = place(n_workers)
    partials_host = [rng.standard_normal((5,)) for _ in range(n_workers)]
    partials = on_devices(backend, partials_host, placement)
    out = collectives.reduce_max(backend, partials, placement, backend.devices[-1])
    assert backend.device_of(out) == backend.devices[-1]
    np.testing.assert_array_equal(host(backend, out), np.max(np.stack(partials_host), axis=0))
    check_operands_untouched(backend, partials, partials_host, placement)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_all_reduce_sum(setup, rng, n_workers):
    backend, place = setup
    placement = place(n_workers)
    partials_host = [rng.standard_normal((2, 3, 2)) for _ in range(n_workers)]
    expected = np.sum(np.stack(partials_host), axis=0)
    partials = on_devices(backend, partials_host, placement)
    outs = collectives.all_reduce_sum(backend, partials, placement)
    assert len(outs) == n_workers
    for i, (out, device) in enumerate(zip(outs, placement)):
        assert backend.device_of(out) == device
        np.testing.assert_allclose(host(backend, out), expected, rtol=1e-13, atol=1e-13)
        first = placement.index(device)
        assert out is outs[first]  # workers sharing a device share its copy
    check_operands_untouched(backend, partials, partials_host, placement)
    if isinstance(backend, SimulatedBackend):
        # Reduce to worker 0's device (one move per other device), then one copy back per other device.
        n_other = len(set(placement)) - 1
        assert total_transfers(backend) <= 2 * n_other


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_all_reduce_max(setup, rng, n_workers):
    backend, place = setup
    placement = place(n_workers)
    partials_host = [rng.standard_normal((4,)) for _ in range(n_workers)]
    outs = collectives.all_reduce_max(backend, on_devices(backend, partials_host, placement), placement)
    for out, device in zip(outs, placement):
        assert backend.device_of(out) == device
        np.testing.assert_array_equal(host(backend, out), np.max(np.stack(partials_host), axis=0))


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_to_placement(rng, n_workers):
    backend = SimulatedBackend(N_DEVICES)
    placement = worker_devices(n_workers, backend.devices)
    arrays = on_devices(backend, [rng.standard_normal(3) for _ in range(n_workers)], [0] * n_workers)
    moved = collectives.to_placement(backend, arrays, placement, np.float64)
    for a, m, d in zip(arrays, moved, placement):
        assert backend.device_of(m) == d
        assert (m is a) == (d == 0)
        np.testing.assert_array_equal(host(backend, m), host(backend, a))
    assert total_transfers(backend) == sum(d != 0 for d in placement)


def test_simulated_results_are_simarrays(rng):
    backend = SimulatedBackend(N_DEVICES)
    placement = worker_devices(5, backend.devices)
    partials = on_devices(backend, [rng.standard_normal(2) for _ in range(5)], placement)
    assert isinstance(collectives.reduce_sum(backend, partials, placement, 1), SimArray)
    assert isinstance(collectives.all_gather(backend, partials, 0, 2), SimArray)


# --- the opt-in in-process NCCL hook ------------------------------------------


class _RecordingNccl:
    """Stands in for InProcessNccl: answers can_reduce as told, and records what it reduced."""

    def __init__(self, backend, accept: bool) -> None:
        self.backend, self.accept, self.calls = backend, accept, []

    def can_reduce(self, arrays, dst, ufunc):
        return self.accept

    def reduce(self, arrays, dst, ufunc):
        self.calls.append((sorted(arrays), dst, ufunc))
        total = sum(self.backend.to_host(a) for a in arrays.values())
        return self.backend.asarray(total, np.float64, dst)


@pytest.mark.parametrize("accept", [True, False])
def test_reduce_goes_through_nccl_only_when_it_accepts(accept):
    backend = SimulatedBackend(3)
    backend.nccl = _RecordingNccl(backend, accept)
    placement = worker_devices(6, backend.devices)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((2, 3)) for _ in placement]
    partials = [backend.asarray(v, np.float64, d) for v, d in zip(values, placement)]
    out = collectives.reduce_sum(backend, partials, placement, 1)
    np.testing.assert_allclose(backend.to_host(out), sum(values), rtol=1e-13)
    assert backend.device_of(out) == 1
    # Local sums first (two workers per device), then one array per device to NCCL.
    assert backend.nccl.calls == ([([0, 1, 2], 1, "add")] if accept else [])
