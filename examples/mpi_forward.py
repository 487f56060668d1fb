"""A tensor-parallel forward pass with one process per worker group, over MPI.

    mpirun -n 2 python examples/mpi_forward.py --workers 4
    srun --ntasks=4 --gpus-per-task=1 python examples/mpi_forward.py --workers 4 --backend cupy --comm nccl

Every rank builds its own shards from the same seed (rank r holds workers
[r * p / s, (r + 1) * p / s) of p workers over s ranks), runs
ColumnParallelLinear(gather_output=False) -> GeLU -> RowParallelLinear, and
gets the full output. Rank 0 checks it against the dense computation from the
layers' full weights, and prints the backend the layers ran on.

A bad option prints one line (``mpi_forward.py: error: ...``) and exits with
status 2 instead of a traceback.

As root, Open MPI refuses to start unless told otherwise, and it starts no more
ranks than the machine has cores; on a small machine or in a container add

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe -n 4 ...
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import numpy as np

from tp_gpu import ConfigError, ParallelMLP, TensorParallelConfig, TensorParallelError, get_communicator
from tp_gpu.comm import Communicator
from tp_gpu.testing import tolerance


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the options and run; 0 on success, 1 if the output disagrees with dense, 2 on a bad option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=None, help="total workers (default: 2 per rank)")
    parser.add_argument("--comm", choices=["mpi", "nccl"], default="mpi")
    parser.add_argument(
        "--backend", choices=["numpy", "simulated", "cupy"], default=None, help="default: auto"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, default=512, help="input and output width (any size)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    args = parser.parse_args(argv)
    rank = 0
    try:
        comm = get_communicator(args.comm)
        rank = comm.rank
        return run(args, comm)
    except TensorParallelError as exc:  # a bad option: one line, not a traceback
        # Options are the same on every rank, so a ConfigError is too: rank 0 alone reports it.
        # Other errors (a backend missing on one node) may differ: every rank reports its own.
        if rank == 0 or not isinstance(exc, ConfigError):
            prefix = f"rank {rank}: " if rank else ""
            print(f"mpi_forward.py: error: {prefix}{exc}", file=sys.stderr, flush=True)
        return 2


def run(args: argparse.Namespace, comm: Communicator) -> int:
    """The forward pass and, on rank 0, the check against dense; returns the exit status."""
    n_workers = 2 * comm.size if args.workers is None else args.workers
    config = TensorParallelConfig(n_workers=n_workers, backend=args.backend, comm=args.comm, dtype=args.dtype)
    hidden = 4 * args.features  # any size splits over any worker count
    mlp = ParallelMLP(args.features, hidden, args.features, config, seed=0, activation="gelu_tanh").eval()
    x = np.random.default_rng(0).standard_normal((args.batch, args.features))  # the same on every rank
    y = mlp.backend.to_host(mlp(x))

    state = mlp.state_dict()  # collective: gathers the logical weights on every rank
    if comm.rank == 0:
        pre = x @ state["fc1.weight"] + state["fc1.bias"]
        gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
        dense = gelu @ state["fc2.weight"] + state["fc2.bias"]
        error = float(np.abs(y - dense).max())
        layout = f"{comm.size} {comm.name} ranks x {n_workers // comm.size} workers each"
        sizes = [last - first for first, last in mlp.fc1.partition]  # rank 0's workers' hidden columns
        print(f"{layout} ({mlp.backend.name} backend, {args.dtype}): rank 0 holds {sizes} of {hidden} hidden")
        print(f"output {y.shape}, max abs error vs dense {error:.2e}")
        return 0 if error <= tolerance(args.dtype, terms=hidden) * max(1.0, float(np.abs(dense).max())) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
