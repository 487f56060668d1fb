"""NCCL: in-process over every GPU (``TP_GPU_NCCL=1``), and ``comm="nccl"`` in a process of its own that
must also exit cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import tp_gpu
from tp_gpu import RowParallelLinear, TensorParallelConfig, collectives

WORLD_OF_ONE = Path(__file__).with_name("nccl_world_of_one.py")
DONE = "nccl world of one: done"  # its last line


def test_in_process_nccl_on_every_gpu(cupy, nccl, monkeypatch, record_property):
    """InProcessNccl's grouped reduce (add, maximum) over every GPU, exact; then a row layer with
    ``TP_GPU_NCCL=1``, whose reduction goes through NCCL where there are two GPUs or more."""
    from tp_gpu.comm.nccl_local import InProcessNccl

    devices = list(range(cupy.cuda.runtime.getDeviceCount()))
    comm = InProcessNccl(cupy, devices)
    parts = {}
    for d in devices:
        with cupy.cuda.Device(d):
            parts[d] = cupy.full((64, 32), float(d + 1), dtype=cupy.float32)
    for ufunc, expected in (("add", sum(d + 1 for d in devices)), ("maximum", len(devices))):
        assert comm.can_reduce(parts, devices[0], ufunc)
        got = cupy.asnumpy(comm.reduce(parts, devices[0], ufunc))
        np.testing.assert_array_equal(got, np.full((64, 32), expected, dtype=np.float32), err_msg=ufunc)

    monkeypatch.setenv("TP_GPU_NCCL", "1")
    monkeypatch.setattr(collectives, "_reductions", weakref.WeakKeyDictionary())  # chosen afresh, with NCCL
    n = max(2, len(devices))
    layer = RowParallelLinear(16 * n, 8, TensorParallelConfig(n_workers=n, backend="cupy"), seed=1)
    x = np.random.default_rng(0).standard_normal((4, 16 * n))
    error = float(np.abs(cupy.asnumpy(layer(x)) - (x @ layer.full_weight() + layer.full_bias())).max())
    strategy = type(collectives.default_reduction(layer.backend)).__name__
    record_property("detail", f"GPUs {devices}: reduce exact; row layer error {error:.1e} via {strategy}")
    assert error < 1e-12
    if len(devices) > 1:
        assert strategy == "InProcessNcclReduction"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_world_of_one_exits_cleanly(nccl, record_property):
    """A layer, all_reduce, all_gather_object and barrier over NcclComm, then an exit within seconds:
    a TCP store left running would hang it (cupy/cupy#7863)."""
    env = dict(os.environ, TP_GPU_RANK="0", TP_GPU_WORLD_SIZE="1", CUPYX_DISTRIBUTED_HOST="127.0.0.1")
    env["CUPYX_DISTRIBUTED_PORT"] = str(_free_port())
    source = str(Path(tp_gpu.__file__).resolve().parents[1])  # this tp_gpu, installed or a checkout's src/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    child = subprocess.Popen(
        [sys.executable, str(WORLD_OF_ONE)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: the store, if it outlives it, goes with it
    )
    try:
        out, _ = child.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        hung = DONE in out
        pytest.fail(("finished, then hung at exit" if hung else "timed out") + f":\n{out[-2000:]}")
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    record_property("detail", out.strip().splitlines()[-2] if out.strip() else "no output")
    assert child.returncode == 0, out[-3000:]
    assert out.rstrip().endswith(DONE)
