"""``save_pretrained`` over 2 and 3 MPI processes (tests/mpi_programs/export_hf.py): rank 0 writes
the same files one process writes, every rank loads back every weight bit for bit, and a folder
rank 0 cannot write raises on every rank."""

from __future__ import annotations

import pytest
from test_mpi import _mpi_missing, mpirun

pytestmark = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


@pytest.mark.parametrize("n_procs", [2, 3])
def test_export_over_processes(tmp_path, n_procs):
    result = mpirun(n_procs, "export_hf.py", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(n_procs):
        assert f"rank {rank}: 17 checks passed" in result.stdout, result.stdout + result.stderr
