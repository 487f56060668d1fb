"""Training while a checkpoint saves in the background: the step time, and the time until on disk.

A model of about 150 MB of float32 weights (``--layers`` ParallelMLP blocks of ``--hidden`` x
``--ffn`` and a vocabulary-split head with the vocab-parallel loss, ``--workers`` workers on the
NumPy backend, SGD with momentum, so the checkpoint also holds the momentum: about twice the
weights) trains on random tokens. Rounds alternate, in one run:

* **no save**: ``--steps`` training steps;
* **background save** (``save_checkpoint(..., background=True)``, per format): the call (the host
  copies: training is blocked for that long), then training steps until the save is on disk, then
  up to ``--steps`` steps in all; ``handle.seconds`` is the time from the call until the file was
  on disk (fsync'ed and renamed);
* **synchronous save**: ``save_checkpoint`` alone, training blocked for all of it.

The table gives medians over ``--rounds`` rounds: the step time without a save and while a write
runs, the time training is blocked per save, the time until the save is on disk, and the training
time a save costs in all (blocked + the extra time of the steps that overlapped the write) against a
synchronous save. BLAS is pinned to ``--threads`` threads; the writer thread needs a core of its own
to stay out of the step's way.

    python benchmarks/checkpoint_background.py          # writes results/checkpoint-background-t1-<date>.md
    python benchmarks/checkpoint_background.py --out -  # print only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: import tp_gpu from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (puts the checkout's src/ on the path)

from benchmarks import harness, machine
from tp_gpu import (
    SGD,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    Sequential,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    save_checkpoint,
)
from tp_gpu.backends import get_backend

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = {"single file": {}, "sharded folder": {"sharded": True}}


def build(args: argparse.Namespace) -> Sequential:
    config = TensorParallelConfig(n_workers=args.workers, backend="numpy", dtype="float32")
    head = dataclasses.replace(config, gather_output=False)
    return Sequential(
        ParallelEmbedding(args.vocab, args.hidden, config, seed=1),
        *[ParallelMLP(args.hidden, args.ffn, args.hidden, config, seed=2 + i) for i in range(args.layers)],
        ColumnParallelLinear(args.hidden, args.vocab, head, seed=99),
    )


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model = build(args)
        self.optimizer = SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.loss_fn = VocabParallelCrossEntropy()
        self.args, self.step_count = args, 0

    def step(self) -> float:
        """One training step; its seconds."""
        ids = np.random.default_rng(self.step_count).integers(
            0, self.args.vocab, (self.args.batch, self.args.seq)
        )
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.loss_fn(self.model(ids), (ids + 1) % self.args.vocab).backward()
        self.optimizer.step()
        self.step_count += 1
        return time.perf_counter() - start

    def nbytes(self) -> int:
        return sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize for p in self.model.parameters())


def background_round(trainer: Trainer, path: Path, steps: int, keywords: Dict[str, Any]) -> Dict[str, Any]:
    start = time.perf_counter()
    handle = save_checkpoint(path, trainer.model, optimizer=trainer.optimizer, background=True, **keywords)
    assert handle is not None
    blocked = time.perf_counter() - start
    during: List[float] = []
    after: List[float] = []
    while len(during) + len(after) < steps or not handle.done():
        writing = not handle.done()  # the step starts while the write runs: it overlaps it
        (during if writing else after).append(trainer.step())
    handle.wait()
    return {"blocked": blocked, "on_disk": handle.seconds, "during": during, "after": after}


def sync_round(trainer: Trainer, path: Path, keywords: Dict[str, Any]) -> float:
    start = time.perf_counter()
    save_checkpoint(path, trainer.model, optimizer=trainer.optimizer, **keywords)
    return time.perf_counter() - start


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir())
    return path.stat().st_size


def run(args: argparse.Namespace) -> Dict[str, Any]:
    trainer = Trainer(args)
    for _ in range(2):
        trainer.step()  # warm-up
    base: List[float] = []
    rows: Dict[str, Dict[str, List[Any]]] = {
        name: {"blocked": [], "on_disk": [], "during": [], "sync": [], "size": []} for name in FORMATS
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for _ in range(args.rounds):
            base.extend(trainer.step() for _ in range(args.steps))
            for name, keywords in FORMATS.items():
                path = Path(folder) / ("bg.safetensors" if not keywords else "bg")
                outcome = background_round(trainer, path, args.steps, keywords)
                row = rows[name]
                row["blocked"].append(outcome["blocked"])
                row["on_disk"].append(outcome["on_disk"])
                row["during"].append(outcome["during"])
                sync_path = Path(folder) / ("sync.safetensors" if not keywords else "sync")
                row["sync"].append(sync_round(trainer, sync_path, keywords))
                row["size"].append(size_of(sync_path))
    return {"base": base, "rows": rows, "weights": trainer.nbytes()}


def report(args: argparse.Namespace, result: Dict[str, Any], info: Dict[str, Any]) -> str:
    med = statistics.median
    base = med(result["base"])
    lines = [
        "# Background checkpoint saves: training step time while a save runs",
        "",
        f"{info['date']}, {info['cpu']} ({info['cores']} cores, {info['memory_gib']:.0f} GiB), "
        f"NumPy {info['numpy']} ({info['blas'].get('name', '?')} {info['blas'].get('core', '')}), "
        f"BLAS threads {args.threads}, "
        f"tp_gpu {info['tp_gpu_source'].get('commit', '?')[:10]}.",
        "",
        f"Model: embedding + {args.layers} x ParallelMLP({args.hidden}, {args.ffn}) + head, vocabulary "
        f"{args.vocab}, {args.workers} workers (NumPy), float32: {result['weights'] / 1e6:.0f} MB of "
        f"weights; SGD with momentum (the checkpoint holds both). Batch {args.batch} x {args.seq} tokens. "
        f"Written to {args.dir or tempfile.gettempdir()} (fsync'ed). Medians over {args.rounds} rounds; "
        f"step time without a save: **{base * 1e3:.0f} ms** (spread {min(result['base']) * 1e3:.0f}-"
        f"{max(result['base']) * 1e3:.0f} ms over {len(result['base'])} steps).",
        "",
        "| format | checkpoint | step while writing | steps overlapped | training blocked | on disk after "
        "| training time lost | synchronous save |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        steps = [t for one in row["during"] for t in one]
        during = med(steps) if steps else float("nan")
        overlapped = len(steps) / args.rounds
        lost = med([b + sum(t - base for t in one) for b, one in zip(row["blocked"], row["during"])])
        lines.append(
            f"| {name} | {med(row['size']) / 1e6:.0f} MB | {during * 1e3:.0f} ms ({during / base:.2f}x) "
            f"| {overlapped:.1f} | {med(row['blocked']):.2f} s | {med(row['on_disk']):.2f} s "
            f"| {lost:.2f} s | {med(row['sync']):.2f} s |"
        )
    lines += [
        "",
        "*step while writing*: the median step that started while the write ran (ratio to the step "
        "without a save); *steps overlapped*: how many started while it ran, per save; *training "
        "blocked*: the `save_checkpoint(..., background=True)` call (host copies); *on disk after*: from "
        "that call until the checkpoint was fsync'ed and renamed (`handle.seconds`); *training time lost*: "
        "blocked + the overlapped steps' extra time over a step without a save; "
        "*synchronous save*: `save_checkpoint` without `background`, which blocks training for all of it.",
        "",
    ]
    return "\n".join(lines)


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp dir)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the .md, or - to print only")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    note = harness.pin_threads(args.threads, None, on_gpu=False)
    if note:
        print(note, file=sys.stderr)
    info = machine.machine_info(get_backend("numpy"), None)
    text = report(args, run(args), info)
    print(text)
    if args.out != "-":
        path = (
            Path(args.out) / f"checkpoint-background-t{args.threads}-{datetime.date.today().isoformat()}.md"
        )
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
