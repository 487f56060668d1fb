"""Run under mpirun: the last rank passes a different number of rows; every rank must raise ShapeError.

Then every rank passes the same rows again, to show the communicator still works.
"""

from __future__ import annotations

import numpy as np

from tp_gpu import ColumnParallelLinear, RowParallelLinear, ShapeError, TensorParallelConfig, get_communicator

world = get_communicator("mpi")
config = TensorParallelConfig(n_workers=world.size, backend="numpy", comm="mpi", dtype="float64")
row = RowParallelLinear(4 * config.n_workers, 3, config, seed=0)
column = ColumnParallelLinear(5, 2 * config.n_workers, config, seed=0)  # gathers its output
rows = 3 if config.rank == world.size - 1 else 2
for name, layer, n_in in (("row", row, 4 * config.n_workers), ("column", column, 5)):
    try:
        layer(np.ones((rows, n_in)))
    except ShapeError as exc:
        print(f"rank {config.rank}: {name} ShapeError: {exc}", flush=True)
    else:
        raise SystemExit(f"rank {config.rank}: {name}: different row counts accepted")
    y = layer(np.ones((2, n_in)))
    print(f"rank {config.rank}: {name} matched forward {tuple(y.shape)}", flush=True)
