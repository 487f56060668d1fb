"""Errors across processes, under mpirun with 2 and 3 ranks.

- Ranks that pass different row counts to a layer all raise ShapeError naming every rank's shape
  (not MPI_ERR_TRUNCATE on one rank and the full timeout on the others), and the communicator
  still works afterwards.
- A rank whose program ends (exit status 0) while the others still call collectives ends the job
  within seconds, not after TP_GPU_COMM_TIMEOUT.
- A normal end, ranks leaving at different times after their last collective, aborts nothing.
"""

from __future__ import annotations

import time

import pytest
from test_mpi import _mpi_missing, mpirun

pytestmark = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))

#: Long enough that a job waiting for it fails the time bounds below.
COMM_TIMEOUT = "60"


@pytest.mark.parametrize("n_procs", [2, 3])
def test_different_row_counts_raise_shape_error_on_every_rank(n_procs):
    start = time.monotonic()
    result = mpirun(n_procs, "row_count_mismatch.py", timeout=120, env={"TP_GPU_COMM_TIMEOUT": COMM_TIMEOUT})
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    last = n_procs - 1
    others = "rank 0" if n_procs == 2 else f"ranks 0-{n_procs - 2}"
    for rank in range(n_procs):
        assert (
            f"rank {rank}: row ShapeError: rank {rank}/{n_procs}: MPI all_reduce(sum) got arrays of "
            f"different shapes or dtypes ({others}: (2, 3) float64; rank {last}: (3, 3) float64)"
        ) in result.stdout, output
        assert (
            f"rank {rank}: column ShapeError: rank {rank}/{n_procs}: MPI all_gather got arrays of "
            f"different shapes or dtypes ({others}: (2, 2) float64; rank {last}: (3, 2) float64)"
        ) in result.stdout, output
        assert f"rank {rank}: row matched forward (2, 3)" in result.stdout, output
        assert f"rank {rank}: column matched forward (2, {2 * n_procs})" in result.stdout, output
    assert "TRUNCATE" not in output and "CommError" not in output
    assert elapsed < 30, f"took {elapsed:.1f} s\n{output}"


@pytest.mark.parametrize("n_procs, leaving", [(2, 1), (3, 0)])
def test_a_rank_that_ends_early_ends_the_job_within_seconds(n_procs, leaving):
    start = time.monotonic()
    result = mpirun(
        n_procs, "early_exit.py", str(leaving), timeout=120, env={"TP_GPU_COMM_TIMEOUT": COMM_TIMEOUT}
    )
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "second forward returned" not in result.stdout, output
    assert (
        f"rank {leaving} left the job (its program ended) while this rank waited in MPI all_reduce(sum)"
        in (result.stderr)
    ), output
    assert "did not complete within" not in output, output  # nobody waited for the timeout
    assert elapsed < 20, f"the job took {elapsed:.1f} s to end\n{output}"


@pytest.mark.parametrize("last", ["forward", "object"])
@pytest.mark.parametrize("n_procs", [2, 3])
def test_a_normal_end_with_ranks_leaving_at_different_times_aborts_nothing(n_procs, last):
    result = mpirun(n_procs, "normal_end.py", last, timeout=120, env={"TP_GPU_COMM_TIMEOUT": COMM_TIMEOUT})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in range(n_procs):
        assert f"rank {rank}: done" in result.stdout, output
    assert "MPI_ABORT" not in output and "CommError" not in output, output
