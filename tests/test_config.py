"""TensorParallelConfig: defaults, immutability, dtype normalisation, and every bad value."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tp_gpu import ConfigError, TensorParallelConfig, TensorParallelError
from tp_gpu.config import BACKEND_NAMES, SUPPORTED_DTYPES, check_positive_int


def test_defaults():
    cfg = TensorParallelConfig(dtype="float64")
    assert cfg.n_workers == 2
    assert cfg.gather_output is True
    assert cfg.backend is None
    assert cfg.devices is None
    assert cfg.dtype == "float64"
    assert cfg.output_device is None


def test_supported_names():
    assert SUPPORTED_DTYPES == ("float64", "float32", "float16")
    assert set(BACKEND_NAMES) == {"numpy", "cupy", "simulated"}


@pytest.mark.parametrize(
    "field, value",
    [("n_workers", 3), ("gather_output", False), ("backend", "numpy"), ("devices", 2), ("dtype", "float32")],
)
def test_frozen(field, value):
    cfg = TensorParallelConfig(dtype="float64")
    before = getattr(cfg, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, value)
    assert getattr(cfg, field) == before


def test_equal_configs_compare_and_hash_equal():
    a = TensorParallelConfig(n_workers=4, dtype=np.float32, devices=[0, 1])
    b = TensorParallelConfig(n_workers=4, dtype="float32", devices=(0, 1))
    assert a == b
    assert hash(a) == hash(b)


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (np.float64, "float64"),
        (np.float32, "float32"),
        (np.float16, "float16"),
        ("float64", "float64"),
        ("float32", "float32"),
        ("float16", "float16"),
        (np.dtype("float64"), "float64"),
        (np.dtype("float32"), "float32"),
        (np.dtype("float16"), "float16"),
        ("f8", "float64"),
        ("f4", "float32"),
        ("f2", "float16"),
        ("<f4", "float32"),
        (float, "float64"),
    ],
)
def test_dtype_normalised_to_name(dtype, expected):
    cfg = TensorParallelConfig(dtype=dtype)
    assert cfg.dtype == expected
    assert isinstance(cfg.dtype, str)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 64, np.int64(5), np.int32(3)])
def test_n_workers_accepts_integers(n):
    cfg = TensorParallelConfig(n_workers=n, dtype="float64")
    assert cfg.n_workers == int(n)
    assert type(cfg.n_workers) is int


@pytest.mark.parametrize("flag", [True, False, np.bool_(True), np.bool_(False)])
def test_gather_output_accepts_bools(flag):
    cfg = TensorParallelConfig(gather_output=flag, dtype="float64")
    assert cfg.gather_output is bool(flag)


@pytest.mark.parametrize("backend", [None, "numpy", "cupy", "simulated"])
def test_backend_names_accepted(backend):
    # Naming "cupy" in a config is valid anywhere; only building the backend needs a GPU.
    assert TensorParallelConfig(backend=backend, dtype="float64").backend == backend


@pytest.mark.parametrize(
    "devices, expected",
    [
        (None, None),
        (1, 1),
        (3, 3),
        (np.int64(2), 2),
        ([0], (0,)),
        ([0, 1, 2], (0, 1, 2)),
        ((3, 1), (3, 1)),
        (range(2), (0, 1)),
    ],
)
def test_devices_normalised(devices, expected):
    assert TensorParallelConfig(devices=devices, dtype="float64").devices == expected


@pytest.mark.parametrize("od", [None, 0, 3, "cpu", np.int64(1)])
def test_output_device_accepted(od):
    assert TensorParallelConfig(output_device=od, dtype="float64").output_device == od


BAD_VALUES = [
    # (field, value, text the message must contain)
    ("n_workers", 0, "0"),
    ("n_workers", -1, "-1"),
    ("n_workers", 2.5, "2.5"),
    ("n_workers", True, "True"),
    ("n_workers", "2", "'2'"),
    ("n_workers", None, "None"),
    ("gather_output", "yes", "'yes'"),
    ("gather_output", 1, "1"),
    ("gather_output", None, "None"),
    ("backend", "torch", "'torch'"),
    ("backend", "NumPy", "'NumPy'"),
    ("backend", "", "''"),
    ("devices", 0, "0"),
    ("devices", -1, "-1"),
    ("devices", [], "empty"),
    ("devices", (), "empty"),
    ("devices", [0, 0], "[0, 0]"),
    ("devices", [1, 2, 1], "[1, 2, 1]"),
    ("devices", [-1], "-1"),
    ("devices", "0", "'0'"),
    ("devices", [1.5], "1.5"),
    ("devices", [0, True], "True"),
    ("devices", True, "True"),
    ("devices", 1.5, "1.5"),
    ("dtype", "int32", "'int32'"),
    ("dtype", np.int64, "int64"),
    ("dtype", "float128", "'float128'"),
    ("dtype", "complex64", "'complex64'"),
    ("dtype", "bogus", "'bogus'"),
    ("output_device", 1.5, "1.5"),
    ("output_device", True, "True"),
    ("output_device", [0], "[0]"),
]


@pytest.mark.parametrize("field, value, text", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_raises_config_error_naming_it(field, value, text):
    with pytest.raises(ConfigError) as info:
        TensorParallelConfig(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, TensorParallelError)
    assert text in str(err), f"message {str(err)!r} does not name {text!r}"
    assert field.split("_")[0] in str(err), f"message {str(err)!r} does not name the field {field!r}"


def test_config_error_hierarchy():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, TensorParallelError)
    assert issubclass(TensorParallelError, Exception)


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "4", None])
def test_check_positive_int_rejects(value):
    with pytest.raises(ConfigError, match="widgets"):
        check_positive_int(value, "widgets")


@pytest.mark.parametrize("value", [1, 5, np.int16(2), np.uint8(9)])
def test_check_positive_int_accepts(value):
    out = check_positive_int(value, "widgets")
    assert out == int(value) and type(out) is int


# --- comm ---------------------------------------------------------------------


def test_single_process_comm_reports_rank_and_world_size():
    for comm in (None, "local"):
        cfg = TensorParallelConfig(n_workers=3, comm=comm, dtype="float64")
        assert (cfg.rank, cfg.world_size) == (0, 1)


def test_unknown_comm_is_a_config_error():
    with pytest.raises(ConfigError, match=r"comm must be one of \('local', 'mpi', 'nccl'\), got 'gloo'"):
        TensorParallelConfig(comm="gloo", dtype="float64")


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16"])
def test_bfloat16_is_refused_saying_what_to_use(dtype):
    with pytest.raises(ConfigError, match=rf"dtype '{dtype}' is not supported.*'float16'.*master weights"):
        TensorParallelConfig(dtype=dtype)
