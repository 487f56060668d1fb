"""Run under mpirun: the time of one all-reduce (and one RowParallelLinear forward) at small shapes,
with and without the shape header, interleaved; rank 0 prints medians in microseconds."""

from __future__ import annotations

import time

import numpy as np

from tp_gpu import RowParallelLinear, TensorParallelConfig, get_communicator

world = get_communicator("mpi")
config = TensorParallelConfig(n_workers=world.size, backend="numpy", comm="mpi", dtype="float32")
layer = RowParallelLinear(8 * world.size, 8, config, seed=0)
x = np.ones((2, 8 * world.size), np.float32)
small = np.ones((2, 8), np.float32)
large = np.ones((256, 256), np.float32)  # 256 KiB: past SMALL_BYTES, header then MPI's all-reduce
backend = layer.backend
results = {(what, check): [] for what in ("all_reduce", "forward", "large") for check in (True, False)}
for _ in range(20):
    for check in (True, False):
        world.check_shapes = check
        world.barrier()
        start = time.perf_counter()
        for _ in range(200):
            world.all_reduce(backend, small)
        results["all_reduce", check].append((time.perf_counter() - start) / 200)
        world.barrier()
        start = time.perf_counter()
        for _ in range(200):
            layer(x)
        results["forward", check].append((time.perf_counter() - start) / 200)
        world.barrier()
        start = time.perf_counter()
        for _ in range(20):
            world.all_reduce(backend, large)
        results["large", check].append((time.perf_counter() - start) / 20)
if world.rank == 0:
    for what in ("all_reduce", "forward", "large"):
        on = np.median(results[what, True]) * 1e6
        off = np.median(results[what, False]) * 1e6
        shape = "(256, 256)" if what == "large" else "(2, 8)"
        print(
            f"{what} {shape} float32 x {world.size} ranks: {off:.1f} us unchecked, {on:.1f} us checked, "
            f"+{on - off:.1f} us ({on / off - 1:+.0%})",
            flush=True,
        )
