"""Targets and tables of the generation benchmark, from its records alone (``--render`` redraws them).

A record is one model at one batch (:func:`benchmarks.report.sides_record`): every side's whole
generations in shared rounds, each run's ``prefill`` and ``decode`` phases, and, unless skipped, one
instrumented run per side (:mod:`.generation_profile`). It gives two rows: the prefill of the prompt
(``B * prompt`` tokens) and the decoding steps (``B * new_tokens`` tokens).

The issue's targets, on its rows (prefill at batch 1, decode at every batch): tp_gpu at p = 1 at least
as many tokens per second as transformers eager, and tp_gpu at p = 4 within 1.10x of p = 1's time.
Ratios are the median of the per-round ratios (the two sides ran in the same round).
"""

from __future__ import annotations

import statistics
from typing import Any

from .generation_profile import KINDS
from .report import SPREAD_NOTE, Record, machine_lines, spread_cell, target, targets_table
from .skeleton import Report

TORCH = "transformers"
P4_LIMIT = 1.10


def ours(p: int) -> str:
    return f"tp_gpu p={p}"


def tokens(r: Record, phase: str) -> int:
    """Tokens a phase makes or reads: the prompt for the prefill, the new tokens for decoding."""
    return r["batch"] * (r["prompt"] if phase == "prefill" else r["new_tokens"])


def phase_times(r: Record, side: str, phase: str) -> list[float]:
    return r["sides"][side]["phases_s"][phase]


def paired(r: Record, side: str, base: str, phase: str) -> float:
    """Median over the rounds of ``side``'s phase time over ``base``'s in the same round."""
    return statistics.median(a / b for a, b in zip(phase_times(r, side, phase), phase_times(r, base, phase)))


def rows(r: Record) -> list[str]:
    return ["prefill", "decode"]


def row_label(r: Record, phase: str) -> str:
    what = f"prefill {r['prompt']}" if phase == "prefill" else f"decode {r['new_tokens']}"
    return f"{r['model']} {what} @B={r['batch']}"


def is_target_row(r: Record, phase: str) -> bool:
    return phase == "decode" or r["batch"] == 1


def target_rows(records: list[Record]) -> list[Record]:
    """p = 1 tokens/s >= transformers' (time ratio <= 1) and p = 4 time <= 1.10x p = 1's, per row."""
    out = []
    for r in records:
        for phase in rows(r):
            if not is_target_row(r, phase):
                continue
            label = row_label(r, phase)
            if ours(1) in r["sides"] and TORCH in r["sides"]:
                ratio = {ours(1): paired(r, ours(1), TORCH, phase)}
                out.append(target("p=1 time per token <= transformers'", r, label, ratio, 1.0))
            others = {n: paired(r, n, ours(1), phase) for n in r["sides"] if n.startswith("tp_gpu p=")}
            others.pop(ours(1), None)
            if others and ours(1) in r["sides"]:
                out.append(target(f"p>1 time per token <= {P4_LIMIT}x p=1", r, label, others, P4_LIMIT))
    return out


# --------------------------------------------------------------------------- Markdown


def rate_cell(r: Record, side: str, phase: str) -> str:
    """Median tokens per second, and the slowest and fastest run's, of a side's phase."""
    times, n = phase_times(r, side, phase), tokens(r, phase)
    return f"{n / statistics.median(times):,.0f} ({n / max(times):,.0f}-{n / min(times):,.0f})"


def rate_table(records: list[Record]) -> list[str]:
    """A row per (model, phase, batch): each side's tokens/s, p=1 over transformers, p>1 over p=1."""
    sides = list(records[0]["sides"])
    lines = [
        "| row | " + " | ".join(f"{s} tok/s" for s in sides) + f" | p=1 speed / {TORCH} | p>1 time / p=1 "
        "| spread |",
        "|---|" + "---:|" * len(sides) + "---:|---:|---|",
    ]
    for r in records:
        for phase in rows(r):
            speed = 1 / paired(r, ours(1), TORCH, phase) if ours(1) in r["sides"] else None
            over = [
                f"{n.split()[-1]}: {paired(r, n, ours(1), phase):.3f}"
                for n in r["sides"]
                if n.startswith("tp_gpu p=") and n != ours(1)
            ]
            label = row_label(r, phase) + ("" if is_target_row(r, phase) else " (not a target)")
            lines.append(
                f"| {label} | " + " | ".join(rate_cell(r, s, phase) for s in sides)
                + f" | {'-' if speed is None else f'{speed:.2f}x'} | {', '.join(over) or '-'} "
                f"| {spread_cell(r)} |"
            )  # fmt: skip
    return lines


def us_per_token(r: Record, seconds: float, phase: str) -> float:
    return seconds / tokens(r, phase) * 1e6


def us(value: float) -> str:
    """Microseconds: whole above 100, else one decimal."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def kind_table(records: list[Record], phase: str) -> list[str]:
    """µs per token of each kind in the instrumented run, its total, and the timed median beside it;
    after transformers' row, tp_gpu p=1's over transformers' per kind (> 1: tp_gpu spends more)."""
    lines = [
        "| model | B | side | " + " | ".join(KINDS) + " | instrumented total | timed median |",
        "|---|---:|---|" + "---:|" * (len(KINDS) + 2),
    ]
    for r in records:
        b = r.get("breakdown", {})
        for side, s in b.items():
            p = s["phases"][phase]
            cells = [us(us_per_token(r, p["kinds_s"][k], phase)) for k in KINDS]
            timed = statistics.median(phase_times(r, side, phase))
            lines.append(
                f"| {r['model']} | {r['batch']} | {side} | " + " | ".join(cells)
                + f" | {us(us_per_token(r, p['seconds'], phase))} | {us(us_per_token(r, timed, phase))} |"
            )  # fmt: skip
        if ours(1) in b and TORCH in b:
            mine, theirs = (b[n]["phases"][phase] for n in (ours(1), TORCH))
            ratios = [f"{mine['kinds_s'][k] / theirs['kinds_s'][k]:.2f}x" for k in KINDS]
            total = mine["seconds"] / theirs["seconds"]
            lines.append(
                f"| {r['model']} | {r['batch']} | *p=1 / {TORCH}* | "
                + " | ".join(ratios)
                + f" | {total:.2f}x | |"
            )
    return lines


def class_table(r: Record, phase: str) -> list[str]:
    """Each timed class of every side: its kind, µs per token and calls per step of the phase."""
    b = r["breakdown"]
    steps, per = (r["new_tokens"], "step") if phase == "decode" else (1, "pass")
    names = sorted(
        {n for side in b.values() for n in side["phases"][phase]["by_class_s"]},
        key=lambda n: -max(s["phases"][phase]["by_class_s"].get(n, 0.0) for s in b.values()),
    )
    lines = [
        f"**{r['model']}, B={r['batch']}, {phase}**: µs per token (calls per {per})",
        "",
        "| class | kind | " + " | ".join(b) + " |",
        "|---|---|" + "---:|" * len(b),
    ]
    for name in names:
        kind = next(s["kind_of"][name] for s in b.values() if name in s["kind_of"])
        cells = []
        for side in b.values():
            p = side["phases"][phase]
            if name not in p["by_class_s"]:
                cells.append("-")
                continue
            nested = p["nested_calls"].get(name)
            cells.append(
                f"{us(us_per_token(r, p['by_class_s'][name], phase))} ({p['calls'][name] / steps:g})"
                + (f", {nested / steps:g} nested" if nested else "")
            )
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return lines + [""]


def ops_table(r: Record) -> list[str]:
    """transformers' decoding under torch.profiler: the top operators' self µs per token."""
    ops = r["breakdown"][TORCH]["decode_ops"]
    steps = r["new_tokens"]
    total, in_ops = (us_per_token(r, ops[k], "decode") for k in ("decode_s", "ops_self_s"))
    lines = [
        f"**{r['model']}, B={r['batch']}, decode, torch.profiler**: {us(total)} µs per token profiled, "
        f"{us(in_ops)} of it in operators (self time), {us(total - in_ops)} in none "
        "(Python, dispatch, the profiler)",
        "",
        "| operator | calls per step | self µs per token |",
        "|---|---:|---:|",
    ]
    for op in ops["top"]:
        per_token = us_per_token(r, op["self_s"], "decode")
        lines.append(f"| `{op['op']}` | {op['calls'] / steps:g} | {us(per_token)} |")
    return lines + [""]


def markdown(meta: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The machine, what was timed, the targets, tokens per second, and where the time goes."""
    r0 = records[0]
    lines = [f"# Generation: tp_gpu against transformers eager, {meta['date']}", "", *machine_lines(meta)]
    first = {r["model"]: r for r in reversed(records)}
    models = "; ".join(
        f"{name} ({r['parameters'] / 1e6:.1f}M parameters: "
        + ", ".join(f"{k} {v}" for k, v in r["spec"].items()) + ")"
        for name, r in reversed(first.items())
    )  # fmt: skip
    lines += [
        f"- transformers {meta.get('transformers')}; models of random weights (seeded), float32, eager "
        f"attention, loaded by tp_gpu from transformers' save_pretrained folder: {models}",
        f"- prompt {r0['prompt']} random ids per row, no padding; greedy, end-of-sequence off; prefill = "
        f"the pass over the prompt to the first token, decode = the next {r0['new_tokens']} one-token steps "
        "(see `benchmarks/generation.py` for exactly what each side runs); every side's tokens equal "
        "transformers' `generate` before timing",
        f"- at least {options['repeat']} shuffled rounds of whole generations (every side once a round), "
        f"{options['warmup']} warm-up run(s); tokens/s: median (slowest run - fastest run); ratios: the "
        "median of the per-round ratios",
        "", "## Speed targets", "", *targets_table(target_rows(records)),
        "", "## Tokens per second", "", *rate_table(records),
        "", f"spread (of whole generations) {', '.join(spread_cell(r) for r in records)}. {SPREAD_NOTE}",
    ]  # fmt: skip
    if any("breakdown" in r for r in records):
        lines += [
            "", "## Where the time goes", "",
            f"The fastest of {options.get('profile_runs', 1)} instrumented run(s) per side "
            "(`benchmarks/generation_profile.py`): tp_gpu's Function calls timed by class, transformers' "
            "modules by forward hooks; *other* is the phase less the kinds timed. µs per token (per "
            "decoded token: a step makes B of them); *p=1 / transformers*: > 1 where tp_gpu spends more.",
            "", "### Decode, µs per token", "", *kind_table(records, "decode"),
            "", "### Prefill, µs per prompt token", "", *kind_table(records, "prefill"),
        ]  # fmt: skip
        for phase in ("decode", "prefill"):
            lines += ["", f"### By class, {phase}", ""]
            lines += [line for r in records if "breakdown" in r for line in class_table(r, phase)]
        lines += ["### transformers' decoding operators", ""]
        for r in records:
            if "breakdown" in r and "decode_ops" in r["breakdown"].get(TORCH, {}):
                lines += ops_table(r)
    return "\n".join(lines) + "\n"


REPORT = Report(targets=target_rows, markdown=markdown, plots=lambda records, stem: [])
