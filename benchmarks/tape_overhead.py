"""The autograd tape's overhead per recorded op: ``python -m benchmarks.tape_overhead [--quick]``.

* chain: ``--ops`` N (200) times ``y = y * 1.0`` on ``tp_gpu.tensor(np.ones(4), requires_grad=True)``,
  as raw NumPy, under ``no_grad``, recorded, and recorded+backward; µs per op, and recording per op
  ``= recorded - no_grad``, backward per node ``= recorded+backward - recorded``.
* column: ``ColumnParallelLinear(64, 64)``, 2 workers, gathered, x (8, 64) float32, numpy backend: the
  same three tape sides; µs per forward.

Every side is checked, then a case's sides run in the same shuffled rounds (:mod:`.harness`); JSON and
Markdown ``tape-overhead-<cpu>-numpy-<date>`` go to ``benchmarks/results/local/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tp_gpu
from tp_gpu import ColumnParallelLinear, TensorParallelConfig
from tp_gpu.backends import get_backend

from . import harness, skeleton
from .report import SPREAD_NOTE, Record, file_stem, machine_lines, seconds, sides_record, spread_cell
from .skeleton import option, positive_int

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(50, 5), warmup=2, max_time=(10.0, 0.5), min_time=(0.5, 0.02), retries=(2, 1)
)
OPTIONS: skeleton.Options = {
    "--ops": option("length N of the y = y * 1.0 chain (default 200)", type=positive_int, default=200),
    "--quick": option("5 rounds at least, 0.5 s per case at most, 1 retry", action="store_true"),
    **TIMING, **skeleton.output_options(),
}  # fmt: skip
PROGRAM = skeleton.Program(
    prog="python -m benchmarks.tape_overhead", options=OPTIONS, quick_defaults=TIMING_QUICK,
    description="Time the autograd tape's overhead per recorded op: an elementwise chain and a "
    "column-parallel linear, without the tape, recorded, and recorded with backward.",
)  # fmt: skip
DERIVED = {"recording": ("recorded", "no_grad"), "backward": ("recorded+backward", "recorded")}


def tape_sides(forward: Callable, leaf: Any, grad: Any, zero_grad: Callable = lambda: None) -> dict:
    """``forward`` under ``no_grad``, recorded, and recorded then backward into zeroed gradients (-> dX)."""

    def no_grad() -> Any:
        with tp_gpu.no_grad():
            return forward()

    def backward() -> Any:
        zero_grad()
        leaf.grad = None
        forward().backward(grad)
        return leaf.grad

    return {"no_grad": no_grad, "recorded": forward, "recorded+backward": backward}


def chain_functions(n: int) -> dict[str, Callable[[], Any]]:
    """The four sides of the chain: raw NumPy and the three of the tape."""
    ones = np.ones(4)
    leaf = tp_gpu.tensor(ones, requires_grad=True)

    def chain(y: Any) -> Any:
        for _ in range(n):
            y = y * 1.0
        return y

    return {"numpy": lambda: chain(ones), **tape_sides(lambda: chain(leaf), leaf, ones)}


def column_functions() -> tuple[dict[str, Callable[[], Any]], dict[str, np.ndarray]]:
    """The three tape sides of the column layer, and what they give (the output; dX = dY W^T)."""
    layer = ColumnParallelLinear(64, 64, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float32"))
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal((8, 64)).astype(np.float32) for _ in range(2))
    leaf = tp_gpu.tensor(x, requires_grad=True)
    w, b = layer.full_weight(), layer.full_bias()
    expected = {"out": x @ w + b, "grad": dy @ w.T}  # (8, 64) @ (64, 64); (8, 64) @ (64, 64)
    return tape_sides(lambda: layer(leaf), leaf, dy, layer.zero_grad), expected


def case_record(case: str, per: int, unit: str, fns: dict, expected: dict, args: Any) -> Record:
    """Each side checked against ``expected`` (its output; a backward side's dX), then all timed in shared
    rounds; µs per ``unit`` (``per`` of them in a run) of each side and of the derived costs."""
    for name, fn in fns.items():
        want = expected["grad" if name == "recorded+backward" else "out"]
        np.testing.assert_allclose(np.asarray(fn()), want, rtol=1e-5, atol=1e-5, err_msg=name)
    timed = harness.time_with_retries(fns, harness.cpu_timer(lambda: None), skeleton.timing(args))
    record = sides_record({"case": case, "per": per, "unit": unit}, timed)
    us = record["us_per_unit"] = {name: seconds(record, name) / per * 1e6 for name in fns}
    record["derived_us"] = {k: us[a] - us[b] for k, (a, b) in DERIVED.items()}
    return record


def run(args: argparse.Namespace, state: Any, save: skeleton.Save) -> list[Record]:
    """Both cases, each checked first, then timed; saved after each."""
    harness.warm_up_machine()
    ones = {"out": np.ones(4), "grad": np.ones(4)}
    records = [case_record("chain", args.ops, "op", chain_functions(args.ops), ones, args)]
    save(records)
    records.append(case_record("column", 1, "forward", *column_functions(), args))
    return records


def markdown(meta: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The machine, the cases, every side per op (or per forward), then the derived costs."""
    lines = [f"# Autograd tape overhead, {meta['date']}", "", *machine_lines(meta)]
    lines += [
        f"- chain: {options['ops']} x `y = y * 1.0` on a float64 (4,) host tensor; column: "
        "ColumnParallelLinear(64, 64), 2 workers, gathered, x (8, 64) float32, numpy backend",
        f"- at least {options['repeat']} shuffled rounds of every side, {options['warmup']} warm-up run(s)",
        "", "| case | side | µs per unit | median ms / run | runs | spread |", "|---|---|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in records:
        for name, side in r["sides"].items():
            lines.append(
                f"| {r['case']} | {name} | {r['us_per_unit'][name]:.2f} / {r['unit']} | "
                f"{side['median_s'] * 1e3:.3f} | {len(side['times_s'])} | {spread_cell(r)} |"
            )
    lines += ["", "| case | derived | µs |", "|---|---|---:|"]
    for r in records:
        for name, (a, b) in DERIVED.items():
            per = "node" if name == "backward" and r["case"] == "chain" else r["unit"]
            lines.append(f"| {r['case']} | {name} per {per} ({a} - {b}) | {r['derived_us'][name]:.2f} |")
    return "\n".join(lines + ["", SPREAD_NOTE]) + "\n"


REPORT = skeleton.Report(targets=lambda records: [], markdown=markdown, plots=lambda records, stem: [])
BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, run=run,
    setup=lambda args: (skeleton.start(get_backend("numpy"), None, threads=None), None),  # no torch
    stem=lambda meta, args: "tape-overhead-" + file_stem(meta, args.quick),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tape-overhead benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
