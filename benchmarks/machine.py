"""What the benchmark ran on: CPU, memory, GPUs, NumPy's BLAS (library, core type, threads), torch,
the environment variables that steer BLAS, and the tp_gpu commit measured.

The BLAS matters as much as the processor: ``OPENBLAS_CORETYPE=Haswell`` on a newer CPU makes NumPy
1.65-1.9x slower than the native kernel, which decides any ratio against PyTorch (its own BLAS).
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import tp_gpu
from tp_gpu.backends import host_norm

#: Environment variables that choose a BLAS's kernels or threads; each is recorded, None when unset.
BLAS_ENV = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_VERBOSE",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
#: Any other variable set with one of these prefixes is recorded too.
BLAS_ENV_PREFIXES = ("OPENBLAS_", "GOTO_", "OMP_", "MKL_", "KMP_", "BLIS_", "NVPL_", "VECLIB_")


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def memory_total_gib() -> float | None:
    """Total memory from /proc/meminfo, GiB; None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_names(backend: Any) -> list[str]:
    """The names of the backend's GPUs (none unless it is cupy)."""
    if backend.name != "cupy":
        return []
    runtime = backend.xp.cuda.runtime
    names = [runtime.getDeviceProperties(d)["name"] for d in backend.devices]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _openblas_libs() -> list[str]:
    """Paths of the OpenBLAS libraries mapped into this process (NumPy's), from /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    return sorted(p for p in paths if p.startswith("/"))


def openblas_function(name: str, restype: Any = ctypes.c_int) -> Callable[..., Any] | None:
    """OpenBLAS's ``openblas_<name>`` C function (any of its symbol spellings), or None."""
    symbols = [f"{prefix}openblas_{name}{suffix}" for prefix in ("scipy_", "") for suffix in ("64_", "")]
    for path in _openblas_libs():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in symbols:
            if hasattr(lib, symbol):
                fn = getattr(lib, symbol)
                fn.restype = restype
                return fn
    return None


def _text(fn: Callable[..., Any] | None) -> str | None:
    value = fn() if fn is not None else None
    return value.decode().strip() if isinstance(value, bytes) else None


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS: name, version, thread count, core type (the kernel chosen) and build configuration.

    Threads, core type and configuration are read from OpenBLAS's C API where NumPy uses OpenBLAS.
    """
    info: dict[str, Any] = {"name": None, "version": None, "threads": None, "core": None, "config": None}
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        info["name"], info["version"] = blas.get("name"), blas.get("version")
    except (AttributeError, KeyError, TypeError):
        pass
    threads = openblas_function("get_num_threads")
    info["threads"] = int(threads()) if threads is not None else None
    info["core"] = _text(openblas_function("get_corename", ctypes.c_char_p))
    info["config"] = _text(openblas_function("get_config", ctypes.c_char_p))
    return info


def blas_env() -> dict[str, str | None]:
    """The BLAS-steering environment variables: each of :data:`BLAS_ENV`, and any other one set."""
    env: dict[str, str | None] = {name: os.environ.get(name) for name in BLAS_ENV}
    env.update({k: v for k, v in sorted(os.environ.items()) if k.startswith(BLAS_ENV_PREFIXES)})
    return env


def import_torch(enabled: bool = True) -> Any:
    """``torch``, or None where it is disabled or does not import."""
    if not enabled:
        return None
    try:
        import torch
        import torch.nn.functional
    except (ImportError, OSError, RuntimeError):  # not installed, or a broken install
        return None
    return torch


def torch_info(torch: Any) -> dict[str, Any]:
    """torch's version, CPU threads, BLAS (from its build configuration) and CPU kernel level."""
    if torch is None:
        return {"version": None, "threads": None, "blas": None, "cpu_capability": None}
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = None
    return {
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "blas": match.group(1) if match else None,
        "cpu_capability": capability,
    }


def tp_gpu_source() -> dict[str, Any]:
    """Where the measured tp_gpu was imported from, and its git commit (``+dirty`` if modified)."""
    root = Path(tp_gpu.__file__).resolve().parent.parent
    out: dict[str, Any] = {"path": str(root), "commit": None}

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=False
        )

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode == 0:
            dirty = git("status", "--porcelain", "tp_gpu").stdout.strip()
            out["commit"] = commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def host_kernels() -> str:
    """What tp_gpu's host LayerNorm and RMSNorm run on here: ``numba <version>`` or NumPy's ufuncs
    (:mod:`tp_gpu.backends.host_norm`)."""
    if host_norm.host_kernels() == "numba":
        import numba

        return f"numba {numba.__version__}"
    return "NumPy ufuncs"


def machine_info(backend: Any, torch: Any) -> dict[str, Any]:
    """Everything recorded about the machine at the start of a run."""
    torch_meta = torch_info(torch)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "blas_env": blas_env(),
        "tp_gpu": tp_gpu.__version__,
        "tp_gpu_source": tp_gpu_source(),
        "host_kernels": host_kernels(),
        "torch": torch_meta["version"],
        "torch_threads": torch_meta["threads"],
        "torch_blas": torch_meta["blas"],
        "torch_cpu_capability": torch_meta["cpu_capability"],
        "backend": backend.name,
        "devices": [str(d) for d in backend.devices],
        "gpus": gpu_names(backend),
        "date": datetime.date.today().isoformat(),
        "started": now(),
        "load_avg_start": list(os.getloadavg()),
    }


def now() -> str:
    """The local time, to the second, ISO 8601."""
    return datetime.datetime.now().isoformat(timespec="seconds")
