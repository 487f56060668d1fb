"""Run under mpirun -n 2: bad multi-process configurations are reported on every rank.

1. ``n_workers`` that the world size does not divide;
2. a seed that differs on one rank, detected when the layer is built.
"""

from __future__ import annotations

from tp_gpu import ColumnParallelLinear, ConfigError, TensorParallelConfig, get_communicator

world = get_communicator("mpi")
try:  # the config is only validated; the world size is checked when the first layer is built
    ColumnParallelLinear(
        8, 4, TensorParallelConfig(n_workers=2 * world.size + 1, backend="numpy", comm="mpi", dtype="float64")
    )
except ConfigError as exc:
    print(f"rank {world.rank}: n_workers ConfigError: {exc}", flush=True)
else:
    raise SystemExit(f"rank {world.rank}: indivisible n_workers accepted")

config = TensorParallelConfig(n_workers=2 * world.size, backend="numpy", comm="mpi", dtype="float64")
seed = 7 if config.rank == 1 else 3
try:
    ColumnParallelLinear(8, 4 * config.n_workers, config, seed=seed)
except ConfigError as exc:
    print(f"rank {config.rank}: seed ConfigError: {exc}", flush=True)
    raise SystemExit(0) from None
raise SystemExit(f"rank {config.rank}: different seeds accepted")
