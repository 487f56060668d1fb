"""Dense weights in and out: state_dict / load_state_dict, from_dense / load_dense.

Every test runs on every backend of ``backend_spec`` and, where the split
matters, for every worker count 1..8. Values are random; references are dense
float64 computations from the arrays that were loaded. Every error case checks
that the module was left exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import TOLERANCE, to_host

from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    TensorParallelConfig,
)
from tp_gpu.backends import SimulatedBackend
from tp_gpu.layers.activations import get_activation


def snapshot(module, named=None):
    """Every parameter's logical value, and the identity of every device block."""
    named = module.named_parameters() if named is None else named
    return {name: (p.full(), {d: id(b) for d, b in p.blocks.items()}) for name, p in named}


def assert_unchanged(module, before, named=None) -> None:
    after = snapshot(module, named)
    assert list(after) == list(before)
    for name, (value, blocks) in before.items():
        np.testing.assert_array_equal(after[name][0], value, err_msg=name)
        assert after[name][1] == blocks, f"{name}: device blocks were replaced"


def assert_close(actual, expected, dtype="float64") -> None:
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))


def build(kind: str, n_workers: int, config, seed: int):
    """A module of ``kind`` whose split dimensions are odd multiples of ``n_workers``."""
    if kind == "column":
        return ColumnParallelLinear(7, 3 * n_workers, config, seed=seed)
    if kind == "row":
        return RowParallelLinear(3 * n_workers, 5, config, seed=seed)
    if kind == "embedding":
        return ParallelEmbedding(3 * n_workers, 5, seed=seed, config=config)
    return ParallelMLP(7, 3 * n_workers, 5, config, seed=seed)


def sample_input(kind: str, module, rng):
    if kind == "embedding":
        return rng.integers(0, module.vocab_size, size=(4, 3))
    n_in = module.fc1.n_in if kind == "mlp" else module.n_in
    return rng.standard_normal((4, n_in))


def output(module, x) -> np.ndarray:
    return np.asarray(module.backend.to_host(module(x)))


KINDS = ["column", "row", "embedding", "mlp"]


# --- state_dict / load_state_dict -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_state_dict_round_trip(make_config, rng, kind, n_workers):
    source = build(kind, n_workers, make_config(n_workers), seed=1)
    for p in source.parameters():  # random biases too, not only the zero initial ones
        p.load(rng.standard_normal(p.shape))
    target = build(kind, n_workers, make_config(n_workers), seed=2)
    state = source.state_dict()
    target.load_state_dict(state)
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    x = sample_input(kind, source, rng)
    np.testing.assert_array_equal(output(target, x), output(source, x))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_is_dense_host_copies(make_config, kind):
    module = build(kind, 3, make_config(3), seed=4)
    state = module.state_dict()
    expected = {
        "column": {"weight": (7, 9), "bias": (9,)},
        "row": {"weight": (9, 5), "bias": (5,)},
        "embedding": {"weight": (9, 5)},
        "mlp": {"fc1.weight": (7, 9), "fc1.bias": (9,), "fc2.weight": (9, 5), "fc2.bias": (5,)},
    }[kind]
    assert {k: v.shape for k, v in state.items()} == expected
    for value in state.values():
        assert type(value) is np.ndarray and value.dtype == np.float64
    before = snapshot(module)
    for value in state.values():
        value += 1.0  # the caller's arrays are copies: the module must not see this
    assert_unchanged(module, before)


@pytest.mark.parametrize("n_source", [1, 2, 4, 8])
def test_state_dict_reshards_across_worker_counts_and_backends(backend_spec, rng, n_source):
    name, devices = backend_spec
    source = ParallelMLP(
        6,
        840,
        5,
        TensorParallelConfig(n_workers=n_source, backend=name, devices=devices, dtype="float64"),
        seed=3,
    )
    x = rng.standard_normal((4, 6))
    expected = output(source, x)
    state = source.state_dict()
    for n_target in WORKER_COUNTS:
        for target_backend, target_devices in (("numpy", None), ("simulated", 3)):
            config = TensorParallelConfig(
                n_workers=n_target, backend=target_backend, devices=target_devices, dtype="float64"
            )
            target = ParallelMLP(6, 840, 5, config, seed=9)
            target.load_state_dict(state)
            for key, value in target.state_dict().items():
                np.testing.assert_array_equal(value, state[key], err_msg=key)
            # The reduction order depends on the split, so outputs agree to rounding, not bit for bit.
            assert_close(output(target, x), expected)


def test_load_state_dict_casts_to_module_dtype(make_config, rng):
    layer = ColumnParallelLinear(5, 6, make_config(3, dtype="float32"), seed=0)
    weight, bias = rng.standard_normal((5, 6)), rng.standard_normal(6)
    layer.load_state_dict({"weight": weight, "bias": bias})
    assert layer.full_weight().dtype == np.float32
    np.testing.assert_array_equal(layer.full_weight(), weight.astype(np.float32))
    layer.load_state_dict({"weight": np.arange(30).reshape(5, 6), "bias": np.zeros(6, np.int32)})
    np.testing.assert_array_equal(layer.full_weight(), np.arange(30, dtype=np.float32).reshape(5, 6))


def test_load_state_dict_keeps_blocks_in_place(make_config, rng):
    """Blocks are overwritten in place, so shard views and optimizer state stay attached."""
    layer = RowParallelLinear(12, 5, make_config(4), seed=0)
    before = {name: {d: id(b) for d, b in p.blocks.items()} for name, p in layer.named_parameters()}
    weight = rng.standard_normal((12, 5))
    layer.load_state_dict({"weight": weight, "bias": rng.standard_normal(5)})
    assert {name: {d: id(b) for d, b in p.blocks.items()} for name, p in layer.named_parameters()} == before
    np.testing.assert_array_equal(
        np.concatenate([layer.backend.to_host(s) for s in layer.weight_shards]), weight
    )


@pytest.mark.parametrize(
    "state, message",
    [
        ({"weight": "W"}, "1 missing and 0 unexpected keys (1 problem: missing key 'bias')"),
        ({"weight": "W", "bias": "b", "extra": "b"}, "(1 problem: unexpected key 'extra')"),
        ({"weight": "W", "bias": np.zeros(7)}, "'bias' must have shape (6,), got (7,)"),
        ({"weight": "W", "bias": np.zeros((6, 1))}, "'bias' must have shape (6,), got (6, 1)"),
        ({"weight": "W.T", "bias": "b"}, "'weight' must have shape (5, 6), got (6, 5)"),
        ({"weight": "W", "bias": np.zeros(6, complex)}, "must hold real numbers"),
        ({"weight": "W", "bias": np.array(["a"] * 6)}, "must hold real numbers"),
        ({"weight": "W", "bias": [[1, 2], [3]]}, "could not be read as an array"),
        (["weight", "bias"], "expects a mapping"),
    ],
    ids=[
        "missing",
        "unexpected",
        "bias-size",
        "bias-rank",
        "transposed",
        "complex",
        "strings",
        "ragged",
        "not-a-mapping",
    ],
)
def test_load_state_dict_rejects_bad_state_without_changes(make_config, rng, state, message):
    layer = ColumnParallelLinear(5, 6, make_config(3), seed=0)
    weight, bias = rng.standard_normal((5, 6)), rng.standard_normal(6)
    subst = {"W": weight, "W.T": weight.T, "b": bias}
    if isinstance(state, dict):
        state = {k: subst[v] if isinstance(v, str) and v in subst else v for k, v in state.items()}
    before = snapshot(layer)
    with pytest.raises(ShapeError) as info:
        layer.load_state_dict(state)
    assert message in str(info.value)
    assert_unchanged(layer, before)


def test_mlp_load_state_dict_is_all_or_nothing(make_config, rng):
    """A bad last tensor must not leave the first ones written."""
    mlp = ParallelMLP(4, 6, 3, make_config(3), seed=0)
    state = {k: rng.standard_normal(v.shape) for k, v in mlp.state_dict().items()}
    state["fc2.bias"] = np.zeros(4)
    before = snapshot(mlp)
    with pytest.raises(ShapeError, match=r"'fc2.bias' must have shape \(3,\), got \(4,\)"):
        mlp.load_state_dict(state)
    assert_unchanged(mlp, before)


# --- from_dense / load_dense ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_linear_from_dense(make_config, rng, cls, n_workers, layout):
    n_in, n_out = (7, 3 * n_workers) if cls is ColumnParallelLinear else (3 * n_workers, 7)
    weight, bias = rng.standard_normal((n_in, n_out)), rng.standard_normal(n_out)
    given = weight if layout == "in_out" else np.ascontiguousarray(weight.T)
    layer = cls.from_dense(given, bias, make_config(n_workers), layout=layout)
    assert (layer.n_in, layer.n_out, layer.n_workers) == (n_in, n_out, n_workers)
    np.testing.assert_array_equal(layer.full_weight(), weight)  # full_weight() is the exact inverse
    np.testing.assert_array_equal(layer.full_bias(), bias)
    x = rng.standard_normal((4, n_in))
    assert_close(to_host(layer, layer(x)), x @ weight + bias)
    again = cls.from_dense(layer.full_weight(), layer.full_bias(), make_config(n_workers))
    np.testing.assert_array_equal(to_host(again, again(x)), to_host(layer, layer(x)))


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_embedding_from_dense(make_config, rng, n_workers):
    table = rng.standard_normal((3 * n_workers, 5))
    layer = ParallelEmbedding.from_dense(table, config=make_config(n_workers))
    assert (layer.vocab_size, layer.embed_dim) == table.shape
    np.testing.assert_array_equal(layer.full_weight(), table)
    ids = rng.integers(0, table.shape[0], size=(3, 4))
    np.testing.assert_array_equal(to_host(layer, layer(ids)), table[ids])


@pytest.mark.parametrize("activation", ["gelu", "relu", None])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_mlp_from_dense(make_config, rng, n_workers, layout, activation):
    w1, b1 = rng.standard_normal((6, 5 * n_workers)), rng.standard_normal(5 * n_workers)
    w2, b2 = rng.standard_normal((5 * n_workers, 4)), rng.standard_normal(4)
    flip = (lambda w: w) if layout == "in_out" else (lambda w: np.ascontiguousarray(w.T))
    mlp = ParallelMLP.from_dense(
        flip(w1), b1, flip(w2), b2, make_config(n_workers), layout=layout, activation=activation
    )
    state = mlp.state_dict()
    for key, value in {"fc1.weight": w1, "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2}.items():
        np.testing.assert_array_equal(state[key], value)
    x = rng.standard_normal((3, 6))
    act = get_activation(activation)
    assert_close(output(mlp, x), act.forward(np, x @ w1 + b1) @ w2 + b2)


def test_from_dense_uses_the_config(rng):
    weight = rng.standard_normal((4, 6))  # float64: the layer takes the config's dtype, not the array's
    layer = ColumnParallelLinear.from_dense(weight)
    assert layer.n_workers == 2 and layer.dtype == np.float32  # TensorParallelConfig() defaults
    np.testing.assert_array_equal(layer.full_weight(), weight.astype(np.float32))
    layer = ColumnParallelLinear.from_dense(weight, config=TensorParallelConfig(n_workers=3, dtype="float16"))
    assert layer.dtype == np.float16 and layer.n_workers == 3
    row = RowParallelLinear.from_dense(
        weight.T, config=TensorParallelConfig(n_workers=3, dtype="float64"), input_is_parallel=True
    )
    assert row.input_is_parallel and (row.n_in, row.n_out) == (6, 4)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_load_dense_none_bias_means_no_bias(make_config, rng, cls):
    """``bias=None`` is nn.Linear(bias=False): the bias becomes zero, even after a non-zero one."""
    layer = cls(6, 6, make_config(3), seed=0)
    layer.load_dense(rng.standard_normal((6, 6)), rng.standard_normal(6))
    assert np.any(layer.full_bias() != 0)
    weight = rng.standard_normal((6, 6))
    layer.load_dense(weight)
    np.testing.assert_array_equal(layer.full_bias(), np.zeros(6))
    x = rng.standard_normal((2, 6))
    assert_close(to_host(layer, layer(x)), x @ weight)


def test_load_dense_from_device_array_moves_device_to_device(rng):
    """A full array on a simulated device is split there: only blocks cross, none via the host."""
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    layer = ColumnParallelLinear(4, 10, config, seed=0)
    weight, bias = rng.standard_normal((4, 10)), rng.standard_normal(10)
    on_device = SimulatedBackend(3)
    layer.backend.reset_transfers()
    layer.load_dense(on_device.asarray(weight, np.float64, 2), on_device.asarray(bias, np.float64, 2))
    np.testing.assert_array_equal(layer.full_weight(), weight)
    np.testing.assert_array_equal(layer.full_bias(), bias)
    sources = {src for src, _ in layer.backend.transfers}
    assert sources == {2}, layer.backend.transfers  # from device 2 to devices 0 and 1; nothing from the host
    assert {dst for _, dst in layer.backend.transfers} == {0, 1}
    again = ColumnParallelLinear.from_dense(
        on_device.asarray(weight.T, np.float64, 1), None, config, layout="out_in"
    )
    np.testing.assert_array_equal(again.full_weight(), weight)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_load_dense_rejects_bad_input_without_changes(make_config, rng, cls):
    layer = cls(6, 9, make_config(3), seed=0)
    good_w, good_b = rng.standard_normal((6, 9)), rng.standard_normal(9)
    name = cls.__name__
    cases = [
        (
            dict(weight=good_w.T),
            ShapeError,
            f"{name} weight must have shape (6, 9) (n_in, n_out) for layout='in_out', got (9, 6)",
        ),
        (
            dict(weight=good_w, layout="out_in"),
            ShapeError,
            f"{name} weight must have shape (9, 6) (n_out, n_in) for layout='out_in', got (6, 9)",
        ),
        (
            dict(weight=good_w[None]),
            ShapeError,
            "must be 2-D (n_in, n_out) for layout='in_out', got shape (1, 6, 9)",
        ),
        (
            dict(weight=good_w, bias=good_b[:8]),
            ShapeError,
            f"{name} bias must have shape (9,) (n_out,), got (8,)",
        ),
        (dict(weight=good_w, bias=np.zeros(9, complex)), ShapeError, "must hold real numbers"),
        (dict(weight=good_w, layout="torch"), ConfigError, "layout must be 'in_out'"),
        (dict(weight=good_w, layout=1), ConfigError, "got 1"),  # None is the default: in_out for arrays
    ]
    for kwargs, error, message in cases:
        before = snapshot(layer)
        with pytest.raises(error) as info:
            layer.load_dense(**kwargs)
        assert message in str(info.value), kwargs
        assert_unchanged(layer, before)


def test_embedding_load_dense_rejects_bad_input_without_changes(make_config, rng):
    layer = ParallelEmbedding(9, 4, seed=0, config=make_config(3))
    before = snapshot(layer)
    with pytest.raises(ShapeError, match=r"must have shape \(9, 4\) \(vocab_size, embed_dim\), got \(4, 9\)"):
        layer.load_dense(rng.standard_normal((4, 9)))
    with pytest.raises(ShapeError, match=r"got \(9,\)"):
        layer.load_dense(rng.standard_normal(9))
    assert_unchanged(layer, before)


def test_mlp_load_dense_is_all_or_nothing(make_config, rng):
    mlp = ParallelMLP(4, 6, 3, make_config(3), seed=0)
    before = snapshot(mlp)
    with pytest.raises(ShapeError, match=r"ParallelMLP fc2 bias must have shape \(3,\)"):
        mlp.load_dense(
            rng.standard_normal((4, 6)), rng.standard_normal(6), rng.standard_normal((6, 3)), np.zeros(5)
        )
    with pytest.raises(ShapeError, match=r"ParallelMLP fc2 weight must have shape \(6, 3\)"):
        mlp.load_dense(rng.standard_normal((4, 6)), None, rng.standard_normal((3, 6)), None)
    assert_unchanged(mlp, before)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda w: ColumnParallelLinear.from_dense(w[0]), "must be 2-D"),
        (lambda w: RowParallelLinear.from_dense(w[None]), "must be 2-D"),
        (lambda w: ParallelEmbedding.from_dense(w[0]), "must be 2-D (vocab_size, embed_dim)"),
        (lambda w: ColumnParallelLinear.from_dense(w, layout="in-out"), "layout must be"),
        (lambda w: ColumnParallelLinear.from_dense(w, np.zeros(5)), "bias must have shape (6,)"),
        (
            lambda w: ParallelMLP.from_dense(w, None, w, None),
            "fc1_weight has 6 outputs but fc2_weight has 4 inputs",
        ),
        (
            lambda w: ColumnParallelLinear.from_dense(
                w, config=TensorParallelConfig(n_workers=0, dtype="float64")
            ),
            "n_workers",
        ),
    ],
    ids=["column-1d", "row-3d", "embedding-1d", "layout", "bias", "mlp-hidden", "bad-config"],
)
def test_from_dense_errors(rng, factory, message):
    with pytest.raises((ShapeError, ConfigError)) as info:
        factory(rng.standard_normal((4, 6)))
    assert message in str(info.value)


def test_load_state_dict_with_many_bad_keys_gives_a_count_and_the_first_five(rng):
    """A strict load with 40 unexpected keys names the count and five of them; .problems holds all."""
    layer = ColumnParallelLinear(5, 6, TensorParallelConfig(n_workers=2, dtype="float64"), seed=0)
    state = {f"extra{i}": np.zeros(1) for i in range(40)}
    before = snapshot(layer)
    with pytest.raises(ShapeError) as info:
        layer.load_state_dict(state)
    message = str(info.value)
    head = "2 missing and 40 unexpected keys (42 problems: missing key 'weight'; missing key 'bias'; "
    assert head in message
    assert "unexpected key 'extra2'; and 37 more; all 42 are in the exception's .problems" in message
    assert "extra3'" not in message and len(message) < 400
    assert info.value.problems[-1] == "unexpected key 'extra39'" and len(info.value.problems) == 42
    assert message.endswith("expected exactly 2 keys: ['weight', 'bias']")
    assert_unchanged(layer, before)
