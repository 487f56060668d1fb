"""Ids and sizes in error messages are the values the caller passed.

* A uint64 id of ``2**64 - 1`` is reported as itself, not as the ``-1`` of its
  int64 copy; ``2**63`` is not reported as a negative number.
* A Python int too large for int64 in a list (which NumPy reads as float64 or
  object) is "out of range", not "dtype object".
* Host ids are range-checked on the host before they are copied to a device: no
  device-to-host copy. Ids already on a device are checked there and the check is
  read when the output is (no copy in the forward), still naming the id as passed.
* A layer whose logical weight cannot fit in memory raises ConfigError saying
  how much it would need, before drawing it, instead of MemoryError.
"""

from __future__ import annotations

import numpy as np
import pytest

import tp_gpu.collectives as collectives
import tp_gpu.initializers as initializers
from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    IndexOutOfRangeError,
    ParallelEmbedding,
    RowParallelLinear,
    ShapeError,
    TensorParallelConfig,
)

BACKENDS = [("numpy", None), ("simulated", 3)]
VOCAB = 10


@pytest.fixture(params=BACKENDS, ids=["numpy", "sim3"])
def embedding(request):
    backend, devices = request.param
    return ParallelEmbedding(
        VOCAB, 4, TensorParallelConfig(n_workers=3, backend=backend, devices=devices, dtype="float64")
    )


@pytest.fixture
def host_copies(monkeypatch):
    """Counts the device-to-host copies of the range check (``collectives.to_host``)."""
    calls = []
    real = collectives.to_host

    def counting(backend, x):
        calls.append(x)
        return real(backend, x)

    monkeypatch.setattr(collectives, "to_host", counting)
    return calls


@pytest.mark.parametrize(
    "ids, value",
    [
        (np.array([3, 2**64 - 1], dtype=np.uint64), 2**64 - 1),
        (np.array([[1, 2**63], [0, 4]], dtype=np.uint64), 2**63),
    ],
    ids=["2**64-1", "2**63"],
)
def test_uint64_ids_are_reported_as_passed(embedding, host_copies, ids, value):
    with pytest.raises(IndexOutOfRangeError) as info:
        embedding(ids)
    assert str(info.value).startswith(f"token id {value} (beyond int64) out of range"), str(info.value)
    assert host_copies == []  # host ids: checked on the host, nothing read back from a device
    with pytest.raises(IndexOutOfRangeError, match=f"^token id {VOCAB} out of range"):
        embedding(np.array([VOCAB], dtype=np.uint64))
    out = embedding(np.array([[0, 9], [3, 3]], dtype=np.uint64))  # in range: looked up, no copy
    assert tuple(out.shape) == (2, 2, 4) and host_copies == []


@pytest.mark.parametrize(
    "ids, value",
    [
        (np.array([3, 2**64 - 1], dtype=np.uint64), 2**64 - 1),
        (np.array([[1, 2**63], [0, 4]], dtype=np.uint64), 2**63),
    ],
    ids=["2**64-1", "2**63"],
)
def test_uint64_ids_on_a_device_are_reported_as_passed(ids, value):
    """Ids already on a device are checked there (no device-to-host copy in the forward); reading the
    output raises, naming the uint64 id as passed; the next call is not affected."""
    layer = ParallelEmbedding(
        VOCAB, 4, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64")
    )
    backend = layer.backend
    backend.host_reads.clear()
    out = layer(backend.asarray(ids, np.uint64, layer.devices[1]))
    assert backend.host_reads == {}
    with pytest.raises(IndexOutOfRangeError) as info:
        np.asarray(out)
    assert str(info.value).startswith(f"token id {value} (beyond int64) out of range"), str(info.value)
    good = np.array([[0, 9], [3, 3]], dtype=np.uint64)
    out = layer(backend.asarray(good, np.uint64, layer.devices[1]))
    np.testing.assert_array_equal(np.asarray(out), layer.full_weight()[good.astype(np.int64)])


@pytest.mark.parametrize(
    "ids, value",
    [
        ([2**70], 2**70),
        ([[1, 2], [3, 2**70]], 2**70),
        ([1, 2**63], 2**63),  # NumPy reads this list as float64
        ([0, 2**64], 2**64),
        ([-(2**70), 3], -(2**70)),
        (np.array([1, 2**70], dtype=object), 2**70),
    ],
    ids=["2**70", "nested", "2**63-float64", "2**64", "minus-2**70", "object-array"],
)
def test_python_ints_beyond_int64_are_out_of_range(embedding, ids, value):
    with pytest.raises(
        IndexOutOfRangeError,
        match=rf"^token id {value} \(beyond int64\) out of range; "
        rf"expected 0 <= id < vocab_size={VOCAB}$",
    ):
        embedding(ids)


@pytest.mark.parametrize(
    "ids, dtype",
    [
        ([1.0, 2], "float64"),
        (["a"], "<U1"),
        ([True, 2**70], "object"),
        (np.array([1.5, 2**70], dtype=object), "object"),
    ],
    ids=["float", "str", "bool-and-big", "float-in-object"],
)
def test_object_arrays_of_ints_are_ids_and_anything_else_a_dtype_error(embedding, ids, dtype):
    out = embedding(np.array([[1, 2], [9, 0]], dtype=object))
    np.testing.assert_array_equal(out, embedding(np.array([[1, 2], [9, 0]])))
    with pytest.raises(ShapeError, match=f"indices must be integers, got dtype {dtype}"):
        embedding(ids)


# --- a logical weight that cannot fit in memory -----------------------------------------------------


@pytest.mark.parametrize(
    "build, size",
    [
        (
            lambda: ColumnParallelLinear(
                2**40, 8, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
            ),
            "64.0 TiB",
        ),
        (
            lambda: RowParallelLinear(
                8, 2**40, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
            ),
            "64.0 TiB",
        ),
        (
            lambda: ParallelEmbedding(
                2**40, 1024, TensorParallelConfig(n_workers=4, backend="numpy", dtype="float64")
            ),
            "8.0 PiB",
        ),
    ],
    ids=["column", "row", "embedding"],
)
def test_too_large_a_weight_is_a_config_error(build, size):
    with pytest.raises(ConfigError, match=f"would need {size} .* of host memory") as info:
        build()
    assert "more than this machine's" in str(info.value) or "limit" in str(info.value)


def test_the_check_uses_the_host_memory_and_comes_before_drawing(monkeypatch):
    monkeypatch.setattr(initializers, "host_memory_bytes", lambda: 1 << 20)  # a 1 MiB machine

    def no_draw(*args, **kwargs):
        raise AssertionError("the weight was drawn before the memory check")

    monkeypatch.setattr(initializers.np.random, "default_rng", no_draw)
    with pytest.raises(
        ConfigError, match=r"\(256, 1024\) would need 2.0 MiB .* more than this machine's 1.0 MiB"
    ):
        ColumnParallelLinear(256, 1024, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    monkeypatch.setattr(initializers, "host_memory_bytes", lambda: None)  # unknown: a 1 TiB limit
    with pytest.raises(
        ConfigError, match=r"more than the 1.0 TiB limit used where the memory size is unknown"
    ):
        ColumnParallelLinear(
            2**20, 2**18, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
        )
    monkeypatch.undo()
    assert (
        ColumnParallelLinear(
            256, 1024, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
        ).n_in
        == 256
    )
