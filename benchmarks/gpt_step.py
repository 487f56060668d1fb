"""The GPT training step against its PyTorch twin, with a profile: ``python -m benchmarks.gpt_step``.

The step is ``examples/train_gpt.py``'s: TinyGPT at ``GPTConfig``'s defaults (hidden 64, 2 layers,
4 heads, 64 tokens, 16 sequences), Adam (lr 3e-3), global-norm clipping at 1.0, dropout 0.1, on the
numpy backend; its twin is ``examples/gpt_torch_twin.py``'s TorchGPT from the same logical weights,
with ``torch.optim.Adam`` and ``clip_grad_norm_``, on one torch thread. One step, on both sides, is
zero_grad, forward, loss, backward, clip, optimizer step (:data:`PHASES`, each lapped), on fixed
batches from ``train_gpt.batches`` taken in turn. (``train_gpt.train`` also passes the step through a
``GradScaler``, disabled at these dtypes: a no-op left out here.)

Per dtype, the sides ``tp p=<n>`` (each ``--workers``) and ``torch`` are first checked (the first
step's losses agree: :data:`LOSS_RTOL`), then timed in the same shuffled rounds (:mod:`.harness`),
phase by phase, then profiled by op kind (:mod:`.gpt_step_profile`). The speed targets: tp p=1 at
most torch's time, and every other p at most 1.10x p=1's. JSON, Markdown and the plot go to
``benchmarks/results/local/`` unless ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tp_gpu import Adam, TensorParallelConfig, VocabParallelCrossEntropy, clip_grad_norm
from tp_gpu.backends import get_backend

from . import harness, machine, skeleton
from .gpt_step_profile import KINDS, PHASES, breakdown, kind_totals
from .layer_calls import threadpool_line, threadpools
from .phases import PhaseClock, time_phases
from .plots import pyplot, save
from .report import SPREAD_NOTE, Record, file_stem, machine_lines, ms, seconds, sides_record, spread_cell
from .skeleton import option, positive_int

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:  # train_gpt and its twin import each other as top-level modules
    sys.path.insert(0, str(EXAMPLES))

from train_gpt import GPTConfig, TinyGPT, batches, load_corpus  # noqa: E402

#: The first step's losses of every side agree within this relative error.
LOSS_RTOL = {"float64": 1e-10, "float32": 1e-4}
#: The speed targets: tp p=1 / torch, and tp p=n / tp p=1.
TORCH_LIMIT, WORKERS_LIMIT = 1.00, 1.10
LR, CLIP, BATCH, SEED, N_BATCHES = 3e-3, 1.0, 16, 0, 8
VERDICT = {"met": "PASS", "missed": "**FAIL**", "noisy": "PASS? (noisy: re-run)"}

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(100, 5), warmup=3, max_time=(60.0, 2.0), min_time=(0.0, 0.0), retries=(2, 0)
)
OPTIONS: skeleton.Options = {
    "--quick": option("5 rounds, 2 s per dtype at most, no retry, 1 profiled step", action="store_true"),
    "--dtype": option("dtypes (default float32 float64)", nargs="+", choices=("float32", "float64"),
                      default=["float32", "float64"]),
    "--workers": skeleton.workers_option([1, 4]),
    "--profile-runs": option("instrumented steps per side, the fastest kept (default 5, quick 1)",
                             type=positive_int),
    **TIMING, **skeleton.output_options("plot"),
}  # fmt: skip
PROGRAM = skeleton.Program(
    prog="python -m benchmarks.gpt_step", options=OPTIONS,
    quick_defaults=TIMING_QUICK | {"profile_runs": (5, 1)},
    description="Time examples/train_gpt.py's training step (tp_gpu at each worker count) against its "
    "PyTorch twin, phase by phase, and profile both by op kind.",
)  # fmt: skip


class StepMismatch(RuntimeError):
    """The sides' first losses differ by more than :data:`LOSS_RTOL`."""


# --------------------------------------------------------------------------- the sides


class Side:
    """A model, its optimizer and a step over fixed batches; ``clock`` laps each of :data:`PHASES`;
    ``scope(name)``, where set, is entered around each phase (the torch profile's markers)."""

    def __init__(self, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.clock = PhaseClock()
        self.scope: Callable[[str], Any] | None = None
        self.data, self.step_index, self.loss = data, 0, 0.0

    def phases(self, inputs: np.ndarray, targets: np.ndarray) -> list[tuple[str, Callable[[], None]]]:
        raise NotImplementedError

    def run(self) -> float:
        """One training step on the next batch; its loss (before the update)."""
        inputs, targets = self.data[self.step_index % len(self.data)]
        self.step_index += 1
        steps = self.phases(inputs, targets)
        self.clock.start()
        for name, phase in steps:
            with self.scope(name) if self.scope else contextlib.nullcontext():
                phase()
            self.clock.lap(name)
        return self.loss


class TpSide(Side):
    """``train_gpt.train``'s step: TinyGPT, ``VocabParallelCrossEntropy()``, ``clip_grad_norm``, Adam."""

    def __init__(self, gpt: GPTConfig, n_workers: int, dtype: str, data: list) -> None:
        super().__init__(data)
        config = TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype=dtype)
        self.model = TinyGPT(gpt, config, seed=SEED)
        self.optimizer = Adam(self.model.parameters(), lr=LR)
        self.loss_fn = VocabParallelCrossEntropy()

    def phases(self, inputs: np.ndarray, targets: np.ndarray) -> list[tuple[str, Callable[[], None]]]:
        state: dict[str, Any] = {}

        def forward() -> None:
            state["logits"] = self.model(inputs)  # (B, S, vocab), split on the vocabulary

        def loss() -> None:
            state["loss"] = self.loss_fn(state.pop("logits"), targets)
            self.loss = float(state["loss"])

        return [
            ("zero_grad", self.optimizer.zero_grad), ("forward", forward), ("loss", loss),
            ("backward", lambda: state.pop("loss").backward()),
            ("clip", lambda: clip_grad_norm(self.model.parameters(), CLIP)),
            ("optimizer", self.optimizer.step),
        ]  # fmt: skip


class TorchSide(Side):
    """``gpt_torch_twin.train_torch``'s step: TorchGPT, ``F.cross_entropy``, ``clip_grad_norm_``, Adam."""

    def __init__(self, torch: Any, gpt: GPTConfig, state: dict[str, np.ndarray], dtype: str, data: list):
        from gpt_torch_twin import TORCH_DTYPES, TorchGPT

        super().__init__(data)
        self.torch, self.vocab = torch, gpt.vocab
        self.model = TorchGPT(gpt, state, TORCH_DTYPES[dtype], SEED)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def phases(self, inputs: np.ndarray, targets: np.ndarray) -> list[tuple[str, Callable[[], None]]]:
        torch, state = self.torch, {}
        F = torch.nn.functional

        def forward() -> None:
            state["logits"] = self.model(torch.from_numpy(inputs))  # (B, S, vocab)

        def loss() -> None:
            logits = state.pop("logits").reshape(-1, self.vocab)
            state["loss"] = F.cross_entropy(logits, torch.from_numpy(targets).reshape(-1))
            self.loss = float(state["loss"].detach())

        return [
            ("zero_grad", self.optimizer.zero_grad), ("forward", forward), ("loss", loss),
            ("backward", lambda: state.pop("loss").backward()),
            ("clip", lambda: torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)),
            ("optimizer", self.optimizer.step),
        ]  # fmt: skip


def corpus_batches(gpt_seed: int = SEED) -> tuple[GPTConfig, list[tuple[np.ndarray, np.ndarray]]]:
    """``train_gpt``'s corpus and config, and its first :data:`N_BATCHES` batches."""
    text = load_corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], dtype=np.int64)
    gpt = GPTConfig(vocab=len(chars))
    return gpt, [batches(data, gpt.seq_len, BATCH, gpt_seed, step) for step in range(N_BATCHES)]


def build_sides(dtype: str, workers: Sequence[int], torch: Any) -> tuple[dict[str, Side], GPTConfig]:
    """``tp p=<n>`` for each worker count and ``torch``, fresh (at step 0)."""
    gpt, data = corpus_batches()
    sides: dict[str, Side] = {f"tp p={n}": TpSide(gpt, n, dtype, data) for n in workers}
    first = next(s for s in sides.values() if isinstance(s, TpSide))
    sides["torch"] = TorchSide(torch, gpt, first.model.state_dict(), dtype, data)
    return sides, gpt


def check_sides(sides: dict[str, Side], dtype: str) -> dict[str, Any]:
    """Run each side's first step; their losses must agree within ``LOSS_RTOL[dtype]`` of torch's."""
    losses = {name: side.run() for name, side in sides.items()}
    ref = losses["torch"]
    errors = {name: abs(v - ref) / abs(ref) for name, v in losses.items() if name != "torch"}
    check = {"losses": losses, "relative_errors": errors, "rtol": LOSS_RTOL[dtype]}
    bad = {n: e for n, e in errors.items() if not e <= LOSS_RTOL[dtype]}
    if bad:
        raise StepMismatch(f"first-step losses of {sorted(bad)} differ from torch's {ref!r}: got {losses}, "
                           f"expected within {LOSS_RTOL[dtype]:g} relative")  # fmt: skip
    return check


# --------------------------------------------------------------------------- the run


def run_dtype(args: argparse.Namespace, dtype: str, torch: Any) -> Record:
    """One dtype: the sides checked, timed in shared rounds phase by phase, then profiled."""
    sides, gpt = build_sides(dtype, args.workers, torch)
    check = check_sides(sides, dtype)
    clocks = {name: side.clock for name, side in sides.items()}
    timed, phases = time_phases({n: s.run for n, s in sides.items()}, clocks, PHASES, skeleton.timing(args))
    profile = {
        name: breakdown(side, torch if name == "torch" else None, args.profile_runs)
        for name, side in sides.items()
    }
    fields = {"case": "gpt step", "dtype": dtype, "threads": 1, "gpt": vars(gpt), "check": check}
    record = sides_record(fields, timed, phases)
    for side in record["sides"].values():
        side["spread"] = harness.spread(side["times_s"])
    record["profile"] = profile
    return record


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The machine record (threadpoolctl's view too), with BLAS, torch and tp_gpu's host threads pinned
    to 1; torch."""
    torch = machine.import_torch()
    if torch is None:
        PROGRAM.parser().error("torch is needed: the step is timed against its PyTorch twin")
    meta = skeleton.start(get_backend("numpy"), torch, threads=1)
    meta["threadpools"] = threadpools()
    return meta, torch


def run(args: argparse.Namespace, torch: Any, save: skeleton.Save) -> list[Record]:
    """Each dtype in turn; saved after each."""
    harness.warm_up_machine()
    records: list[Record] = []
    for dtype in args.dtype:
        records.append(run_dtype(args, dtype, torch))
        print(f"gpt step {dtype}: done", flush=True)
        gc.collect()
        save(records)
    return records


# --------------------------------------------------------------------------- the report


def target_rows(records: list[Record]) -> list[Record]:
    """Per dtype: tp p=1 / torch <= 1.00, and tp p=n / tp p=1 <= 1.10 for each other n."""
    rows = []
    for r in records:
        tp = [n for n in r["sides"] if n.startswith("tp p=")]
        base = tp[0]
        pairs = [(base, "torch", TORCH_LIMIT)] + [(n, base, WORKERS_LIMIT) for n in tp[1:]]
        for side, over, limit in pairs:
            ratio = seconds(r, side) / seconds(r, over)
            status = "missed" if not ratio <= limit else "noisy" if r["noisy"] else "met"
            rows.append({"dtype": r["dtype"], "ratio": f"{side} / {over}", "value": ratio, "limit": limit,
                         "status": status})  # fmt: skip
    return rows


def step_lines(r: Record) -> list[str]:
    """A dtype's step: per side its median, spread and phase medians; the loss check."""
    lines = [f"### {r['dtype']}", "", "| side | ms / step | spread | " + " | ".join(PHASES) + " |"]
    lines.append("|---|---:|---:|" + "---:|" * len(PHASES))
    for name, side in r["sides"].items():
        phases = " | ".join(ms(side["phase_median_s"][ph]) for ph in PHASES)
        lines.append(f"| {name} | {ms(side['median_s'])} | {side['spread']:.2f} | {phases} |")
    check = r["check"]
    errors = ", ".join(f"{n} {e:.1e}" for n, e in check["relative_errors"].items())
    lines += ["", f"runs: {len(next(iter(r['sides'].values()))['times_s'])} per side; spread of the "
              f"comparison {spread_cell(r)}; first-step loss {check['losses']['torch']:.4g}, relative "
              f"error to torch: {errors} ({check['rtol']:g} allowed)", ""]  # fmt: skip
    return lines


def profile_lines(r: Record) -> list[str]:
    """A dtype's profile: ms per (phase, kind) of each side's instrumented step, nonzero rows only."""
    names = list(r["profile"])
    lines = [f"### Profile, {r['dtype']} (ms of one instrumented step)", ""]
    lines += ["| phase | kind | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for ph in PHASES:
        for kind in KINDS:
            cells = [r["profile"][n]["phases"][ph]["kinds_s"].get(kind, 0.0) for n in names]
            if any(abs(c) > 0 for c in cells):
                lines.append(f"| {ph} | {kind} | " + " | ".join(f"{c * 1e3:.3f}" for c in cells) + " |")
    totals = [sum(p["seconds"] for p in r["profile"][n]["phases"].values()) for n in names]
    lines.append("| **step** | instrumented total | " + " | ".join(f"{t * 1e3:.3f}" for t in totals) + " |")
    whole = [kind_totals(r["profile"][n]) for n in names]
    lines += ["", "| kind, whole step | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {k} | " + " | ".join(f"{w[k] * 1e3:.3f}" for w in whole) + " |" for k in KINDS]
    tp_map = {c: k for n in names if n != "torch" for c, k in r["profile"][n]["kind_of"].items()}
    lines += ["", "tp_gpu classes: " + ", ".join(f"{c} -> {k}" for c, k in sorted(tp_map.items()))]
    ops: dict[str, list[str]] = {}
    for op, kind in r["profile"]["torch"]["kind_of"].items():
        ops.setdefault(kind, []).append(f"`{op}`")
    lines += ["", "torch ops: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in ops.items()), ""]
    return lines


def markdown(meta: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The machine, the method, the targets, each dtype's step table, then each profile."""
    lines = [f"# GPT training step against its PyTorch twin, {meta['date']}", "", *machine_lines(meta)]
    lines.append(threadpool_line(meta))
    lines += [
        "- examples/train_gpt.py's TinyGPT (hidden 64, 2 layers, 4 heads, 64 tokens x 16 sequences, dropout "
        "0.1), Adam lr 3e-3, clip 1.0, numpy backend; torch: examples/gpt_torch_twin.py, 1 thread",
        f"- at least {options['repeat']} shuffled rounds of every side after {options['warmup']} warm-up "
        f"run(s); phases lapped in every run; profile: fastest of {options['profile_runs']} instrumented "
        "step(s) per side (tp_gpu: Function.apply and the engine's node backward timed by class; torch: "
        "torch.profiler, a record_function per phase); `other` = the phase less its kinds",
        "- the twin's dropout draws tp_gpu's mask in NumPy (`other`) and applies it by `mul`/`div` "
        "(`elementwise`); train_gpt's GradScaler, disabled at these dtypes, is left out of both steps",
        "", "## Speed targets", "", "| dtype | ratio | value | limit | verdict |", "|---|---|---:|---:|---|",
    ]  # fmt: skip
    for t in target_rows(records):
        lines.append(f"| {t['dtype']} | {t['ratio']} | {t['value']:.2f} | {t['limit']:.2f} | "
                     f"{VERDICT[t['status']]} |")  # fmt: skip
    lines += ["", "## Step (median ms)", ""]
    for r in records:
        lines += step_lines(r)
    lines += ["## Profile", ""]
    for r in records:
        lines += profile_lines(r)
    return "\n".join(lines + [SPREAD_NOTE]) + "\n"


def write_plot(records: list[Record], stem: Path) -> list[Path]:
    """``<stem>-phases.png``: per dtype (a column), the median step's phases per side (top) and the
    instrumented step's kinds per side (bottom), as stacked horizontal bars."""
    plt = pyplot() if records else None
    if plt is None:
        return []
    fig, axes = plt.subplots(2, len(records), figsize=(5.2 * len(records), 6.4), squeeze=False)
    for col, r in enumerate(records):
        names = list(r["sides"])
        kinds = {n: kind_totals(r["profile"][n]) for n in names}
        panels = [
            (PHASES, {n: r["sides"][n]["phase_median_s"] for n in names}, "phases: median ms per step"),
            (KINDS, kinds, "kinds: ms of an instrumented step"),
        ]
        for row, (parts, values, label) in enumerate(panels):
            ax, left = axes[row][col], [0.0] * len(names)
            for i, part in enumerate(parts):
                widths = [values[n][part] * 1e3 for n in names]
                color = "lightgray" if part == "other" else plt.get_cmap("tab20")(i)
                ax.barh(names, widths, left=left, color=color, label=part)
                left = [a + b for a, b in zip(left, widths)]
            ax.invert_yaxis()
            ax.set(xlabel=label, title=f"{r['dtype']}: {'phases' if row == 0 else 'op kinds'}")
            if col == len(records) - 1:
                ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("examples/train_gpt.py step: tp_gpu against its PyTorch twin, 1 thread", fontsize=9)
    fig.tight_layout()
    return [save(fig, stem.with_name(f"{stem.name}-phases.png"))]


REPORT = skeleton.Report(targets=target_rows, markdown=markdown, plots=write_plot)
BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, setup=setup, run=run,
    stem=lambda meta, args: "gpt-step-" + file_stem(meta, args.quick),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPT-step benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
