"""Run under mpirun (or plain python for one process): sharded checkpoints across process counts.

``save DIR``: a Llama-shaped ``DecoderForCausalLM`` (grouped-query attention, float64, NumPy) at
``--p`` workers (8) over the ranks trains ``STEPS`` Adam steps, is saved sharded to ``DIR/sharded``
and single-file to ``DIR/single.safetensors``, and trains 5 more steps: the uninterrupted run. Rank
0 writes the logical weights at the save (``DIR/saved.npz``) and after the 5 steps
(``DIR/after.npz``), and ``DIR/world`` (the saver's process count). It also measures, with
tracemalloc, the extra host memory of the sharded save on each rank against the rank's own shard
bytes, and prints them.

``load DIR...``: for every ``--p`` that the process count divides, a fresh model and optimizer load
``DIR/sharded``: the weights must equal ``saved.npz`` bit for bit; then 5 steps: the weights must
equal, bit for bit, those of a twin resumed from ``single.safetensors`` (the single-file format,
which gathers), and those of the uninterrupted run where the split is the saver's.

``killed DIR``: save once, train a step, save again; with ``--kill-rank R`` rank R dies with
``os._exit`` in the middle of writing its rank file. Run ``load`` on ``DIR`` afterwards: the first
save is what loads.

``full DIR``: the same, but rank ``--kill-rank`` runs out of disk space writing its file: every rank
raises (that rank the ENOSPC CheckpointFileError, the others a CheckpointError naming it), and the
folder holds exactly the first save's files.

``corrupt DIR`` (2 processes, after ``save DIR`` over 2): one byte of rank 1's file is flipped; a load
at 8 workers raises on both ranks (only rank 1 reads that byte) and changes no rank's model.

Prints ``rank R: N checks passed`` and exits 0, or raises.
"""

from __future__ import annotations

import argparse
import errno
import os
import struct
import tracemalloc

import numpy as np

import tp_gpu
import tp_gpu.checkpoint_pieces as pieces
from tp_gpu import (
    Adam,
    CheckpointError,
    TensorParallelConfig,
    get_communicator,
    load_checkpoint,
    save_checkpoint,
)
from tp_gpu.errors import CheckpointFileError
from tp_gpu.models import DecoderConfig, DecoderForCausalLM

VOCAB, STEPS, MORE = 2048, 3, 5  # about 660,000 parameters: 16 MB with Adam's state


def make(p: int, comm: str):
    config = DecoderConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,  # replicated at 8 workers, split at 1 and 3 (by heads)
            "max_position_embeddings": 64,
        }
    )
    tp = TensorParallelConfig(n_workers=p, backend="numpy", dtype="float64", comm=comm)
    model = DecoderForCausalLM(config, tp, seed=3)
    return model, Adam(model.parameters(), lr=0.01)


def train(model, optimizer, start: int, stop: int) -> None:
    loss_fn = tp_gpu.VocabParallelCrossEntropy()
    for step in range(start, stop):
        rng = np.random.default_rng([5, step])
        ids = rng.integers(0, VOCAB, size=(2, 7))
        optimizer.zero_grad()
        loss_fn(model(ids), rng.integers(0, VOCAB, size=(2, 7))).backward()
        optimizer.step()


def own_bytes(model, optimizer) -> int:
    """Bytes of the pieces this rank writes: its blocks of split tensors (and, on rank 0, whole ones)."""
    total = 0
    for p in model.parameters():
        whole = p.layout is None or p.axis is None
        if whole and p.comm.rank != 0:
            continue
        blocks = [p.blocks[p.block_devices[0]]] if whole else list(p.blocks.values())
        total += sum(b.nbytes for b in blocks) * (1 + len(optimizer.STATE_KEYS))
    return total


def save(args, comm) -> int:
    model, optimizer = make(args.p, args.comm)
    train(model, optimizer, 0, STEPS)
    folder = os.path.join(args.dirs[0], "sharded")
    save_checkpoint(folder, model, optimizer=optimizer, sharded=True)  # warm-up: lazy imports, caches
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    save_checkpoint(folder, model, optimizer=optimizer, sharded=True)
    extra = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    mine = own_bytes(model, optimizer)
    model_bytes = sum(int(np.prod(p.shape)) * 8 for p in model.parameters()) * 3
    print(f"rank {comm.rank}: sharded save peak extra {extra} bytes, own shards {mine}, model {model_bytes}")
    assert extra < 1.1 * mine + (256 << 10), (extra, mine)
    checks = 1
    if comm.size > 1:
        assert extra < 0.8 * model_bytes, (extra, model_bytes)
        checks += 1
    save_checkpoint(os.path.join(args.dirs[0], "single.safetensors"), model, optimizer=optimizer)
    saved = model.state_dict()
    train(model, optimizer, STEPS, STEPS + MORE)
    after = model.state_dict()
    if comm.rank == 0:
        np.savez(os.path.join(args.dirs[0], "saved.npz"), **saved)
        np.savez(os.path.join(args.dirs[0], "after.npz"), **after)
        with open(os.path.join(args.dirs[0], "world"), "w") as fh:
            fh.write(str(comm.size))
    return checks


def killed(args, comm) -> int:
    model, optimizer = make(args.p, args.comm)
    train(model, optimizer, 0, STEPS)
    folder = os.path.join(args.dirs[0], "sharded")
    save_checkpoint(folder, model, optimizer=optimizer, sharded=True)
    saved = model.state_dict()
    if comm.rank == 0:
        np.savez(os.path.join(args.dirs[0], "saved.npz"), **saved)
    train(model, optimizer, STEPS, STEPS + 1)
    if comm.rank == args.kill_rank:
        real = pieces.write_rank_file

        def dying(path, arrays, metadata):
            real(path, dict(list(arrays.items())[: len(arrays) // 2]), metadata)  # half a file
            os._exit(3)

        pieces.write_rank_file = dying
    save_checkpoint(folder, model, optimizer=optimizer, sharded=True)
    raise AssertionError("the killed save returned")


def full(args, comm) -> int:
    """Rank ``--kill-rank``'s disk is full during the second save: every rank raises, the first stays."""
    model, optimizer = make(args.p, args.comm)
    train(model, optimizer, 0, STEPS)
    folder = os.path.join(args.dirs[0], "sharded")
    save_checkpoint(folder, model, optimizer=optimizer, sharded=True)
    first, saved = sorted(os.listdir(folder)), model.state_dict()
    train(model, optimizer, STEPS, STEPS + 1)
    if comm.rank == args.kill_rank:

        def full_disk(path, arrays, metadata):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        pieces.write_rank_file = full_disk
    try:
        save_checkpoint(folder, model, optimizer=optimizer, sharded=True)
    except CheckpointFileError as exc:
        assert comm.rank == args.kill_rank and exc.errno == errno.ENOSPC, exc
    except CheckpointError as exc:
        assert comm.rank != args.kill_rank and f"rank {args.kill_rank} failed" in str(exc), exc
    else:
        raise AssertionError("the save with a full disk succeeded")
    comm.barrier()
    assert sorted(os.listdir(folder)) == first, (sorted(os.listdir(folder)), first)  # nothing of it stays
    fresh, fresh_optimizer = make(args.p, args.comm)
    load_checkpoint(folder, fresh, optimizer=fresh_optimizer)
    for name, value in fresh.state_dict().items():
        assert np.array_equal(value, saved[name]), name
    return 3


def corrupt(args, comm) -> int:
    """One byte of rank 1's file flipped: at 8 workers over 2 processes only loading rank 1 reads it,
    yet every rank raises and no rank's model changes."""
    folder = os.path.join(args.dirs[0], "sharded")
    if comm.rank == 0:
        path = next(os.path.join(folder, n) for n in os.listdir(folder) if n.startswith("rank-1-"))
        with open(path, "r+b") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + length + 100)
            byte = fh.read(1)
            fh.seek(8 + length + 100)
            fh.write(bytes([byte[0] ^ 1]))
    comm.barrier()
    model, _ = make(args.p, args.comm)
    before = model.state_dict()
    try:
        load_checkpoint(folder, model)
    except CheckpointError as exc:
        expected = "fails its SHA-256 check" if comm.rank == 1 else "rank 1 failed to load"
        assert expected in str(exc), exc
    else:
        raise AssertionError("the corrupted checkpoint loaded")
    for name, value in model.state_dict().items():
        assert np.array_equal(value, before[name]), name
    return 2


def load(args, comm) -> int:
    checks = 0
    for directory in args.dirs:
        saved = dict(np.load(os.path.join(directory, "saved.npz")))
        after = dict(np.load(os.path.join(directory, "after.npz"))) if args.resume else None
        with open(os.path.join(directory, "world")) as fh:
            saver_world = int(fh.read())
        for p in args.loads:
            if p % comm.size:
                continue
            model, optimizer = make(p, args.comm)
            load_checkpoint(os.path.join(directory, "sharded"), model, optimizer=optimizer)
            state = model.state_dict()
            assert state.keys() == saved.keys()
            for name, value in saved.items():
                assert np.array_equal(state[name], value), (directory, p, name)
            checks += 1
            if after is None:
                continue
            twin, twin_optimizer = make(p, args.comm)
            load_checkpoint(os.path.join(directory, "single.safetensors"), twin, optimizer=twin_optimizer)
            train(model, optimizer, STEPS, STEPS + MORE)
            train(twin, twin_optimizer, STEPS, STEPS + MORE)
            state, twin_state = model.state_dict(), twin.state_dict()
            for name, value in twin_state.items():
                assert np.array_equal(state[name], value), (directory, p, name)
            checks += 1
            if p == args.p and comm.size == saver_world:  # the saver's split: the uninterrupted run
                for name, value in after.items():
                    assert np.array_equal(state[name], value), (directory, p, name)
                checks += 1
    return checks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "load", "killed", "full", "corrupt"])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--loads", type=int, nargs="*", default=[1, 3, 8])
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    args = parser.parse_args()
    args.comm = "mpi" if "OMPI_COMM_WORLD_SIZE" in os.environ else "local"
    comm = get_communicator(args.comm)
    checks = {"save": save, "load": load, "killed": killed, "full": full, "corrupt": corrupt}[args.mode](
        args, comm
    )
    print(f"rank {comm.rank}: {checks} checks passed", flush=True)


if __name__ == "__main__":
    main()
