"""The training-step benchmark of issue 17: ``python -m benchmarks.training_step --help``.

For each thread count and dtype: the whole step of the small language model (:mod:`.step_case`) at
every worker count, dense and torch in the same shuffled rounds, each phase timed; then the Adam and
embedding-backward micro-benchmarks (:mod:`.step_micro`). JSON, Markdown and a plot of the phases go
to ``benchmarks/results/local/`` unless ``--out`` says otherwise; they are rewritten after every case.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tp_gpu.backends import get_backend

from . import harness, machine, step_micro
from .cli import LOCAL_RESULTS, positive_int
from .report import file_stem
from .step_case import PHASES, StepShape, build_sides, check_sides, step_functions
from .step_report import Record, timed_record, write_results

#: Issue 17's language model: 4,096 ids, a 50,000 x 512 table and head, an MLP 512 -> 2048 -> 512.
DEFAULT_SHAPE = "4096x50000x512x2048"
QUICK_SHAPE = "1024x8192x256x1024"
DEFAULT_EMBED_IDS = (256, 16_384, 1_000_000)


def _help(text: str, **keywords: Any) -> dict[str, Any]:
    return {"help": text, **keywords}


PARTS = ("step", "adam", "embedding")
OPTIONS: dict[str, dict[str, Any]] = {
    "--shape": _help(
        f"IDSxVOCABxDIMxHIDDEN of the step (default {DEFAULT_SHAPE}; --quick {QUICK_SHAPE})",
        type=StepShape.parse,
    ),
    "--quick": _help("small shape, the MLP's Adam, 256 and 16,384 ids, 3 rounds", action="store_true"),
    "--workers": _help("worker counts (default 1 2 4 8)", type=positive_int, nargs="+", default=[1, 2, 4, 8]),
    "--dtype": _help(
        "dtypes (default float32 float64)", nargs="+", choices=("float32", "float64"),
        default=["float32", "float64"],
    ),
    "--threads": _help(
        "BLAS and torch threads, a run each (default 1 2)", type=positive_int, nargs="+", default=[1, 2]
    ),
    "--parts": _help("what to run (default all)", nargs="+", choices=PARTS, default=list(PARTS)),
    "--adam-sets": _help(
        f"Adam parameter sets, of {list(step_micro.ADAM_SETS)} (default lm mlp; --quick mlp)", nargs="+"
    ),
    "--embed-ids": _help(
        "id counts of the embedding backward (default 256 16384 1000000)", type=positive_int, nargs="+"
    ),
    "--embed-table": _help("VOCABxDIM of the embedding backward (default 50000x512)", default="50000x512"),
    "--no-torch": _help("do not time PyTorch", action="store_true"),
    "--repeat": _help("timed rounds, at least (default 5; --quick 3)", type=positive_int),
    "--warmup": _help("untimed runs of each side first (default 1)", type=positive_int, default=1),
    "--max-time": _help(
        "seconds after which a comparison stops, 3 rounds at least (default 300)", type=float, default=300.0
    ),
    "--retries": _help("re-timings of a disturbed comparison (default 1)", type=int, default=1),
    "--out": _help("output folder (default benchmarks/results/local)", type=Path, default=LOCAL_RESULTS),
    "--force": _help("overwrite an existing result outside the default folder", action="store_true"),
    "--render": _help("time nothing: redraw the table and plot of a JSON", type=Path, metavar="JSON"),
}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training_step",
        description="Time a whole training step (embedding, MLP, head, vocab-parallel loss, backward, Adam) "
        "at several worker counts against dense NumPy and PyTorch, phase by phase, and the Adam and "
        "embedding-backward micro-benchmarks.",
    )
    for flag, keywords in OPTIONS.items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args(argv)
    args.shape = args.shape or StepShape.parse(QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.adam_sets = args.adam_sets or (["mlp"] if args.quick else ["lm", "mlp"])
    unknown = [name for name in args.adam_sets if name not in step_micro.ADAM_SETS]
    if unknown:
        parser.error(f"unknown Adam set(s) {unknown}; expected some of {list(step_micro.ADAM_SETS)}")
    args.embed_ids = args.embed_ids or list(DEFAULT_EMBED_IDS[: 2 if args.quick else 3])
    return args


def timing(args: argparse.Namespace) -> harness.Timing:
    return harness.Timing(
        repeat=args.repeat, warmup=args.warmup, max_time=args.max_time, min_time=0.0, retries=args.retries
    )


def time_step(
    sides: dict, timing_: harness.Timing
) -> tuple[harness.Timed, dict[str, dict[str, list[float]]]]:
    """Every side's step in the same shuffled rounds; and each kept run's phases, per side.

    The harness keeps only each run's seconds; the timer here also keeps the run's phases under
    (function, seconds), so that the kept attempt's runs find theirs."""
    fns = step_functions(sides)
    side_of = {fn: sides[name] for name, fn in fns.items()}
    timer = harness.cpu_timer(lambda: None)
    laps: dict[tuple, dict[str, float]] = {}

    def once(fn: Any) -> float:
        seconds = timer(fn)
        laps[(fn, seconds)] = side_of[fn].clock.laps
        return seconds

    timed = harness.time_with_retries(fns, once, timing_)
    phases = {
        name: {ph: [laps[(fns[name], s)].get(ph, 0.0) for s in times] for ph in PHASES}
        for name, times in timed.times.items()
    }
    return timed, phases


def run_step(args: argparse.Namespace, dtype: str, threads: int, torch: Any) -> Record:
    """The training step at every worker count, dense and torch, checked first, then timed."""
    shape = args.shape
    sides, weights = build_sides(shape, dtype, args.workers, torch)
    check = check_sides(sides, weights, shape, dtype)  # raises StepMismatch on a wrong TP step
    timed, phases = time_step(sides, timing(args))
    fields = {
        "case": "training step", "dtype": dtype, "threads": threads, "shape": shape.describe(),
        "ids": shape.ids, "vocab": shape.vocab, "dim": shape.dim, "hidden": shape.hidden,
        "parameters": shape.parameters(), "check": check,
    }  # fmt: skip
    return timed_record(fields, timed, phases)


def run_micro(args: argparse.Namespace, dtype: str, threads: int, torch: Any) -> list[Record]:
    """The Adam sets and the embedding backward at each id count."""
    records = []
    base = {"dtype": dtype, "threads": threads}
    if "adam" in args.parts:
        for name in args.adam_sets:
            fns, numbers = step_micro.adam_functions(name, dtype, torch)
            label = f"{name}: {step_micro.ADAM_SETS[name][0]} ({numbers / 1e6:.1f}M)"
            fields = {"case": "adam", "label": label, "set": name, "numbers": numbers, **base}
            records.append(timed_record(fields, step_micro.time_micro(fns, timing(args))))
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
            records.append(timed_record(fields, step_micro.time_micro(fns, timing(args))))
            del fns
            gc.collect()
    return records


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    options["shape"] = vars(args.shape)
    return options


def render(path: Path) -> int:
    data = json.loads(path.read_text())
    paths = write_results(path.with_suffix(""), data["machine"], data["options"], data["results"])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    torch = machine.import_torch(not args.no_torch)
    meta = machine.machine_info(get_backend("numpy"), torch)
    pinned = "/".join(map(str, args.threads)) + " (pinned per table)"
    meta["blas"]["threads"] = pinned  # BLAS, torch and tp_gpu's own host threads, set for each table
    meta["torch_threads"] = pinned if torch is not None else None
    stem = args.out / ("step-" + file_stem(meta, args.quick))
    if (
        not args.force
        and stem.parent.resolve() != LOCAL_RESULTS.resolve()
        and stem.with_suffix(".json").exists()
    ):
        print(f"error: {stem.with_suffix('.json')} exists; pass --force or another --out", file=sys.stderr)
        return 2
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
                write_results(stem, meta | {"complete": False}, options_record(args), records, plot=False)
            records += run_micro(args, dtype, threads, torch)
            write_results(stem, meta | {"complete": False}, options_record(args), records, plot=False)
    meta.update(complete=True, load_avg_end=list(os.getloadavg()), finished=machine.now())
    paths = write_results(stem, meta, options_record(args), records)
    print(paths[1].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
