"""Records, the issue 5 targets, Markdown and JSON of a benchmark run.

A record is one case (layer, shape, dtype, mode, worker count) as stored in the JSON, with every raw
time; the Markdown table and the plots (:mod:`benchmarks.plots`) are drawn from the records alone, so
that ``--render`` redraws them from a JSON.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cases import SPECS, Shape
from .harness import Timed
from .plots import write_plots

Record = dict[str, Any]

#: Issue 5's speed targets, checked against the forward timings: (name, layers, shape, dtype, limit).
TARGETS = (
    (
        "throughput-bound forward <= 1.05x dense",
        ("column", "row", "mlp"),
        Shape(2048, 4096, 4096),
        "float32",
        1.05,
    ),
    ("latency-bound forward <= 1.5x dense", ("column", "row", "mlp"), Shape(8, 1024, 1024), "float32", 1.5),
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
    passed = worst[key] <= limit
    status = "missed" if not passed else "noisy" if noisy else "met"
    ratios = {r["n_workers"]: r[key] for r in hits} if timed else {}
    row = {"target": target, "layer": layer, "shape": shape, "dtype": dtype, "limit": limit, "ratios": ratios}
    return row | {
        "worst": worst[key],
        "worst_workers": worst["n_workers"],
        "pass": passed,
        "noisy_workers": noisy,
        "status": status,
    }


def target_rows(records: list[Record]) -> list[Record]:
    """One row per (target, layer): the worst TP/dense over the worker counts, and its status; then the
    worst extra memory of a forward."""
    rows = []
    for name, layers, shape, dtype, limit in TARGETS:
        size = (shape.batch, shape.n_in, shape.n_out)
        for kind in layers:
            hits = [
                r
                for r in records
                if (r["layer"], r["mode"], r["dtype"], r["batch"], r["n_in"], r["n_out"])
                == (kind, "fwd", dtype, *size)
            ]
            if hits:
                rows.append(
                    _target_row(name, kind, SPECS[kind].describe(shape), dtype, limit, hits, "ratio_tp_dense")
                )
    # Buffers, not Python's own objects (a few KB, which tracemalloc counts too): outputs of 1 MiB and more.
    key = "extra_peak_over_output"
    fwd = [
        r
        for r in records
        if r["mode"] == "fwd" and r[key] is not None and r["output_bytes"] >= MEMORY_TARGET_MIN_OUTPUT
    ]
    if fwd:
        rows.append(
            _target_row(
                "peak extra memory <= 1 output buffer",
                "all",
                "forward, outputs >= 1 MiB",
                "all",
                1.0,
                fwd,
                key,
            )
        )
        worst = max(fwd, key=lambda r: r[key])
        rows[-1]["worst_case"] = f"{worst['layer']} {worst['shape']} {worst['dtype']}"
    return rows


# --------------------------------------------------------------------------- Markdown


def ms(seconds: float | None) -> str:
    """Milliseconds, 3 decimals below 10 s."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


STATUS_CELL = {"met": "yes", "missed": "**no**", "noisy": "noisy: re-run"}


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
        status = t["status"]
        lines.append(
            f"| {t['target']} | {t['layer']} | {t['shape']} | {t['dtype']} | {per} | {worst} | "
            f"{STATUS_CELL[status]} |"
        )
    return lines


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


def _machine_lines(machine: dict[str, Any], options: dict[str, Any]) -> list[str]:
    gpus = ", ".join(machine["gpus"]) or "none"
    blas, source = machine["blas"], machine["tp_gpu_source"]
    torch_note = ""
    if machine["torch_threads"] is not None:  # its BLAS and kernel level, where recorded
        built = " ".join(
            str(v) for v in (machine.get("torch_blas"), machine.get("torch_cpu_capability")) if v
        )
        torch_note = f" ({machine['torch_threads']} threads{', ' + built if built else ''})"
    env = "not recorded"
    if "blas_env" in machine:
        env = ", ".join(f"{k}={v}" for k, v in machine["blas_env"].items() if v is not None) or "none set"
    load = machine.get("load_avg_start", [None])[0], machine.get("load_avg_end", [None])[0]
    return [
        f"- CPU: {machine['cpu']} ({machine['cores']} cores, {num(machine['memory_gib'], '.0f')} GiB); "
        f"GPU: {gpus}",
        (
            f"- backend: {machine['backend']}, devices {machine['devices']}; NumPy {machine['numpy']} "
            f"({blas['name']} {blas['version']}, {blas['threads']} threads); "
            f"torch {machine['torch'] or 'not installed'}"
            f"{torch_note}; tp_gpu {machine['tp_gpu']} at commit {source['commit'] or 'unknown'}"
        ),
        f"- BLAS core type {blas.get('core') or 'not recorded'}; BLAS environment: {env}",
        f"- load average (1 min) at start {num(load[0])}, at end {num(load[1])}",
        _method_line(machine, options),
    ]


def _case_row(r: Record) -> str:
    spread = num(r["spread"]) + (" noisy" if r.get("noisy") else "")
    rerun = " *re-run*" if r.get("rerun") else ""
    return (
        f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['mode']}{rerun} | {r['n_workers']} | "
        f"{ms(r['tp_median_s'])} | {ms(r['dense_median_s'])} | {ms(r['torch_median_s'])} | "
        f"{num(r['ratio_tp_dense'])} | {num(r['ratio_tp_torch'])} | {num(r['tp_rate'], '.1f')} | "
        f"{num(r['dense_rate'], '.1f')} | {num(r['torch_rate'], '.1f')} | {r['unit']} | "
        f"{num(r['extra_peak_over_output'])} | {spread} |"
    )


def markdown(machine: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The run as Markdown: the machine and method, the issue 5 targets, then every case."""
    lines = [f"# tp_gpu layer benchmark, {machine['date']}{' (--quick)' if options['quick'] else ''}", ""]
    lines += _machine_lines(machine, options)
    lines += [
        "- **TP/dense < 1: the tensor-parallel layer is faster than dense on the same backend; > 1: slower**",
        (
            "- rate: GFLOP/s of the GEMMs (2·B·n_in·n_out per GEMM; forward + backward counts 3x) "
            "for linears and MLP; "
            "GB/s of output for the embedding (forward + backward: 2x)"
        ),
        (
            "- extra mem: peak memory of one TP run minus that of one dense run, in output buffers "
            "(<= 1 is issue 5's target; < 0: TP needs less)"
        ),
        "- MLP: `ParallelMLP(n_in, hidden=n_out, n_out=n_in)`, GeLU (tanh)",
    ]
    for rerun in machine.get("reruns", []):
        lines.append(
            f"- re-timed at {rerun['started']} (load average {num(rerun['load_avg'][0][0])}), replacing "
            f"{len(rerun['replaced'])} case(s) whose first timing was disturbed; marked *re-run* below"
        )
    targets = target_rows(records)
    if targets:
        lines += ["", "## Issue 5 targets (forward, TP/dense at each worker count)", ""]
        lines += targets_markdown(targets, options["workers"])
    lines += [
        "",
        "## Every case",
        "",
        (
            "| layer | shape | dtype | mode | workers | TP ms | dense ms | torch ms | TP/dense | TP/torch "
            "| TP rate | dense rate | torch rate | unit | extra mem | spread |"
        ),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    lines += [_case_row(r) for r in records]
    lines += [
        "",
        (
            "spread: interquartile range of the runs / median (range / median below 5 runs), the worst of "
            "TP, dense and torch; *noisy*: still above 25 % (40 % below 2 ms) after the retries, so its "
            "ratios are not to be "
            "trusted and a target resting on it reads `noisy: re-run` instead of met."
        ),
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 4 significant digits (timings are not more precise)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def write_json(path: Path, header: dict[str, Any], records: list[Record]) -> None:
    """``{**header, "results": records}``: the header indented, then one line per case, 4 digits."""
    head = json.dumps(header, indent=1)[:-2]
    lines = [json.dumps(rounded(r), separators=(",", ":")) for r in records]
    path.write_text(head + ',\n "results": [\n' + ",\n".join(lines) + "\n ]\n}\n")


def file_stem(machine: dict[str, Any], quick: bool) -> str:
    """``<machine>-<backend>-<YYYY-MM-DD>[-quick]``, the machine from the GPU name on cupy, else the CPU."""
    name = machine["gpus"][0] if machine["gpus"] else machine["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"
    return f"{slug}-{machine['backend']}-{machine['date']}" + ("-quick" if quick else "")


def write_results(
    stem: Path, machine: dict[str, Any], options: dict[str, Any], records: list[Record], plots: bool = True
) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and, with ``plots``, the PNGs; returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [rounded(r) for r in records]  # as stored: the table then matches a --render of the JSON
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    write_json(json_path, {"machine": machine, "options": options, "targets": target_rows(records)}, records)
    md_path.write_text(markdown(machine, options, records))
    return [json_path, md_path] + (write_plots(records, stem) if plots else [])
