"""The layer benchmark's records, its targets and its Markdown.

A record is one case (layer, shape, dtype, mode, worker count) with every raw time of TP, dense and
torch in flat fields, their medians, ratios and rates, and the checks (memory, differences).

Targets, checked against the forward timings (TP/dense at every worker count, the worst deciding):
throughput-bound forward within 1.05x dense, latency-bound forward and the 1M-id embedding lookup
within 1.5x; and a forward's peak extra memory at most one output buffer.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .cases import SPECS, Shape
from .harness import Timed
from .plots import write_plots
from .report import SPREAD_NOTE, STATUS_CELL, Record, machine_lines, ms, num, status
from .skeleton import Report

#: The speed targets: (name, layers, shape, dtype, limit on the forward's TP/dense).
LINEARS = ("column", "row", "mlp")
TARGETS = (
    ("throughput-bound forward <= 1.05x dense", LINEARS, Shape(2048, 4096, 4096), "float32", 1.05),
    ("latency-bound forward <= 1.5x dense", LINEARS, Shape(8, 1024, 1024), "float32", 1.5),
    ("embedding forward <= 1.5x dense take", ("embedding",), Shape(1_000_000, 50_000, 1024), "float32", 1.5),
)

#: The memory target is checked on outputs at least this large (smaller ones measure Python's objects).
MEMORY_TARGET_MIN_OUTPUT = 2**20

CASE_KEY = ("layer", "batch", "n_in", "n_out", "dtype", "mode", "n_workers")


def case_key(r: Record) -> tuple:
    """What identifies a case: layer, sizes, dtype, mode and worker count."""
    return tuple(r[k] for k in CASE_KEY)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _times(timed: Timed) -> dict[str, Any]:
    """Raw times, medians and ratios of the kept attempt, and every attempt's spread and load."""
    medians = {name: statistics.median(t) for name, t in timed.times.items()}
    out: dict[str, Any] = {}
    for name in ("tp", "dense", "torch"):
        out[f"{name}_times_s"] = timed.times.get(name)
        out[f"{name}_median_s"] = medians.get(name)
    out["ratio_tp_dense"] = _ratio(medians["tp"], medians["dense"])
    out["ratio_tp_torch"] = _ratio(medians["tp"], medians.get("torch"))
    out["ratio_dense_torch"] = _ratio(medians["dense"], medians.get("torch"))
    out["spread"], out["noisy"], out["load_1min"] = timed.spread, timed.noisy, timed.load_1min
    out["attempts"] = [  # raw times of an attempt not kept; the kept one's are above
        {"spread": a["spread"], "load_1min": a["load_1min"], "kept": a["kept"]}
        | ({} if a["kept"] else {f"{k}_times_s": v for k, v in a["times_s"].items()})
        for a in timed.attempts
    ]
    return out


def make_record(case: dict[str, Any], timed: Timed, checks: dict[str, Any]) -> Record:
    """One case's record: ``case`` (what was run), its timings, rates and ``checks`` (memory, diffs)."""
    record = dict(case)
    record.update(_times(timed))
    for name in ("tp", "dense", "torch"):
        median = record[f"{name}_median_s"]
        record[f"{name}_rate"] = None if median is None else record["work"] / median
    record.update(checks)
    tp_peak, dense_peak = checks.get("tp_peak_bytes"), checks.get("dense_peak_bytes")
    extra = None if tp_peak is None or dense_peak is None else tp_peak - dense_peak
    record["extra_peak_bytes"] = extra
    record["extra_peak_over_output"] = None if extra is None else extra / record["output_bytes"]
    return record


# --------------------------------------------------------------------------- targets


def _target_row(
    target: str, layer: str, shape: str, dtype: str, limit: float, hits: list[Record], key: str
) -> Record:
    """The worst ``key`` over ``hits`` against ``limit``: met, missed, or noisy where a met target rests
    on a case whose runs spread too much to trust."""
    timed = key.startswith("ratio")  # a speed target, which noisy timings undermine; else memory
    worst = max(hits, key=lambda r: r[key])
    noisy = [r["n_workers"] for r in hits if r.get("noisy")] if timed else []
    ratios = {r["n_workers"]: r[key] for r in hits} if timed else {}
    row = {"target": target, "layer": layer, "shape": shape, "dtype": dtype, "limit": limit, "ratios": ratios}
    return row | {
        "worst": worst[key], "worst_workers": worst["n_workers"], "pass": worst[key] <= limit,
        "noisy_workers": noisy, "status": status(worst[key], limit, bool(noisy)),
    }  # fmt: skip


def target_rows(records: list[Record]) -> list[Record]:
    """One row per (target, layer): the worst TP/dense over the worker counts, and its status; then the
    worst extra memory of a forward."""
    rows = []
    for name, layers, shape, dtype, limit in TARGETS:
        where = ("fwd", dtype, shape.batch, shape.n_in, shape.n_out)
        for kind in layers:
            hits = [
                r for r in records
                if (r["layer"], r["mode"], r["dtype"], r["batch"], r["n_in"], r["n_out"]) == (kind, *where)
            ]  # fmt: skip
            if hits:
                described = SPECS[kind].describe(shape)
                rows.append(_target_row(name, kind, described, dtype, limit, hits, "ratio_tp_dense"))
    # Buffers, not Python's own objects (a few KB, which tracemalloc counts too): outputs of 1 MiB and more.
    key = "extra_peak_over_output"
    fwd = [
        r for r in records
        if r["mode"] == "fwd" and r[key] is not None and r["output_bytes"] >= MEMORY_TARGET_MIN_OUTPUT
    ]  # fmt: skip
    if fwd:
        name, what = "peak extra memory <= 1 output buffer", "forward, outputs >= 1 MiB"
        rows.append(_target_row(name, "all", what, "all", 1.0, fwd, key))
        worst = max(fwd, key=lambda r: r[key])
        rows[-1]["worst_case"] = f"{worst['layer']} {worst['shape']} {worst['dtype']}"
    return rows


def targets_markdown(rows: list[Record], workers: Sequence[int]) -> list[str]:
    """The targets table: TP/dense at each worker count, the worst, and whether it is met."""
    lines = [
        "| target | layer | shape | dtype | " + " | ".join(f"p={n}" for n in workers) + " | worst | met? |",
        "|---|---|---|---|" + "---:|" * len(workers) + "---:|---|",
    ]
    for t in rows:
        per = " | ".join(num(t["ratios"].get(n)) for n in workers)
        worst = num(t["worst"]) + (
            f" ({t['worst_case']}, p={t['worst_workers']})" if "worst_case" in t else ""
        )
        lines.append(
            f"| {t['target']} | {t['layer']} | {t['shape']} | {t['dtype']} | {per} | {worst} | "
            f"{STATUS_CELL[t['status']]} |"
        )
    return lines


# --------------------------------------------------------------------------- Markdown

#: What a run records as its ``machine.method``; a JSON without it comes from the single-file benchmark.
METHOD = "shuffled rounds of TP, dense and torch; dense in place on the layer's own weights"
LEGACY_METHOD = (
    "- timed by the single-file benchmark before this package: TP and dense alternating, torch in a block "
    "of its own, dense `x @ W + b` on its own copy of the weights; TP/torch and extra memory are not "
    "comparable with later runs"
)


def _method_line(machine: dict[str, Any], options: dict[str, Any]) -> str:
    if machine.get("method") != METHOD:
        return LEGACY_METHOD
    return (
        f"- median of at least {options['repeat']} rounds of TP, dense and torch, interleaved in a "
        f"shuffled order, after {options['warmup']} warm-up, at most {options['max_time']:g} s per "
        f"comparison; re-timed up to {options['retries']} times when disturbed; dense in place, on "
        "the TP layer's own weight arrays where it holds them whole"
    )


def _case_row(r: Record) -> str:
    rerun = " *re-run*" if r.get("rerun") else ""
    return (
        f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['mode']}{rerun} | {r['n_workers']} | "
        f"{ms(r['tp_median_s'])} | {ms(r['dense_median_s'])} | {ms(r['torch_median_s'])} | "
        f"{num(r['ratio_tp_dense'])} | {num(r['ratio_tp_torch'])} | {num(r['tp_rate'], '.1f')} | "
        f"{num(r['dense_rate'], '.1f')} | {num(r['torch_rate'], '.1f')} | {r['unit']} | "
        f"{num(r['extra_peak_over_output'])} | {num(r['spread'])}{' noisy' if r.get('noisy') else ''} |"
    )


def markdown(machine: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The run as Markdown: the machine and method, the targets, then every case."""
    lines = [f"# tp_gpu layer benchmark, {machine['date']}{' (--quick)' if options['quick'] else ''}", ""]
    lines += machine_lines(machine) + [_method_line(machine, options)]
    lines += [
        "- **TP/dense < 1: the tensor-parallel layer is faster than dense on the same backend; > 1: slower**",
        "- rate: GFLOP/s of the GEMMs (2·B·n_in·n_out per GEMM; forward + backward counts 3x) for linears "
        "and MLP; GB/s of output for the embedding (forward + backward: 2x)",
        "- extra mem: peak memory of one TP run minus that of one dense run, in output buffers "
        "(<= 1 is the memory target; < 0: TP needs less)",
        "- MLP: `ParallelMLP(n_in, hidden=n_out, n_out=n_in)`, GeLU (tanh)",
    ]
    for rerun in machine.get("reruns", []):
        lines.append(
            f"- re-timed at {rerun['started']} (load average {num(rerun['load_avg'][0][0])}), replacing "
            f"{len(rerun['replaced'])} case(s) whose first timing was disturbed; marked *re-run* below"
        )
    targets = target_rows(records)
    if targets:
        lines += ["", "## Speed and memory targets (forward, TP/dense at each worker count)", ""]
        lines += targets_markdown(targets, options["workers"])
    lines += [
        "", "## Every case", "",
        "| layer | shape | dtype | mode | workers | TP ms | dense ms | torch ms | TP/dense | TP/torch "
        "| TP rate | dense rate | torch rate | unit | extra mem | spread |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]  # fmt: skip
    lines += [_case_row(r) for r in records]
    lines += ["", SPREAD_NOTE]
    return "\n".join(lines) + "\n"


REPORT = Report(targets=target_rows, markdown=markdown, plots=write_plots, key=case_key)
