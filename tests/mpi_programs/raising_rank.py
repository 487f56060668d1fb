"""Run under mpirun: one rank raises an ordinary exception after the first forward.

The others go on to a second forward, whose all-reduce the raising rank never
joins. The job must end within seconds (the excepthook that MpiComm installs
calls MPI_Abort), not after TP_GPU_COMM_TIMEOUT.

    mpirun -n 3 python tests/mpi_programs/raising_rank.py --raising-rank 1
"""

from __future__ import annotations

import argparse

import numpy as np

from tp_gpu import RowParallelLinear, TensorParallelConfig, get_communicator

parser = argparse.ArgumentParser()
parser.add_argument("--raising-rank", type=int, default=1)
args = parser.parse_args()

config = TensorParallelConfig(
    n_workers=get_communicator("mpi").size, backend="numpy", comm="mpi", dtype="float64"
)
layer = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
x = np.ones((2, 4 * config.n_workers))
layer(x)
print(f"rank {config.rank}: first forward returned", flush=True)
if config.rank == args.raising_rank:
    raise RuntimeError(f"rank {config.rank} fails after its first forward")
layer(x)  # the all-reduce that the raising rank never joins
print(f"rank {config.rank}: second forward returned", flush=True)
