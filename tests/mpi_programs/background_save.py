"""Run under mpirun: a background checkpoint save while every rank goes on training.

    mpirun -n 2 python tests/mpi_programs/background_save.py FOLDER [--sharded] [--fail-rank R]

Every rank trains a small float64 model (4 workers over the ranks, comm="mpi") for 2 steps,
starts ``save_checkpoint(..., background=True)`` and trains 3 more steps while the write is held
at a gate (so it is certainly in flight); ``wait(timeout=0.5)`` with only rank 0's gate closed must
raise TimeoutError on both ranks; then the gates open and ``wait()`` returns. The file must
hold the weights of the call: a fresh model (2 workers) loads it, equals them bit for bit, and
resuming from it replays the same 3 steps. Every communicator call is checked to run in the main
thread: the writing thread must run none.

With ``--fail-rank R`` a synchronous save comes first (after 1 step), then the background write
fails on rank R (ENOSPC): nothing waits for it; the next ``save_checkpoint`` must raise on every
rank (the original CheckpointFileError on rank R, a CheckpointError naming rank R elsewhere), not
write its file, and the previous checkpoint must still load, with the weights of the first save.
Each rank prints what happened; tests/test_checkpoint_background_mpi.py reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import threading

import numpy as np

import tp_gpu.checkpoint as checkpoint_module
from tp_gpu import (
    SGD,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    Sequential,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    get_communicator,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

parser = argparse.ArgumentParser()
parser.add_argument("folder")
parser.add_argument("--sharded", action="store_true")
parser.add_argument("--fail-rank", type=int, default=-1)
args = parser.parse_args()

VOCAB, HIDDEN, FFN = 11, 8, 12
comm = get_communicator("mpi")
rank = comm.rank
outside_main: list[str] = []
for method in (
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_gather_object",
    "broadcast_object",
    "barrier",
):
    real = getattr(comm, method)

    def checked(*a, _real=real, _name=method, **k):
        if threading.current_thread() is not threading.main_thread():
            outside_main.append(_name)
        return _real(*a, **k)

    setattr(comm, method, checked)


def make_model(p: int) -> Sequential:
    config = TensorParallelConfig(n_workers=p, backend="numpy", comm="mpi", dtype="float64")
    return Sequential(
        ParallelEmbedding(VOCAB, HIDDEN, config, seed=1),
        ParallelMLP(HIDDEN, FFN, HIDDEN, config, seed=3),
        ColumnParallelLinear(HIDDEN, VOCAB, dataclasses.replace(config, gather_output=False), seed=5),
    )


def train(model, optimizer, start: int, stop: int) -> list[float]:
    losses, loss_fn = [], VocabParallelCrossEntropy()
    for step in range(start, stop):
        ids = np.random.default_rng([3, step]).integers(0, VOCAB, size=(2, 5))
        optimizer.zero_grad()
        loss = loss_fn(model(ids), (2 * ids + 1) % VOCAB)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses


def say(text: str) -> None:
    """One line, in one write: the ranks' lines never interleave inside a line."""
    sys.stdout.write(f"rank {rank}: {text}\n")
    sys.stdout.flush()


def weights(model) -> dict:
    return {name: p.full() for name, p in model.named_parameters()}


gate = threading.Event()
failing = threading.Event()  # set: the write fails on --fail-rank


def no_space(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def gated(prepared_write):
    """The prepared save's write, held until the gate opens; the single-file write fails on
    --fail-rank there (its other ranks write nothing, so the failure is injected around it)."""

    def write(self):
        gate.wait(60)
        if rank == args.fail_rank and failing.is_set() and not args.sharded:
            raise checkpoint_module.file_error(self.path, "write", no_space(self.path))
        prepared_write(self)

    return write


if args.sharded:
    from tp_gpu import checkpoint_pieces, checkpoint_sharded

    real_rank_file = checkpoint_pieces.write_rank_file

    def rank_file(path, *a, **k):  # the disk of --fail-rank is full: its own file fails
        if rank == args.fail_rank and failing.is_set():
            raise no_space(path)
        return real_rank_file(path, *a, **k)

    checkpoint_pieces.write_rank_file = rank_file
    checkpoint_sharded.PreparedSave.write = gated(checkpoint_sharded.PreparedSave.write)  # type: ignore[method-assign]
    name = "model"
else:
    checkpoint_module.SingleFileSave.write = gated(checkpoint_module.SingleFileSave.write)  # type: ignore[method-assign]
    name = "model.safetensors"
path = os.path.join(args.folder, name)

model = make_model(4)
optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
train(model, optimizer, 0, 1)
previous = weights(model)
if args.fail_rank >= 0:
    gate.set()
    save_checkpoint(path, model, optimizer=optimizer, sharded=args.sharded)  # the previous checkpoint
    gate.clear()
    failing.set()
train(model, optimizer, 1, 2)
at_call = weights(model)
handle = save_checkpoint(path, model, optimizer=optimizer, sharded=args.sharded, background=True)
during = train(model, optimizer, 2, 5)
in_flight = not handle.done()
say(f"in flight during 3 steps: {in_flight}")
if args.fail_rank < 0:  # only rank 0 is still writing: wait(timeout) must time out on every rank
    if rank != 0:
        gate.set()
    try:
        handle.wait(timeout=0.5)
        say("wait(timeout) returned")
    except TimeoutError:
        say(f"wait(timeout) raised TimeoutError; done here: {handle.done()}")
gate.set()

if args.fail_rank < 0:
    handle.wait()
    say(f"wait returned, on disk after {handle.seconds:.3f} s")
else:
    other = os.path.join(args.folder, "other" + ("" if args.sharded else ".safetensors"))
    try:
        save_checkpoint(other, model, sharded=args.sharded)
        say("the next save did not raise")
    except Exception as exc:  # noqa: BLE001
        say(f"next save raised {type(exc).__name__}: {exc}")
    say(f"next save's target exists: {os.path.exists(other)}")
    try:
        handle.wait()  # reported already: the same error again, without a collective
    except Exception as exc:  # noqa: BLE001
        say(f"wait raised {type(exc).__name__} again")

fresh = make_model(2)
fresh_optimizer = SGD(fresh.parameters(), lr=0.1, momentum=0.9)
load_checkpoint(path, fresh, optimizer=fresh_optimizer)
loaded = weights(fresh)
expected, what = (
    (at_call, "the weights at the call") if args.fail_rank < 0 else (previous, "the previous save")
)
same = all(loaded[n].tobytes() == expected[n].tobytes() for n in expected)
say(f"loaded equals {what}: {same}")
if args.fail_rank < 0:
    say(f"resumed steps equal: {train(fresh, fresh_optimizer, 2, 5) == during}")
    if not args.sharded and rank == 0:
        say(f"tensors in the file: {len(read_checkpoint(path).tensors)}")
say(f"communicator calls outside the main thread: {len(outside_main)}")
