"""The training-step benchmark: ``python -m benchmarks.training_step --help``.

For each thread count and dtype: the whole step of the small language model (:mod:`.step_case`) at
every worker count, dense and torch in the same shuffled rounds, each phase timed; then the Adam and
embedding-backward micro-benchmarks (:mod:`.step_micro`). Targets, tables and the phase plot are in
:mod:`.step_report`; the command line, the results folder and the files come from :mod:`.skeleton`.
JSON, Markdown and the plot go to ``benchmarks/results/local/`` unless ``--out`` says otherwise; they
are rewritten after every case.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from typing import Any

from tp_gpu.backends import get_backend

from . import harness, machine, skeleton, step_micro
from .phases import time_phases
from .report import Record, file_stem, sides_record
from .skeleton import option, positive_int
from .step_case import PHASES, StepShape, build_sides, check_sides, step_functions
from .step_report import REPORT

#: The language model of the speed targets: 4,096 ids, a 50,000 x 512 table and head, an MLP
#: 512 -> 2048 -> 512.
DEFAULT_SHAPE = "4096x50000x512x2048"
QUICK_SHAPE = "1024x8192x256x1024"
DEFAULT_EMBED_IDS = (256, 16_384, 1_000_000)

PARTS = ("step", "adam", "embedding")
TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(5, 3), warmup=1, max_time=(300.0, 300.0), min_time=(0.0, 0.0), retries=(1, 1)
)
OPTIONS: skeleton.Options = {
    "--shape": option(
        f"IDSxVOCABxDIMxHIDDEN of the step (default {DEFAULT_SHAPE}; --quick {QUICK_SHAPE})",
        type=StepShape.parse,
    ),
    "--quick": option("small shape, the MLP's Adam, 256 and 16,384 ids, 3 rounds", action="store_true"),
    "--workers": skeleton.workers_option([1, 2, 4, 8]),
    "--dtype": option(
        "dtypes (default float32 float64)", nargs="+", choices=("float32", "float64"),
        default=["float32", "float64"],
    ),
    "--threads": option(
        "BLAS and torch threads, a run each (default 1 2)", type=positive_int, nargs="+", default=[1, 2]
    ),
    "--parts": option("what to run (default all)", nargs="+", choices=PARTS, default=list(PARTS)),
    "--adam-sets": option(
        f"Adam parameter sets, of {list(step_micro.ADAM_SETS)} (default lm mlp; --quick mlp)", nargs="+"
    ),
    "--embed-ids": option(
        "id counts of the embedding backward (default 256 16384 1000000)", type=positive_int, nargs="+"
    ),
    "--embed-table": option("VOCABxDIM of the embedding backward (default 50000x512)", default="50000x512"),
    "--no-torch": option("do not time PyTorch", action="store_true"),
    **TIMING,
    **skeleton.output_options("plot"),
}  # fmt: skip

PROGRAM = skeleton.Program(
    prog="python -m benchmarks.training_step",
    description="Time a whole training step (embedding, MLP, head, vocab-parallel loss, backward, Adam) "
    "at several worker counts against dense NumPy and PyTorch, phase by phase, and the Adam and "
    "embedding-backward micro-benchmarks.",
    options=OPTIONS,
    quick_defaults=TIMING_QUICK | {
        "shape": (StepShape.parse(DEFAULT_SHAPE), StepShape.parse(QUICK_SHAPE)),
        "adam_sets": (["lm", "mlp"], ["mlp"]),
        "embed_ids": (list(DEFAULT_EMBED_IDS), list(DEFAULT_EMBED_IDS[:2])),
    },
)  # fmt: skip


def time_step(sides: dict, timing: harness.Timing) -> tuple[harness.Timed, dict[str, dict[str, list[float]]]]:
    """Every side's step in the same shuffled rounds; and each kept run's phases, per side."""
    return time_phases(step_functions(sides), {n: s.clock for n, s in sides.items()}, PHASES, timing)


def run_step(args: argparse.Namespace, dtype: str, threads: int, torch: Any) -> Record:
    """The training step at every worker count, dense and torch, checked first, then timed."""
    shape = args.shape
    sides, weights = build_sides(shape, dtype, args.workers, torch)
    check = check_sides(sides, weights, shape, dtype)  # raises StepMismatch on a wrong TP step
    timed, phases = time_step(sides, skeleton.timing(args))
    fields = {
        "case": "training step", "dtype": dtype, "threads": threads, "shape": shape.describe(),
        "ids": shape.ids, "vocab": shape.vocab, "dim": shape.dim, "hidden": shape.hidden,
        "parameters": shape.parameters(), "check": check,
    }  # fmt: skip
    return sides_record(fields, timed, phases)


def run_micro(args: argparse.Namespace, dtype: str, threads: int, torch: Any) -> list[Record]:
    """The Adam sets and the embedding backward at each id count."""
    records = []
    base = {"dtype": dtype, "threads": threads}
    timing = skeleton.timing(args)
    if "adam" in args.parts:
        for name in args.adam_sets:
            fns, numbers = step_micro.adam_functions(name, dtype, torch)
            label = f"{name}: {step_micro.ADAM_SETS[name][0]} ({numbers / 1e6:.1f}M)"
            fields = {"case": "adam", "label": label, "set": name, "numbers": numbers, **base}
            records.append(sides_record(fields, step_micro.time_micro(fns, timing)))
            del fns
            gc.collect()
    if "embedding" in args.parts:
        vocab, dim = (int(v) for v in args.embed_table.lower().split("x"))
        for n_ids in args.embed_ids:
            fns, notes = step_micro.embedding_functions(n_ids, vocab, dim, dtype, torch)
            errors = step_micro.check_embedding(fns, dtype, n_ids)
            label = f"{n_ids} ids, {vocab}x{dim}"
            fields = {"case": "embedding backward", "label": label, "ids": n_ids, "vocab": vocab, "dim": dim}
            fields.update(base, notes=notes, errors=errors)
            records.append(sides_record(fields, step_micro.time_micro(fns, timing)))
            del fns
            gc.collect()
    return records


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The machine record (threads: pinned per table) and torch (or None)."""
    unknown = [name for name in args.adam_sets if name not in step_micro.ADAM_SETS]
    if unknown:
        PROGRAM.parser().error(
            f"unknown Adam set(s) {unknown}; expected some of {list(step_micro.ADAM_SETS)}"
        )
    torch = machine.import_torch(not args.no_torch)
    meta = skeleton.start(get_backend("numpy"), torch, threads=None)
    pinned = "/".join(map(str, args.threads)) + " (pinned per table)"
    meta["blas"]["threads"] = pinned  # BLAS, torch and tp_gpu's own host threads, set for each table
    meta["torch_threads"] = pinned if torch is not None else None
    return meta, torch


def run(args: argparse.Namespace, torch: Any, save: skeleton.Save) -> list[Record]:
    """For each thread count and dtype: the step, then the micro-benchmarks; saved after each."""
    records: list[Record] = []
    harness.warm_up_machine()
    for threads in args.threads:
        note = harness.pin_threads(threads, torch, on_gpu=False)
        if note:
            print(note)
        for dtype in args.dtype:
            if "step" in args.parts:
                records.append(run_step(args, dtype, threads, torch))
                print(f"step {dtype} {threads} thread(s): done", flush=True)
                gc.collect()
                save(records)
            records += run_micro(args, dtype, threads, torch)
            save(records)
    return records


BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, setup=setup, run=run,
    stem=lambda meta, args: "step-" + file_stem(meta, args.quick),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the training-step benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
