"""Sequence parallelism (Korthikanti et al., 2022): collectives, regions, layers, the transformer layer.

Between the tensor-parallel regions, activations ``(B, S, H)`` are split along
the sequence axis (-2) over the workers. Everything here is compared with the
same computation without sequence parallelism, in float64 to rtol 1e-12:
forward outputs, input gradients and every parameter gradient. The
collectives are checked against NumPy, the regions for adjointness (each
backward is the transpose of its forward), and the simulated backend's
transfer counter for the bytes a reduce-scatter and an all-gather move.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import forward_backward

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    Dropout,
    LayerNorm,
    ParallelEmbedding,
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformerLayer,
    RowParallelLinear,
    ShapeError,
    ShardedTensor,
    TensorParallelConfig,
    TiedLMHead,
    collectives,
    get_group,
    regions,
)
from tp_gpu.autograd import Node, _Rebuild
from tp_gpu.comm.base import Communicator
from tp_gpu.layers.dropout import keep_mask
from tp_gpu.parameter import ShardedParameter
from tp_gpu.partition import BlockLayout
from tp_gpu.placements import Dense, Partial
from tp_gpu.tensor import Tensor, new_tensor

TOL = dict(rtol=1e-12, atol=1e-12)

#: numpy (one device) and 3 simulated devices: more workers than devices from p = 4 on.
SP_BACKENDS = [pytest.param(("numpy", None), id="numpy"), pytest.param(("simulated", 3), id="sim3")]


@pytest.fixture(params=SP_BACKENDS)
def spec(request):
    return request.param


def config(spec, p: int, sequence_parallel: bool = False, **kwargs) -> TensorParallelConfig:
    name, devices = spec
    return TensorParallelConfig(
        n_workers=p,
        backend=name,
        devices=devices,
        sequence_parallel=sequence_parallel,
        **{"dtype": "float64", **kwargs},
    )


def host(backend, value) -> np.ndarray:
    """A dense host float64 copy of an array or a Tensor (a ShardedTensor gathered)."""
    if isinstance(value, Tensor):
        return np.asarray(value.numpy(), dtype=np.float64)
    return np.asarray(backend.to_host(value), dtype=np.float64)


def split(group, x: np.ndarray) -> ShardedTensor:
    """``x`` ``(..., S, H)`` split along the sequence over ``group``'s workers (a leaf: no gradient
    flows back to ``x``)."""
    return regions.scatter_to_sequence_parallel_region(x, group, x.dtype)


def check_sequence_split(tensor, group, shape) -> None:
    """``tensor`` is a ShardedTensor of logical ``shape`` split along the sequence like ``group.split``."""
    assert isinstance(tensor, ShardedTensor)
    assert tensor.shape == tuple(shape)
    assert tensor.axis == len(shape) - 2
    assert tensor.layout == regions.sequence_layout(group, shape[-2])


# ---------------------------------------------------------------------------------------- config


def test_config_sequence_parallel_defaults_off_and_is_validated():
    assert TensorParallelConfig(dtype="float64").sequence_parallel is False
    assert TensorParallelConfig(sequence_parallel=np.bool_(True), dtype="float64").sequence_parallel is True
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="sequence_parallel must be True or False"):
            TensorParallelConfig(sequence_parallel=bad, dtype="float64")


def test_sp_and_non_sp_layers_share_one_group():
    a = TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64")
    assert get_group(a) is get_group(dataclasses.replace(a, sequence_parallel=True))


# ---------------------------------------------------------------------------------------- collectives


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("seq", [1, 7, 13])
def test_all_gather_blocks_gives_every_device_the_whole(spec, p, seq, rng):
    group = get_group(config(spec, p))
    x = rng.standard_normal((2, seq, 5))
    layout = regions.sequence_layout(group, seq)
    blocks = collectives.scatter_blocks(group.backend, x, -2, layout, np.float64)
    whole = collectives.all_gather_blocks(group.backend, blocks, -2, layout)
    assert list(whole) == list(layout.groups)
    for device, array in whole.items():
        assert group.backend.device_of(array) == device
        np.testing.assert_array_equal(host(group.backend, array), x)


@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("seq", [1, 7, 13])
def test_reduce_scatter_blocks_gives_each_device_its_slices_of_the_sum(spec, p, seq, rng):
    group = get_group(config(spec, p))
    backend = group.backend
    layout = regions.sequence_layout(group, seq)
    parts = {d: rng.standard_normal((seq, 4)) for d in layout.groups}  # one whole partial per device
    partials = {d: backend.asarray(a, np.float64, d) for d, a in parts.items()}
    blocks = collectives.reduce_scatter_blocks(backend, partials, 0, layout)
    total = sum(parts.values())
    assert list(blocks) == list(layout.groups)
    for device, block in blocks.items():
        assert backend.device_of(block) == device
        expected = np.concatenate([total[s] for s in layout.global_slices(device)])
        np.testing.assert_allclose(host(backend, block), expected, **TOL)


def test_reduce_scatter_blocks_refuses_a_padded_layout():
    backend = get_group(
        TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64")
    ).backend
    layout = BlockLayout.split(5, [0, 1], pad_to_multiple_of=4)
    partials = {d: backend.asarray(np.ones((8, 2)), np.float64, d) for d in (0, 1)}
    with pytest.raises(ConfigError, match="without padding"):
        collectives.reduce_scatter_blocks(backend, partials, 0, layout)


@pytest.mark.parametrize("d", [2, 3, 4, 8])
def test_reduce_scatter_and_all_gather_move_d_minus_1_over_d_of_the_whole_per_device(d, rng):
    group = get_group(TensorParallelConfig(n_workers=d, backend="simulated", devices=d, dtype="float64"))
    backend = group.backend
    seq = 8 * d
    layout = regions.sequence_layout(group, seq)
    whole_bytes = 2 * seq * 3 * 8  # (2, seq, 3) float64
    partials = {dev: backend.asarray(rng.standard_normal((2, seq, 3)), np.float64, dev) for dev in range(d)}
    backend.reset_transfers()
    blocks = collectives.reduce_scatter_blocks(backend, partials, -2, layout)
    for dev in range(d):
        into = [v for (src, dst), v in backend.transfers.items() if dst == dev]
        assert sum(count for count, _ in into) == d - 1  # one piece from each other device
        assert sum(nbytes for _, nbytes in into) == whole_bytes * (d - 1) // d
    backend.reset_transfers()
    collectives.all_gather_blocks(backend, blocks, -2, layout)
    for dev in range(d):
        into = [v for (src, dst), v in backend.transfers.items() if dst == dev]
        assert sum(count for count, _ in into) == d - 1
        assert sum(nbytes for _, nbytes in into) == whole_bytes * (d - 1) // d


class _TwoRankAllReduce(Communicator):
    """A stand-in for a second rank: its contribution equals ours, so the all-reduce doubles."""

    name, rank, size = "fake", 1, 2

    def all_reduce(self, backend, array, op="sum"):
        return array * 2


def test_communicator_default_reduce_scatter_is_all_reduce_then_this_ranks_piece():
    x = np.arange(7 * 3, dtype=np.float64).reshape(7, 3)
    piece = _TwoRankAllReduce().reduce_scatter(None, x, 0, [4, 3])  # rank 1 keeps rows 4..6
    np.testing.assert_array_equal(piece, 2 * x[4:])
    piece = _TwoRankAllReduce().reduce_scatter(None, x.T, -1, [4, 3])  # along the last axis
    np.testing.assert_array_equal(piece, 2 * x.T[:, 4:])


# ---------------------------------------------------------------------------------------- regions


def _inner(backend, a: dict, b: dict) -> float:
    """``sum_d <a_d, b_d>`` over per-device blocks."""
    return sum(float(np.sum(host(backend, a[d]) * host(backend, b[d]))) for d in a)


@pytest.mark.parametrize("p", [1, 2, 5, 8])
def test_each_sequence_region_backward_is_the_transpose_of_its_forward(spec, p, rng):
    """``<f(X), G> = <X, f^T(G)>`` for each region, summed over devices: the backward is the adjoint."""
    group = get_group(config(spec, p))
    backend, seq = group.backend, 11
    layout = regions.sequence_layout(group, seq)
    devices = tuple(layout.groups)

    def wholes():
        return {d: backend.asarray(rng.standard_normal((3, seq, 4)), np.float64, d) for d in devices}

    def partial(blocks):
        return new_tensor(blocks, Partial(devices), (3, seq, 4), np.float64, backend, group.comm)

    x, g = rng.standard_normal((3, seq, 4)), wholes()
    # all-gather X: <gather(X), G> = <X, reduce_scatter(G)>
    xs = split(group, x).requires_grad_()
    gathered = regions.gather_from_sequence_parallel_region(xs, group)
    lhs = _inner(backend, gathered.blocks, g)
    gathered.backward(partial({d: a.copy() for d, a in g.items()}))
    rhs = _inner(backend, xs.blocks, xs.grad.blocks)
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # reduce-scatter partials: <reduce_scatter(P), G> = <P, all_gather(G)>
    partials, grad = partial(wholes()).requires_grad_(), split(group, rng.standard_normal((3, seq, 4)))
    summed = regions.reduce_scatter_to_sequence_parallel_region(partials, group)
    lhs = _inner(backend, summed.blocks, grad.blocks)
    summed.backward(grad)
    rhs = _inner(backend, partials.blocks, partials.grad.blocks)
    assert lhs == pytest.approx(rhs, rel=1e-12)
    # scatter a dense X: <scatter(X), G> = <X, gather(G)>
    dense = tp_gpu.tensor(x, requires_grad=True)
    scattered = regions.scatter_to_sequence_parallel_region(dense, group, np.float64)
    lhs = _inner(backend, scattered.blocks, grad.blocks)
    scattered.backward(grad)
    assert isinstance(dense.grad.placement, Dense)
    assert lhs == pytest.approx(float(np.sum(x * host(backend, dense.grad))), rel=1e-12)


# ---------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("p", range(1, 9))
def test_column_layer_all_gathers_a_sequence_split_input(spec, p, rng):
    dense = ColumnParallelLinear(6, 10, config(spec, p), seed=1)
    column = ColumnParallelLinear(6, 10, config(spec, p), seed=1)
    group = column.group
    x, g = rng.standard_normal((2, 7, 6)), rng.standard_normal((2, 7, 10))
    y, dx = forward_backward(column, split(group, x), g)
    y_dense, dx_dense = forward_backward(dense, x, g)
    np.testing.assert_allclose(host(group.backend, y), host(group.backend, y_dense), **TOL)
    check_sequence_split(dx, group, (2, 7, 6))
    np.testing.assert_allclose(host(group.backend, dx), host(group.backend, dx_dense), **TOL)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(column.grads()[name], grad, **TOL, err_msg=name)


@pytest.mark.parametrize("p", range(1, 9))
def test_row_layer_reduce_scatters_its_output_along_the_sequence(spec, p, rng):
    dense = RowParallelLinear(10, 6, config(spec, p), seed=2)
    row = RowParallelLinear(10, 6, config(spec, p, sequence_parallel=True), seed=2)
    bias = rng.standard_normal(6)
    for layer in (dense, row):
        layer.load_dense(layer.full_weight(), bias)
    x, g = rng.standard_normal((3, 5, 10)), rng.standard_normal((3, 5, 6))
    y, dx = forward_backward(row, x, split(row.group, g))  # dY split like Y
    check_sequence_split(y, row.group, (3, 5, 6))
    y_dense, dx_dense = forward_backward(dense, x, g)
    np.testing.assert_allclose(host(row.backend, y), host(dense.backend, y_dense), **TOL)
    np.testing.assert_allclose(host(row.backend, dx), host(dense.backend, dx_dense), **TOL)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(row.grads()[name], grad, **TOL, err_msg=name)
    row(x).backward(g)  # a dense dY is taken as it is
    np.testing.assert_allclose(row.grads()["bias"], 2 * dense.grads()["bias"], **TOL)


def test_row_layer_with_sequence_parallelism_needs_a_sequence_axis():
    row = RowParallelLinear(
        4, 3, TensorParallelConfig(n_workers=2, backend="numpy", sequence_parallel=True, dtype="float64")
    )
    with pytest.raises(ShapeError, match="sequence axis"):
        row(np.ones(4))


@pytest.mark.parametrize("p", [1, 3, 8])
def test_mlp_between_sequence_slices_equals_the_dense_mlp(spec, p, rng):
    dense = ParallelMLP(6, 11, 6, config(spec, p), seed=4)
    mlp = ParallelMLP(6, 11, 6, config(spec, p, sequence_parallel=True), seed=4)
    x, g = rng.standard_normal((2, 9, 6)), rng.standard_normal((2, 9, 6))
    y, dx = forward_backward(mlp, split(mlp.group, x), split(mlp.group, g))
    check_sequence_split(y, mlp.group, (2, 9, 6))
    y_dense, dx_dense = forward_backward(dense, x, g)
    np.testing.assert_allclose(host(mlp.backend, y), host(dense.backend, y_dense), **TOL)
    check_sequence_split(dx, mlp.group, (2, 9, 6))
    np.testing.assert_allclose(host(mlp.backend, dx), host(dense.backend, dx_dense), **TOL)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(mlp.grads()[name], grad, **TOL, err_msg=name)


@pytest.mark.parametrize("p", range(1, 9))
def test_layer_norm_on_sequence_slices_equals_the_dense_norm(spec, p, rng):
    dense, norm = LayerNorm(7, config(spec, p), eps=1e-5), LayerNorm(7, config(spec, p), eps=1e-5)
    weight, bias = rng.standard_normal(7), rng.standard_normal(7)
    for layer in (dense, norm):
        layer.load_dense(weight, bias)
    x, g = rng.standard_normal((2, 6, 7)), rng.standard_normal((2, 6, 7))
    y, dx = forward_backward(norm, split(norm.group, x), split(norm.group, g))
    check_sequence_split(y, norm.group, (2, 6, 7))
    y_dense, dx_dense = forward_backward(dense, x, g)
    np.testing.assert_allclose(host(norm.backend, y), host(dense.backend, y_dense), **TOL)
    check_sequence_split(dx, norm.group, (2, 6, 7))
    np.testing.assert_allclose(host(norm.backend, dx), host(dense.backend, dx_dense), **TOL)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(norm.grads()[name], grad, **TOL, err_msg=name)


@pytest.mark.parametrize("p", range(1, 9))
def test_dropout_on_sequence_slices_draws_the_dense_mask(spec, p, rng):
    dense, drop = Dropout(0.3, config(spec, p), seed=9), Dropout(0.3, config(spec, p), seed=9)
    for _ in range(2):  # two steps: a fresh mask each, the same on both
        x, g = rng.standard_normal((3, 7, 5)), rng.standard_normal((3, 7, 5))
        y, dx = forward_backward(drop, split(drop.group, x), split(drop.group, g))
        check_sequence_split(y, drop.group, (3, 7, 5))
        y_dense, dx_dense = forward_backward(dense, x, g)
        np.testing.assert_array_equal(host(drop.backend, y), host(dense.backend, y_dense))
        check_sequence_split(dx, drop.group, (3, 7, 5))
        np.testing.assert_array_equal(host(drop.backend, dx), host(dense.backend, dx_dense))
    assert drop.step == dense.step == 2
    drop.eval()
    x = split(drop.group, rng.standard_normal((1, 3, 2)))
    assert drop(x) is x


def test_keep_mask_of_any_slice_is_that_slice_of_the_whole_mask():
    whole = keep_mask(np, 0.4, 3, 5, (4, 9, 6), (Ellipsis,))
    for index in [
        (slice(None), slice(2, 7)),
        (slice(1, 3), slice(None), slice(4, 6)),
        (Ellipsis, slice(0, 0)),
        (slice(None), slice(8, 9), Ellipsis),
        (slice(0, 4, 2), slice(None, None, 3)),
    ]:
        np.testing.assert_array_equal(keep_mask(np, 0.4, 3, 5, (4, 9, 6), index), whole[index])
    np.testing.assert_array_equal(keep_mask(np, 0.4, 3, 5, (4, 9, 6), (1, slice(2, 5))), whole[1, 2:5])


@pytest.mark.parametrize("p", [1, 2, 4, 7])
def test_attention_takes_and_returns_sequence_slices(spec, p, rng):
    dense = ParallelSelfAttention(12, 4, config(spec, p), seed=5, causal=True)
    attention = ParallelSelfAttention(12, 4, config(spec, p, sequence_parallel=True), seed=5, causal=True)
    x, g = rng.standard_normal((2, 7, 12)), rng.standard_normal((2, 7, 12))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, 5:] = 0
    y, dx = forward_backward(attention, split(attention.group, x), split(attention.group, g), mask)
    check_sequence_split(y, attention.group, (2, 7, 12))
    y_dense, dx_dense = forward_backward(dense, x, g, mask)
    np.testing.assert_allclose(host(attention.backend, y), host(dense.backend, y_dense), **TOL)
    check_sequence_split(dx, attention.group, (2, 7, 12))
    np.testing.assert_allclose(host(attention.backend, dx), host(dense.backend, dx_dense), **TOL)
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(attention.grads()[name], grad, **TOL, err_msg=name)


@pytest.mark.parametrize("p", [1, 3, 8])
def test_tied_lm_head_all_gathers_a_sequence_split_input(spec, p, rng):
    heads = [TiedLMHead(ParallelEmbedding(11, 6, config(spec, p), seed=2)) for _ in range(2)]
    dense, head = heads
    x, g = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 11))
    grad = ShardedTensor.from_blocks(
        collectives.scatter_blocks(head.group.backend, g, -1, head.embedding_layout, np.float64),
        -1,
        head.embedding_layout,
        head.group.backend,
    )
    logits, dx = forward_backward(head, split(head.group, x), grad)
    logits_dense, dx_dense = forward_backward(dense, x, grad)
    np.testing.assert_allclose(
        host(head.group.backend, logits), host(dense.group.backend, logits_dense), **TOL
    )
    check_sequence_split(dx, head.group, (2, 5, 6))
    np.testing.assert_allclose(host(head.group.backend, dx), host(dense.group.backend, dx_dense), **TOL)
    np.testing.assert_allclose(head.grads()["weight"], dense.grads()["weight"], **TOL)


def test_sharded_inputs_split_on_the_wrong_axis_are_refused(rng):
    cfg = TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64")
    column = ColumnParallelLinear(4, 6, dataclasses.replace(cfg, gather_output=False))
    by_feature = column(rng.standard_normal((3, 5, 4)))  # split on the last axis
    with pytest.raises(ShapeError, match="split along the sequence"):
        ColumnParallelLinear(6, 2, cfg)(by_feature)
    with pytest.raises(ShapeError, match="any axis but the last"):
        LayerNorm(6, cfg)(by_feature)
    with pytest.raises(ShapeError, match="split along the sequence"):
        ParallelSelfAttention(6, 2, cfg)(by_feature)


# ---------------------------------------------------------------------------------------- transformer


def _transformer_pair(spec, p, pre_norm, dropout=0.0):
    kwargs = dict(seed=3, pre_norm=pre_norm, causal=pre_norm, eps=1e-5, dropout=dropout)
    dense = ParallelTransformerLayer(12, 3, 20, config(spec, p), **kwargs)
    sp = ParallelTransformerLayer(12, 3, 20, config(spec, p, sequence_parallel=True), **kwargs)
    return dense, sp


def _compare_transformers(dense, sp, x, mask, g, sharded_input: bool) -> None:
    group = sp.group
    if sharded_input:
        y, dx = forward_backward(sp, split(group, x), split(group, g), mask)
    else:
        y, dx = forward_backward(sp, x, g, mask)
    check_sequence_split(y, group, x.shape)
    y_dense, dx_dense = forward_backward(dense, x, g, mask)
    np.testing.assert_allclose(host(sp.backend, y), host(dense.backend, y_dense), **TOL)
    if sharded_input:
        check_sequence_split(dx, group, x.shape)
    else:
        assert isinstance(dx.placement, Dense)  # a dense input gets a dense gradient
    np.testing.assert_allclose(host(sp.backend, dx), host(dense.backend, dx_dense), **TOL)
    sp_grads = sp.grads()
    for name, grad in dense.grads().items():
        np.testing.assert_allclose(sp_grads[name], grad, **TOL, err_msg=name)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("p", range(1, 9))
def test_sequence_parallel_transformer_layer_equals_the_layer_without_it(spec, p, pre_norm, rng):
    """Forward, dX and every gradient, p = 1..8, an uneven sequence (7), a padding mask; with
    pre-norm also causal; dropout on (the masks depend on logical indices only)."""
    dense, sp = _transformer_pair(spec, p, pre_norm, dropout=0.1)
    x, g = rng.standard_normal((2, 7, 12)), rng.standard_normal((2, 7, 12))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[0, 4:] = 0
    _compare_transformers(dense, sp, x, mask, g, sharded_input=True)
    dense.zero_grad()
    sp.zero_grad()
    x2 = rng.standard_normal((2, 7, 12))
    _compare_transformers(dense, sp, x2, None, g, sharded_input=False)  # a second step, a dense input


@pytest.mark.parametrize("seq", [1, 2, 5, 13])
def test_sequence_parallel_transformer_layer_at_short_and_long_sequences(seq, rng):
    """Sequences shorter than the worker count leave some workers (and devices) no rows."""
    spec = ("simulated", 3)
    dense, sp = _transformer_pair(spec, 5, pre_norm=True)
    x, g = rng.standard_normal((1, seq, 12)), rng.standard_normal((1, seq, 12))
    additive = np.where(rng.random((1, 1, seq, seq)) < 0.2, -1e9, 0.0)  # an additive float mask
    _compare_transformers(dense, sp, x, additive, g, sharded_input=True)


def test_sequence_parallel_transformer_layer_in_eval_mode_and_float32(rng):
    spec = ("simulated", 3)
    cfg = config(spec, 4, dtype="float32")
    dense = ParallelTransformerLayer(12, 3, 20, cfg, seed=1, dropout=0.2).eval()
    sp = ParallelTransformerLayer(
        12, 3, 20, dataclasses.replace(cfg, sequence_parallel=True), seed=1, dropout=0.2
    )
    sp.eval()
    x = rng.standard_normal((2, 6, 12)).astype(np.float32)
    with tp_gpu.no_grad():
        y = sp(x)
    assert y.dtype == np.float32
    check_sequence_split(y, sp.group, x.shape)
    np.testing.assert_allclose(host(sp.backend, y), host(dense.backend, dense(x)), rtol=1e-5, atol=1e-5)
    assert y.grad_fn is None and _saved_bytes(y, 0) == 0  # nothing recorded, no activation kept


def test_sequence_parallel_transformer_checks_gradients_before_consuming_anything(rng):
    _, sp = _transformer_pair(("simulated", 3), 3, pre_norm=False)
    y = sp(rng.standard_normal((2, 5, 12)))
    with pytest.raises(ShapeError, match=r"grad has shape \(2, 4, 12\); expected the tensor's shape"):
        y.backward(split(sp.group, rng.standard_normal((2, 4, 12))))
    assert all(p.grad is None for p in sp.parameters())
    y.backward(split(sp.group, rng.standard_normal((2, 5, 12))))  # what was kept is still there
    assert all(p.grad is not None for p in sp.parameters())


# ---------------------------------------------------------------------------------------- memory


def _is_parameter(t: Tensor) -> bool:
    """A parameter, or a parameter's copy onto each device (LayerNorm's weight beside sequence
    slices): weights, not activations."""
    node = t.grad_fn
    return isinstance(t, ShardedParameter) or (
        node is not None
        and node.function is regions.CopyToRegion
        and isinstance(node.edges[0][0] if node.edges[0] else None, ShardedParameter)
    )


def _saved_bytes(y: Tensor, device) -> int:
    """Bytes of the activations on ``device`` that the graph behind ``y`` keeps for backward: every
    array its nodes' contexts hold (a rebuild recipe's slices included), parameters left out."""
    seen, total = set(), 0

    def walk(value):
        nonlocal total
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, _Rebuild):  # the sequence all-gather's output, kept as its slices
            walk([cell.cell_contents for cell in value.recompute.__closure__ or ()])
        elif isinstance(value, Tensor):
            if not _is_parameter(value):
                walk(value.blocks)
        elif hasattr(value, "nbytes") and hasattr(value, "device") and id(value) not in seen:
            seen.add(id(value))
            total += value.nbytes if value.device == device else 0

    nodes, stack = set(), [y.grad_fn] if y.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        slots = [s for cls in type(node.ctx).__mro__ for s in getattr(cls, "__slots__", ())]
        walk([getattr(node.ctx, s) for s in slots if hasattr(node.ctx, s)])
        stack.extend(e[0] for e in node.edges if e is not None and isinstance(e[0], Node))
    return total


def test_activation_memory_per_device_falls_as_one_over_p(rng):
    """With 8 simulated devices and p = 1, 2, 4, 8, what the layer keeps per device falls as 1/p:
    the column layers keep only the sequence slices of their all-gathered input."""
    x = rng.standard_normal((2, 16, 16))
    kept = {}
    for p in (1, 2, 4, 8):
        cfg = TensorParallelConfig(
            n_workers=p, backend="simulated", devices=8, sequence_parallel=True, dtype="float64"
        )
        layer = ParallelTransformerLayer(16, 8, 32, cfg, seed=0, dropout=0.1)
        y = layer(x)
        kept[p] = max(_saved_bytes(y, d) for d in range(8))
    assert kept[1] >= 10 * x.nbytes  # the walk sees the activations (q, k, v, the probabilities, ...)
    for p in (2, 4, 8):
        assert kept[p] == pytest.approx(kept[1] / p, rel=0.02), kept


def test_a_column_layer_keeps_only_the_slices_of_its_gathered_input(rng):
    """The sequence all-gather's output, saved by the column layer, is kept as its slices: ``1/p`` of
    ``X`` per device, gathered again in backward."""
    x = rng.standard_normal((2, 16, 8))
    cfg = TensorParallelConfig(n_workers=4, backend="simulated", devices=4, dtype="float64")
    column = ColumnParallelLinear(8, 4, dataclasses.replace(cfg, gather_output=False), bias=False)
    y = column(split(column.group, x))
    for d in range(4):
        assert _saved_bytes(y, d) == x.nbytes // 4
