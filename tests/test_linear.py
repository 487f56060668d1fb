"""ColumnParallelLinear and RowParallelLinear against a dense float64 reference.

Every test runs on every backend of ``backend_spec`` (NumPy, simulated devices
with fewer / as many / more devices than workers, CuPy where a GPU is present)
and, where it matters, for every worker count 1..8. Split dimensions are
``7 * n_workers`` or ``13 * n_workers`` so shards have odd, prime sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import TOLERANCE, device_of, to_host

from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    RowParallelLinear,
    ShapeError,
    ShardedTensor,
    Tensor,
    TensorParallelConfig,
    TensorParallelError,
)
from tp_gpu.backends import SimulatedBackend

DTYPES = ["float64", "float32", "float16"]


def dense_reference(layer, x: np.ndarray) -> np.ndarray:
    """``x @ W + b`` in float64 from the layer's own logical weight and bias."""
    return np.asarray(x, np.float64) @ layer.full_weight().astype(np.float64) + layer.full_bias().astype(
        np.float64
    )


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_column_matches_dense(make_config, rng, n_workers, dtype):
    layer = ColumnParallelLinear(13, 7 * n_workers, make_config(n_workers, dtype=dtype), seed=n_workers)
    x = rng.standard_normal((5, 13)).astype(dtype)
    y = layer(x)
    assert y.shape == (5, 7 * n_workers)
    assert isinstance(y, Tensor) and y.dtype == np.dtype(dtype)
    assert device_of(layer, y) == layer.devices[0]
    assert_close(to_host(layer, y), dense_reference(layer, x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_row_matches_dense(make_config, rng, n_workers, dtype):
    layer = RowParallelLinear(13 * n_workers, 7, make_config(n_workers, dtype=dtype), seed=n_workers)
    x = rng.standard_normal((5, 13 * n_workers)).astype(dtype)
    y = layer(x)
    assert y.shape == (5, 7)
    assert isinstance(y, Tensor) and y.dtype == np.dtype(dtype)
    assert device_of(layer, y) == layer.devices[0]
    assert_close(to_host(layer, y), dense_reference(layer, x), dtype)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_column_to_row_chain_without_gather(make_config, rng, n_workers):
    col = ColumnParallelLinear(11, 3 * n_workers, make_config(n_workers, gather_output=False), seed=1)
    row = RowParallelLinear(3 * n_workers, 5, make_config(n_workers), seed=2)
    x = rng.standard_normal((7, 11))
    hidden = col(x)
    assert isinstance(hidden, ShardedTensor)
    assert hidden.shape == (7, 3 * n_workers) and hidden.axis == 1
    assert hidden.devices == col.devices
    for shard, device in zip(hidden.shards, col.devices):
        assert shard.shape == (7, 3)
        assert col.backend.device_of(shard) == device
    np.testing.assert_allclose(to_host(col, hidden.gather()), dense_reference(col, x), rtol=1e-12, atol=1e-12)
    expected = dense_reference(row, dense_reference(col, x))
    np.testing.assert_allclose(to_host(row, row(hidden)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_nonzero_bias_is_added_once(make_config, rng, n_workers):
    """Biases start at zero; set them to random values and check they are added exactly once."""
    col = ColumnParallelLinear(5, 2 * n_workers, make_config(n_workers), seed=0)
    row = RowParallelLinear(2 * n_workers, 3, make_config(n_workers), seed=0)
    for shard, device in zip(col.bias_shards, col.devices):  # shards are views: write in place
        with col.backend.device(device):
            shard[...] = col.backend.asarray(rng.standard_normal(2), col.dtype, device)
    row.bias.load(rng.standard_normal(3))
    x = rng.standard_normal((4, 5))
    np.testing.assert_allclose(to_host(col, col(x)), dense_reference(col, x), rtol=1e-12, atol=1e-12)
    h = rng.standard_normal((4, 2 * n_workers))
    np.testing.assert_allclose(to_host(row, row(h)), dense_reference(row, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(13,), (2, 3, 13), (1, 13), (0, 13)])
def test_any_leading_shape(make_config, rng, shape):
    col = ColumnParallelLinear(13, 6, make_config(3), seed=0)
    row = RowParallelLinear(13, 4, make_config(1), seed=0)
    x = rng.standard_normal(shape)
    assert col(x).shape == shape[:-1] + (6,)
    np.testing.assert_allclose(to_host(col, col(x)), dense_reference(col, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(row, row(x)), dense_reference(row, x), rtol=1e-12, atol=1e-12)


def test_shard_shapes_and_placement(make_config):
    col = ColumnParallelLinear(6, 20, make_config(4), seed=0)
    row = RowParallelLinear(20, 6, make_config(4), seed=0)
    devices = list(col.backend.devices)
    assert col.devices == [devices[i % len(devices)] for i in range(4)]
    assert [w.shape for w in col.weight_shards] == [(6, 5)] * 4
    assert [b.shape for b in col.bias_shards] == [(5,)] * 4
    assert [w.shape for w in row.weight_shards] == [(5, 6)] * 4
    assert row.bias.shape == (6,)
    for layer in (col, row):
        assert [layer.backend.device_of(w) for w in layer.weight_shards] == layer.devices
        assert (layer.n_in, layer.n_out, layer.n_workers) == ((6, 20, 4) if layer is col else (20, 6, 4))
        assert layer.full_weight().shape == ((6, 20) if layer is col else (20, 6))
        assert isinstance(layer.full_weight(), np.ndarray) and isinstance(layer.full_bias(), np.ndarray)


def test_full_weight_is_a_copy(make_config):
    layer = ColumnParallelLinear(4, 4, make_config(2), seed=0)
    w = layer.full_weight()
    w[:] = 0.0
    assert np.abs(layer.full_weight()).max() > 0


def test_inputs_of_other_kinds(make_config, rng):
    """Nested lists, integer arrays and other float dtypes are accepted and cast."""
    layer = ColumnParallelLinear(3, 4, make_config(2), seed=5)
    x = rng.integers(-3, 4, size=(2, 3))
    expected = dense_reference(layer, x)
    for value in (x.tolist(), x, x.astype(np.float32), x.astype(np.int8)):
        np.testing.assert_allclose(to_host(layer, layer(value)), expected, rtol=1e-12, atol=1e-12)


def test_output_device_from_config():
    cfg = TensorParallelConfig(n_workers=2, backend="simulated", devices=3, output_device=2, dtype="float64")
    col = ColumnParallelLinear(4, 4, cfg)
    row = RowParallelLinear(4, 4, cfg)
    x = np.ones((2, 4))
    assert device_of(col, col(x)) == 2
    assert device_of(row, row(x)) == 2
    assert row.backend.device_of(row.bias_shards[0]) == 2


def test_input_on_another_simulated_device(rng):
    """A device array on a device no worker uses is moved, and the result is right."""
    cfg = TensorParallelConfig(n_workers=2, backend="simulated", devices=[0, 1, 5], dtype="float64")
    layer = ColumnParallelLinear(3, 4, cfg, seed=0)
    x = rng.standard_normal((2, 3))
    on_5 = SimulatedBackend([5]).asarray(x, np.float64, 5)
    np.testing.assert_allclose(to_host(layer, layer(on_5)), dense_reference(layer, x), rtol=1e-12)


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_column_copies_input_once_per_device(rng, n_workers):
    cfg = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float64")
    layer = ColumnParallelLinear(13, 2 * n_workers, cfg, seed=0)
    layer.backend.reset_transfers()
    x = rng.standard_normal((5, 13))
    layer(x)
    used = sorted(set(layer.devices))
    host_copies = {dst: count for (src, dst), (count, _) in layer.backend.transfers.items() if src == "host"}
    assert host_copies == {d: 1 for d in used}
    gathered = {src: count for (src, dst), (count, _) in layer.backend.transfers.items() if src != "host"}
    # Each other device's block (all of its workers' shards) reaches the output device once.
    assert sum(gathered.values()) == len(set(layer.devices) - {layer.output_device})


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_row_sends_each_worker_only_its_slice(rng, n_workers):
    cfg = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float64")
    layer = RowParallelLinear(13 * n_workers, 5, cfg, seed=0)
    layer.backend.reset_transfers()
    x = rng.standard_normal((4, 13 * n_workers))
    layer(x)
    host_bytes = sum(b for (src, _), (_, b) in layer.backend.transfers.items() if src == "host")
    assert host_bytes == x.nbytes
    moved_partials = sum(c for (src, _), (c, _) in layer.backend.transfers.items() if src != "host")
    assert moved_partials == len(set(layer.devices) - {layer.output_device})


# --- bad inputs ---------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((3, 5)), r"\(\.\.\., 6\).*\(3, 5\)"),
        (np.ones(5), r"\(5,\)"),
        (np.float64(1.0), r"\(\)"),
        (np.ones((2, 6), dtype=np.complex128), "complex128"),
        (np.ones((2, 6), dtype=bool), "bool"),
        (np.array([["a"] * 6]), "<U1"),
        ([[1.0, 2.0], [3.0]], "rectangular"),
    ],
)
def test_bad_input_raises_shape_error(make_config, layer_cls, bad, match):
    layer = layer_cls(6, 6, make_config(2))
    with pytest.raises(ShapeError, match=match) as info:
        layer(bad)
    assert isinstance(info.value, (TensorParallelError, ValueError))


def test_row_rejects_sharded_tensor_of_other_split(make_config, rng):
    x = rng.standard_normal((3, 12))
    col3 = ColumnParallelLinear(12, 12, make_config(3, gather_output=False))
    row2 = RowParallelLinear(12, 4, make_config(2))
    with pytest.raises(ShapeError, match=r"sizes=\[4, 4, 4\].*expected.*sizes \[6, 6\]"):
        row2(col3(x))
    rows = np.split(rng.standard_normal((4, 12)), 2, axis=0)  # 12 features, split on axis 0
    on_axis0 = ShardedTensor(
        [row2.backend.asarray(r, row2.dtype, d) for r, d in zip(rows, row2.devices)],
        0,
        row2.devices,
        row2.backend,
    )
    with pytest.raises(ShapeError, match=r"axis=0.*expected.*axis 1"):
        row2(on_axis0)


@pytest.mark.parametrize("layer_cls, split", [(ColumnParallelLinear, "n_out"), (RowParallelLinear, "n_in")])
def test_uneven_split_dimension_is_balanced(layer_cls, split):
    """10 features on 4 workers: 3, 3, 2, 2 (np.array_split), and the layer still equals dense."""
    cfg = TensorParallelConfig(n_workers=4, backend="numpy", dtype="float64")
    layer = layer_cls(10, 10, cfg, seed=1)
    assert layer.partition == [(0, 3), (3, 6), (6, 8), (8, 10)]
    x = np.random.default_rng(0).standard_normal((3, 10))
    np.testing.assert_allclose(
        layer.backend.to_host(layer(x)), x @ layer.full_weight(), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_in": 0}, "n_in.*0"),
        ({"n_in": -4}, "n_in.*-4"),
        ({"n_out": 2.5}, "n_out.*2.5"),
        ({"seed": -1}, "seed.*-1"),
        ({"seed": "s"}, "seed.*'s'"),
        ({"config": {"n_workers": 2}}, "TensorParallelConfig.*dict"),
    ],
)
def test_bad_constructor_arguments(layer_cls, kwargs, match):
    args = {
        "n_in": 4,
        "n_out": 4,
        "config": TensorParallelConfig(backend="numpy", dtype="float64"),
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        layer_cls(**args)


def test_output_device_must_exist():
    cfg = TensorParallelConfig(n_workers=2, backend="simulated", devices=2, output_device=7, dtype="float64")
    with pytest.raises(ConfigError, match=r"output_device 7.*\[0, 1\]"):
        ColumnParallelLinear(4, 4, cfg)


def test_layer_unchanged_after_bad_input(make_config, rng):
    layer = RowParallelLinear(6, 3, make_config(3), seed=0)
    before = layer.full_weight(), layer.full_bias()
    x = rng.standard_normal((2, 6))
    y_before = to_host(layer, layer(x))
    with pytest.raises(ShapeError):
        layer(np.ones((2, 7)))
    np.testing.assert_array_equal(layer.full_weight(), before[0])
    np.testing.assert_array_equal(layer.full_bias(), before[1])
    np.testing.assert_array_equal(to_host(layer, layer(x)), y_before)
