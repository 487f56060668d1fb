"""Backend selection, the NumPy and simulated backends, and SimArray's device checks."""

from __future__ import annotations

import importlib.machinery
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from tp_gpu import (
    BackendUnavailableError,
    ColumnParallelLinear,
    ConfigError,
    DeviceMismatchError,
    TensorParallelConfig,
    TensorParallelError,
    get_backend,
)
from tp_gpu.backends import (
    CPU,
    ENV_VAR,
    NumpyBackend,
    SimArray,
    SimulatedBackend,
    cupy_available,
    resolve_backend_name,
)
from tp_gpu.backends.cupy_backend import cupy_unavailable_reason
from tp_gpu.backends.simulated import DEFAULT_SIMULATED_DEVICES, current_device

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
AUTO = "cupy" if cupy_available() else "numpy"


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ---------------------------------------------------------------------------- selection


def test_env_var_name():
    assert ENV_VAR == "TP_GPU_BACKEND"


def test_auto_without_env(no_env):
    assert resolve_backend_name() == AUTO
    assert resolve_backend_name(None) == AUTO
    if AUTO == "numpy":
        assert isinstance(get_backend(), NumpyBackend)


def test_empty_env_means_auto(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "")
    assert resolve_backend_name() == AUTO


@pytest.mark.parametrize("env", ["numpy", "simulated"])
def test_env_beats_auto(monkeypatch, env):
    monkeypatch.setenv(ENV_VAR, env)
    assert resolve_backend_name() == env
    assert get_backend().name == env
    # A config that names no backend follows the environment too.
    layer = ColumnParallelLinear(3, 4, TensorParallelConfig(n_workers=2, dtype="float64"))
    assert layer.backend.name == env


@pytest.mark.parametrize("env", ["numpy", "simulated", "cupy", "bogus", "NUMPY"])
@pytest.mark.parametrize("explicit", ["numpy", "simulated"])
def test_explicit_beats_env(monkeypatch, env, explicit):
    monkeypatch.setenv(ENV_VAR, env)
    assert resolve_backend_name(explicit) == explicit
    assert get_backend(explicit).name == explicit
    layer = ColumnParallelLinear(3, 4, TensorParallelConfig(n_workers=2, backend=explicit, dtype="float64"))
    assert layer.backend.name == explicit


@pytest.mark.parametrize("env", ["bogus", "torch", "NumPy", " numpy"])
def test_bad_env_raises_config_error(monkeypatch, env):
    monkeypatch.setenv(ENV_VAR, env)
    with pytest.raises(ConfigError) as info:
        resolve_backend_name()
    assert repr(env) in str(info.value)
    assert ENV_VAR in str(info.value)
    with pytest.raises(ConfigError):
        ColumnParallelLinear(3, 4, TensorParallelConfig(n_workers=2, dtype="float64"))


@pytest.mark.parametrize("name", ["torch", "", "CUPY"])
def test_bad_explicit_name(no_env, name):
    with pytest.raises(ConfigError) as info:
        resolve_backend_name(name)
    assert repr(name) in str(info.value)


def test_cupy_unavailable_raises_with_reason(no_env):
    if cupy_available():
        pytest.skip("CuPy can run here; the unavailable path cannot be exercised")
    reason = cupy_unavailable_reason()
    assert reason
    for make in (
        lambda: get_backend("cupy"),
        lambda: ColumnParallelLinear(3, 4, TensorParallelConfig(backend="cupy", dtype="float64")),
    ):
        with pytest.raises(BackendUnavailableError) as info:
            make()
        assert isinstance(info.value, TensorParallelError)
        assert "cannot run" in str(info.value)
        assert reason in str(info.value)


def test_cupy_from_env_unavailable(monkeypatch):
    if cupy_available():
        pytest.skip("CuPy can run here; the unavailable path cannot be exercised")
    monkeypatch.setenv(ENV_VAR, "cupy")
    assert resolve_backend_name() == "cupy"
    with pytest.raises(BackendUnavailableError):
        get_backend()


def test_cupy_not_installed_simulated(monkeypatch, no_env):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert not cupy_available()
    assert resolve_backend_name() == "numpy"
    assert "not installed" in cupy_unavailable_reason()
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    msg = str(info.value)
    assert "not installed" in msg
    assert "import of cupy halted" in msg  # the import error itself is quoted
    assert "pip install" in msg


def _fake_cupy(get_count):
    fake = types.ModuleType("cupy")
    fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_count))
    return fake


def test_cupy_without_driver_simulated(monkeypatch, no_env):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(no_driver))
    assert not cupy_available()
    assert resolve_backend_name() == "numpy"
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    assert "driver" in str(info.value)
    assert "cudaErrorInsufficientDriver" in str(info.value)


def test_cupy_without_gpu_simulated(monkeypatch, no_env):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    assert not cupy_available()
    assert resolve_backend_name() == "numpy"
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("cupy")
    assert "no GPU is visible" in str(info.value)


# ---------------------------------------------------------------------------- numpy backend


@pytest.mark.parametrize("devices", [None, 1, (0,)])
def test_numpy_backend_accepts_one_device(devices):
    b = NumpyBackend(devices)
    assert b.devices == (CPU,) == ("cpu",)
    assert b.name == "numpy"
    assert b.xp is np


@pytest.mark.parametrize("devices", [3, 2, 0, (0, 1), (1,)])
def test_numpy_backend_rejects_devices(devices):
    with pytest.raises(ConfigError) as info:
        NumpyBackend(devices)
    assert repr(devices) in str(info.value)
    assert "simulated" in str(info.value)


def test_numpy_backend_rejects_devices_from_config():
    with pytest.raises(ConfigError, match="devices=3"):
        ColumnParallelLinear(3, 4, TensorParallelConfig(backend="numpy", devices=3, dtype="float64"))


def test_numpy_backend_arrays():
    b = NumpyBackend()
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert b.device_of(x) == CPU
    y = b.asarray(x, np.float32, CPU)
    assert y.dtype == np.float32 and type(y) is np.ndarray
    np.testing.assert_array_equal(y, x)
    assert b.asarray(x, np.float64, CPU) is x
    assert b.to_device(x, CPU) is x
    z = b.asarray([[1, 2], [3, 4]], "float16", CPU)
    assert z.dtype == np.float16 and z.shape == (2, 2)
    assert b.to_host(x) is x


# ---------------------------------------------------------------------------- simulated backend


def test_simulated_default_devices():
    assert DEFAULT_SIMULATED_DEVICES >= 2
    b = SimulatedBackend()
    assert b.devices == tuple(range(DEFAULT_SIMULATED_DEVICES))
    assert get_backend("simulated").devices == tuple(range(DEFAULT_SIMULATED_DEVICES))
    assert b.transfers == {}


@pytest.mark.parametrize(
    "devices, expected", [(1, (0,)), (3, (0, 1, 2)), (8, tuple(range(8))), ([2, 5], (2, 5)), ((4,), (4,))]
)
def test_simulated_devices(devices, expected):
    assert SimulatedBackend(devices).devices == expected
    assert get_backend("simulated", devices).devices == expected


@pytest.mark.parametrize("devices", [0, -2])
def test_simulated_rejects_device_count(devices):
    with pytest.raises(ConfigError, match=repr(devices)):
        SimulatedBackend(devices)


@pytest.fixture
def sim():
    return SimulatedBackend(3)


@pytest.fixture
def host(rng):
    return rng.standard_normal((4, 5))


def test_current_device_default_and_context(sim):
    assert current_device() == 0
    with sim.device(2):
        assert current_device() == 2
        with sim.device(1):
            assert current_device() == 1
        assert current_device() == 2
    assert current_device() == 0
    with pytest.raises(RuntimeError):
        with sim.device(1):
            raise RuntimeError("boom")
    assert current_device() == 0


def test_device_context_rejects_unknown_device(sim):
    with pytest.raises(DeviceMismatchError, match="7"):
        with sim.device(7):
            pass
    with pytest.raises(DeviceMismatchError):
        sim.asarray(np.ones(2), np.float64, 3)


def test_asarray_places_and_converts(sim, host):
    a = sim.asarray(host, np.float64, 1)
    assert isinstance(a, SimArray)
    assert a.device == 1 and sim.device_of(a) == 1
    assert a.dtype == np.float64
    np.testing.assert_array_equal(sim.to_host(a), host)
    assert type(sim.to_host(a)) is np.ndarray
    assert sim.asarray(a, np.float64, 1) is a
    sim.reset_transfers()
    b = sim.asarray(a, np.float32, 1)
    assert b is not a and b.dtype == np.float32 and b.device == 1
    np.testing.assert_array_equal(sim.to_host(b), host.astype(np.float32))
    assert sim.transfers == {}  # a dtype change on the same device is no transfer
    c = sim.asarray([[1, 2], [3, 4]], "float16", 2)
    assert c.dtype == np.float16 and c.device == 2 and c.shape == (2, 2)
    assert sim.device_of(host) == "host"


def test_simarray_keeps_device_across_views(sim, host):
    a = sim.asarray(host, np.float64, 1)
    # Current device is 0; views and copies made by methods are not operations on 1.
    derived = {
        "slice": a[1:3],
        "index": a[0],
        "step": a[:, ::2],
        "T": a.T,
        "reshape": a.reshape(5, 4),
        "view": a.view(),
        "copy": a.copy(),
        "ravel": a.ravel(),
    }
    for what, d in derived.items():
        assert isinstance(d, SimArray), what
        assert d.device == 1, what
    np.testing.assert_array_equal(derived["copy"].view(np.ndarray), host)
    with sim.device(1):
        assert np.copy(a).device == 1
        assert np.concatenate([a[:1], a[1:]]).device == 1


def test_simarray_off_device_ops_raise(sim, host):
    a = sim.asarray(host, np.float64, 1)
    assert current_device() == 0
    ops = {
        "add": lambda: a + a,
        "scalar mul": lambda: a * 2.0,
        "matmul": lambda: a @ a.T,
        "sum": lambda: a.sum(),
        "concatenate": lambda: np.concatenate([a, a]),
        "take": lambda: np.take(a, [0, 1], axis=0),
        "where": lambda: np.where(a > 0, a, 0.0),
    }
    for what, op in ops.items():
        with pytest.raises(DeviceMismatchError) as info:
            op()
        msg = str(info.value)
        assert "device 1" in msg and "current device is 0" in msg, what
    with pytest.raises(DeviceMismatchError):
        a[0, 0] = 3.0


def test_simarray_op_under_device(sim, host):
    a = sim.asarray(host, np.float64, 1)
    with sim.device(1):
        results = {
            "add": (a + a, host + host),
            "scalar": (a * 2.0 + 1, host * 2.0 + 1),
            "np scalar": (a * np.float64(3), host * 3),
            "0-d host": (a + np.array(0.5), host + 0.5),
            "matmul": (a @ a.T, host @ host.T),
            "sum": (a.sum(axis=0), host.sum(axis=0)),
            "concatenate": (np.concatenate([a, a], axis=1), np.concatenate([host, host], axis=1)),
            "zeros": (sim.xp.zeros((2, 3)), np.zeros((2, 3))),
        }
        a2 = a.copy()
        a2[0] = 7.0
    for what, (got, want) in results.items():
        assert isinstance(got, SimArray), what
        assert got.device == 1, what
        np.testing.assert_allclose(got.view(np.ndarray), want, rtol=1e-15, err_msg=what)
    assert a2.device == 1 and np.all(a2.view(np.ndarray)[0] == 7.0)
    np.testing.assert_array_equal(a.view(np.ndarray), host)  # the copy was written, not a


def test_simarray_mixing_devices_raises(sim, host):
    a0 = sim.asarray(host, np.float64, 0)
    a1 = sim.asarray(host, np.float64, 1)
    for dev in (0, 1, 2):
        with sim.device(dev):
            for op in (
                lambda: a0 + a1,
                lambda: a0 @ a1.T,
                lambda: np.concatenate([a0, a1]),
                lambda: np.add(a0, a0, out=a1),
            ):
                with pytest.raises(DeviceMismatchError, match=r"different devices \[0, 1\]"):
                    op()
    with sim.device(0):
        with pytest.raises(DeviceMismatchError):
            a0[0] = a1[0]


def test_simarray_mixing_host_raises(sim, host):
    a = sim.asarray(host, np.float64, 0)
    with sim.device(0):
        for op in (lambda: a + host, lambda: host + a, lambda: a @ host.T, lambda: np.concatenate([a, host])):
            with pytest.raises(DeviceMismatchError, match="host"):
                op()
        with pytest.raises(DeviceMismatchError, match="host"):
            a[0] = host[0]
        # Scalars and 0-d host arrays are fine.
        assert (a + 1).device == 0
        assert (a * np.float32(2)).device == 0
        assert (np.float64(2) * a).device == 0


def test_simarray_repr_off_device(sim):
    a = sim.asarray(np.arange(3.0), np.float64, 2)
    assert current_device() == 0
    text = repr(a)
    assert "device=2" in text
    assert "0., 1., 2." in text
    assert "device=2" in str(a)


def test_to_device_records_transfers(sim, host):
    a = sim.asarray(host, np.float64, 0)
    assert sim.transfers == {("host", 0): (1, host.nbytes)}
    sim.reset_transfers()
    assert sim.transfers == {}
    assert sim.to_device(a, 0) is a
    assert sim.transfers == {}
    b = sim.to_device(a, 2)
    assert isinstance(b, SimArray) and b.device == 2 and b is not a
    assert b.dtype == a.dtype
    np.testing.assert_array_equal(b.view(np.ndarray), host)
    assert sim.transfers == {(0, 2): (1, host.nbytes)}
    sim.to_device(a, 2)
    sim.to_device(b, 1)
    sim.to_device(a[:2], 1)  # a view moves only its own bytes
    assert sim.transfers == {
        (0, 2): (2, 2 * host.nbytes),
        (2, 1): (1, host.nbytes),
        (0, 1): (1, host.nbytes // 2),
    }
    f32 = sim.asarray(a, np.float32, 1)
    assert f32.device == 1 and f32.dtype == np.float32
    assert sim.transfers[(0, 1)] == (2, host.nbytes // 2 + host.nbytes)


def test_to_device_from_host(sim, host):
    b = sim.to_device(host, 1)
    assert isinstance(b, SimArray) and b.device == 1
    assert sim.transfers == {("host", 1): (1, host.nbytes)}


# ---------------------------------------------------------------------------- no CuPy import


_CHECKS = {
    "import": "",
    "numpy layers": """
        from tp_gpu import ColumnParallelLinear, RowParallelLinear, ParallelEmbedding, TensorParallelConfig
        cfg = TensorParallelConfig(n_workers=2, backend="numpy")
        y = ColumnParallelLinear(3, 4, cfg)(np.ones((2, 3)))
        y = RowParallelLinear(4, 3, cfg)(y)
        e = ParallelEmbedding(6, 3, config=cfg)(np.array([0, 5]))
        assert y.shape == (2, 3) and e.shape == (2, 3)
    """,
    "simulated layer": """
        from tp_gpu import ColumnParallelLinear, TensorParallelConfig
        config = TensorParallelConfig(n_workers=2, backend="simulated", devices=2)
        ColumnParallelLinear(3, 4, config)(np.ones(3))
    """,
    "numpy from env": """
        import os
        assert os.environ["TP_GPU_BACKEND"] == "numpy"
        from tp_gpu import ColumnParallelLinear
        assert ColumnParallelLinear(3, 4).backend.name == "numpy"
    """,
}


@pytest.mark.parametrize("check", list(_CHECKS))
def test_cupy_never_imported(tmp_path, check):
    # A stand-in ``cupy`` that imports fine, so importing it would show in sys.modules.
    fake = tmp_path / "cupy"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    code = (
        textwrap.dedent(
            """
        import sys
        import numpy as np
        import tp_gpu
        assert "cupy" not in sys.modules, "import tp_gpu imported cupy"
        """
        )
        + textwrap.dedent(_CHECKS[check])
        + textwrap.dedent(
            f"""
        assert "cupy" not in sys.modules, "building a layer imported cupy"
        import cupy  # the stand-in is importable: the checks above could have failed
        assert cupy.__file__.startswith({str(tmp_path)!r}), cupy.__file__
        """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VAR, "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO_ROOT / "src")])
    if check == "numpy from env":
        env[ENV_VAR] = "numpy"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
