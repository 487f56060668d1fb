"""The layer benchmark: the tensor-parallel layers against dense and PyTorch, interleaved.

    python -m benchmarks --help        (or python benchmarks/bench_layers.py --help, the same program)

For each (layer, shape, dtype, mode), every worker count on the same data (:mod:`benchmarks.runner`,
:mod:`benchmarks.cases`); records, targets and tables in :mod:`benchmarks.layer_report`; the command
line, the results folder, ``--update`` and ``--render`` from :mod:`benchmarks.skeleton`. See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python benchmarks/bench_layers.py: the checkout's benchmarks and tp_gpu
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness, machine, runner, skeleton  # noqa: E402
from benchmarks.cases import LAYERS, MODES, SPECS, Shape  # noqa: E402
from benchmarks.layer_report import METHOD, REPORT  # noqa: E402
from benchmarks.report import Record, file_stem  # noqa: E402
from benchmarks.skeleton import option, positive_int  # noqa: E402
from tp_gpu.backends import get_backend, resolve_backend_name  # noqa: E402
from tp_gpu.config import BACKEND_NAMES, SUPPORTED_DTYPES  # noqa: E402

# From latency-bound (small batch) to throughput-bound (large batch and weights).
LINEAR_DEFAULT = "8x1024x1024 256x1024x1024 512x2048x2048 2048x4096x4096"
# Embedding: ids x vocabulary x dim. The last is the large-lookup target: 1M ids, vocabulary 50,000, dim 1024.
EMBED_DEFAULT = "8x8192x1024 256x8192x1024 16384x50000x1024 1000000x50000x1024"
LINEAR_SHAPES = tuple(Shape.parse(text) for text in LINEAR_DEFAULT.split())
EMBED_SHAPES = tuple(Shape.parse(text) for text in EMBED_DEFAULT.split())

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(20, 5), warmup=2, max_time=(10.0, 0.5), min_time=(0.3, 0.02), retries=(2, 1)
)
OPTIONS: skeleton.Options = {
    "--quick": option(
        "the two 1024x1024 shapes, float32 (and float16 on cupy), few rounds: about a minute on 2 cores",
        action="store_true",
    ),
    "--backend": option("default: $TP_GPU_BACKEND, else cupy with a GPU, else numpy", choices=BACKEND_NAMES),
    "--devices": option("device count (simulated, cupy)", type=positive_int),
    "--workers": skeleton.workers_option([1, 2, 4, 8]),
    "--no-torch": option("do not time PyTorch even where it imports", action="store_true"),
    "--layers": option("default: all", nargs="+", choices=LAYERS, default=list(LAYERS)),
    "--mode": option("default: both", nargs="+", choices=MODES, default=list(MODES)),
    "--shapes": option(f"BxNINxNOUT, linear / MLP (default: {LINEAR_DEFAULT})", nargs="+", type=Shape.parse),
    "--embed-shapes": option(f"IDSxVOCABxDIM (default: {EMBED_DEFAULT})", nargs="+", type=Shape.parse),
    "--dtype": option(
        "compute dtypes (default: float32 float64, --quick float32; and float16 on cupy)",
        nargs="+", choices=SUPPORTED_DTYPES,
    ),
    **TIMING,
    "--threads": option(
        "set NumPy's BLAS (OpenBLAS) and torch's CPU threads (default: BLAS as it is, torch as many)",
        type=positive_int,
    ),
    **skeleton.output_options(),
    "--update": option(
        "re-time the selected cases and replace them in an earlier run's JSON, then redraw its table "
        "and plots", type=Path, metavar="JSON",
    ),
}  # fmt: skip

PROGRAM = skeleton.Program(
    prog="python -m benchmarks",
    description="Time tensor-parallel layers against the dense computation and PyTorch, interleaved, on "
    "one backend, forward and forward+backward; write JSON, Markdown and PNG plots.",
    options=OPTIONS,
    quick_defaults=TIMING_QUICK | {
        "shapes": (list(LINEAR_SHAPES), list(LINEAR_SHAPES[:2])),
        "embed_shapes": (list(EMBED_SHAPES), list(EMBED_SHAPES[:2])),
    },
)  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The backend (and its default dtypes), the BLAS threads; the machine record, and torch (or None)."""
    args.backend = resolve_backend_name(args.backend)
    backend = get_backend(args.backend, args.devices)
    if args.dtype is None:
        args.dtype = (["float32"] if args.quick else ["float32", "float64"]) + (
            ["float16"] if args.backend == "cupy" else []
        )
    torch = machine.import_torch(not args.no_torch)
    meta = skeleton.start(backend, torch, args.threads, on_gpu=args.backend == "cupy")
    meta["method"] = METHOD
    return meta, torch


def run(args: argparse.Namespace, torch: Any, save: skeleton.Save) -> list[Record]:
    """Every group, the records so far saved after each."""
    groups = runner.groups(args, SPECS)
    harness.warm_up_machine()
    progress = runner.Progress(len(groups) * len(args.workers))
    records: list[Record] = []
    try:
        for group in groups:
            records += runner.run_group(group, args, torch, progress)
            save(records)
    finally:
        progress.close()
    return records


BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, setup=setup, run=run, stem=lambda meta, args: file_stem(meta, args.quick)
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the layer benchmark (or ``--update`` / ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
