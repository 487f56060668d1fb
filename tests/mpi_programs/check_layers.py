"""Run under mpirun: every layer with comm="mpi" must equal the single-process layer.

Each rank builds, for several worker counts (multiples of the world size), the
same layer twice: with ``comm="mpi"`` (this rank holds only its workers'
shards) and with ``comm="local"`` (every shard, one process: the reference).
Forward outputs, input and parameter gradients after backward, one Adam step,
the state dict, and checkpoints (saved by one, loaded by the other, both
ways) must agree. Then the same for sizes that do not divide: over
``world``, ``2 * world`` and ``3 * world`` workers the processes hold spans of
different lengths (a column layer of 13 outputs, a row layer of 11 inputs, an
embedding of 31 rows, an MLP of 7 hidden units, a class-weighted loss over 31
classes), some processes hold nothing at all (1 output column, 2 vocabulary
rows), and one head is padded to shards of 8. Prints ``rank R: N checks
passed`` and exits 0, or raises.

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
    tensor,
)

TOL = dict(rtol=1e-12, atol=1e-12)


def host(layer, value):
    """A Tensor (a ShardedTensor gathered: collective) as a float64 host array."""
    return np.asarray(value, dtype=np.float64)


def forward_backward(layer, inputs, grad):
    """``(y, dX)``: ``layer``'s output for ``inputs`` and, after ``y.backward(grad)``, the gradient of
    ``inputs`` (None for integer ids, which have none)."""
    if np.issubdtype(np.asarray(inputs).dtype, np.integer):
        y = layer(inputs)
        y.backward(grad)
        return y, None
    leaf = tensor(inputs, requires_grad=True)
    y = layer(leaf)
    y.backward(grad)
    return y, leaf.grad


def check_pair(name, make, inputs, grad_shape, rng, checks):
    """Forward, backward, an Adam step and the state dict of ``make(comm)`` for both comms."""
    mpi, ref = make("mpi"), make("local")
    grad = rng.standard_normal(grad_shape)
    (out_mpi, back_mpi), (out_ref, back_ref) = (
        forward_backward(mpi, inputs, grad),
        forward_backward(ref, inputs, grad),
    )
    np.testing.assert_allclose(host(mpi, out_mpi), host(ref, out_ref), **TOL, err_msg=f"{name} forward")
    if back_ref is not None:
        np.testing.assert_allclose(host(mpi, back_mpi), host(ref, back_ref), **TOL, err_msg=f"{name} dX")
    for key, value in ref.grads().items():
        np.testing.assert_allclose(mpi.grads()[key], value, **TOL, err_msg=f"{name} grad {key}")
    for layer in (mpi, ref):
        Adam(layer.parameters(), lr=1e-2).step()
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(mpi.state_dict()[key], value, **TOL, err_msg=f"{name} state {key}")
    np.testing.assert_allclose(
        host(mpi, mpi(inputs)), host(ref, ref(inputs)), **TOL, err_msg=f"{name} after step"
    )
    check_checkpoints(name, make, mpi, ref)
    checks.append(name)


def check_checkpoints(name, make, mpi, ref):
    """A checkpoint saved over MPI loads into a single-process layer, and the other way round."""
    comm = get_communicator("mpi")
    directory = comm.broadcast_object(tempfile.mkdtemp() if comm.rank == 0 else None)
    from_mpi, from_ref = (
        os.path.join(directory, "mpi.safetensors"),
        os.path.join(directory, f"ref{comm.rank}.safetensors"),
    )
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


def array_split_spans(size, n_workers, world):
    """Each process's ``[first, last)`` when ``size`` is cut as ``np.array_split`` cuts it over
    ``n_workers`` workers, ``n_workers // world`` consecutive ones per process."""
    sizes = [len(p) for p in np.array_split(np.arange(size), n_workers)]
    local = n_workers // world
    bounds = np.cumsum([0] + [sum(sizes[r * local : (r + 1) * local]) for r in range(world)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def check_spans(name, layer, size, n_workers, world, unequal=True):
    """The layer's processes hold ``np.array_split``'s spans; with ``unequal``, not all of one length."""
    spans = array_split_spans(size, n_workers, world)
    assert layer.layout.spans == spans, f"{name}: spans {layer.layout.spans}, expected {spans}"
    assert layer.layout.total == size, name
    if unequal:
        assert len({b - a for a, b in spans}) > 1, f"{name}: spans {spans} are all of one length"


def check_loss_pair(name, make_head, loss_kwargs, x, targets, checks):
    """Head (gather_output=False) -> vocab-parallel cross-entropy, the same with either comm."""
    results = {}
    for comm in ("mpi", "local"):
        head = make_head(comm)
        loss_fn = VocabParallelCrossEntropy(**loss_kwargs)
        x_leaf = tensor(x, requires_grad=True)
        logits = head(x_leaf)
        z = logits.detach().requires_grad_()  # a leaf over the logits' blocks: z.grad is dZ
        loss = loss_fn(z, targets)
        loss.backward()
        dz = z.grad
        assert isinstance(dz, ShardedTensor) and dz.split_sizes == logits.split_sizes, name
        logits.backward(dz)
        results[comm] = (float(loss), host(head, dz), x_leaf.grad, head.grads(), head)
    loss_m, dz_m, dx_m, grads_m, head_m = results["mpi"]
    loss_r, dz_r, dx_r, grads_r, head_r = results["local"]
    np.testing.assert_allclose(loss_m, loss_r, **TOL, err_msg=f"{name} loss")
    np.testing.assert_allclose(dz_m, dz_r, **TOL, err_msg=f"{name} dZ")
    np.testing.assert_allclose(host(head_m, dx_m), host(head_r, dx_r), **TOL, err_msg=f"{name} dX")
    for key in grads_r:
        np.testing.assert_allclose(grads_m[key], grads_r[key], **TOL, err_msg=f"{name} grad {key}")
    checks.append(name)


def check_uneven(args, world, rng, checks):
    """Sizes no worker count divides: processes hold spans of different lengths, or none."""
    for n_workers in (world, 2 * world, 3 * world):
        base = dict(n_workers=n_workers, backend=args.backend, devices=args.devices, dtype="float64")

        def config(comm, base=base, **kw):
            return TensorParallelConfig(comm=comm, **base, **kw)

        x = rng.standard_normal((5, 13))
        check_spans("column 13", ColumnParallelLinear(13, 13, config("mpi"), seed=6), 13, n_workers, world)
        check_pair(
            f"uneven column n_out=13 p={n_workers}",
            lambda c: ColumnParallelLinear(13, 13, config(c), seed=6),
            x,
            (5, 13),
            rng,
            checks,
        )
        h = rng.standard_normal((5, 11))
        check_spans("row 11", RowParallelLinear(11, 4, config("mpi"), seed=7), 11, n_workers, world)
        check_pair(
            f"uneven row n_in=11 p={n_workers}",
            lambda c: RowParallelLinear(11, 4, config(c), seed=7),
            h,
            (5, 4),
            rng,
            checks,
        )
        check_pair(
            f"uneven mlp hidden=7 p={n_workers}",
            lambda c: ParallelMLP(13, 7, 6, config(c), seed=8),
            x,
            (5, 6),
            rng,
            checks,
        )
        ids = rng.integers(0, 31, size=(4, 6))
        ids[0, :2] = (0, 30)  # the first and the last row
        embedding = ParallelEmbedding(31, 3, config=config("mpi"), seed=9)
        check_spans("embedding 31", embedding, 31, n_workers, world)
        check_pair(
            f"uneven embedding vocab=31 p={n_workers}",
            lambda c: ParallelEmbedding(31, 3, config=config(c), seed=9),
            ids,
            (4, 6, 3),
            rng,
            checks,
        )
        weight = rng.uniform(0.2, 2.0, size=31)
        targets = rng.integers(0, 31, size=5)
        targets[1] = -100
        check_loss_pair(
            f"uneven weighted cross-entropy vocab=31 p={n_workers}",
            lambda c: ColumnParallelLinear(13, 31, config(c, gather_output=False), seed=10),
            dict(weight=weight, label_smoothing=0.1),
            x,
            targets,
            checks,
        )

    # Processes that hold nothing: 1 column, 2 vocabulary rows over more workers than that.
    base = dict(backend=args.backend, devices=args.devices, dtype="float64")
    p = 2 * world
    cfg = lambda c, **kw: TensorParallelConfig(comm=c, n_workers=p, **base, **kw)  # noqa: E731
    x = rng.standard_normal((5, 13))
    empty = ColumnParallelLinear(13, 1, cfg("mpi"), seed=11)
    check_spans("column 1", empty, 1, p, world)
    assert empty.layout.spans[-1] == (1, 1), empty.layout.spans
    check_pair(
        f"empty spans column n_out=1 p={p}",
        lambda c: ColumnParallelLinear(13, 1, cfg(c), seed=11),
        x,
        (5, 1),
        rng,
        checks,
    )
    p3 = 3 * world
    ids = rng.integers(0, 2, size=(3, 4))
    check_pair(
        f"empty spans embedding vocab=2 p={p3}",
        lambda c: ParallelEmbedding(2, 3, config=TensorParallelConfig(comm=c, n_workers=p3, **base), seed=12),
        ids,
        (3, 4, 3),
        rng,
        checks,
    )
    # Padded: every worker's shard holds 8 columns, of which the last workers' are all padding.
    targets = rng.integers(0, 13, size=5)
    check_loss_pair(
        f"padded cross-entropy vocab=13 k=8 p={p}",
        lambda c: ColumnParallelLinear(13, 13, cfg(c, gather_output=False), seed=13, pad_to_multiple_of=8),
        dict(label_smoothing=0.1),
        x,
        targets,
        checks,
    )
    check_pair(
        f"padded column n_out=13 k=8 p={p}",
        lambda c: ColumnParallelLinear(13, 13, cfg(c), seed=13, pad_to_multiple_of=8),
        x,
        (5, 13),
        rng,
        checks,
    )


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
        base = dict(n_workers=n_workers, backend=args.backend, devices=args.devices, dtype="float64")

        def config(comm, base=base, **kw):  # bound now: the lambdas below must not see a later base
            return TensorParallelConfig(comm=comm, **base, **kw)

        x = rng.standard_normal((5, 13))
        check_pair(
            f"column p={n_workers}",
            lambda c, n=n_workers: ColumnParallelLinear(13, 7 * n, config(c), seed=1),
            x,
            (5, 7 * n_workers),
            rng,
            checks,
        )
        h = rng.standard_normal((5, 3 * n_workers))
        check_pair(
            f"row p={n_workers}",
            lambda c, n=n_workers: RowParallelLinear(3 * n, 4, config(c), seed=2),
            h,
            (5, 4),
            rng,
            checks,
        )
        check_pair(
            f"mlp p={n_workers}",
            lambda c, n=n_workers: ParallelMLP(13, 2 * n, 6, config(c), seed=3),
            x,
            (5, 6),
            rng,
            checks,
        )
        ids = rng.integers(0, 5 * n_workers, size=(4, 6))
        check_pair(
            f"embedding p={n_workers}",
            lambda c, n=n_workers: ParallelEmbedding(5 * n, 3, config=config(c), seed=4),
            ids,
            (4, 6, 3),
            rng,
            checks,
        )

        # Column (gather_output=False) -> vocab-parallel cross-entropy, never gathering the logits.
        targets = rng.integers(0, 7 * n_workers, size=5)
        losses = {}
        for comm in ("mpi", "local"):
            head = ColumnParallelLinear(13, 7 * n_workers, config(comm, gather_output=False), seed=5)
            loss_fn = VocabParallelCrossEntropy(label_smoothing=0.1)
            loss = loss_fn(head(x), targets)
            loss.backward()
            losses[comm] = float(loss)
            losses[comm + " grads"] = head.grads()
        np.testing.assert_allclose(losses["mpi"], losses["local"], **TOL, err_msg="cross-entropy")
        for key in losses["local grads"]:
            np.testing.assert_allclose(
                losses["mpi grads"][key], losses["local grads"][key], **TOL, err_msg=key
            )
        checks.append(f"cross-entropy p={n_workers}")
    check_uneven(args, world, rng, checks)
    print(f"rank {rank}: {len(checks)} checks passed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
