"""A tensor-parallel forward pass with one process per worker group, over MPI.

    mpirun -n 2 python examples/mpi_forward.py --workers 4
    srun --ntasks=4 --gpus-per-task=1 python examples/mpi_forward.py --workers 4 --backend cupy --comm nccl

Every rank builds its own shards from the same seed (rank r holds workers
[r * p / s, (r + 1) * p / s) of p workers over s ranks), runs
ColumnParallelLinear(gather_output=False) -> GeLU -> RowParallelLinear, and
gets the full output. Rank 0 checks it against the dense computation from the
layers' full weights.
"""

from __future__ import annotations

import argparse

import numpy as np

from tp_gpu import ParallelMLP, TensorParallelConfig, get_communicator


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=None, help="total workers (default: 2 per rank)")
    parser.add_argument("--comm", choices=["mpi", "nccl"], default="mpi")
    parser.add_argument("--backend", choices=["numpy", "simulated", "cupy"], default=None, help="default: auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, default=512)
    args = parser.parse_args(argv)

    comm = get_communicator(args.comm)
    n_workers = 2 * comm.size if args.workers is None else args.workers
    config = TensorParallelConfig(n_workers=n_workers, backend=args.backend, comm=args.comm)
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
        print(f"{comm.size} {comm.name} ranks x {n_workers // comm.size} workers each ({mlp.backend.name} backend): "
              f"output {y.shape}, max abs error vs dense {error:.2e}")
        return 0 if error < 1e-6 * max(1.0, float(np.abs(dense).max())) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
