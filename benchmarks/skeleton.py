"""The skeleton every benchmark program stands on: command line, machine, runs, results folder, files.

A program declares a :class:`Benchmark`: its options (:class:`Program`, on top of the common ones
built here), how it starts (the machine record, after torch and the BLAS threads; and what its runs
need, such as torch), how it runs its cases into records, and a :class:`Report` (targets, Markdown,
plots) drawn from those records alone.
:func:`main` does the rest, the same way for every program:

* ``--render JSON``: time nothing, redraw the Markdown and plots of an earlier run from its JSON;
* results go to ``<--out>/<stem>.json``, ``.md`` and plots, rewritten after every group of cases (an
  interrupted run keeps what it finished, ``machine.complete`` false); ``--out`` defaults to
  :data:`LOCAL_RESULTS` (ignored by git), where a run replaces one of the same name; anywhere else an
  existing result is kept unless ``--force``;
* ``--update JSON`` (where a program offers it and its report has a case key): replace the cases
  timed in an earlier run's JSON, note the re-run there, and redraw.

Timing itself is :mod:`benchmarks.harness`'s (interleaved shuffled rounds after warm-up); the options
here only say how long: :func:`timing_options` and :func:`timing`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import harness, machine, report
from .report import Record

RESULTS = Path(__file__).resolve().parent / "results"
#: The default output folder: scratch, ignored by git; the committed results are in RESULTS.
LOCAL_RESULTS = RESULTS / "local"

Options = dict[str, dict[str, Any]]  # flag -> add_argument keywords (and "aliases": more flags)
QuickDefaults = dict[str, tuple[Any, Any]]  # option name -> (full run, --quick)

# --------------------------------------------------------------------------- the command line


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def option(text: str, **keywords: Any) -> dict[str, Any]:
    """An entry of an option table: its help ``text`` and ``add_argument`` keywords."""
    return {"help": text, **keywords}


def timing_options(
    repeat: tuple[int, int],
    warmup: int,
    max_time: tuple[float, float],
    min_time: tuple[float, float],
    retries: tuple[int, int],
    repeat_aliases: tuple[str, ...] = (),
) -> tuple[Options, QuickDefaults]:
    """``--repeat --warmup --max-time --min-time --retries``, each default a (full, ``--quick``) pair;
    returns the options and the defaults :meth:`Program.parse` fills in."""

    def pair(values: tuple[Any, Any]) -> str:
        return f"default {values[0]:g}" + (f", quick {values[1]:g}" if values[1] != values[0] else "")

    options = {
        "--repeat": option(
            f"timed rounds, at least ({pair(repeat)})", type=positive_int, aliases=repeat_aliases
        ),
        "--warmup": option(f"untimed runs of each function first (default {warmup})", type=positive_int,
                           default=warmup),
        "--max-time": option(
            f"stop a comparison after this many seconds, 3 rounds at least ({pair(max_time)})", type=float
        ),
        "--min-time": option(f"keep repeating fast cases this many seconds ({pair(min_time)})", type=float),
        "--retries": option(
            f"re-time a comparison whose runs spread too much or whose machine is busy ({pair(retries)})",
            type=int,
        ),
    }  # fmt: skip
    quick = {"repeat": repeat, "max_time": max_time, "min_time": min_time, "retries": retries}
    return options, quick


def workers_option(default: Sequence[int]) -> dict[str, Any]:
    """``--workers N ...``: the worker counts (tp_gpu's ``n_workers``) compared."""
    text = " ".join(map(str, default))
    return option(f"worker counts (default {text})", type=positive_int, nargs="+", default=list(default))


def output_options(plots: str = "plots") -> Options:
    """``--out``, ``--force`` and ``--render``: where the files go, and redrawing them from a JSON."""
    return {
        "--out": option(
            "output folder (default benchmarks/results/local: not committed)",
            type=Path, default=LOCAL_RESULTS,
        ),
        "--force": option("overwrite an existing result outside the default folder", action="store_true"),
        "--render": option(
            f"time nothing: rewrite the Markdown table and the {plots} of an earlier run from its JSON",
            type=Path, metavar="JSON",
        ),
    }  # fmt: skip


@dataclass(frozen=True)
class Program:
    """A benchmark's command line: its option table and the defaults that differ with ``--quick``."""

    prog: str
    description: str
    options: Options
    quick_defaults: QuickDefaults = field(default_factory=dict)

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=self.prog, description=self.description)
        for flag, keywords in self.options.items():
            keywords = dict(keywords)
            parser.add_argument(flag, *keywords.pop("aliases", ()), **keywords)
        return parser

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The options, with the ``--quick`` dependent defaults filled in where not given."""
        args = self.parser().parse_args(argv)
        for name, (full, quick) in self.quick_defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if getattr(args, "quick", False) else full)
        return args


def timing(args: argparse.Namespace) -> harness.Timing:
    """The timing options of the command line (a program without ``--min-time`` gets 0)."""
    return harness.Timing(
        repeat=args.repeat, warmup=args.warmup, max_time=args.max_time,
        min_time=getattr(args, "min_time", 0.0), retries=args.retries,
    )  # fmt: skip


def plain(value: Any) -> Any:
    """``value`` as JSON stores it: paths as text, dataclasses (shapes) as dicts, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    """The options as stored in the JSON."""
    return {name: plain(value) for name, value in vars(args).items()}


# --------------------------------------------------------------------------- the machine


def start(backend: Any, torch: Any, threads: int | None, on_gpu: bool = False) -> dict[str, Any]:
    """Pin the BLAS (and torch's, and tp_gpu's host) threads, then record the machine and print it in
    one line."""
    note = harness.pin_threads(threads, torch, on_gpu=on_gpu)
    if note:
        print(note)
    meta = machine.machine_info(backend, torch)
    blas = meta["blas"]
    torch_note = (
        f"torch {meta['torch']} ({meta['torch_threads']} threads, {meta['torch_blas']})"
        if torch
        else "no torch"
    )
    print(
        f"{meta['cpu']}, {meta['cores']} cores; backend {meta['backend']} {meta['devices']}; "
        f"BLAS {blas['name']} core {blas['core']}, {blas['threads']} threads; {torch_note}; "
        f"tp_gpu from {meta['tp_gpu_source']['path']}"
    )
    return meta


# --------------------------------------------------------------------------- the files


@dataclass
class Report:
    """What a benchmark writes, from its records alone (so that ``--render`` redraws it from a JSON)."""

    targets: Callable[[list[Record]], list[Record]]  # the rows stored under "targets" in the JSON
    markdown: Callable[[dict[str, Any], dict[str, Any], list[Record]], str]  # (machine, options, records)
    plots: Callable[[list[Record], Path], list[Path]]  # draws <stem>-*.png, returns their paths
    key: Callable[[Record], tuple] | None = None  # what identifies a case (for --update)


def write_results(
    rep: Report, stem: Path, meta: dict[str, Any], options: dict[str, Any], records: list[Record],
    plots: bool = True,
) -> list[Path]:  # fmt: skip
    """``<stem>.json``, ``<stem>.md`` and, with ``plots``, the plots; returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [report.rounded(r) for r in records]  # as stored: the table then matches a --render
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    report.write_json(
        json_path, {"machine": meta, "options": options, "targets": rep.targets(records)}, records
    )
    md_path.write_text(rep.markdown(meta, options, records))
    return [json_path, md_path] + (rep.plots(records, stem) if plots else [])


def render(rep: Report, path: Path) -> int:
    """Rewrite ``<stem>.md`` and the plots from ``<stem>.json`` (e.g. after changing how they are drawn)."""
    data = json.loads(path.read_text())
    stem = path.with_suffix("")
    md_path = stem.with_suffix(".md")
    md_path.write_text(rep.markdown(data["machine"], data["options"], data["results"]))
    paths = [md_path] + rep.plots(data["results"], stem)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def update(rep: Report, path: Path, meta: dict[str, Any], records: list[Record]) -> int:
    """Replace ``records``' cases in the run stored at ``path``, note the re-run there, and redraw."""
    if rep.key is None:
        raise ValueError("this benchmark's records have no case key: they cannot be updated")
    key = rep.key
    data = json.loads(path.read_text())
    new = {key(r): r for r in records}
    replaced = []
    for i, old in enumerate(data["results"]):
        if key(old) in new:
            data["results"][i] = dict(new.pop(key(old)), rerun=meta["started"])
            replaced.append(" ".join(map(str, key(old))))
    data["results"] += [dict(r, rerun=meta["started"]) for r in new.values()]
    added = [" ".join(map(str, key(r))) for r in new.values()]
    data["machine"].setdefault("reruns", []).append({
        "started": meta["started"], "finished": machine.now(),
        "load_avg": [meta["load_avg_start"], list(os.getloadavg())], "tp_gpu_source": meta["tp_gpu_source"],
        "argv": sys.argv[1:], "replaced": replaced, "added": added, "method": meta.get("method"),
    })  # fmt: skip
    header = {"machine": data["machine"], "options": data["options"], "targets": rep.targets(data["results"])}
    report.write_json(path, header, data["results"])
    print(f"replaced {len(replaced)} and added {len(new)} case(s) in {path}")
    return render(rep, path)


def refuse_overwrite(args: argparse.Namespace, stem: Path) -> str | None:
    """Why this run must not write to ``stem`` (an existing result outside the scratch folder), or None."""
    if args.force or getattr(args, "update", None) is not None:
        return None
    if stem.parent.resolve() == LOCAL_RESULTS.resolve() or not stem.with_suffix(".json").exists():
        return None
    return f"{stem.with_suffix('.json')} exists; pass --force to overwrite it, or another --out"


# --------------------------------------------------------------------------- a program


Save = Callable[[list[Record]], None]  # writes the records so far (JSON and Markdown, no plots)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark program: its command line, how it starts and runs, its report and its file name."""

    program: Program
    report: Report
    setup: Callable[[argparse.Namespace], tuple[dict[str, Any], Any]]  # (machine record, what run needs)
    run: Callable[[argparse.Namespace, Any, Save], list[Record]]  # every case; save() after each group
    stem: Callable[[dict[str, Any], argparse.Namespace], str]  # the files' name, without a suffix


def main(bench: Benchmark, argv: Sequence[str] | None = None) -> int:
    """Run ``bench`` (or its ``--render`` / ``--update``); 0 on success, 1 if no case ran, 2 if the
    result would overwrite one it must keep."""
    args = bench.program.parse(argv)
    if args.render is not None:
        return render(bench.report, args.render)
    meta, state = bench.setup(args)
    stem = args.out / bench.stem(meta, args)
    refusal = refuse_overwrite(args, stem)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    updating = getattr(args, "update", None) is not None
    options = options_record(args)

    def save(records: list[Record]) -> None:
        if records and not updating:
            write_results(bench.report, stem, meta | {"complete": False}, options, records, plots=False)

    records = bench.run(args, state, save)
    if not records:
        print("no case ran (every case was skipped); nothing written", file=sys.stderr)
        return 1
    if updating:
        return update(bench.report, args.update, meta, records)
    meta.update(complete=True, load_avg_end=list(os.getloadavg()), finished=machine.now())
    paths = write_results(bench.report, stem, meta, options, records)
    md = paths[1].read_text()  # the table as written (from the rounded records), not built again
    print(md if len(records) <= 200 else md.split("## Every case")[0])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
