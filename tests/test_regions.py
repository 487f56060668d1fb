"""The regions as tape Functions: each placement change forward, its conjugate backward, against NumPy.

Each runs on every backend of ``conftest`` (NumPy; 1, 3 and 8 simulated
devices; CuPy where a GPU is) with 1..8 workers, so the simulated runs place
more workers than devices and more devices than workers. Expected blocks are
built here from ``np.array_split`` and round-robin placement; the simulated
backend also counts what crosses between devices.

The conjugate property: copy forward then backward of the copies sums them
(``D`` devices give ``D * x``); reduce backward then forward does the same
for ``dY``; scatter then gather, and gather then scatter, are identities.
The dispatchers :func:`replicate` and :func:`split` pick the region from the
input's placement and refuse, naming both placements, what no region converts.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
from conftest import WORKER_COUNTS

import tp_gpu
from tp_gpu import RowParallelLinear, ShapeError, ShardedTensor, TensorParallelConfig, get_group
from tp_gpu.backends import SimulatedBackend
from tp_gpu.placements import Dense, Partial, Replicated, Split
from tp_gpu.regions import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    reduce_from_region,
    reduce_scatter_to_sequence_parallel_region,
    replicate,
    scatter_to_region,
    scatter_to_sequence_parallel_region,
    sequence_layout,
    split,
)
from tp_gpu.tensor import Tensor, new_tensor


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


def leaf(group, blocks: Dict, placement, shape) -> Tensor:
    """A leaf that requires grad, of per-device ``blocks`` (on their devices) placed as ``placement``."""
    dtype = next(iter(blocks.values())).dtype
    return new_tensor(blocks, placement, tuple(shape), dtype, group.backend, group.comm).requires_grad_()


def assert_blocks(backend, t: Tensor, expected: Dict, dtype=None) -> None:
    """``t``'s blocks are ``expected``'s, each on its own device (and of ``dtype`` when given)."""
    assert list(t.blocks) == list(expected)
    for d, want in expected.items():
        assert backend.device_of(t.blocks[d]) == d
        if dtype is not None:
            assert t.blocks[d].dtype == dtype
        np.testing.assert_allclose(host(backend, t.blocks[d]), want, rtol=1e-12, atol=1e-12)


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
    x_host = rng.standard_normal((3, 7))
    x = tp_gpu.tensor(x_host, requires_grad=True)
    reset(backend)
    copies = copy_to_region(x, group, dtype)  # Dense -> Replicated
    assert copies.placement == Replicated(tuple(devices)) and copies.dtype == dtype
    assert copies.grad_fn.name == "CopyToRegionBackward"
    assert_blocks(backend, copies, {d: x_host.astype(dtype) for d in devices}, dtype)
    if counts(backend):
        assert moves(backend) == {("host", d): (1, x_host.nbytes) for d in devices}  # one copy per device

    # Backward sums the Partial dX of every device onto the output device.
    partials_host = {d: rng.standard_normal((3, 7)).astype(dtype) for d in devices}
    grad = Tensor(put(backend, partials_host), Partial(tuple(devices)), (3, 7), dtype, backend)
    copies.backward(grad)
    assert x.grad.placement == Dense(out) and x.grad.dtype == dtype
    assert backend.device_of(x.grad.blocks[out]) == out
    expected = np.sum(np.stack(list(partials_host.values())).astype(np.float64), axis=0)
    np.testing.assert_allclose(np.asarray(x.grad), expected, rtol=tolerance(dtype), atol=tolerance(dtype))
    if counts(backend):
        nbytes = partials_host[devices[0]].nbytes
        assert moves(backend) == {(d, out): (1, nbytes) for d in devices if d != out}

    # Conjugate: copy forward then backward of the copies gives D * x.
    x = tp_gpu.tensor(x_host, requires_grad=True)
    copies = copy_to_region(x, group, dtype)
    copies.backward(Tensor(dict(copies.blocks), Partial(tuple(devices)), (3, 7), dtype, backend))
    np.testing.assert_allclose(np.asarray(x.grad), len(devices) * x_host.astype(dtype), rtol=tolerance(dtype))


# ---------------------------------------------------------------------------- reduce_from_region


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_from_region(make_config, rng, n_workers):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    devices = tuple(distinct(group.devices))
    partials_host = {d: rng.standard_normal((2, 5)) for d in devices}
    partials = leaf(group, put(backend, partials_host), Partial(devices), (2, 5))
    y = reduce_from_region(partials, group)  # Partial -> Dense (sum)
    assert y.placement == Dense(out) and backend.device_of(y.blocks[out]) == out
    np.testing.assert_allclose(np.asarray(y), sum(partials_host.values()), rtol=1e-12, atol=1e-12)
    if counts(backend):
        assert moves(backend) == {(d, out): (1, partials_host[d].nbytes) for d in devices if d != out}

    # Backward copies dY (on the output device) to every device: a Replicated gradient.
    g_host = rng.standard_normal((2, 5))
    g = Tensor(put(backend, {out: g_host}), Dense(out), (2, 5), np.float64, backend)
    y.backward(g)
    assert partials.grad.placement == Replicated(devices)
    assert_blocks(backend, partials.grad, {d: g_host for d in devices})
    if out in devices:
        assert partials.grad.blocks[out] is g.blocks[out]  # already there: no copy
    if counts(backend):
        assert moves(backend) == {(out, d): (1, g_host.nbytes) for d in devices if d != out}

    # Conjugate: reduce backward then forward gives D * dY.
    total = reduce_from_region(
        Tensor(partials.grad.blocks, Partial(devices), (2, 5), np.float64, backend), group
    )
    np.testing.assert_allclose(np.asarray(total), len(devices) * g_host, rtol=1e-12)


def test_reduce_from_region_with_an_output_device_without_workers(rng):
    """2 workers on devices 0 and 1, output on device 2: the sum lands there, dY comes back from
    there, and the row-parallel bias (whole on device 2) gets its gradient there."""
    config = TensorParallelConfig(
        n_workers=2, backend="simulated", devices=3, output_device=2, dtype="float64"
    )
    group = get_group(config)
    backend = group.backend
    assert group.devices == [0, 1] and group.output_device == 2
    partials_host = {0: rng.standard_normal(7), 1: rng.standard_normal(7)}
    partials = leaf(group, put(backend, partials_host), Partial((0, 1)), (7,))
    y = reduce_from_region(partials, group)
    assert y.placement == Dense(2) and backend.device_of(y.blocks[2]) == 2
    np.testing.assert_allclose(np.asarray(y), partials_host[0] + partials_host[1], rtol=1e-12)
    assert moves(backend) == {(0, 2): (1, 56), (1, 2): (1, 56)}
    g_host = rng.standard_normal(7)
    y.backward(Tensor(put(backend, {2: g_host}), Dense(2), (7,), np.float64, backend))
    assert partials.grad.placement == Replicated((0, 1))
    assert_blocks(backend, partials.grad, {0: g_host, 1: g_host})
    assert moves(backend) == {(2, 0): (1, 56), (2, 1): (1, 56)}

    row = RowParallelLinear(4, 7, config, seed=0)
    x, dy = rng.standard_normal((3, 4)), rng.standard_normal((3, 7))
    row(x).backward(dy)
    assert list(row.bias.grad_blocks) == [2] and backend.device_of(row.bias.grad_blocks[2]) == 2
    np.testing.assert_allclose(row.bias.full_grad(), dy.sum(0), rtol=1e-12)


# ---------------------------------------------------------------------------- scatter_to_region


@pytest.mark.parametrize("size", [5, 13])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_scatter_to_region(make_config, rng, n_workers, axis, size):
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    shape = [3, 2, 4]
    shape[axis] = size
    x_host = rng.standard_normal(shape)
    x = tp_gpu.tensor(x_host, requires_grad=True)
    layout = group.split(size)
    expected = reference_blocks(x_host, axis, n_workers, list(backend.devices))
    reset(backend)
    y = scatter_to_region(x, group, layout, np.float64, axis)  # Dense -> Split(axis)
    assert isinstance(y, ShardedTensor) and y.placement == Split(axis % 3, layout)
    assert_blocks(backend, y, expected)
    if counts(backend):
        # Only each device's own slices cross: per device exactly its block's bytes.
        got = moves(backend)
        assert set(got) == {("host", d) for d in expected}
        assert {d: got[("host", d)][1] for d in expected} == {d: b.nbytes for d, b in expected.items()}

    # Backward gathers dX's blocks on the output device; each block crosses once.
    dx_host = rng.standard_normal(shape)
    grads_host = reference_blocks(dx_host, axis, n_workers, list(backend.devices))
    y.backward(Tensor(put(backend, grads_host), y.placement, tuple(shape), np.float64, backend))
    assert x.grad.placement == Dense(out) and backend.device_of(x.grad.blocks[out]) == out
    np.testing.assert_array_equal(np.asarray(x.grad), dx_host)  # every worker's slice back in its place
    if counts(backend):
        assert moves(backend) == {(d, out): (1, grads_host[d].nbytes) for d in grads_host if d != out}

    # Conjugate: scatter then gather returns x exactly, forward and backward.
    x = tp_gpu.tensor(x_host, requires_grad=True)
    y = scatter_to_region(x, group, layout, np.float64, axis)
    np.testing.assert_array_equal(np.asarray(gather_from_region(y, group)), x_host)
    y.backward(Tensor(dict(y.blocks), y.placement, tuple(shape), np.float64, backend))
    np.testing.assert_array_equal(np.asarray(x.grad), x_host)


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
    x = leaf(group, put(backend, blocks_host), Split(axis % 3, layout), shape)
    y = gather_from_region(x, group)  # Split(axis) -> Dense
    assert y.placement == Dense(out) and backend.device_of(y.blocks[out]) == out
    np.testing.assert_array_equal(np.asarray(y), y_host)
    if counts(backend):
        assert moves(backend) == {(d, out): (1, b.nbytes) for d, b in blocks_host.items() if d != out}

    # Backward splits dY (on the output device) into the devices' blocks; nothing crosses to out itself.
    g_host = rng.standard_normal(shape)
    y.backward(Tensor(put(backend, {out: g_host}), Dense(out), tuple(shape), np.float64, backend))
    expected = reference_blocks(g_host, axis, n_workers, list(backend.devices))
    assert x.grad.placement == x.placement
    assert_blocks(backend, x.grad, expected, np.float64)
    if counts(backend):
        got = moves(backend)
        assert set(got) == {(out, d) for d in expected if d != out}
        assert {key: nbytes for key, (_, nbytes) in got.items()} == {
            (out, d): want.nbytes for d, want in expected.items() if d != out
        }

    # Conjugate both ways: gather then split returns the blocks, split then gather returns dY.
    x = leaf(group, put(backend, blocks_host), Split(axis % 3, layout), shape)
    y = gather_from_region(x, group)
    y.backward(Tensor(dict(y.blocks), y.placement, tuple(shape), np.float64, backend))
    assert_blocks(backend, x.grad, blocks_host)
    round_trip = gather_from_region(scatter_to_region(g_host, group, layout, np.float64, axis), group)
    np.testing.assert_array_equal(np.asarray(round_trip), g_host)


# ---------------------------------------------------------------------------- sequence parallelism


@pytest.mark.parametrize("seq", [5, 13])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_gather_from_sequence_parallel_region(make_config, rng, n_workers, seq):
    """``Split(S) -> Replicated`` (all-gather); backward reduce-scatters the Partial ``dX``."""
    group = get_group(make_config(n_workers))
    backend = group.backend
    devices = tuple(distinct(group.devices))
    x_host = rng.standard_normal((2, seq, 3))
    layout = sequence_layout(group, seq)
    x = leaf(
        group,
        put(backend, reference_blocks(x_host, 1, n_workers, list(backend.devices))),
        Split(1, layout),
        (2, seq, 3),
    )
    y = gather_from_sequence_parallel_region(x, group)
    assert y.placement == Replicated(devices) and y.grad_fn.name == "GatherFromSequenceParallelRegionBackward"
    assert_blocks(backend, y, {d: x_host for d in devices})
    np.testing.assert_array_equal(np.asarray(y.recompute().blocks[devices[0]]), x_host)  # kept: the slices

    partials_host = {d: rng.standard_normal((2, seq, 3)) for d in devices}
    y.backward(Tensor(put(backend, partials_host), Partial(devices), (2, seq, 3), np.float64, backend))
    total = sum(partials_host.values())
    assert x.grad.placement == x.placement
    assert_blocks(backend, x.grad, reference_blocks(total, 1, n_workers, list(backend.devices)))
    with tp_gpu.no_grad():
        assert gather_from_sequence_parallel_region(x, group).recompute is None  # nothing to keep


@pytest.mark.parametrize("seq", [5, 13])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_reduce_scatter_to_sequence_parallel_region(make_config, rng, n_workers, seq):
    """``Partial -> Split(S)`` (reduce-scatter); backward all-gathers ``dY``, whole on every device."""
    group = get_group(make_config(n_workers))
    backend = group.backend
    devices = tuple(distinct(group.devices))
    partials_host = {d: rng.standard_normal((seq, 4)) for d in devices}
    x = leaf(group, put(backend, partials_host), Partial(devices), (seq, 4))
    y = reduce_scatter_to_sequence_parallel_region(x, group)
    layout = sequence_layout(group, seq)
    assert isinstance(y, ShardedTensor) and y.placement == Split(0, layout)
    total = sum(partials_host.values())
    assert_blocks(backend, y, reference_blocks(total, 0, n_workers, list(backend.devices)))
    np.testing.assert_allclose(np.asarray(y), total, rtol=1e-12, atol=1e-12)

    g_host = rng.standard_normal((seq, 4))
    g_blocks = put(backend, reference_blocks(g_host, 0, n_workers, list(backend.devices)))
    y.backward(Tensor(g_blocks, y.placement, (seq, 4), np.float64, backend))
    assert x.grad.placement == Replicated(devices)
    assert_blocks(backend, x.grad, {d: g_host for d in devices})
    with pytest.raises(ShapeError, match=r"needs a sequence axis, got shape \(4,\)"):
        reduce_scatter_to_sequence_parallel_region(
            leaf(group, put(backend, {devices[0]: g_host[0]}), Partial(devices[:1]), (4,)), group
        )


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_scatter_to_sequence_parallel_region(make_config, rng, n_workers):
    """``Dense -> Split(S)``; backward gathers ``dX`` on the output device."""
    group = get_group(make_config(n_workers))
    backend, out = group.backend, group.output_device
    x_host = rng.standard_normal((2, 11, 3))
    x = tp_gpu.tensor(x_host, requires_grad=True)
    y = scatter_to_sequence_parallel_region(x, group)
    assert y.placement == Split(1, sequence_layout(group, 11))
    assert_blocks(backend, y, reference_blocks(x_host, 1, n_workers, list(backend.devices)))
    assert scatter_to_sequence_parallel_region(y, group) is y  # already split so: as it is
    g_host = rng.standard_normal((2, 11, 3))
    y.backward(g_host)
    assert x.grad.placement == Dense(out)
    np.testing.assert_array_equal(np.asarray(x.grad), g_host)
    with pytest.raises(ShapeError, match=r"sequence axis.*got \(5,\)"):
        scatter_to_sequence_parallel_region(np.ones(5), group)


# ---------------------------------------------------------------------------- the dispatchers


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_replicate_picks_the_region_from_the_placement(make_config, rng, n_workers):
    group = get_group(make_config(n_workers))
    backend = group.backend
    devices = tuple(distinct(group.devices))
    x_host = rng.standard_normal((2, 6, 3))
    dense = tp_gpu.tensor(x_host, requires_grad=True)
    y = replicate(dense, group, np.float64)
    assert y.grad_fn.name == "CopyToRegionBackward" and y.placement == Replicated(devices)
    raw = replicate(x_host, group, np.float64)  # a raw array: a Dense constant, nothing recorded
    assert raw.placement == Replicated(devices) and raw.grad_fn is None
    assert replicate(y, group, np.float64) is y  # already whole on the group's devices
    with pytest.raises(ShapeError, match=r"is placed Replicated.*expected a Dense tensor"):
        replicate(y, group, np.float32)  # replicated, but in another dtype: no region casts it

    seq = scatter_to_sequence_parallel_region(tp_gpu.tensor(x_host, requires_grad=True), group)
    gathered = replicate(seq, group, np.float64)
    assert gathered.grad_fn.name == "GatherFromSequenceParallelRegionBackward"
    assert_blocks(backend, gathered, {d: x_host for d in devices})

    split_last = split(dense, group, group.split(3), np.float64, -1)
    with pytest.raises(
        ShapeError,
        match=r"layer input is placed Split\(axis=2.*expected a Dense tensor, one split along the "
        r"sequence \(axis 1\)",
    ):
        replicate(split_last, group, np.float64, "layer input")
    partial = leaf(group, put(backend, {devices[0]: x_host}), Partial(devices[:1]), x_host.shape)
    with pytest.raises(ShapeError, match=r"input is placed Partial.*expected a Dense tensor"):
        replicate(partial, group, np.float64)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_split_picks_the_region_from_the_placement(make_config, rng, n_workers):
    group = get_group(make_config(n_workers))
    backend = group.backend
    devices = tuple(distinct(group.devices))
    x_host = rng.standard_normal((4, 5 * n_workers))
    layout = group.split(5 * n_workers)
    y = split(tp_gpu.tensor(x_host, requires_grad=True), group, layout, np.float64)
    assert y.grad_fn.name == "ScatterToRegionBackward" and y.placement == Split(1, layout)
    assert split(y, group, layout, np.float64) is y  # already split alike: as it is
    assert split(x_host, group, layout).placement == Split(1, layout)  # a raw array is scattered

    other = group.split(5 * n_workers + 1)
    with pytest.raises(
        ShapeError,
        match=r"input of shape \(4, \d+\) is placed Split\(axis=1, sizes=.*expected it Dense or split on "
        r"axis 1 with sizes",
    ):
        split(split(np.ones((4, 5 * n_workers + 1)), group, other), group, layout)
    with pytest.raises(
        ShapeError, match=r"is placed Split\(axis=1.*expected it Dense or split on axis 0 with sizes"
    ):
        split(y, group, group.split(4), np.float64, 0)
    replicated = replicate(x_host, group, np.float64)
    with pytest.raises(
        ShapeError, match=r"weight of shape .* is placed Replicated.*expected it Dense or split on axis 1"
    ):
        split(replicated, group, layout, np.float64, -1, "weight")
    partial = leaf(group, put(backend, {devices[0]: x_host}), Partial(devices[:1]), x_host.shape)
    with pytest.raises(ShapeError, match=r"is placed Partial.*expected it Dense"):
        split(partial, group, layout)
    with pytest.raises(ShapeError, match="reduce_from_region takes a Partial tensor, got Dense"):
        reduce_from_region(tp_gpu.tensor(x_host), group)
    with pytest.raises(ShapeError, match="gather_from_region takes a Split tensor, got Replicated"):
        gather_from_region(replicated, group)


def test_split_moves_slices_that_lie_on_other_devices(rng):
    """A tensor split with the group's sizes but on other devices is moved (Relayout); its gradient
    moves back to where it lay."""
    group = get_group(TensorParallelConfig(n_workers=2, backend="simulated", devices=3, dtype="float64"))
    backend = group.backend
    x_host = rng.standard_normal((3, 8))
    elsewhere = ShardedTensor(
        [backend.asarray(p, np.float64, d) for p, d in zip(np.split(x_host, 2, axis=1), [2, 0])],
        1,
        [2, 0],
        backend,
    ).requires_grad_()
    layout = group.split(8)
    y = split(elsewhere, group, layout)
    assert y.grad_fn.name == "RelayoutBackward" and y.placement == Split(1, layout) and y.devices == [0, 1]
    np.testing.assert_array_equal(np.asarray(y), x_host)
    g_host = rng.standard_normal((3, 8))
    y.backward(g_host)
    assert elsewhere.grad.placement == elsewhere.placement
    assert elsewhere.grad.devices == [2, 0]
    np.testing.assert_array_equal(np.asarray(elsewhere.grad), g_host)


# ---------------------------------------------------------------------------- regions chained as in a layer


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_column_then_row_regions_compute_a_two_layer_product(make_config, rng, n_workers):
    """copy -> (X A_d) -> gather equals X A; scatter -> (X_d B_d) -> reduce equals X B (Megatron's pairs)."""
    group = get_group(make_config(n_workers))
    backend, comm = group.backend, group.comm
    x = rng.standard_normal((4, 6))
    a = rng.standard_normal((6, 13))
    b = rng.standard_normal((13, 5))
    cols = group.split(13)
    a_blocks = scatter_to_region(a, group, cols, np.float64, axis=1).blocks
    b_blocks = scatter_to_region(b, group, cols, np.float64, axis=0).blocks
    copies = copy_to_region(x, group, np.float64)
    h_blocks = group.on_devices(lambda u, w: u @ w, copies.blocks, a_blocks)  # (4, 6) @ (6, n_d)
    h = gather_from_region(new_tensor(h_blocks, Split(1, cols), (4, 13), np.float64, backend, comm), group)
    np.testing.assert_allclose(np.asarray(h), x @ a, rtol=1e-12, atol=1e-12)
    partials = group.on_devices(lambda u, w: u @ w, h_blocks, b_blocks)  # (4, n_d) @ (n_d, 5)
    y = reduce_from_region(
        new_tensor(partials, Partial(tuple(partials)), (4, 5), np.float64, backend, comm), group
    )
    np.testing.assert_allclose(np.asarray(y), x @ a @ b, rtol=1e-10, atol=1e-10)
