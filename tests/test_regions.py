"""The four conjugate regions, forward then backward, against NumPy, with their transfer counts.

Each runs on every backend of ``conftest`` (NumPy; 1, 3 and 8 simulated
devices; CuPy where a GPU is) with 1..8 workers, so the simulated runs place
more workers than devices and more devices than workers. Expected blocks are
built here from ``np.array_split`` and round-robin placement.

The conjugate property, per device block: copy forward then backward sums the
copies (``D`` devices give ``D * x``); reduce backward then forward does the
same for ``dY``; scatter then gather, and gather then scatter, are identities.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
from conftest import WORKER_COUNTS

from tp_gpu import TensorParallelConfig, get_group
from tp_gpu.backends import SimulatedBackend
from tp_gpu.regions import copy_to_region, gather_from_region, reduce_from_region, scatter_to_region


def counts(backend) -> bool:
    return isinstance(backend, SimulatedBackend)


def reset(backend) -> None:
    if counts(backend):
        backend.reset_transfers()


def moves(backend) -> Dict:
    return dict(backend.transfers) if counts(backend) else {}


def host(backend, arr) -> np.ndarray:
    return np.array(backend.to_host(arr))


def distinct(devices) -> List:
    return list(dict.fromkeys(devices))


def put(backend, arrays: Dict) -> Dict:
    out = {d: backend.asarray(a, a.dtype, d) for d, a in arrays.items()}
    reset(backend)
    return out


def along(axis: int, index) -> tuple:
    return (slice(None),) * axis + (index,)


def reference_blocks(x: np.ndarray, axis: int, n_workers: int, backend_devices) -> Dict:
    """Device ``d``'s block: the ``np.array_split`` pieces of the workers placed round-robin on ``d``."""
    axis %= x.ndim
    edges = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(x.shape[axis]), n_workers)])
    placement = [backend_devices[i % len(backend_devices)] for i in range(n_workers)]
    return {
        device: np.concatenate(
            [
                x[along(axis, slice(edges[w], edges[w + 1]))]
                for w in range(n_workers)
                if placement[w] == device
            ],
            axis=axis,
        )
        for device in distinct(placement)
    }


def tolerance(dtype) -> float:
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5


# ---------------------------------------------------------------------------- copy_to_region


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_copy_to_region(make_config, rng, n_workers, dtype):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    devices = distinct(group.devices)
    x = rng.standard_normal((3, 7))
    reset(backend)
    copies = copy_to_region.forward(group, x, dtype)
    assert list(copies) == devices
    for d, c in copies.items():
        assert backend.device_of(c) == d and c.dtype == dtype
        np.testing.assert_array_equal(host(backend, c), x.astype(dtype))
    if counts(backend):
        assert moves(backend) == {("host", d): (1, x.nbytes) for d in devices}  # one copy per device

    # Backward sums the partial dX of every device onto the output device.
    partials_host = {d: rng.standard_normal((3, 7)).astype(dtype) for d in devices}
    reset(backend)
    dx = copy_to_region.backward(group, put(backend, partials_host))
    assert backend.device_of(dx) == out and dx.dtype == dtype
    expected = np.sum(np.stack(list(partials_host.values())).astype(np.float64), axis=0)
    np.testing.assert_allclose(host(backend, dx), expected, rtol=tolerance(dtype), atol=tolerance(dtype))
    if counts(backend):
        nbytes = partials_host[devices[0]].nbytes
        assert moves(backend) == {(d, out): (1, nbytes) for d in devices if d != out}

    # Conjugate: copy forward then backward of the copies gives D * x.
    again = copy_to_region.backward(group, copy_to_region.forward(group, x, dtype))
    np.testing.assert_allclose(host(backend, again), len(devices) * x.astype(dtype), rtol=tolerance(dtype))


# ---------------------------------------------------------------------------- reduce_from_region


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_from_region(make_config, rng, n_workers):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    devices = distinct(group.devices)
    partials_host = {d: rng.standard_normal((2, 5)) for d in devices}
    partials = put(backend, partials_host)
    y = reduce_from_region.forward(group, partials)
    assert backend.device_of(y) == out
    np.testing.assert_allclose(host(backend, y), sum(partials_host.values()), rtol=1e-12, atol=1e-12)
    if counts(backend):
        assert moves(backend) == {(d, out): (1, partials_host[d].nbytes) for d in devices if d != out}

    # Backward copies dY (on the output device) to every device, and to ``also``.
    g_host = rng.standard_normal((2, 5))
    g = put(backend, {out: g_host})[out]
    copies = reduce_from_region.backward(group, g, np.float64, also=[out])
    assert list(copies) == distinct([*devices, out])
    assert copies[out] is g  # already there: no copy
    for d, c in copies.items():
        assert backend.device_of(c) == d
        np.testing.assert_array_equal(host(backend, c), g_host)
    if counts(backend):
        assert moves(backend) == {(out, d): (1, g_host.nbytes) for d in copies if d != out}

    # Conjugate: reduce backward then forward gives D * dY.
    total = reduce_from_region.forward(group, reduce_from_region.backward(group, g_host, np.float64))
    np.testing.assert_allclose(host(backend, total), len(devices) * g_host, rtol=1e-12)


def test_reduce_from_region_backward_reaches_an_output_device_without_workers(rng):
    """2 workers on devices 0 and 1, output on device 2: the bias gradient needs dY there too."""
    group = get_group(
        TensorParallelConfig(n_workers=2, backend="simulated", devices=3, output_device=2, dtype="float64")
    )
    backend = group.backend
    assert group.devices == [0, 1] and group.output_device == 2
    partials_host = {0: rng.standard_normal(7), 1: rng.standard_normal(7)}
    y = reduce_from_region.forward(group, put(backend, partials_host))
    assert backend.device_of(y) == 2
    np.testing.assert_allclose(host(backend, y), partials_host[0] + partials_host[1], rtol=1e-12)
    assert moves(backend) == {(0, 2): (1, 56), (1, 2): (1, 56)}
    g_host = rng.standard_normal(7)
    g = put(backend, {2: g_host})[2]
    copies = reduce_from_region.backward(group, g, np.float32, also=[2])
    assert list(copies) == [0, 1, 2]
    for d, c in copies.items():
        assert backend.device_of(c) == d and c.dtype == np.float32
        np.testing.assert_array_equal(host(backend, c), g_host.astype(np.float32))
    assert moves(backend) == {(2, 0): (1, 56), (2, 1): (1, 56)}
    assert list(reduce_from_region.backward(group, g, np.float64)) == [0, 1]  # without ``also``: workers only


# ---------------------------------------------------------------------------- scatter_to_region


@pytest.mark.parametrize("size", [5, 13])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_scatter_to_region(make_config, rng, n_workers, axis, size):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    shape = [3, 2, 4]
    shape[axis] = size
    x = rng.standard_normal(shape)
    layout = group.split(size)
    expected = reference_blocks(x, axis, n_workers, list(backend.devices))
    reset(backend)
    blocks = scatter_to_region.forward(group, x, layout, np.float64, axis)
    assert list(blocks) == list(expected)
    for d, want in expected.items():
        assert backend.device_of(blocks[d]) == d
        np.testing.assert_array_equal(host(backend, blocks[d]), want)
    if counts(backend):
        # Only each device's own slices cross: per device exactly its block's bytes.
        got = moves(backend)
        assert set(got) == {("host", d) for d in expected}
        assert {d: got[("host", d)][1] for d in expected} == {d: b.nbytes for d, b in expected.items()}

    # Backward gathers dX's blocks on the output device; each block crosses once.
    dx_host = rng.standard_normal(shape)
    grads_host = reference_blocks(dx_host, axis, n_workers, list(backend.devices))
    grads = put(backend, grads_host)
    dx = scatter_to_region.backward(group, grads, layout, axis)
    assert backend.device_of(dx) == out
    np.testing.assert_array_equal(host(backend, dx), dx_host)  # every worker's slice back in its place
    if counts(backend):
        assert moves(backend) == {(d, out): (1, grads_host[d].nbytes) for d in grads_host if d != out}

    # Conjugate: scatter then gather returns x exactly.
    back = scatter_to_region.backward(
        group, scatter_to_region.forward(group, x, layout, np.float64, axis), layout, axis
    )
    np.testing.assert_array_equal(host(backend, back), x)


# ---------------------------------------------------------------------------- gather_from_region


@pytest.mark.parametrize("size", [5, 13])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_gather_from_region(make_config, rng, n_workers, axis, size):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    shape = [2, 3, 4]
    shape[axis] = size
    y_host = rng.standard_normal(shape)
    layout = group.split(size)
    blocks_host = reference_blocks(y_host, axis, n_workers, list(backend.devices))
    blocks = put(backend, blocks_host)
    y = gather_from_region.forward(group, blocks, layout, axis)
    assert backend.device_of(y) == out
    np.testing.assert_array_equal(host(backend, y), y_host)
    if counts(backend):
        assert moves(backend) == {(d, out): (1, b.nbytes) for d, b in blocks_host.items() if d != out}

    # Backward splits dY (on the output device) into the devices' blocks; nothing crosses to out itself.
    g_host = rng.standard_normal(shape)
    g = put(backend, {out: g_host})[out]
    grads = gather_from_region.backward(group, g, layout, np.float32, axis)
    expected = reference_blocks(g_host, axis, n_workers, list(backend.devices))
    assert list(grads) == list(expected)
    for d, want in expected.items():
        assert backend.device_of(grads[d]) == d and grads[d].dtype == np.float32
        np.testing.assert_array_equal(host(backend, grads[d]), want.astype(np.float32))
    if counts(backend):
        got = moves(backend)
        assert set(got) == {(out, d) for d in expected if d != out}
        assert {key: nbytes for key, (_, nbytes) in got.items()} == {
            (out, d): want.nbytes for d, want in expected.items() if d != out
        }

    # Conjugate both ways: gather then split returns the blocks, split then gather returns dY.
    again = gather_from_region.backward(
        group, gather_from_region.forward(group, blocks, layout, axis), layout, np.float64, axis
    )
    for d, want in blocks_host.items():
        np.testing.assert_array_equal(host(backend, again[d]), want)
    round_trip = gather_from_region.forward(
        group, gather_from_region.backward(group, g, layout, np.float64, axis), layout, axis
    )
    np.testing.assert_array_equal(host(backend, round_trip), g_host)


# ---------------------------------------------------------------------------- regions chained as in a layer


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_column_then_row_regions_compute_a_two_layer_product(make_config, rng, n_workers):
    """copy -> (X A_d) -> gather equals X A; scatter -> (X_d B_d) -> reduce equals X B (Megatron's pairs)."""
    group = get_group(make_config(n_workers))
    backend = group.backend
    x = rng.standard_normal((4, 6))
    a = rng.standard_normal((6, 13))
    b = rng.standard_normal((13, 5))
    cols = group.split(13)
    a_blocks = scatter_to_region.forward(group, a, cols, np.float64, axis=1)
    b_blocks = scatter_to_region.forward(group, b, cols, np.float64, axis=0)
    copies = copy_to_region.forward(group, x, np.float64)
    h_blocks = group.on_devices(lambda u, w: u @ w, copies, a_blocks)
    h = gather_from_region.forward(group, h_blocks, cols)
    np.testing.assert_allclose(host(backend, h), x @ a, rtol=1e-12, atol=1e-12)
    partials = group.on_devices(lambda u, w: u @ w, h_blocks, b_blocks)
    y = reduce_from_region.forward(group, partials)
    np.testing.assert_allclose(host(backend, y), x @ a @ b, rtol=1e-10, atol=1e-10)
