"""Sharded checkpoints across process counts, under mpirun (tests/mpi_programs/check_sharded_checkpoint.py).

A float64 decoder at 8 workers is saved sharded over 2 and over 4 processes (each rank writes its own
file; its save's peak extra host memory is about its own shards, not the model), then loaded at 1, 3
and 8 workers over 1, 2 and 3 processes: the weights equal the saved ones bit for bit, and 5 more
Adam steps equal those of a twin resumed from the single-file format, and the uninterrupted run at the
saver's split. A rank killed in the middle of writing leaves the previous checkpoint loading; a rank
whose disk is full fails the save on every rank, and leaves the folder as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from test_mpi import PROGRAMS, ROOT, _mpi_missing, mpirun

pytestmark = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))

PROGRAM = "check_sharded_checkpoint.py"


def run_alone(*args: str):
    """The program in one process, without mpirun (comm "local")."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    return subprocess.run(
        [sys.executable, str(PROGRAMS / PROGRAM), *args], capture_output=True, text=True, timeout=240, env=env
    )


def passed(result, n_procs: int) -> list:
    """Each rank's number of checks; the run must have succeeded. (Ranks' lines may interleave.)"""
    assert result.returncode == 0, result.stdout + result.stderr
    found = dict(re.findall(r"rank (\d+): (\d+) checks passed", result.stdout))
    assert sorted(found) == [str(r) for r in range(n_procs)], result.stdout
    return [int(found[str(r)]) for r in range(n_procs)]


def test_save_at_8_over_2_and_4_processes_loads_at_1_3_8_over_1_2_3_processes(tmp_path):
    dirs = [tmp_path / "w2", tmp_path / "w4"]
    for directory, n in zip(dirs, (2, 4)):
        directory.mkdir()
        result = mpirun(n, PROGRAM, "save", str(directory))
        assert passed(result, n) == [2] * n  # the memory bounds: own shards, and under the model
        files = sorted(os.listdir(directory / "sharded"))
        assert files[0] == "index.json" and len(files) == n + 1, files  # one file per rank, no marker
    assert passed(run_alone("load", *map(str, dirs)), 1) == [2 * 3 * 2]  # p = 1, 3, 8; weights + 5 steps
    # p = 8 over 2 processes, and the uninterrupted run of the 2-process saver
    assert passed(mpirun(2, PROGRAM, "load", *map(str, dirs)), 2) == [5, 5]
    assert passed(mpirun(3, PROGRAM, "load", *map(str, dirs)), 3) == [4, 4, 4]  # p = 3 over 3 processes
    # a byte only loading rank 1 reads: both ranks raise, neither model changes
    assert passed(mpirun(2, PROGRAM, "corrupt", str(dirs[0])), 2) == [2, 2]


def test_a_rank_killed_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    result = mpirun(
        2, PROGRAM, "killed", str(tmp_path), "--kill-rank", "1", env={"TP_GPU_COMM_TIMEOUT": "30"}
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert "the killed save returned" not in result.stdout + result.stderr
    names = os.listdir(tmp_path / "sharded")
    assert len({n.split("-")[2].split(".")[0] for n in names if n.startswith("rank-")}) == 2, names  # 2 saves
    (tmp_path / "world").write_text("2")
    assert passed(run_alone("load", str(tmp_path), "--no-resume", "--loads", "1", "3", "8"), 1) == [3]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_keeps_the_previous(tmp_path, failing):
    result = mpirun(2, PROGRAM, "full", str(tmp_path), "--kill-rank", str(failing))
    assert passed(result, 2) == [3, 3]  # the errors, the folder as before the save, the first save loads
