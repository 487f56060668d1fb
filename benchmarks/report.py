"""Records, their Markdown and their JSON: what every benchmark's report is made of.

A record is one timed comparison as stored in the JSON, with every raw time; tables and plots are
drawn from the records alone, so that ``--render`` redraws them from a JSON. Two shapes of record:

* the layer benchmark's (:mod:`benchmarks.layer_report`): TP, dense and torch in flat fields;
* a comparison of named *sides* (:func:`sides_record`): ``{"sides": {name: {"times_s", "median_s"}}}``,
  as the training-step and encode benchmarks time any number of ways to do one thing.

A target compares a ratio with a limit: met, missed, or noisy where it would be met but rests on
runs that spread too much to trust (:func:`status`).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from .harness import Timed

Record = dict[str, Any]

STATUS_CELL = {"met": "yes", "missed": "**no**", "noisy": "noisy: re-run"}

SPREAD_NOTE = (
    "spread: interquartile range of the runs / median (range / median below 5 runs), the worst of the "
    "sides compared; *noisy*: still above 25 % (40 % below 2 ms) after the retries, so its ratios are "
    "not to be trusted and a target resting on it reads `noisy: re-run` instead of met."
)


def status(worst: float, limit: float, noisy: bool) -> str:
    """``worst <= limit``: met, or noisy where the runs behind it are; else missed."""
    return "missed" if not worst <= limit else "noisy" if noisy else "met"


# --------------------------------------------------------------------------- a comparison of sides


def sides_record(
    fields: dict[str, Any], timed: Timed, phases: dict[str, dict[str, list[float]]] | None = None
) -> Record:
    """``fields`` and, for each side, its raw times and median (and its phases' raw times and medians)."""
    sides = {}
    for name, times in timed.times.items():
        side: dict[str, Any] = {"median_s": statistics.median(times), "times_s": times}
        if phases is not None:
            side["phase_median_s"] = {ph: statistics.median(v) for ph, v in phases[name].items()}
            side["phases_s"] = phases[name]
        sides[name] = side
    attempts = [
        {"spread": a["spread"], "load_1min": a["load_1min"], "kept": a["kept"]} for a in timed.attempts
    ]
    return {
        **fields, "sides": sides, "spread": timed.spread, "noisy": timed.noisy,
        "load_1min": timed.load_1min, "attempts": attempts,
    }  # fmt: skip


def seconds(record: Record, side: str, phase: str | None = None) -> float:
    """A side's median time (or a phase's); the side must have run."""
    entry = record["sides"][side]
    return entry["median_s"] if phase is None else entry["phase_median_s"][phase]


def median(record: Record, side: str, phase: str | None = None) -> float | None:
    """A side's median time (or a phase's), None where the side did not run."""
    return seconds(record, side, phase) if side in record["sides"] else None


def target(name: str, record: Record, label: str, ratios: dict[str, float], limit: float) -> Record:
    """A target row over a sides record: each ratio, the worst, and its status."""
    worst = max(ratios.values())
    return {
        "target": name, "dtype": record["dtype"], "threads": record["threads"], "case": label,
        "ratios": ratios, "worst": worst, "limit": limit, "status": status(worst, limit, record["noisy"]),
    }  # fmt: skip


def targets_table(rows: list[Record]) -> list[str]:
    """The targets of sides records: a row per (target, case, dtype, threads) with every ratio."""
    lines = ["| target | case | dtype | threads | ratios | worst | met? |", "|---|---|---|---:|---|---:|---|"]
    for t in rows:
        ratios = ", ".join(f"{k.replace('tp ', '')}: {v:.2f}" for k, v in t["ratios"].items())
        lines.append(
            f"| {t['target']} | {t['case']} | {t['dtype']} | {t['threads']} | {ratios} | "
            f"{t['worst']:.2f} | {STATUS_CELL[t['status']]} |"
        )
    return lines


# --------------------------------------------------------------------------- Markdown


def ms(seconds: float | None) -> str:
    """Milliseconds, 3 decimals below 10 s."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def num(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def spread_cell(r: Record) -> str:
    return num(r["spread"]) + (" noisy" if r.get("noisy") else "")


def machine_lines(machine: dict[str, Any]) -> list[str]:
    """The machine record (:func:`benchmarks.machine.machine_info`) as four Markdown list items."""
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
            f"{', host norms on ' + machine['host_kernels'] if 'host_kernels' in machine else ''}"
        ),
        f"- BLAS core type {blas.get('core') or 'not recorded'}; BLAS environment: {env}",
        f"- load average (1 min) at start {num(load[0])}, at end {num(load[1])}",
    ]


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


def slug(text: str) -> str:
    """``"AMD EPYC 7B13"`` -> ``"amd-epyc-7b13"``: lower case, runs of other characters as one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def file_stem(machine: dict[str, Any], quick: bool) -> str:
    """``<machine>-<backend>-<YYYY-MM-DD>[-quick]``, the machine from the GPU name on cupy, else the CPU."""
    name = machine["gpus"][0] if machine["gpus"] else machine["cpu"]
    return f"{slug(name)}-{machine['backend']}-{machine['date']}" + ("-quick" if quick else "")
