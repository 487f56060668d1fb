"""Any size on any number of workers.

Every layer is compared, forward and backward (dX and every parameter
gradient), with a dense float64 reference built from its own logical weights,
for split sizes 1, 2, 7 and 13 on 1..8 and 16 workers (16 > 13: some workers
hold empty shards), on NumPy and on 1, 3 and 8 simulated devices (through
``backend_spec``; CuPy where a GPU is present). The vocabularies of BERT
(30,522) and GPT-2 (50,257) go through the embedding and the loss. Each layer's
``partition`` must be ``np.array_split``'s ranges; whole-unit splits keep heads
whole; checkpoints re-shard between worker counts bit for bit; bad sizes raise
ConfigError naming the value.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import device_of, forward_backward
from test_class_weights import dense_cross_entropy

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    ModuleDict,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    get_group,
    load_checkpoint,
    save_checkpoint,
)
from tp_gpu.backends import SimulatedBackend
from tp_gpu.partition import split_ranges, split_sizes
from tp_gpu.testing import assert_close

SIZES = [1, 2, 7, 13]
COUNTS = WORKER_COUNTS + [16]
LARGE_SIZES = [30522, 50257]
LARGE_COUNTS = [3, 4, 7, 8, 16]
F64 = "float64"


# --- helpers ---------------------------------------------------------------------------------------


def array_split_ranges(size: int, parts: int):
    """The half-open ranges ``np.array_split`` cuts ``size`` indices into."""
    bounds = np.cumsum([0] + [len(piece) for piece in np.array_split(np.arange(size), parts)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def host(layer, value) -> np.ndarray:
    """An output or gradient (a Tensor, a ShardedTensor gathered, an array) as a float64 host array."""
    return np.asarray(tp_gpu.to_numpy(value), np.float64)


def leaf(value):
    """``value``'s blocks as a new leaf that requires grad (a ShardedTensor stays one): its ``.grad``
    after a backward through it is the gradient of ``value``."""
    return value.detach().requires_grad_()


def randomize(layer, rng) -> None:
    """Random logical values for every parameter (biases start at zero; a zero bias hides bugs)."""
    layer.load_state_dict({name: rng.standard_normal(p.shape) for name, p in layer.named_parameters()})


def sharded(layer, array: np.ndarray, sizes) -> ShardedTensor:
    """``array`` cut on its last axis into ``sizes``, shard i on ``layer``'s worker i's device."""
    cuts = np.cumsum(sizes)[:-1]
    pieces = np.split(array, cuts, axis=-1)
    shards = [layer.backend.asarray(p, np.float64, d) for p, d in zip(pieces, layer.devices)]
    return ShardedTensor(shards, -1, layer.devices, layer.backend)


def flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_grad(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(
        2 * math.pi
    )


def moves(backend) -> dict:
    """``{(src, dst): count}`` of every copy recorded since the last reset (host to device included)."""
    return {key: count for key, (count, _) in backend.transfers.items()}


def reduction_only(layer) -> dict:
    """The copies of one reduction onto the output device: one from each other device in use."""
    out = layer.output_device
    return {(d, out): 1 for d in sorted(set(layer.devices)) if d != out}


# --- the split itself --------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("size", SIZES + LARGE_SIZES + [4097, 12])
def test_split_is_balanced_and_contiguous_like_array_split(size, n_workers):
    ranges = split_ranges(size, n_workers)
    assert ranges == array_split_ranges(size, n_workers)
    sizes = split_sizes(size, n_workers)
    assert sum(sizes) == size and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first size % p workers get one more


# --- ColumnParallelLinear ------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_out", SIZES)
def test_column_gathered_matches_dense(make_config, rng, n_out, n_workers):
    layer = ColumnParallelLinear(5, n_out, make_config(n_workers, dtype=F64), seed=n_out)
    assert layer.partition == array_split_ranges(n_out, n_workers)
    randomize(layer, rng)
    w, b = layer.full_weight(), layer.full_bias()
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal((2, 3, n_out))
    y, dx = forward_backward(layer, x, g)
    assert y.shape == (2, 3, n_out) and device_of(layer, y) == layer.output_device
    assert_close(host(layer, y), x @ w + b, F64, 5, "Y")
    assert dx.shape == x.shape and device_of(layer, dx) == layer.output_device
    assert_close(host(layer, dx), g @ w.T, F64, n_out, "dX")
    grads = layer.grads()
    assert_close(grads["weight"], flat(x).T @ flat(g), F64, 6, "dW")
    assert_close(grads["bias"], flat(g).sum(axis=0), F64, 6, "db")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_out", SIZES)
def test_column_sharded_output_matches_dense(make_config, rng, n_out, n_workers):
    layer = ColumnParallelLinear(5, n_out, make_config(n_workers, dtype=F64, gather_output=False), seed=n_out)
    randomize(layer, rng)
    w, b = layer.full_weight(), layer.full_bias()
    x = rng.standard_normal((4, 5))
    ranges = array_split_ranges(n_out, n_workers)
    g = rng.standard_normal((4, n_out))
    y, dx = forward_backward(layer, x, sharded(layer, g, [last - first for first, last in ranges]))
    assert isinstance(y, ShardedTensor) and y.shape == (4, n_out) and y.axis == 1
    assert y.split_sizes == [last - first for first, last in ranges]
    dense = x @ w + b
    for shard, device, (first, last) in zip(y.shards, layer.devices, ranges):
        assert layer.backend.device_of(shard) == device
        assert_close(np.asarray(layer.backend.to_host(shard)), dense[:, first:last], F64, 5, "shard")
    assert_close(host(layer, y), dense, F64, 5, "gathered Y")
    assert_close(host(layer, dx), g @ w.T, F64, n_out, "dX")
    grads = layer.grads()
    assert_close(grads["weight"], x.T @ g, F64, 4, "dW")
    assert_close(grads["bias"], g.sum(axis=0), F64, 4, "db")


# --- RowParallelLinear -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_in", SIZES)
def test_row_dense_input_matches_dense(make_config, rng, n_in, n_workers):
    layer = RowParallelLinear(n_in, 4, make_config(n_workers, dtype=F64), seed=n_in)
    assert layer.partition == array_split_ranges(n_in, n_workers)
    randomize(layer, rng)
    w, b = layer.full_weight(), layer.full_bias()
    x = rng.standard_normal((2, 3, n_in))
    g = rng.standard_normal((2, 3, 4))
    y, dx = forward_backward(layer, x, g)
    assert y.shape == (2, 3, 4) and device_of(layer, y) == layer.output_device
    assert_close(host(layer, y), x @ w + b, F64, n_in, "Y")
    assert not isinstance(dx, ShardedTensor) and dx.shape == x.shape
    assert_close(host(layer, dx), g @ w.T, F64, 4, "dX")
    grads = layer.grads()
    assert_close(grads["weight"], flat(x).T @ flat(g), F64, 6, "dW")
    assert_close(grads["bias"], flat(g).sum(axis=0), F64, 6, "db")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("n_in", SIZES)
def test_row_sharded_input_matches_dense(make_config, rng, n_in, n_workers):
    layer = RowParallelLinear(n_in, 4, make_config(n_workers, dtype=F64), seed=n_in, input_is_parallel=True)
    randomize(layer, rng)
    w, b = layer.full_weight(), layer.full_bias()
    x = rng.standard_normal((5, n_in))
    sizes = [last - first for first, last in array_split_ranges(n_in, n_workers)]
    g = rng.standard_normal((5, 4))
    y, dx = forward_backward(layer, sharded(layer, x, sizes), g)
    assert_close(host(layer, y), x @ w + b, F64, n_in, "Y")
    assert isinstance(dx, ShardedTensor) and dx.split_sizes == sizes and dx.devices == layer.devices
    assert_close(host(layer, dx), g @ w.T, F64, 4, "dX")
    grads = layer.grads()
    assert_close(grads["weight"], x.T @ g, F64, 5, "dW")
    assert_close(grads["bias"], g.sum(axis=0), F64, 5, "db")


# --- column -> row -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("hidden", SIZES)
def test_column_to_row_chain_is_communication_free(make_config, rng, hidden, n_workers):
    col = ColumnParallelLinear(6, hidden, make_config(n_workers, dtype=F64, gather_output=False), seed=1)
    row = RowParallelLinear(hidden, 5, make_config(n_workers, dtype=F64), seed=2, input_is_parallel=True)
    assert col.partition == row.partition == array_split_ranges(hidden, n_workers)
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
    if counting:  # only the row layer's reduction: nothing moved between the two layers
        assert moves(backend) == reduction_only(row)
    w1, b1, w2, b2 = col.full_weight(), col.full_bias(), row.full_weight(), row.full_bias()
    hid = x @ w1 + b1
    assert_close(host(row, y), hid @ w2 + b2, F64, 6 * hidden, "Y")
    g = backend.asarray(
        rng.standard_normal((3, 5)), np.float64, row.output_device
    )  # as the next layer gives it
    g_host = np.asarray(backend.to_host(g))
    if counting:
        backend.reset_transfers()
    y.backward(g)
    if counting:  # dY to every other device (the row layer), the reduction of dX (the column layer)
        out = row.output_device
        dy_copies = {(out, d): 1 for d in sorted(set(row.devices)) if d != out}
        assert moves(backend) == {**dy_copies, **reduction_only(col)}
    assert_close(host(col, x_leaf.grad), g_host @ w2.T @ w1.T, F64, 5 * hidden, "dX")
    assert_close(row.grads()["weight"], hid.T @ g_host, F64, 3, "fc2 dW")
    assert_close(col.grads()["weight"], x.T @ (g_host @ w2.T), F64, 5 * 3, "fc1 dW")
    assert_close(col.grads()["bias"], (g_host @ w2.T).sum(axis=0), F64, 5 * 3, "fc1 db")


# --- ParallelMLP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("hidden", SIZES)
def test_mlp_matches_dense(make_config, rng, hidden, n_workers):
    mlp = ParallelMLP(6, hidden, 4, make_config(n_workers, dtype=F64), seed=3)
    assert mlp.fc1.partition == mlp.fc2.partition == array_split_ranges(hidden, n_workers)
    randomize(mlp, rng)
    state = mlp.state_dict()
    a, a_b, b, b_b = state["fc1.weight"], state["fc1.bias"], state["fc2.weight"], state["fc2.bias"]
    x = rng.standard_normal((2, 3, 6))
    h = x @ a + a_b
    g = rng.standard_normal((2, 3, 4))
    y, dx = forward_backward(mlp, x, g)
    assert_close(host(mlp.fc2, y), gelu(h) @ b + b_b, F64, 6 * hidden, "Y")
    dh = (g @ b.T) * gelu_grad(h)
    assert_close(host(mlp.fc2, dx), dh @ a.T, F64, 4 * hidden, "dX")
    grads = mlp.grads()
    expected = {
        "fc1.weight": flat(x).T @ flat(dh),
        "fc1.bias": flat(dh).sum(axis=0),
        "fc2.weight": flat(gelu(h)).T @ flat(g),
        "fc2.bias": flat(g).sum(axis=0),
    }
    assert set(grads) == set(expected)
    for key, value in expected.items():
        assert_close(grads[key], value, F64, 6 * 4, key)


# --- ParallelEmbedding ----------------------------------------------------------------------------


def check_embedding(layer, rng, ids) -> None:
    """Forward bit for bit ``E[ids]``; backward the scatter-add of dOut onto the rows of ``ids``."""
    table = layer.full_weight()
    out = layer(ids)
    assert out.shape == ids.shape + (layer.embed_dim,)
    assert np.array_equal(np.asarray(layer.backend.to_host(out)), table[ids])
    g = rng.standard_normal(out.shape)
    out.backward(g)  # the ids get no gradient: only the table's
    expected = np.zeros_like(table)
    np.add.at(expected, ids.reshape(-1), g.reshape(-1, layer.embed_dim))
    assert_close(layer.grads()["weight"], expected, F64, ids.size, "dE")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("vocab", SIZES)
def test_embedding_matches_dense(make_config, rng, vocab, n_workers):
    layer = ParallelEmbedding(vocab, 3, make_config(n_workers, dtype=F64), seed=vocab)
    assert layer.partition == array_split_ranges(vocab, n_workers)
    ids = np.concatenate([np.arange(vocab), rng.integers(0, vocab, size=11)])  # every id, and repeats
    check_embedding(layer, rng, rng.permutation(ids).reshape(1, -1))


@pytest.mark.parametrize("n_workers", LARGE_COUNTS)
@pytest.mark.parametrize("vocab", LARGE_SIZES)
def test_embedding_with_real_vocabularies(make_config, rng, vocab, n_workers):
    layer = ParallelEmbedding(vocab, 2, make_config(n_workers, dtype=F64), seed=1)
    ranges = array_split_ranges(vocab, n_workers)
    assert layer.partition == ranges
    edges = [i for first, last in ranges for i in (first, last - 1)]  # the first and last row of every shard
    ids = np.array(edges + list(rng.integers(0, vocab, size=16)))
    check_embedding(layer, rng, ids.reshape(2, -1))


# --- VocabParallelCrossEntropy on uneven logits -----------------------------------------------


def check_loss(logits: ShardedTensor, z: np.ndarray, targets: np.ndarray, **kwargs) -> None:
    loss_fn = VocabParallelCrossEntropy(**kwargs)
    logits = leaf(logits)
    loss = loss_fn(logits, targets)
    expected, expected_grad = dense_cross_entropy(z, targets, **kwargs)
    assert_close(float(loss), expected, F64, z.shape[-1], "loss")
    loss.backward()
    grad = logits.grad
    assert isinstance(grad, ShardedTensor)
    assert grad.split_sizes == logits.split_sizes and grad.devices == logits.devices
    assert_close(np.asarray(logits.backend.to_host(grad.gather())), expected_grad, F64, z.shape[-1], "dZ")


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("vocab", SIZES)
def test_loss_on_uneven_logits_matches_dense(make_config, rng, vocab, n_workers):
    head = ColumnParallelLinear(4, vocab, make_config(n_workers, dtype=F64, gather_output=False), seed=vocab)
    randomize(head, rng)
    x = rng.standard_normal((6, 4))
    logits = head(x)
    z = x @ head.full_weight() + head.full_bias()
    targets = rng.integers(0, vocab, size=6)
    targets[2] = -100
    check_loss(logits, z, targets, label_smoothing=0.1)
    # The whole chain: dZ into the head gives its weight gradient.
    _, dz = dense_cross_entropy(z, targets)
    loss_fn = VocabParallelCrossEntropy()
    head.zero_grad()
    loss_fn(head(x), targets).backward()
    assert_close(head.grads()["weight"], x.T @ dz, F64, 6, "head dW")


@pytest.mark.parametrize("n_workers", LARGE_COUNTS)
@pytest.mark.parametrize("vocab", LARGE_SIZES)
def test_loss_with_real_vocabularies(make_config, rng, vocab, n_workers):
    group = get_group(make_config(n_workers))
    z = 4.0 * rng.standard_normal((3, vocab))
    ranges = array_split_ranges(vocab, n_workers)
    shards = [group.backend.asarray(z[:, a:b], np.float64, d) for (a, b), d in zip(ranges, group.devices)]
    logits = ShardedTensor(shards, -1, group.devices, group.backend)
    targets = np.array([ranges[0][0], ranges[-1][1] - 1, -100])  # the first and the last class
    check_loss(logits, z, targets, label_smoothing=0.1)


# --- ShardedTensor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", COUNTS)
@pytest.mark.parametrize("size", SIZES)
def test_sharded_tensor_of_uneven_shards_gathers(make_config, rng, size, n_workers):
    group = get_group(make_config(n_workers))
    backend, devices = group.backend, group.devices
    full = rng.standard_normal((3, size, 2))
    pieces = np.array_split(full, n_workers, axis=1)
    tensor = ShardedTensor(
        [backend.asarray(p, np.float64, d) for p, d in zip(pieces, devices)], 1, devices, backend
    )
    assert tensor.shape == full.shape
    assert tensor.split_sizes == [p.shape[1] for p in pieces]
    assert tensor.layout.ranges == array_split_ranges(size, n_workers)
    for device in sorted(set(devices)):
        gathered = tensor.gather(device)
        assert backend.device_of(gathered) == device
        assert np.array_equal(np.asarray(backend.to_host(gathered)), full)
    doubled = tensor.map(lambda a: 2 * a)
    assert doubled.split_sizes == tensor.split_sizes
    assert np.array_equal(np.asarray(backend.to_host(doubled.gather())), 2 * full)


# --- whole-unit splits -----------------------------------------------------------------------------

HEADS, HEAD_DIM = 12, 3


@pytest.mark.parametrize("n_workers", [5, 7, 8, 16])
def test_heads_stay_whole_and_balanced(make_config, rng, n_workers):
    width = HEADS * HEAD_DIM
    heads = [len(h) for h in np.array_split(np.arange(HEADS), n_workers)]
    col = ColumnParallelLinear(
        6, width, make_config(n_workers, dtype=F64, gather_output=False), seed=1, unit=HEAD_DIM
    )
    row = RowParallelLinear(
        width, 4, make_config(n_workers, dtype=F64), seed=2, unit=HEAD_DIM, input_is_parallel=True
    )
    expected = [(HEAD_DIM * a, HEAD_DIM * b) for a, b in array_split_ranges(HEADS, n_workers)]
    assert col.partition == row.partition == expected
    assert [(last - first) // HEAD_DIM for first, last in col.partition] == heads
    assert all(first % HEAD_DIM == 0 and last % HEAD_DIM == 0 for first, last in col.partition)
    if n_workers == 8:
        assert heads == [2, 2, 2, 2, 1, 1, 1, 1]  # the issue's example
    randomize(col, rng)
    randomize(row, rng)
    x = rng.standard_normal((3, 6))
    x_leaf = tp_gpu.tensor(x, requires_grad=True)
    backend = row.backend
    h = col(x_leaf)
    assert h.split_sizes == [HEAD_DIM * n for n in heads]
    if isinstance(backend, SimulatedBackend):
        backend.reset_transfers()
    y = row(h)
    if isinstance(backend, SimulatedBackend):
        assert moves(backend) == reduction_only(row)
    hid = x @ col.full_weight() + col.full_bias()
    assert_close(host(row, y), hid @ row.full_weight() + row.full_bias(), F64, 6 * width, "Y")
    g = rng.standard_normal((3, 4))
    y.backward(g)
    assert_close(host(col, x_leaf.grad), g @ row.full_weight().T @ col.full_weight().T, F64, 4 * width, "dX")


def test_unit_split_sizes_directly():
    assert split_sizes(12 * 64, 8, unit=64) == [128] * 4 + [64] * 4
    assert split_sizes(36, 5, unit=3) == [9, 9, 6, 6, 6]
    assert split_sizes(36, 16, unit=3) == [3] * 12 + [0] * 4


# --- re-sharding through checkpoints ---------------------------------------------------------------


def tiny_model(config: TensorParallelConfig, seed: int) -> ModuleDict:
    """Embedding -> MLP -> column head, every split dimension uneven for most worker counts."""
    return ModuleDict(
        {
            "embed": ParallelEmbedding(31, 6, config, seed=seed),
            "mlp": ParallelMLP(6, 13, 6, config, seed=seed + 1),
            "head": ColumnParallelLinear(
                6, 29, dataclasses.replace(config, gather_output=False), seed=seed + 3
            ),
        }
    )


def run_model(model: ModuleDict, ids: np.ndarray) -> np.ndarray:
    hidden = model["mlp"](model["embed"](ids))
    return host(model["head"], model["head"](hidden))


def test_reshard_round_trip_through_checkpoints(make_config, rng, tmp_path: pathlib.Path):
    source = tiny_model(make_config(3, dtype=F64), seed=10)
    source.load_state_dict({k: rng.standard_normal(v.shape) for k, v in source.state_dict().items()})
    saved = source.state_dict()
    ids = rng.integers(0, 31, size=(2, 5))
    expected = run_model(source, ids)
    save_checkpoint(tmp_path / "p3.safetensors", source)
    for n_workers in (8, 1, 16):
        target = tiny_model(make_config(n_workers, dtype=F64), seed=n_workers)
        load_checkpoint(tmp_path / "p3.safetensors", target)
        for key, value in target.state_dict().items():
            assert np.array_equal(value, saved[key]), f"p=3 -> p={n_workers}: {key}"
        assert_close(run_model(target, ids), expected, F64, 6 * 13, f"output at p={n_workers}")
        # ... and back to p=3, through a checkpoint written at this worker count.
        save_checkpoint(tmp_path / f"p{n_workers}.safetensors", target)
        back = tiny_model(make_config(3, dtype=F64), seed=99)
        load_checkpoint(tmp_path / f"p{n_workers}.safetensors", back)
        for key, value in back.state_dict().items():
            assert np.array_equal(value, saved[key]), f"p={n_workers} -> p=3: {key}"
        assert np.array_equal(run_model(back, ids), expected)


def test_state_dict_reshards_without_a_file(rng):
    """load_state_dict between worker counts of uneven splits keeps every weight bit for bit."""
    source = tiny_model(TensorParallelConfig(n_workers=7, backend="numpy", dtype="float64"), seed=0)
    saved = source.state_dict()
    for n_workers in (2, 5, 16):
        target = tiny_model(
            TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype="float64"), seed=n_workers
        )
        assert any(not np.array_equal(target.state_dict()[k], saved[k]) for k in saved)  # seeds differ
        target.load_state_dict(saved)
        for key, value in target.state_dict().items():
            assert np.array_equal(value, saved[key]), key


# --- errors --------------------------------------------------------------------------------------

BAD_SIZES = [0, -1, -13, 2.5, 7.0, "7", None, True]
FACTORIES = {
    "column n_out": lambda v, cfg: ColumnParallelLinear(4, v, cfg),
    "column n_in": lambda v, cfg: ColumnParallelLinear(v, 4, cfg),
    "row n_in": lambda v, cfg: RowParallelLinear(v, 4, cfg),
    "row n_out": lambda v, cfg: RowParallelLinear(4, v, cfg),
    "embedding vocab_size": lambda v, cfg: ParallelEmbedding(v, 4, cfg),
    "embedding embed_dim": lambda v, cfg: ParallelEmbedding(4, v, cfg),
    "mlp hidden": lambda v, cfg: ParallelMLP(4, v, 4, cfg),
    "split_sizes": lambda v, cfg: split_sizes(v, 3),
}


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("what", list(FACTORIES))
def test_bad_size_raises_config_error_naming_it(what, value):
    with pytest.raises(ConfigError) as info:
        FACTORIES[what](value, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64"))
    message = str(info.value)
    assert repr(value) in message, message
    assert "nearest" not in message


@pytest.mark.parametrize("value", [0, -3, 1.5, "3"], ids=repr)
def test_bad_unit_raises_config_error_naming_it(value):
    with pytest.raises(ConfigError, match="unit") as info:
        ColumnParallelLinear(
            4, 36, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64"), unit=value
        )
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "make, size, unit",
    [
        (lambda cfg: ColumnParallelLinear(4, 36, cfg, unit=5), 36, 5),
        (lambda cfg: RowParallelLinear(37, 4, cfg, unit=3), 37, 3),
        (lambda cfg: ColumnParallelLinear(4, 12, cfg, unit=64), 12, 64),
    ],
    ids=["column 36/5", "row 37/3", "column 12/64"],
)
def test_unit_that_does_not_divide_its_dimension(make, size, unit):
    with pytest.raises(ConfigError) as info:
        make(TensorParallelConfig(n_workers=4, backend="numpy", dtype="float64"))
    message = str(info.value)
    assert f"({size})" in message and str(unit) in message, message
    assert "nearest" not in message


@pytest.mark.parametrize("n_workers", [2, 3, 4, 8])
def test_sizes_the_issue_saw_refused_are_accepted(n_workers):
    cfg = TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype="float32")
    assert ParallelEmbedding(30522, 1, cfg).partition == array_split_ranges(30522, n_workers)
    assert ParallelEmbedding(50257, 1, cfg).partition == array_split_ranges(50257, n_workers)
    assert ColumnParallelLinear(8, 50257, cfg).partition == array_split_ranges(50257, n_workers)


def test_no_nearest_valid_sizes_hint_is_left_in_the_library():
    package = pathlib.Path(__file__).resolve().parents[1] / "src" / "tp_gpu"
    offenders = [str(p) for p in package.rglob("*.py") if "nearest valid" in p.read_text(encoding="utf-8")]
    assert offenders == []
