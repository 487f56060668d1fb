"""An uncaught exception on one MPI rank ends the whole job within seconds.

Without the excepthook that ``MpiComm`` installs, the other ranks would wait in
their next collective for ``TP_GPU_COMM_TIMEOUT`` seconds (120 by default).
The mpirun tests need Open MPI and mpi4py and are skipped with the reason
without them; the hook itself is checked in-process with a stand-in for MPI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import List

import pytest
from test_mpi import ROOT, _mpi_missing, mpirun

import tp_gpu.comm.mpi as mpi_module

#: Long enough that a job waiting for it cannot pass the 10 s bound, short enough that it ends.
COMM_TIMEOUT = "30"


@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
@pytest.mark.parametrize("n_procs, raising", [(2, 1), (3, 0)])
def test_a_raising_rank_ends_the_job_within_seconds(n_procs, raising):
    start = time.monotonic()
    result = mpirun(
        n_procs,
        "raising_rank.py",
        "--raising-rank",
        str(raising),
        timeout=90,
        env={"TP_GPU_COMM_TIMEOUT": COMM_TIMEOUT},
    )
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # (Not every rank's "first forward returned" is asserted: the abort may cut off its forwarding.)
    assert "second forward returned" not in result.stdout, output
    assert f"RuntimeError: rank {raising} fails after its first forward" in result.stderr, (
        output
    )  # the traceback
    assert "CommError" not in output, output  # nobody waited for the timeout
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end\n{output}"


class FakeWorld:
    """``MPI.COMM_WORLD`` (and a communicator of ``size`` ranks) that records ``Abort`` calls."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.aborts: List[int] = []

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return self.size

    def Abort(self, code: int) -> None:
        self.aborts.append(code)


class FakeMPI:
    def __init__(self, size: int) -> None:
        self.COMM_WORLD = FakeWorld(size)


def test_mpi_comm_installs_the_abort_hook_only_for_a_multi_process_job(monkeypatch):
    printed = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc_info: printed.append(exc_info[1]))
    original = sys.excepthook

    for size, setting in ((1, None), (2, "0")):  # one process; opted out
        fake = FakeMPI(size)
        monkeypatch.setattr(mpi_module, "import_mpi", lambda fake=fake: fake)
        if setting is None:
            monkeypatch.delenv(mpi_module.ABORT_ON_ERROR_ENV, raising=False)
        else:
            monkeypatch.setenv(mpi_module.ABORT_ON_ERROR_ENV, setting)
        mpi_module.MpiComm(comm=fake.COMM_WORLD)
        assert sys.excepthook is original, (size, setting)

    monkeypatch.delenv(mpi_module.ABORT_ON_ERROR_ENV, raising=False)
    fake = FakeMPI(2)
    monkeypatch.setattr(mpi_module, "import_mpi", lambda: fake)
    mpi_module.MpiComm(comm=fake.COMM_WORLD)
    hook = sys.excepthook
    assert hook is not original
    mpi_module.MpiComm(comm=fake.COMM_WORLD)
    assert sys.excepthook is hook  # installed once, not wrapped again

    error = ValueError("boom")
    hook(ValueError, error, None)
    assert printed == [error]  # the previous hook still prints the traceback ...
    assert fake.COMM_WORLD.aborts == [1]  # ... then the whole job is aborted


# --- examples/mpi_forward.py: a bad option is one line and exit status 2 -----------------------------


def test_mpi_forward_bad_option_is_one_line_in_one_process():
    """Without mpirun (and even without mpi4py, which is then the error): no traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mpi_forward.py"), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")])),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpi_forward.py: error: "), result.stderr


@pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))
def test_mpi_forward_bad_worker_count_is_reported_once():
    result = mpirun(2, "examples/mpi_forward.py", "--workers", "3", "--backend", "numpy", timeout=90)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    expected = (
        "mpi_forward.py: error: n_workers (3) must be a multiple of the world size (2) with comm='mpi': "
        "every process holds n_workers / 2 workers; expected one of [2, 4, 6], ..."
    )
    assert [line for line in output.splitlines() if "error:" in line] == [expected], output
