"""Sequence parallelism under mpirun with 2 and 3 ranks equals one process without it.

Needs ``mpirun`` and mpi4py (skipped with the reason otherwise); launches
``tests/mpi_programs/check_sequence_parallel.py`` as ``tests/test_mpi.py`` does.
"""

from __future__ import annotations

import pytest
from test_mpi import _mpi_missing, mpirun

pytestmark = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))

#: What the program checks per rank: the collectives at 3 sequence lengths, the communicator's
#: reduce-scatter on 3 axes, and the transformer layer at 2 worker counts x 2 norms x 3
#: (sequence length, input kind).
CHECKS = 3 + 3 + 2 * 2 * 3


@pytest.mark.parametrize("n_procs", [2, 3])
@pytest.mark.parametrize("backend, devices", [("numpy", None), ("simulated", 2)], ids=["numpy", "sim2"])
def test_sequence_parallel_transformer_layer_across_processes(n_procs, backend, devices):
    args = ["--backend", backend] + (["--devices", str(devices)] if devices else [])
    result = mpirun(n_procs, "check_sequence_parallel.py", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(n_procs):
        assert f"rank {rank}: {CHECKS} checks passed" in result.stdout, result.stdout + result.stderr
