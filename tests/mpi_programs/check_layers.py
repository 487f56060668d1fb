"""Run under mpirun: every layer with comm="mpi" must equal the single-process layer.

Each rank builds, for several worker counts (multiples of the world size), the
same layer twice: with ``comm="mpi"`` (this rank holds only its workers'
shards) and with ``comm="local"`` (every shard, one process: the reference).
Forward outputs, input and parameter gradients after backward, one Adam step,
the state dict, and checkpoints (saved by one, loaded by the other, both
ways) must agree. Prints ``rank R: N checks passed`` and exits 0,
or raises.

    mpirun -n 3 python tests/mpi_programs/check_layers.py --backend numpy
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np

from tp_gpu import (
    Adam,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    get_communicator,
    load_checkpoint,
    save_checkpoint,
)

TOL = dict(rtol=1e-12, atol=1e-12)


def host(layer, value):
    if isinstance(value, ShardedTensor):
        value = value.gather()
    return np.asarray(layer.backend.to_host(value), dtype=np.float64)


def check_pair(name, make, inputs, grad_shape, rng, checks):
    """Forward, backward, an Adam step and the state dict of ``make(comm)`` for both comms."""
    mpi, ref = make("mpi"), make("local")
    out_mpi, out_ref = mpi(inputs), ref(inputs)
    np.testing.assert_allclose(host(mpi, out_mpi), host(ref, out_ref), **TOL, err_msg=f"{name} forward")
    grad = rng.standard_normal(grad_shape)
    back_mpi, back_ref = mpi.backward(grad), ref.backward(grad)
    if back_ref is not None:
        np.testing.assert_allclose(host(mpi, back_mpi), host(ref, back_ref), **TOL, err_msg=f"{name} dX")
    for key, value in ref.grads().items():
        np.testing.assert_allclose(mpi.grads()[key], value, **TOL, err_msg=f"{name} grad {key}")
    for layer in (mpi, ref):
        Adam(layer.parameters(), lr=1e-2).step()
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(mpi.state_dict()[key], value, **TOL, err_msg=f"{name} state {key}")
    np.testing.assert_allclose(host(mpi, mpi(inputs)), host(ref, ref(inputs)), **TOL, err_msg=f"{name} after step")
    check_checkpoints(name, make, mpi, ref)
    checks.append(name)


def check_checkpoints(name, make, mpi, ref):
    """A checkpoint saved over MPI loads into a single-process layer, and the other way round."""
    comm = get_communicator("mpi")
    directory = comm.broadcast_object(tempfile.mkdtemp() if comm.rank == 0 else None)
    from_mpi, from_ref = os.path.join(directory, "mpi.safetensors"), os.path.join(directory, f"ref{comm.rank}.safetensors")
    save_checkpoint(from_mpi, mpi)  # collective: rank 0 writes
    save_checkpoint(from_ref, ref)  # each rank its own file, from its single-process layer
    fresh_ref, fresh_mpi = make("local"), make("mpi")
    load_checkpoint(from_mpi, fresh_ref)
    load_checkpoint(from_ref, fresh_mpi)
    for loaded, saved in ((fresh_ref, mpi), (fresh_mpi, ref)):  # bit for bit what was saved
        for key, value in saved.state_dict().items():
            np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=f"{name} checkpoint {key}")
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(directory)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="numpy", choices=["numpy", "simulated", "cupy"])
    parser.add_argument("--devices", type=int, default=None)
    args = parser.parse_args()

    comm = get_communicator("mpi")
    world, rank = comm.size, comm.rank
    rng = np.random.default_rng(1234)  # same stream on every rank: same data everywhere
    checks = []
    for n_workers in (world, 2 * world):
        base = dict(n_workers=n_workers, backend=args.backend, devices=args.devices)

        def config(comm, **kw):
            return TensorParallelConfig(comm=comm, **base, **kw)

        x = rng.standard_normal((5, 13))
        check_pair(f"column p={n_workers}", lambda c: ColumnParallelLinear(13, 7 * n_workers, config(c), seed=1),
                   x, (5, 7 * n_workers), rng, checks)
        h = rng.standard_normal((5, 3 * n_workers))
        check_pair(f"row p={n_workers}", lambda c: RowParallelLinear(3 * n_workers, 4, config(c), seed=2),
                   h, (5, 4), rng, checks)
        check_pair(f"mlp p={n_workers}", lambda c: ParallelMLP(13, 2 * n_workers, 6, config(c), seed=3),
                   x, (5, 6), rng, checks)
        ids = rng.integers(0, 5 * n_workers, size=(4, 6))
        check_pair(f"embedding p={n_workers}", lambda c: ParallelEmbedding(5 * n_workers, 3, config=config(c), seed=4),
                   ids, (4, 6, 3), rng, checks)

        # Column (gather_output=False) -> vocab-parallel cross-entropy, never gathering the logits.
        targets = rng.integers(0, 7 * n_workers, size=5)
        losses = {}
        for comm in ("mpi", "local"):
            head = ColumnParallelLinear(13, 7 * n_workers, config(comm, gather_output=False), seed=5)
            loss_fn = VocabParallelCrossEntropy(label_smoothing=0.1)
            losses[comm] = loss_fn(head(x), targets)
            head.backward(loss_fn.backward())
            losses[comm + " grads"] = head.grads()
        np.testing.assert_allclose(losses["mpi"], losses["local"], **TOL, err_msg="cross-entropy")
        for key in losses["local grads"]:
            np.testing.assert_allclose(losses["mpi grads"][key], losses["local grads"][key], **TOL, err_msg=key)
        checks.append(f"cross-entropy p={n_workers}")
    print(f"rank {rank}: {len(checks)} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
