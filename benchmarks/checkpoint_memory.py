"""Save and load time and peak host memory per process of a 1 GiB checkpoint: sharded folder against one file.

The model is ``ParallelMLP(8192, 16384, 8192)``, float32, 4 workers on NumPy: 1 GiB of weights. Each
process saves, then loads (from the page cache, straight after the save). Per process it prints the
time, tracemalloc's peak above the start ("extra": what the save or load allocates) and the rise of
the resident set's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; a load's
also counts the memory-mapped rank files, freed when they close). Linux only.

    python -m benchmarks.checkpoint_memory sharded /tmp/ckpt-dir
    mpirun -n 4 python -m benchmarks.checkpoint_memory single /tmp/ckpt-dir   # from the repository root

The folder needs room for 1 GiB; with several processes it must be shared by them.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import tracemalloc
from typing import Callable, Tuple

import numpy as np

from tp_gpu import ParallelMLP, TensorParallelConfig, get_communicator, load_checkpoint, save_checkpoint


def _status(key: str) -> int:
    """Bytes of ``key`` (``VmRSS``, ``VmHWM``) in /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def measure(call: Callable[[], object]) -> Tuple[float, int, int]:
    """``(seconds, tracemalloc peak above the start, VmHWM rise)`` of ``call()``."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    rss = _status("VmRSS")
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return seconds, peak, _status("VmHWM") - rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("format", choices=["sharded", "single"])
    parser.add_argument("folder")
    args = parser.parse_args()
    comm_name = "mpi" if "OMPI_COMM_WORLD_SIZE" in os.environ else "local"
    comm = get_communicator(comm_name)
    config = TensorParallelConfig(n_workers=4, backend="numpy", dtype="float32", comm=comm_name)
    model = ParallelMLP(8192, 16384, 8192, config, seed=1)
    total = sum(int(np.prod(p.shape)) * 4 for p in model.parameters())
    sharded = args.format == "sharded"
    path = os.path.join(args.folder, "ckpt" if sharded else "ckpt.safetensors")
    gc.collect()
    comm.barrier()
    save = measure(lambda: save_checkpoint(path, model, sharded=sharded))
    comm.barrier()
    load = measure(lambda: load_checkpoint(path, model))
    comm.barrier()
    mib = 2**20
    print(
        f"{args.format} procs={comm.size} rank={comm.rank} model={total / mib:.0f}MiB "
        f"save={save[0]:.2f}s save_extra={save[1] / mib:.0f}MiB save_rss+={save[2] / mib:.0f}MiB "
        f"load={load[0]:.2f}s load_extra={load[1] / mib:.0f}MiB load_rss+={load[2] / mib:.0f}MiB",
        flush=True,
    )


if __name__ == "__main__":
    main()
