"""Opt-in padding of a split dimension: ``pad_to_multiple_of=k``.

Every worker's physical shard then has the same size, a multiple of ``k``;
the padded rows and columns are zero and never leak: not into
``full_weight()``, state dicts, checkpoints, gathered outputs (logical width)
or the loss (padded logits are masked, so the loss and its gradient equal those
of the unpadded model). Each padded layer is compared with a dense float64
reference and with its unpadded twin, for sizes 1, 2, 7 and 13 on 1..8 and 16
workers, ``k`` = 8 and 64, on every backend of ``backend_spec``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import forward_backward
from test_class_weights import dense_cross_entropy
from test_uneven import flat, host, leaf, moves, randomize, reduction_only, sharded

import tp_gpu
from tp_gpu import (
    SGD,
    Adam,
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    ShardedTensor,
    VocabParallelCrossEntropy,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tp_gpu.backends import SimulatedBackend
from tp_gpu.partition import padded_split_sizes
from tp_gpu.testing import assert_close

SIZES = [1, 2, 7, 13]
COUNTS = WORKER_COUNTS + [16]
PADS = [8, 64]
F64 = "float64"


# --- what padding must look like -------------------------------------------------------------------


def expected_capacity(size: int, n_workers: int, k: int) -> int:
    """Megatron's padded shard: ``size`` rounded up to a multiple of ``n_workers * k``, cut in equal parts."""
    return -(-size // (n_workers * k)) * k


def expected_partition(size: int, n_workers: int, k: int):
    """Equal shards of the capacity filled in order: the padding falls at the end."""
    c = expected_capacity(size, n_workers, k)
    return [(min(i * c, size), min((i + 1) * c, size)) for i in range(n_workers)]


def padding_of(param, layer) -> list:
    """Every padded entry of ``param``'s device blocks, as host arrays (computed from the layout's
    capacities and partition, independently of the layout's own masks)."""
    layout, axis = layer.layout, param.axis
    found = []
    for device, block in param.blocks.items():
        block = np.asarray(layer.backend.to_host(block))
        offset = 0
        for w in layout.groups[device]:
            first, last = layout.ranges[w]
            pad = slice(offset + (last - first), offset + layout.capacities[w])
            found.append(np.moveaxis(block, axis, 0)[pad])
            offset += layout.capacities[w]
    return found


def assert_padded_layout(layer, size: int, n_workers: int, k: int) -> None:
    """Equal physical shards of a multiple of ``k``, zero padding, a logical ``full_weight()``."""
    capacity = expected_capacity(size, n_workers, k)
    assert capacity % k == 0 and capacity * n_workers >= size
    assert layer.layout.capacities == [capacity] * n_workers
    assert layer.partition == expected_partition(size, n_workers, k)
    param = layer.weight
    for device, block in param.blocks.items():  # one block per device: its workers' shards side by side
        assert block.shape[param.axis] == capacity * len(layer.layout.groups[device])
    for name, p in layer.named_parameters():
        if p.axis is not None:
            assert all(not pad.any() for pad in padding_of(p, layer)), f"{name}: padding is not zero"
    logical = layer.full_weight()
    assert logical.shape == param.shape
    assert size in logical.shape


def for_each_pad(check, *args) -> None:
    """``check(*args, k)`` for every ``k`` of PADS, naming ``k`` in any failure."""
    for k in PADS:
        try:
            check(*args, k)
        except Exception as exc:
            raise AssertionError(f"with pad_to_multiple_of={k}: {type(exc).__name__}: {exc}") from exc


# --- ColumnParallelLinear --------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_out", SIZES)
def test_padded_column_matches_dense(make_config, rng, n_out, n_workers):
    for_each_pad(check_padded_column_matches_dense, make_config, rng, n_out, n_workers)


def check_padded_column_matches_dense(make_config, rng, n_out, n_workers, k):
    layer = ColumnParallelLinear(5, n_out, make_config(n_workers, dtype=F64), seed=3, pad_to_multiple_of=k)
    plain = ColumnParallelLinear(5, n_out, make_config(n_workers, dtype=F64), seed=3)
    assert np.array_equal(layer.full_weight(), plain.full_weight())  # padding does not change the init
    randomize(layer, rng)
    assert_padded_layout(layer, n_out, n_workers, k)
    w, b = layer.full_weight(), layer.full_bias()
    assert w.shape == (5, n_out) and b.shape == (n_out,)
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal((2, 3, n_out))
    y, dx = forward_backward(layer, x, g)
    assert y.shape == (2, 3, n_out)  # the logical width
    assert_close(host(layer, y), x @ w + b, F64, 5, "Y")
    assert_close(host(layer, dx), g @ w.T, F64, n_out, "dX")
    grads = layer.grads()
    assert grads["weight"].shape == (5, n_out)
    assert_close(grads["weight"], flat(x).T @ flat(g), F64, 6, "dW")
    assert_close(grads["bias"], flat(g).sum(axis=0), F64, 6, "db")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_out", SIZES)
def test_padded_column_sharded_output_has_the_logical_width(make_config, rng, n_out, n_workers):
    for_each_pad(check_padded_column_sharded_output_has_the_logical_width, make_config, rng, n_out, n_workers)


def check_padded_column_sharded_output_has_the_logical_width(make_config, rng, n_out, n_workers, k):
    layer = ColumnParallelLinear(
        5, n_out, make_config(n_workers, dtype=F64, gather_output=False), seed=3, pad_to_multiple_of=k
    )
    randomize(layer, rng)
    x = rng.standard_normal((4, 5))
    x_leaf = tp_gpu.tensor(x, requires_grad=True)
    y = layer(x_leaf)
    assert isinstance(y, ShardedTensor) and y.shape == (4, n_out)
    assert y.split_sizes == [b - a for a, b in expected_partition(n_out, n_workers, k)]
    assert_close(host(layer, y), x @ layer.full_weight() + layer.full_bias(), F64, 5, "gathered Y")
    g = rng.standard_normal((4, n_out))
    grad = y.map(lambda a: a * 0)  # dY split exactly like Y (padded blocks) ...
    for shard, (first, last) in zip(grad.shards, layer.partition):
        with layer.backend.device(layer.backend.device_of(shard)):
            shard[...] = layer.backend.asarray(g[:, first:last], np.float64, layer.backend.device_of(shard))
    y.backward(grad)
    assert_close(host(layer, x_leaf.grad), g @ layer.full_weight().T, F64, n_out, "dX")
    assert_close(layer.grads()["weight"], x.T @ g, F64, 4, "dW")
    # ... or dY as unpadded shards (re-padded on the way in).
    _, dx = forward_backward(layer, x, sharded(layer, g, y.split_sizes))
    assert_close(host(layer, dx), g @ layer.full_weight().T, F64, n_out, "dX")
    assert_close(layer.grads()["weight"], 2 * x.T @ g, F64, 4, "dW twice")
    assert all(not pad.any() for pad in padding_of(layer.weight, layer))


# --- RowParallelLinear -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_in", SIZES)
def test_padded_row_matches_dense(make_config, rng, n_in, n_workers):
    for_each_pad(check_padded_row_matches_dense, make_config, rng, n_in, n_workers)


def check_padded_row_matches_dense(make_config, rng, n_in, n_workers, k):
    layer = RowParallelLinear(n_in, 4, make_config(n_workers, dtype=F64), seed=3, pad_to_multiple_of=k)
    randomize(layer, rng)
    assert_padded_layout(layer, n_in, n_workers, k)
    w, b = layer.full_weight(), layer.full_bias()
    assert w.shape == (n_in, 4)
    x = rng.standard_normal((2, 3, n_in))
    g = rng.standard_normal((2, 3, 4))
    y, dx = forward_backward(layer, x, g)
    assert_close(host(layer, y), x @ w + b, F64, n_in, "Y")
    assert dx.shape == (2, 3, n_in)  # the logical width
    assert_close(host(layer, dx), g @ w.T, F64, 4, "dX")
    grads = layer.grads()
    assert_close(grads["weight"], flat(x).T @ flat(g), F64, 6, "dW")
    assert_close(grads["bias"], flat(g).sum(axis=0), F64, 6, "db")


# --- column -> row, both padded alike ----------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("hidden", SIZES)
def test_padded_chain_is_communication_free_and_matches_dense(make_config, rng, hidden, n_workers):
    check = check_padded_chain_is_communication_free_and_matches_dense
    for_each_pad(check, make_config, rng, hidden, n_workers)


def check_padded_chain_is_communication_free_and_matches_dense(make_config, rng, hidden, n_workers, k):
    col = ColumnParallelLinear(
        6, hidden, make_config(n_workers, dtype=F64, gather_output=False), seed=1, pad_to_multiple_of=k
    )
    row = RowParallelLinear(
        hidden, 5, make_config(n_workers, dtype=F64), seed=2, pad_to_multiple_of=k, input_is_parallel=True
    )
    assert col.partition == row.partition == expected_partition(hidden, n_workers, k)
    randomize(col, rng)
    randomize(row, rng)
    x = rng.standard_normal((3, 6))
    x_leaf = tp_gpu.tensor(x, requires_grad=True)
    backend = row.backend
    counting = isinstance(backend, SimulatedBackend)
    h = col(x_leaf)
    if counting:
        backend.reset_transfers()
    y = row(h)
    if counting:
        assert moves(backend) == reduction_only(row)
    hid = x @ col.full_weight() + col.full_bias()
    assert_close(host(row, y), hid @ row.full_weight() + row.full_bias(), F64, 6 * hidden, "Y")
    g = backend.asarray(rng.standard_normal((3, 5)), np.float64, row.output_device)
    g_host = np.asarray(backend.to_host(g))
    if counting:
        backend.reset_transfers()
    y.backward(g)
    if counting:  # dY to every other device (the row layer), the reduction of dX (the column layer)
        out = row.output_device
        dy_copies = {(out, d): 1 for d in sorted(set(row.devices)) if d != out}
        assert moves(backend) == {**dy_copies, **reduction_only(col)}
    assert_close(
        host(col, x_leaf.grad), g_host @ row.full_weight().T @ col.full_weight().T, F64, 5 * hidden, "dX"
    )
    assert_close(row.grads()["weight"], hid.T @ g_host, F64, 3, "fc2 dW")
    assert_close(col.grads()["weight"], x.T @ (g_host @ row.full_weight().T), F64, 15, "fc1 dW")


# --- ParallelEmbedding -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("vocab", SIZES)
def test_padded_embedding_matches_dense(make_config, rng, vocab, n_workers):
    for_each_pad(check_padded_embedding_matches_dense, make_config, rng, vocab, n_workers)


def check_padded_embedding_matches_dense(make_config, rng, vocab, n_workers, k):
    layer = ParallelEmbedding(vocab, 3, make_config(n_workers, dtype=F64), seed=vocab, pad_to_multiple_of=k)
    randomize(layer, rng)
    assert_padded_layout(layer, vocab, n_workers, k)
    table = layer.full_weight()
    assert table.shape == (vocab, 3)
    ids = rng.permutation(np.concatenate([np.arange(vocab), rng.integers(0, vocab, 9)])).reshape(1, -1)
    out = layer(ids)
    assert np.array_equal(np.asarray(layer.backend.to_host(out)), table[ids])
    g = rng.standard_normal(out.shape)
    out.backward(g)
    expected = np.zeros_like(table)
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, 3))
    assert_close(layer.grads()["weight"], expected, F64, ids.size, "dE")
    assert all(not pad.any() for pad in padding_of(layer.weight, layer))


@pytest.mark.parametrize("k", PADS)
@pytest.mark.parametrize("n_workers", [3, 4, 7, 8, 16])
def test_padded_gpt2_vocabulary(make_config, rng, n_workers, k):
    layer = ParallelEmbedding(50257, 2, make_config(n_workers, dtype=F64), seed=0, pad_to_multiple_of=k)
    assert_padded_layout(layer, 50257, n_workers, k)
    ids = np.array(
        [0, 50256] + [b - 1 for a, b in layer.partition if b > a] + list(rng.integers(0, 50257, 8))
    )
    assert np.array_equal(np.asarray(layer.backend.to_host(layer(ids))), layer.full_weight()[ids])


def test_padded_split_sizes_of_the_docstring():
    assert padded_split_sizes(50257, 4, 64) == ([12608, 12608, 12608, 12433], 12608)
    assert padded_split_sizes(13, 8, 8) == ([8, 5, 0, 0, 0, 0, 0, 0], 8)


# --- a padded LM head feeding the loss ---------------------------------------------------------

LOSS_OPTIONS = {
    "mean": dict(),
    "smoothed mean": dict(label_smoothing=0.1),
    "weighted smoothed sum": dict(weight="random", label_smoothing=0.1, reduction="sum"),
    "weighted none": dict(weight="random", reduction="none"),
}


def run_head_loss(head, x, targets, kwargs):
    """``(loss, dZ, head gradients)`` of ``head`` feeding the loss, all on the host."""
    head.zero_grad()
    loss_fn = VocabParallelCrossEntropy(**kwargs)
    logits = head(x)
    assert logits.shape == (len(x), head.n_out)  # the logical width
    z = leaf(logits)  # its .grad is dZ, then passed on into the head
    loss = loss_fn(z, targets)
    none = kwargs.get("reduction") == "none"
    loss.backward(np.ones(len(x)) if none else None)
    loss = np.asarray(head.backend.to_host(loss)) if none else float(loss)
    dz = z.grad
    assert isinstance(dz, ShardedTensor) and dz.shape == (len(x), head.n_out)
    dz_host = host(head, dz)
    logits.backward(dz)
    return loss, dz_host, head.grads()


def check_padded_head_loss(cfg, rng, vocab: int, k: int, names, twin: bool = False) -> None:
    """A padded head's loss, dZ and gradients equal the dense (unpadded) model's, and with ``twin``
    also those of the same head built without padding."""
    padded = ColumnParallelLinear(4, vocab, cfg, seed=5, pad_to_multiple_of=k)
    randomize(padded, rng)
    w, b = padded.full_weight(), padded.full_bias()
    x = rng.standard_normal((6, 4))
    targets = rng.integers(0, vocab, size=6)
    targets[3] = -100
    z = x @ w + b
    for name in names:
        kwargs = dict(LOSS_OPTIONS[name])
        if "weight" in kwargs:
            kwargs["weight"] = rng.uniform(0.2, 2.0, vocab)
        loss, dz, grads = run_head_loss(padded, x, targets, kwargs)
        expected, expected_dz = dense_cross_entropy(z, targets, **kwargs)
        assert_close(loss, expected, F64, vocab, f"padded loss, {name}")
        assert_close(dz, expected_dz, F64, vocab, f"padded dZ, {name}")
        assert_close(grads["weight"], x.T @ expected_dz, F64, 6 * vocab, f"head dW, {name}")
        assert_close(grads["bias"], expected_dz.sum(axis=0), F64, 6 * vocab, f"head db, {name}")
        assert all(not pad.any() for pad in padding_of(padded.weight, padded))
        if twin:
            plain = ColumnParallelLinear(4, vocab, cfg, seed=5)
            plain.load_state_dict(padded.state_dict())
            loss_u, dz_u, grads_u = run_head_loss(plain, x, targets, kwargs)
            assert_close(loss, loss_u, F64, vocab, f"padded vs unpadded loss, {name}")
            assert_close(dz, dz_u, F64, vocab, f"padded vs unpadded dZ, {name}")
            for key in grads_u:
                assert_close(grads[key], grads_u[key], F64, 6 * vocab, f"padded vs unpadded {key}, {name}")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("vocab", SIZES)
def test_padded_head_loss_equals_the_unpadded_model(make_config, rng, vocab, n_workers):
    cfg = make_config(n_workers, dtype=F64, gather_output=False)
    options = {8: ["smoothed mean"], 64: ["weighted none"]}  # every option: the test below
    for_each_pad(lambda k: check_padded_head_loss(cfg, rng, vocab, k, options[k]))


@pytest.mark.parametrize("option", list(LOSS_OPTIONS))
@pytest.mark.parametrize("vocab, n_workers, k", [(13, 3, 8), (7, 8, 8), (13, 16, 64), (2, 3, 64)])
def test_padded_head_loss_every_option_against_unpadded_twin(make_config, rng, vocab, n_workers, k, option):
    cfg = make_config(n_workers, dtype=F64, gather_output=False)
    check_padded_head_loss(cfg, rng, vocab, k, [option], twin=True)


def test_padded_gpt2_head_loss_equals_the_unpadded_model(make_config, rng):
    """The issue's case: GPT-2's 50,257 classes, a head padded to shards of 64 on 4 workers."""
    cfg = make_config(4, dtype=F64, gather_output=False)
    check_padded_head_loss(cfg, rng, 50257, 64, ["weighted smoothed sum"], twin=True)


# --- state dicts and checkpoints hold the logical weight ----------------------------------------


@pytest.mark.parametrize("k", PADS)
@pytest.mark.parametrize("n_workers", [3, 8, 16])
def test_checkpoints_move_between_padded_and_unpadded(make_config, rng, tmp_path, n_workers, k):
    cfg = make_config(n_workers, dtype=F64)
    makers = {
        "column": lambda pad, seed: ColumnParallelLinear(4, 13, cfg, seed=seed, pad_to_multiple_of=pad),
        "row": lambda pad, seed: RowParallelLinear(13, 4, cfg, seed=seed, pad_to_multiple_of=pad),
        "embedding": lambda pad, seed: ParallelEmbedding(13, 3, cfg, seed=seed, pad_to_multiple_of=pad),
    }
    for name, make in makers.items():
        padded = make(k, 1)
        randomize(padded, rng)
        state = padded.state_dict()
        assert {key: v.shape for key, v in state.items()} == {
            key: p.shape for key, p in make(None, 1).named_parameters()
        }
        save_checkpoint(tmp_path / f"{name}-padded", padded)
        stored = read_checkpoint(tmp_path / f"{name}-padded").tensors
        assert set(stored) == set(state)
        for key in state:
            assert np.array_equal(stored[key], state[key]), f"{name} {key}: the file holds the logical weight"
        plain = make(None, 2)
        load_checkpoint(tmp_path / f"{name}-padded", plain)  # padded -> unpadded
        for key, value in plain.state_dict().items():
            assert np.array_equal(value, state[key]), f"{name} {key}: padded -> unpadded"
        randomize(plain, rng)
        save_checkpoint(tmp_path / f"{name}-plain", plain)
        again = make(k, 3)
        load_checkpoint(tmp_path / f"{name}-plain", again)  # unpadded -> padded
        for key, value in again.state_dict().items():
            assert np.array_equal(value, plain.state_dict()[key]), f"{name} {key}: unpadded -> padded"
        assert all(not pad.any() for pad in padding_of(again.weight, again)), f"{name}: padding after a load"


# --- training keeps the padding zero -------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("n_workers", [3, 5, 16])
def test_training_keeps_the_padding_zero_and_tracks_the_unpadded_model(
    make_config, rng, n_workers, optimizer
):
    """Embedding -> column -> row -> padded LM head -> loss, padded (k=8) and unpadded, a few steps each."""
    cfg = make_config(n_workers, dtype=F64)
    cfg_sharded = dataclasses.replace(cfg, gather_output=False)

    def build(pad):
        return [
            ParallelEmbedding(29, 6, cfg, seed=1, pad_to_multiple_of=pad),
            ColumnParallelLinear(6, 11, cfg_sharded, seed=2, pad_to_multiple_of=pad),
            RowParallelLinear(11, 6, cfg, seed=3, pad_to_multiple_of=pad, input_is_parallel=True),
            ColumnParallelLinear(6, 29, cfg_sharded, seed=4, pad_to_multiple_of=pad),
        ]

    models = {"padded": build(8), "plain": build(None)}
    for a, b in zip(*models.values()):
        randomize(a, rng)
        b.load_state_dict(a.state_dict())
    make_opt = {"sgd": lambda ps: SGD(ps, lr=0.1, momentum=0.9), "adam": lambda ps: Adam(ps, lr=0.05)}[
        optimizer
    ]
    opts = {
        key: make_opt([p for layer in layers for p in layer.parameters()]) for key, layers in models.items()
    }
    ids = rng.integers(0, 29, size=(2, 5))
    targets = rng.integers(0, 29, size=(2, 5))
    losses = {key: [] for key in models}
    for _ in range(3):
        for key, (embed, fc1, fc2, head) in models.items():
            loss_fn = VocabParallelCrossEntropy(label_smoothing=0.1)
            loss = loss_fn(head(fc2(fc1(embed(ids)))), targets)
            losses[key].append(float(loss))
            loss.backward()
            opts[key].step()
            opts[key].zero_grad()
    assert losses["padded"][-1] < losses["padded"][0]  # it trains
    assert_close(losses["padded"], losses["plain"], F64, 29 * 11, "losses")
    for padded, plain in zip(*models.values()):
        assert all(not pad.any() for pad in padding_of(padded.weight, padded)), type(padded).__name__
        for key, value in plain.state_dict().items():
            assert_close(padded.state_dict()[key], value, F64, 29 * 11, f"{type(padded).__name__} {key}")
