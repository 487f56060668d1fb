"""The GPU check (``python benchmarks/gpu_check.py``): every test here is marked ``gpu`` and skips, with
tp_gpu's own reason (CuPy missing, no CUDA driver or device, no NVRTC/cuBLAS), where CuPy cannot run.

``TP_GPU_CHECK_RESULTS`` names the folder where tests keep their records (timings, the benchmark's
files); without it, each test's ``tmp_path``. ``TP_GPU_CHECK_FAST=1`` shortens the benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import skip_unless_cupy

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    # Known here even without pytest-timeout, whose per-test limits the long tests carry.
    config.addinivalue_line("markers", "timeout(seconds): this test's time limit (pytest-timeout)")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _needs_cupy():
    skip_unless_cupy()


@pytest.fixture
def cupy():
    import cupy

    return cupy


@pytest.fixture
def nccl():
    """CuPy's NCCL module; skips, saying why, where this CuPy has none."""
    from cupy.cuda import nccl

    if not nccl.available:
        pytest.skip("cupy.cuda.nccl.available is False: install NCCL (pip install nvidia-nccl-cu12 or -cu13)")
    return nccl


@pytest.fixture
def results_dir(tmp_path) -> Path:
    """Where a test keeps its records: the GPU check's results folder, else its own temporary one."""
    folder = os.environ.get("TP_GPU_CHECK_RESULTS")
    return Path(folder) if folder else tmp_path


@pytest.fixture
def fast() -> bool:
    return os.environ.get("TP_GPU_CHECK_FAST") == "1"
