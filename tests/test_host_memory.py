"""tp_gpu.host_memory: glibc's thresholds are pinned once, only where the user did not choose, and a
step's repeated temporaries then reuse freed memory instead of faulting on new pages."""

from __future__ import annotations

import platform
import resource

import numpy as np
import pytest

from tp_gpu import ConfigError, host_memory
from tp_gpu.backends import get_backend
from tp_gpu.layers.activations import get_activation

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class FakeLibc:
    """Records ``mallopt`` calls and answers ``result``."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def fresh(monkeypatch):
    """A process state where nothing was pinned yet, with a fake libc and glibc's variables unset."""
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_status", None)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    for name in (host_memory.ENV_VAR, *host_memory._GLIBC_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_pins_mmap_then_trim_threshold_once(fresh):
    assert host_memory.host_malloc_status() is None
    assert host_memory.retain_freed_host_memory() == "retained"
    assert fresh.calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]
    assert host_memory.retain_freed_host_memory() == "retained"
    assert len(fresh.calls) == 2, "a second call must not call mallopt again"
    assert host_memory.host_malloc_status() == "retained"


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"])
def test_user_glibc_variables_stand(fresh, monkeypatch, variable):
    monkeypatch.setenv(variable, "1048576")
    assert host_memory.retain_freed_host_memory() == f"left to the user's {variable}"
    assert fresh.calls == []


@pytest.mark.parametrize("value", ["system", " SYSTEM "])
def test_opt_out(fresh, monkeypatch, value):
    monkeypatch.setenv(host_memory.ENV_VAR, value)
    assert "TP_GPU_HOST_MALLOC=system" in host_memory.retain_freed_host_memory()
    assert fresh.calls == []


def test_retain_is_the_default_said_out_loud(fresh, monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "retain")
    assert host_memory.retain_freed_host_memory() == "retained"


@pytest.mark.parametrize("value", ["sytem", "off", "1"])
def test_an_unknown_choice_is_refused_before_anything_changes(fresh, monkeypatch, value):
    monkeypatch.setenv(host_memory.ENV_VAR, value)
    with pytest.raises(ConfigError, match=f"TP_GPU_HOST_MALLOC={value!r}.*expected one of"):
        host_memory.retain_freed_host_memory()
    assert fresh.calls == [] and host_memory.host_malloc_status() is None


def test_other_libc_is_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.retain_freed_host_memory() == "left to the system (malloc is not glibc's)"
    assert fresh.calls == []


def test_refusal_is_reported(fresh):
    fresh.result = 0
    assert host_memory.retain_freed_host_memory() == "left to the system (glibc refused the thresholds)"


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_repeated_temporaries_do_not_fault_once_pinned():
    """GELU-tanh's backward on a 2 MiB float64 block makes several 2 MiB temporaries; with glibc's
    default heuristic each call faults on ~1,000 new pages, pinned it reuses the freed ones."""
    get_backend("numpy")
    if host_memory.host_malloc_status() != "retained":
        pytest.skip(f"thresholds not pinned here: {host_memory.host_malloc_status()}")
    gelu = get_activation("gelu_tanh")
    x = np.random.default_rng(0).standard_normal((16, 64, 256))
    gelu.grad(np, x, x)  # the heap grows to the step's size once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        gelu.grad(np, x, x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 100, f"{faults} page faults in 5 calls that reuse the same sizes"
