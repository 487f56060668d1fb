"""Run under mpirun: a normal end, with ranks leaving at different times after their last
collective; nothing may abort and the job exits 0."""

from __future__ import annotations

import sys
import time

import numpy as np

from tp_gpu import RowParallelLinear, TensorParallelConfig, get_communicator

last = sys.argv[1]  # the kind of the last collective: "forward" or "object"
world = get_communicator("mpi")
config = TensorParallelConfig(n_workers=world.size, backend="numpy", comm="mpi", dtype="float64")
layer = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
for _ in range(20):
    layer(np.ones((2, 4 * config.n_workers)))
if last == "object":
    world.all_gather_object({"rank": config.rank})
else:
    layer(np.ones((2, 4 * config.n_workers)))
time.sleep(0.5 * config.rank)  # rank 0 leaves first, the last rank last
print(f"rank {config.rank}: done", flush=True)
