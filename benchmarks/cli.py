"""The command line: options, a run, and the ``--update`` and ``--render`` modes.

    python -m benchmarks --help                  (or python benchmarks/bench_layers.py --help)

Results go to ``benchmarks/results/local/`` (ignored by git) unless ``--out`` says otherwise; an
existing result elsewhere is not overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tp_gpu.backends import get_backend, resolve_backend_name
from tp_gpu.config import BACKEND_NAMES, SUPPORTED_DTYPES

from . import harness, machine, report, runner
from .cases import LAYERS, MODES, SPECS, Shape

RESULTS = Path(__file__).resolve().parent / "results"
#: The default output folder: scratch, ignored by git; the committed results are in RESULTS.
LOCAL_RESULTS = RESULTS / "local"

# From latency-bound (small batch) to throughput-bound (large batch and weights).
LINEAR_DEFAULT = "8x1024x1024 256x1024x1024 512x2048x2048 2048x4096x4096"
# Embedding: ids x vocabulary x dim. The last is issue 5's target: 1M ids, vocabulary 50,000, dim 1024.
EMBED_DEFAULT = "8x8192x1024 256x8192x1024 16384x50000x1024 1000000x50000x1024"
LINEAR_SHAPES = tuple(Shape.parse(text) for text in LINEAR_DEFAULT.split())
EMBED_SHAPES = tuple(Shape.parse(text) for text in EMBED_DEFAULT.split())

#: Defaults that differ with --quick: (full, quick).
QUICK_DEFAULTS = {
    "repeat": (20, 5),
    "max_time": (10.0, 0.5),
    "min_time": (0.3, 0.02),
    "retries": (2, 1),
    "shapes": (list(LINEAR_SHAPES), list(LINEAR_SHAPES[:2])),
    "embed_shapes": (list(EMBED_SHAPES), list(EMBED_SHAPES[:2])),
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _help(text: str, **keywords: Any) -> dict[str, Any]:
    return {"help": text, **keywords}


#: Every option: flag -> ``add_argument`` keywords. Defaults of None are filled in from QUICK_DEFAULTS.
OPTIONS: dict[str, dict[str, Any]] = {
    "--quick": _help(
        "the two 1024x1024 shapes, float32 (and float16 on cupy), few rounds: about a minute on 2 cores",
        action="store_true",
    ),
    "--backend": _help("default: $TP_GPU_BACKEND, else cupy with a GPU, else numpy", choices=BACKEND_NAMES),
    "--devices": _help("device count (simulated, cupy)", type=positive_int),
    "--workers": _help("worker counts (default 1 2 4 8)", type=positive_int, nargs="+", default=[1, 2, 4, 8]),
    "--no-torch": _help("do not time PyTorch even where it imports", action="store_true"),
    "--layers": _help("default: all", nargs="+", choices=LAYERS, default=list(LAYERS)),
    "--mode": _help("default: both", nargs="+", choices=MODES, default=list(MODES)),
    "--shapes": _help(f"BxNINxNOUT, linear / MLP (default: {LINEAR_DEFAULT})", nargs="+", type=Shape.parse),
    "--embed-shapes": _help(f"IDSxVOCABxDIM (default: {EMBED_DEFAULT})", nargs="+", type=Shape.parse),
    "--dtype": _help(
        "compute dtypes (default: float32 float64, --quick float32; and float16 on cupy)",
        nargs="+", choices=SUPPORTED_DTYPES,
    ),
    "--repeat": _help("timed rounds, at least (default 20, quick 5)", type=positive_int),
    "--warmup": _help("untimed runs of each function first (default 2)", type=positive_int, default=2),
    "--max-time": _help(
        "stop a comparison after this many seconds, 3 rounds at least (default 10, quick 0.5)", type=float
    ),
    "--min-time": _help("keep repeating fast cases this many seconds (default 0.3, quick 0.02)", type=float),
    "--retries": _help(
        "re-time a comparison whose runs spread too much or whose machine is busy (default 2, quick 1)",
        type=int,
    ),
    "--threads": _help(
        "set NumPy's BLAS (OpenBLAS) and torch's CPU threads (default: BLAS as it is, torch as many)",
        type=positive_int,
    ),
    "--out": _help(
        "output folder (default benchmarks/results/local: not committed)", type=Path, default=LOCAL_RESULTS
    ),
    "--force": _help("overwrite an existing result outside the default folder", action="store_true"),
    "--update": _help(
        "re-time the selected cases and replace them in an earlier run's JSON, then redraw its table "
        "and plots", type=Path, metavar="JSON",
    ),
    "--render": _help(
        "time nothing: rewrite the Markdown table and the plots of an earlier run from its JSON",
        type=Path, metavar="JSON",
    ),
}  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, with the ``--quick`` dependent defaults filled in."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time tensor-parallel layers against the dense computation and PyTorch, interleaved, on "
        "one backend, forward and forward+backward; write JSON, Markdown and PNG plots.",
    )
    for flag, keywords in OPTIONS.items():
        parser.add_argument(flag, **keywords)
    args = parser.parse_args(argv)
    for name, (full, quick) in QUICK_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def options_record(args: argparse.Namespace) -> dict[str, Any]:
    """The options as stored in the JSON (shapes as dicts, paths as text)."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    options["shapes"] = [vars(s) for s in args.shapes]
    options["embed_shapes"] = [vars(s) for s in args.embed_shapes]
    return options


def update(path: Path, meta: dict[str, Any], records: list[report.Record]) -> int:
    """Replace ``records``' cases in the run stored at ``path``, note the re-run there, and redraw."""
    data = json.loads(path.read_text())
    new = {report.case_key(r): r for r in records}
    replaced = []
    for i, old in enumerate(data["results"]):
        if report.case_key(old) in new:
            data["results"][i] = dict(new.pop(report.case_key(old)), rerun=meta["started"])
            replaced.append(" ".join(map(str, report.case_key(old))))
    data["results"] += [dict(r, rerun=meta["started"]) for r in new.values()]
    added = [" ".join(map(str, report.case_key(r))) for r in new.values()]
    data["machine"].setdefault("reruns", []).append({
        "started": meta["started"], "finished": machine.now(),
        "load_avg": [meta["load_avg_start"], list(os.getloadavg())], "tp_gpu_source": meta["tp_gpu_source"],
        "argv": sys.argv[1:], "replaced": replaced, "added": added, "method": meta["method"],
    })  # fmt: skip
    header = {
        "machine": data["machine"],
        "options": data["options"],
        "targets": report.target_rows(data["results"]),
    }
    report.write_json(path, header, data["results"])
    print(f"replaced {len(replaced)} and added {len(new)} case(s) in {path}")
    return render(path)


def render(path: Path) -> int:
    """Rewrite ``<stem>.md`` and the plots from ``<stem>.json`` (e.g. after changing how they are drawn)."""
    data = json.loads(path.read_text())
    stem = path.with_suffix("")
    md_path = stem.with_suffix(".md")
    md_path.write_text(report.markdown(data["machine"], data["options"], data["results"]))
    paths = [md_path] + report.write_plots(data["results"], stem)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def refuse_overwrite(args: argparse.Namespace, stem: Path) -> str | None:
    """Why this run must not write to ``stem`` (an existing result outside the scratch folder), or None."""
    if args.force or args.update is not None or stem.parent.resolve() == LOCAL_RESULTS.resolve():
        return None
    if stem.with_suffix(".json").exists():
        return f"{stem.with_suffix('.json')} exists; pass --force to overwrite it, or another --out"
    return None


def start(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Backend, torch, BLAS threads and the machine description, printed in one line."""
    args.backend = resolve_backend_name(args.backend)
    backend = get_backend(args.backend, args.devices)
    if args.dtype is None:
        args.dtype = (["float32"] if args.quick else ["float32", "float64"]) + (
            ["float16"] if args.backend == "cupy" else []
        )
    torch = machine.import_torch(not args.no_torch)
    note = harness.pin_threads(args.threads, torch, on_gpu=args.backend == "cupy")
    if note:
        print(note)
    meta = machine.machine_info(backend, torch)
    meta["method"] = report.METHOD
    blas = meta["blas"]
    torch_note = (
        f"torch {meta['torch']} ({meta['torch_threads']} threads, {meta['torch_blas']})"
        if torch
        else "no torch"
    )
    print(
        f"{meta['cpu']}, {meta['cores']} cores; backend {args.backend} {meta['devices']}; "
        f"BLAS {blas['name']} core {blas['core']}, {blas['threads']} threads; {torch_note}; "
        f"tp_gpu from {meta['tp_gpu_source']['path']}"
    )
    return torch, meta


def run(args: argparse.Namespace, torch: Any, meta: dict[str, Any], stem: Path) -> list[report.Record]:
    """Every group, the results so far written after each (an interrupted run keeps what it finished)."""
    groups = runner.groups(args, SPECS)
    harness.warm_up_machine()
    progress = runner.Progress(len(groups) * len(args.workers))
    records: list[report.Record] = []
    try:
        for group in groups:
            records += runner.run_group(group, args, torch, progress)
            if records and args.update is None:
                meta["complete"] = False
                report.write_results(stem, meta, options_record(args), records, plots=False)
    finally:
        progress.close()
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or ``--update`` / ``--render``); 0 on success."""
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    torch, meta = start(args)
    stem = args.out / report.file_stem(meta, args.quick)
    refusal = refuse_overwrite(args, stem)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    records = run(args, torch, meta, stem)
    if not records:
        print("no case ran (every worker count was skipped); nothing written", file=sys.stderr)
        return 1
    if args.update is not None:
        return update(args.update, meta, records)
    meta.update(complete=True, load_avg_end=list(os.getloadavg()), finished=machine.now())
    paths = report.write_results(stem, meta, options_record(args), records)
    md = paths[1].read_text()  # the table as written (from the rounded records), not built again
    print(md if len(records) <= 200 else md.split("## Every case")[0])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
