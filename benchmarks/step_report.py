"""Targets, tables and the phase plot of the training-step benchmark.

A record is one comparison of sides (:func:`benchmarks.report.sides_record`): a training step at one
dtype and thread count (every side's phases too), an Adam or an embedding-backward micro-benchmark.

The speed targets: the step and the loss backward within 1.10x and 1.5x of the dense NumPy step at
every worker count; tp_gpu's Adam within 1.2x of the textbook in-place NumPy Adam; the embedding
backward within 1.5x of torch's best way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .plots import pyplot, save
from .report import (
    SPREAD_NOTE,
    Record,
    machine_lines,
    median,
    ms,
    num,
    seconds,
    spread_cell,
    target,
    targets_table,
)
from .skeleton import Report
from .step_case import PHASES

#: The limits of the speed targets.
STEP_LIMIT, LOSS_BWD_LIMIT, ADAM_LIMIT, EMBEDDING_LIMIT = 1.10, 1.5, 1.2, 1.5
ADAM_BASELINE = "numpy in place"
TORCH_EMBEDDING = ("torch index_add_", "torch embedding backward")


def tp_sides(record: Record) -> list[str]:
    """The tp_gpu sides: each worker count (``inplace=True``) and the default, kept-logits loss."""
    return [name for name in record["sides"] if name.startswith("tp ")]


def _over(r: Record, sides: list[str], base: str, phase: str | None = None) -> dict[str, float]:
    """Each side's median over ``base``'s (of a phase, or of the whole run)."""
    return {n: seconds(r, n, phase) / seconds(r, base, phase) for n in sides}


def target_rows(records: list[Record]) -> list[Record]:
    """The speed targets, one row per (target, case, dtype, threads), with each ratio and the worst."""
    rows = []
    for r in records:
        if r["case"] == "training step":
            rows.append(
                target(
                    f"step <= {STEP_LIMIT}x dense", r, r["shape"], _over(r, tp_sides(r), "dense"), STEP_LIMIT
                )
            )
            loss = _over(r, tp_sides(r), "dense", "loss bwd")
            rows.append(target(f"loss bwd <= {LOSS_BWD_LIMIT}x dense", r, r["shape"], loss, LOSS_BWD_LIMIT))
        elif r["case"] == "adam":
            ratio = _over(r, ["tp_gpu Adam"], ADAM_BASELINE)
            rows.append(target(f"Adam <= {ADAM_LIMIT}x {ADAM_BASELINE}", r, r["label"], ratio, ADAM_LIMIT))
        elif r["case"] == "embedding backward":
            torch_best = min((seconds(r, n) for n in TORCH_EMBEDDING if n in r["sides"]), default=None)
            if torch_best is not None:
                ratios = {n: seconds(r, n) / torch_best for n in ("tp_gpu kernel", "tp_gpu layer")}
                name = f"embedding bwd <= {EMBEDDING_LIMIT}x torch's best"
                rows.append(target(name, r, r["label"], ratios, EMBEDDING_LIMIT))
    return rows


# --------------------------------------------------------------------------- Markdown


def step_table(r: Record) -> list[str]:
    """One training step: a row per side, its step time, its ratio to dense and each phase's time."""
    head = "| side | step ms | / dense | " + " | ".join(PHASES) + " |"
    lines = [f"### Training step: {r['shape']}, {r['dtype']}, {r['threads']} thread(s)", "", head]
    lines.append("|---|---:|---:|" + "---:|" * len(PHASES))
    dense = seconds(r, "dense")
    for name in r["sides"]:
        phases = " | ".join(ms(seconds(r, name, ph)) for ph in PHASES)
        lines.append(f"| {name} | {ms(seconds(r, name))} | {num(seconds(r, name) / dense)} | {phases} |")
    lines += [
        "",
        f"spread {spread_cell(r)}; load average {num(r['load_1min'][0])}; check: {check_text(r)}",
        "",
    ]
    return lines


def check_text(r: Record) -> str:
    check = r.get("check") or {}
    errors = check.get("errors", {})
    worst = max((e["error"] for n, e in errors.items() if n.startswith("tp")), default=None)
    torch = errors.get("torch")
    allowed = num(check.get("allowed_relative_error"), ".2g")
    text = f"TP within {num(worst, '.2g')} of dense (relative; {allowed} allowed)"
    return text + (f", torch {num(torch['error'], '.2g')} ({torch['worst']})" if torch else "")


def micro_table(records: list[Record], title: str) -> list[str]:
    """Micro-benchmarks of one kind: a row per (case, dtype, threads), a column per side (ms)."""
    if not records:
        return []
    names = list(dict.fromkeys(n for r in records for n in r["sides"]))
    lines = [f"### {title}", "", "| case | dtype | threads | " + " | ".join(names) + " | spread |"]
    lines.append("|---|---|---:|" + "---:|" * len(names) + "---:|")
    for r in records:
        cells = " | ".join(ms(median(r, n)) for n in names)
        lines.append(f"| {r['label']} | {r['dtype']} | {r['threads']} | {cells} | {spread_cell(r)} |")
    notes = [n for r in records for n in r.get("notes", [])]
    return lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])


def markdown(machine: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The run as Markdown: the machine, the method, the speed targets, then every table."""
    lines = [f"# tp_gpu training-step benchmark, {machine['date']}", ""]
    lines += machine_lines(machine)
    lines += [
        f"- median of at least {options['repeat']} shuffled rounds of every side (TP at each worker count, "
        f"dense, torch) after {options['warmup']} warm-up run(s), at most {options['max_time']:g} s per "
        "comparison; dense in place on the TP layers' own weight arrays; phases timed inside each run",
        "- `/ dense` < 1: faster than the dense NumPy step; the targets' ratios are of medians",
        "",
        "## Speed targets",
        "",
    ]
    lines += targets_table(target_rows(records)) + [""]
    for r in records:
        if r["case"] == "training step":
            lines += step_table(r)
    lines += micro_table([r for r in records if r["case"] == "adam"], "Adam (ms per step)")
    lines += micro_table([r for r in records if r["case"] == "embedding backward"], "Embedding backward (ms)")
    lines += [SPREAD_NOTE]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the plot


def write_phase_plot(records: list[Record], stem: Path) -> list[Path]:
    """``<stem>-phases.png``: per training step (dtype, threads), a stacked bar of phase medians per side."""
    steps = [r for r in records if r["case"] == "training step"]
    plt = pyplot() if steps else None
    if plt is None:
        return []
    fig, axes = plt.subplots(1, len(steps), figsize=(4.6 * len(steps), 3.8), squeeze=False)
    for ax, r in zip(axes[0], steps):
        names = list(r["sides"])
        left = [0.0] * len(names)
        for i, ph in enumerate(PHASES):
            widths = [seconds(r, n, ph) * 1e3 for n in names]
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
    return [save(fig, stem.with_name(f"{stem.name}-phases.png"))]


REPORT = Report(targets=target_rows, markdown=markdown, plots=write_phase_plot)
