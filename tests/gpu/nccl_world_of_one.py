"""``comm="nccl"`` in a world of one process, rendezvous over cupyx's TCP store (MPI hidden): a layer, the
collectives, then the last line, after which the process must exit at once (cupy/cupy#7863).

Run by test_gpu_nccl.py in its own process, with TP_GPU_RANK, TP_GPU_WORLD_SIZE and CUPYX_DISTRIBUTED_*.
"""

from __future__ import annotations

import multiprocessing

import cupy
import numpy as np

from tp_gpu import ColumnParallelLinear, TensorParallelConfig
from tp_gpu.comm import get_communicator, mpi
from tp_gpu.errors import BackendUnavailableError

DONE = "nccl world of one: done"


def no_mpi():
    raise BackendUnavailableError("hidden by the GPU check: rendezvous over the TCP store")


if __name__ == "__main__":
    mpi.MpiComm = no_mpi
    comm = get_communicator("nccl")
    stores = [p for p in multiprocessing.active_children() if type(p).__name__ == "ExceptionAwareProcess"]
    assert not stores, f"the TCP store still runs after start-up: {stores}"
    layer = ColumnParallelLinear(
        64, 32, TensorParallelConfig(n_workers=2, backend="cupy", comm="nccl"), seed=0
    )
    x = np.random.default_rng(0).standard_normal((4, 64))
    error = float(np.abs(cupy.asnumpy(layer(x)) - (x @ layer.full_weight() + layer.full_bias())).max())
    assert error < 1e-12, error
    with cupy.cuda.Device(comm.device):
        total = comm.all_reduce(layer.backend, cupy.arange(5.0), "sum")
    assert np.array_equal(cupy.asnumpy(total), np.arange(5.0))
    assert comm.all_gather_object({"rank": comm.rank}) == [{"rank": 0}]
    comm.barrier()
    print(f"rank {comm.rank}/{comm.size} on GPU {comm.device}", flush=True)
    print(DONE, flush=True)
