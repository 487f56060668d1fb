"""Run under mpirun: sequence parallelism across processes equals one process without it.

Each rank builds, for worker counts that are multiples of the world size, a
``ParallelTransformerLayer`` with ``sequence_parallel=True`` and ``comm="mpi"``
(this rank holds only its span of the sequence, and of the heads and MLP
columns) and the same layer without sequence parallelism in one process
(``comm="local"``: the reference). Forward outputs, ``dX`` and every
parameter gradient must agree to float64 rtol 1e-12, post- and pre-norm,
with padding or causal masks, dropout, uneven sequence lengths, dense and
sequence-split inputs. The collectives ``all_gather_blocks`` and
``reduce_scatter_blocks``, and the communicator's ``reduce_scatter`` (pieces of
any length, one empty), are checked across the processes too. Prints
``rank R: N checks passed`` and exits 0, or raises.

    mpirun -n 3 python tests/mpi_programs/check_sequence_parallel.py --backend numpy
"""

from __future__ import annotations

import argparse

import numpy as np

import tp_gpu
from tp_gpu import (
    ParallelTransformerLayer,
    ShardedTensor,
    TensorParallelConfig,
    collectives,
    get_communicator,
    get_group,
    regions,
)

TOL = dict(rtol=1e-12, atol=1e-12)


def host(backend, value) -> np.ndarray:
    if isinstance(value, tp_gpu.Tensor):
        return np.asarray(value.numpy(), dtype=np.float64)  # collective for a ShardedTensor
    return np.asarray(backend.to_host(value), dtype=np.float64)


def check_collectives(config: TensorParallelConfig, rng, checks: list) -> None:
    """All-gather and reduce-scatter of uneven sequence slices over every process."""
    group = get_group(config)
    backend, comm = group.backend, group.comm
    for seq in (1, 7, 2 * config.n_workers + 1):
        layout = regions.sequence_layout(group, seq)
        x = rng.standard_normal((2, seq, 3))  # the same on every rank
        blocks = collectives.scatter_blocks(backend, x, -2, layout, np.float64)
        for device, whole in collectives.all_gather_blocks(backend, blocks, -2, layout, comm).items():
            assert backend.device_of(whole) == device
            np.testing.assert_array_equal(host(backend, whole), x, err_msg=f"all_gather seq={seq}")
        every = [rng.standard_normal((2, seq, 3)) for _ in range(comm.size * len(layout.groups))]
        mine = every[comm.rank * len(layout.groups) : (comm.rank + 1) * len(layout.groups)]
        partials = {d: backend.asarray(a, np.float64, d) for d, a in zip(layout.groups, mine)}
        total = sum(every)
        for device, block in collectives.reduce_scatter_blocks(backend, partials, -2, layout, comm).items():
            expected = np.concatenate([total[:, s] for s in layout.global_slices(device)], axis=1)
            np.testing.assert_allclose(host(backend, block), expected, **TOL, err_msg=f"reduce_scatter {seq}")
        checks.append(f"collectives seq={seq}")
    for axis in (0, 1, -1):  # the communicator's own reduce-scatter, pieces of any length (0 too)
        every = [rng.standard_normal((5, comm.size + 2, 3)) for _ in range(comm.size)]
        sizes = [0] * comm.size
        for i in range(every[0].shape[axis]):
            sizes[1 + i % (comm.size - 1)] += 1  # uneven, and rank 0 gets none
        first = sum(sizes[: comm.rank])
        piece = comm.reduce_scatter(
            backend, backend.asarray(every[comm.rank], np.float64, group.devices[0]), axis, sizes
        )
        expected = np.take(sum(every), range(first, first + sizes[comm.rank]), axis=axis)
        np.testing.assert_allclose(
            host(backend, piece), expected, **TOL, err_msg=f"comm.reduce_scatter {axis}"
        )
        checks.append(f"comm.reduce_scatter axis={axis}")


def check_layer(args, p: int, pre_norm: bool, seq: int, sharded_input: bool, rng, checks: list) -> None:
    base = dict(n_workers=p, backend=args.backend, devices=args.devices, dtype="float64")
    kwargs = dict(seed=7, pre_norm=pre_norm, causal=pre_norm, eps=1e-5, dropout=0.1)
    sp = ParallelTransformerLayer(
        12, 4, 18, TensorParallelConfig(**base, comm="mpi", sequence_parallel=True), **kwargs
    )
    ref = ParallelTransformerLayer(12, 4, 18, TensorParallelConfig(**base, comm="local"), **kwargs)
    name = f"p={p} {'pre' if pre_norm else 'post'}-norm seq={seq} {'sharded' if sharded_input else 'dense'}"
    for step in range(2):  # two steps: dropout draws new masks, gradients accumulate
        x, g = rng.standard_normal((2, seq, 12)), rng.standard_normal((2, seq, 12))
        mask = np.ones((2, seq), dtype=np.int64)
        mask[1, seq // 2 + 1 :] = 0
        layout = regions.sequence_layout(sp.group, seq)
        leaf = (_split(sp, x) if sharded_input else tp_gpu.tensor(x)).requires_grad_()
        y = sp(leaf, mask)
        assert isinstance(y, ShardedTensor) and y.layout == layout, f"{name}: output split {y!r}"
        ref_leaf = tp_gpu.tensor(x, requires_grad=True)
        ref_y = ref(ref_leaf, mask)
        np.testing.assert_allclose(host(sp.backend, y), host(ref.backend, ref_y), **TOL, err_msg=f"{name} y")
        y.backward(_split(sp, g) if sharded_input else g)
        dx = leaf.grad
        assert isinstance(dx, ShardedTensor) == sharded_input, f"{name}: dX {dx!r}"
        ref_y.backward(g)
        ref_dx = host(ref.backend, ref_leaf.grad)
        np.testing.assert_allclose(host(sp.backend, dx), ref_dx, **TOL, err_msg=f"{name} step {step} dX")
    sp_grads = sp.grads()  # collective
    for key, value in ref.grads().items():
        np.testing.assert_allclose(sp_grads[key], value, **TOL, err_msg=f"{name} grad {key}")
    checks.append(name)


def _split(layer, a: np.ndarray) -> ShardedTensor:
    """``a`` (the same on every rank) split along the sequence: this rank's slices."""
    return regions.scatter_to_sequence_parallel_region(a, layer.group, np.float64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--devices", type=int, default=None)
    args = parser.parse_args()
    comm = get_communicator("mpi")
    rng = np.random.default_rng(1234)  # the same stream on every rank
    checks: list = []
    check_collectives(
        TensorParallelConfig(
            n_workers=2 * comm.size, backend=args.backend, devices=args.devices, comm="mpi", dtype="float64"
        ),
        rng,
        checks,
    )
    for p in (comm.size, 2 * comm.size):
        for pre_norm in (False, True):
            for seq, sharded_input in ((7, True), (2 * p + 1, False), (1, True)):
                check_layer(args, p, pre_norm, seq, sharded_input, rng, checks)
    comm.barrier()
    print(f"rank {comm.rank}: {len(checks)} checks passed", flush=True)


if __name__ == "__main__":
    main()
