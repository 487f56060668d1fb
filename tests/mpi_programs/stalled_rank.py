"""Run under mpirun: rank 1 never joins the all-reduce; rank 0 must raise CommError after the timeout."""

from __future__ import annotations

import time

import numpy as np

from tp_gpu import CommError, RowParallelLinear, TensorParallelConfig, get_communicator

config = TensorParallelConfig(
    n_workers=get_communicator("mpi").size, backend="numpy", comm="mpi", dtype="float64"
)
layer = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
if config.rank == 1:
    time.sleep(60)  # alive but stuck elsewhere: no launcher will notice
    raise SystemExit(0)
try:
    layer(np.ones((2, 4 * config.n_workers)))
except CommError as exc:
    print(f"rank {config.rank}: CommError: {exc}", flush=True)
    raise SystemExit(3) from None
