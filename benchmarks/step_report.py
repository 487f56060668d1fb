"""Records, targets, Markdown and the phase plot of the training-step benchmark (issue 17).

A record is one timed comparison (a training step at one dtype and thread count, an Adam or an
embedding-backward micro-benchmark) with every raw time of every side; the tables and the plot are
drawn from the records alone, so that ``--render`` redraws them from a JSON.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from . import report
from .harness import Timed
from .plots import _shrink_png
from .step_case import PHASES

Record = dict[str, Any]

#: Issue 17's limits.
STEP_LIMIT, LOSS_BWD_LIMIT, ADAM_LIMIT, EMBEDDING_LIMIT = 1.10, 1.5, 1.2, 1.5
ADAM_BASELINE = "numpy in place"
TORCH_EMBEDDING = ("torch index_add_", "torch embedding backward")


def timed_record(
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


def median(record: Record, side: str, phase: str | None = None) -> float | None:
    """A side's median step (or phase) time, None where the side did not run."""
    entry = record["sides"].get(side)
    if entry is None:
        return None
    return entry["median_s"] if phase is None else entry["phase_median_s"][phase]


def tp_sides(record: Record) -> list[str]:
    return [name for name in record["sides"] if name.startswith("tp p=")]


# --------------------------------------------------------------------------- targets


def _target(name: str, record: Record, label: str, ratios: dict[str, float], limit: float) -> Record:
    worst = max(ratios.values())
    status = "missed" if worst > limit else "noisy" if record["noisy"] else "met"
    return {
        "target": name, "dtype": record["dtype"], "threads": record["threads"], "case": label,
        "ratios": ratios, "worst": worst, "limit": limit, "status": status,
    }  # fmt: skip


def target_rows(records: list[Record]) -> list[Record]:
    """Issue 17's targets, one row per (target, case, dtype, threads), with each ratio and the worst."""
    rows = []
    for r in records:
        if r["case"] == "training step":
            step = {n: median(r, n) / median(r, "dense") for n in tp_sides(r)}
            rows.append(_target(f"step <= {STEP_LIMIT}x dense", r, r["shape"], step, STEP_LIMIT))
            loss = {n: median(r, n, "loss bwd") / median(r, "dense", "loss bwd") for n in tp_sides(r)}
            rows.append(_target(f"loss bwd <= {LOSS_BWD_LIMIT}x dense", r, r["shape"], loss, LOSS_BWD_LIMIT))
        elif r["case"] == "adam":
            ratio = {"tp_gpu Adam": median(r, "tp_gpu Adam") / median(r, ADAM_BASELINE)}
            rows.append(_target(f"Adam <= {ADAM_LIMIT}x {ADAM_BASELINE}", r, r["label"], ratio, ADAM_LIMIT))
        elif r["case"] == "embedding backward":
            torch_best = min((median(r, n) for n in TORCH_EMBEDDING if n in r["sides"]), default=None)
            if torch_best is not None:
                ratios = {n: median(r, n) / torch_best for n in ("tp_gpu kernel", "tp_gpu layer")}
                name = f"embedding bwd <= {EMBEDDING_LIMIT}x torch's best"
                rows.append(_target(name, r, r["label"], ratios, EMBEDDING_LIMIT))
    return rows


# --------------------------------------------------------------------------- Markdown


def _ms(seconds: float | None) -> str:
    return report.ms(seconds)


def _spread(r: Record) -> str:
    return report.num(r["spread"]) + (" noisy" if r["noisy"] else "")


def step_table(r: Record) -> list[str]:
    """One training step: a row per side, its step time, its ratio to dense and each phase's time."""
    head = "| side | step ms | / dense | " + " | ".join(PHASES) + " |"
    lines = [f"### Training step: {r['shape']}, {r['dtype']}, {r['threads']} thread(s)", "", head]
    lines.append("|---|---:|---:|" + "---:|" * len(PHASES))
    dense = median(r, "dense")
    for name in r["sides"]:
        phases = " | ".join(_ms(median(r, name, ph)) for ph in PHASES)
        lines.append(
            f"| {name} | {_ms(median(r, name))} | {report.num(median(r, name) / dense)} | {phases} |"
        )
    lines += [
        "",
        f"spread {_spread(r)}; load average {report.num(r['load_1min'][0])}; check: {check_text(r)}",
        "",
    ]
    return lines


def check_text(r: Record) -> str:
    check = r.get("check") or {}
    errors = check.get("errors", {})
    worst = max((e["error"] for n, e in errors.items() if n.startswith("tp")), default=None)
    torch = errors.get("torch")
    allowed = report.num(check.get("allowed_relative_error"), ".2g")
    text = f"TP within {report.num(worst, '.2g')} of dense (relative; {allowed} allowed)"
    return text + (f", torch {report.num(torch['error'], '.2g')} ({torch['worst']})" if torch else "")


def micro_table(records: list[Record], title: str) -> list[str]:
    """Micro-benchmarks of one kind: a row per (case, dtype, threads), a column per side (ms)."""
    if not records:
        return []
    names = list(dict.fromkeys(n for r in records for n in r["sides"]))
    lines = [f"### {title}", "", "| case | dtype | threads | " + " | ".join(names) + " | spread |"]
    lines.append("|---|---|---:|" + "---:|" * len(names) + "---:|")
    for r in records:
        cells = " | ".join(_ms(median(r, n)) for n in names)
        lines.append(f"| {r['label']} | {r['dtype']} | {r['threads']} | {cells} | {_spread(r)} |")
    notes = [n for r in records for n in r.get("notes", [])]
    return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


STATUS = {"met": "yes", "missed": "**no**", "noisy": "noisy: re-run"}


def targets_table(rows: list[Record]) -> list[str]:
    lines = ["| target | case | dtype | threads | ratios | worst | met? |", "|---|---|---|---:|---|---:|---|"]
    for t in rows:
        ratios = ", ".join(f"{k.replace('tp ', '')}: {v:.2f}" for k, v in t["ratios"].items())
        lines.append(
            f"| {t['target']} | {t['case']} | {t['dtype']} | {t['threads']} | {ratios} | "
            f"{t['worst']:.2f} | {STATUS[t['status']]} |"
        )
    return lines


def markdown(machine: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The run as Markdown: the machine, the method, issue 17's targets, then every table."""
    lines = [f"# tp_gpu training-step benchmark (issue 17), {machine['date']}", ""]
    lines += report._machine_lines(machine, options)[:4]
    lines += [
        f"- median of at least {options['repeat']} shuffled rounds of every side (TP at each worker count, "
        f"dense, torch) after {options['warmup']} warm-up run(s), at most {options['max_time']:g} s per "
        "comparison; dense in place on the TP layers' own weight arrays; phases timed inside each run",
        "- `/ dense` < 1: faster than the dense NumPy step; the targets' ratios are of medians",
        "",
        "## Issue 17 targets",
        "",
    ]
    lines += targets_table(target_rows(records)) + [""]
    for r in records:
        if r["case"] == "training step":
            lines += step_table(r)
    lines += micro_table([r for r in records if r["case"] == "adam"], "Adam (ms per step)")
    lines += micro_table([r for r in records if r["case"] == "embedding backward"], "Embedding backward (ms)")
    lines += [
        "spread: interquartile range of the runs / median (range / median below 5 runs), the worst side; "
        "*noisy*: above 25 % (40 % below 2 ms) after the retries, so a target resting on it reads "
        "`noisy: re-run`."
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the plot and the files


def write_phase_plot(records: list[Record], stem: Path) -> list[Path]:
    """``<stem>-phases.png``: per training step (dtype, threads), a stacked bar of phase medians per side."""
    steps = [r for r in records if r["case"] == "training step"]
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install matplotlib)")
        return []
    if not steps:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(steps), figsize=(4.6 * len(steps), 3.8), squeeze=False)
    for ax, r in zip(axes[0], steps):
        names = list(r["sides"])
        left = [0.0] * len(names)
        for i, ph in enumerate(PHASES):
            widths = [median(r, n, ph) * 1e3 for n in names]
            ax.barh(names, widths, left=left, color=f"C{i}", label=ph)
            left = [a + b for a, b in zip(left, widths)]
        for y, n in enumerate(names):  # the spread of the whole step: its interquartile range
            times = sorted(t * 1e3 for t in r["sides"][n]["times_s"])
            ax.plot([times[len(times) // 4], times[(3 * len(times)) // 4]], [y, y], color="k", linewidth=1)
        ax.invert_yaxis()
        ax.set(
            xlabel="ms per step (median; black: quartiles of the step)",
            title=f"{r['dtype']}, {r['threads']} thread(s)",
        )
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(steps[0]["shape"], fontsize=8)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}-phases.png")
    fig.savefig(path, dpi=72)
    plt.close(fig)
    _shrink_png(path)
    return [path]


def write_results(
    stem: Path, machine: dict[str, Any], options: dict[str, Any], records: list[Record], plot: bool = True
) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and, with ``plot``, ``<stem>-phases.png``; returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [report.rounded(r) for r in records]
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    header = {"machine": machine, "options": options, "targets": target_rows(records)}
    report.write_json(json_path, header, records)
    md_path.write_text(markdown(machine, options, records))
    return [json_path, md_path] + (write_phase_plot(records, stem) if plot else [])
