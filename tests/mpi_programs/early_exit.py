"""Run under mpirun: one rank's program ends (exit status 0) after one forward; the others call a
second forward, which that rank never joins. They must end within seconds, not after the timeout."""

from __future__ import annotations

import sys

import numpy as np

from tp_gpu import RowParallelLinear, TensorParallelConfig, get_communicator

leaving = int(sys.argv[1])
world = get_communicator("mpi")
config = TensorParallelConfig(n_workers=world.size, backend="numpy", comm="mpi", dtype="float64")
layer = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
layer(np.ones((2, 4 * config.n_workers)))
print(f"rank {config.rank}: first forward returned", flush=True)
if config.rank == leaving:
    raise SystemExit(0)
layer(np.ones((2, 4 * config.n_workers)))  # the rank that left never joins
print(f"rank {config.rank}: second forward returned", flush=True)
