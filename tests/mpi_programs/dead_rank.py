"""Run under mpirun: rank 1 dies before a collective; the others must stop, not hang."""

from __future__ import annotations

import os
import signal

import numpy as np

from tp_gpu import RowParallelLinear, TensorParallelConfig, get_communicator

config = TensorParallelConfig(
    n_workers=get_communicator("mpi").size, backend="numpy", comm="mpi", dtype="float64"
)
layer = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
if config.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
layer(np.ones((2, 4 * config.n_workers)))  # the all-reduce that rank 1 never joins
print(f"rank {config.rank}: forward returned without rank 1", flush=True)
