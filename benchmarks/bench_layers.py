"""Benchmark the tensor-parallel layers against the dense computation on the same backend.

For each layer (column, row, embedding), shape, dtype and worker count, times
the tensor-parallel forward and, on the same backend and data, the dense one:
``x @ W + b`` with ``W = layer.full_weight()`` on the layer's output device,
or ``table[ids]`` for the embedding. Where PyTorch imports, also times
``torch.nn.functional.linear`` / ``F.embedding`` on the same data (CPU torch
for the numpy and simulated backends, CUDA torch for cupy).

Timing: median of ``--repeat`` runs after warm-up. On CPU backends each run is
timed with ``time.perf_counter`` around ``fn(); backend.synchronize()``; on
CuPy with ``cupyx.profiler.benchmark(..., devices=backend.devices)``, taking
for each run the largest GPU time over the devices.

Writes into ``--out`` (default ``benchmarks/results``), named after the
machine and the date, ``<machine-slug>-<YYYY-MM-DD>``:

* ``.json``: machine info, options and every raw timing;
* ``.md``: a Markdown table of medians, ratios and rates;
* ``-ratio.png`` and ``-rate.png``: plots, when matplotlib imports.

Run ``python benchmarks/bench_layers.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

try:
    import tp_gpu
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tp_gpu

from tp_gpu import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear, TensorParallelConfig
from tp_gpu.backends import get_backend, resolve_backend_name
from tp_gpu.config import BACKEND_NAMES, SUPPORTED_DTYPES

LAYERS = ("column", "row", "embedding")

#: The embedding table has EMBED_VOCAB_FACTOR * n_in rows and n_out columns; batch is the token count.
EMBED_VOCAB_FACTOR = 8


@dataclass(frozen=True)
class Shape:
    """A problem size: ``batch`` rows of ``n_in`` features to ``n_out`` features."""

    batch: int
    n_in: int
    n_out: int


# From latency-bound (small batch) to throughput-bound (large batch and weights).
SHAPES = (Shape(8, 1024, 1024), Shape(256, 1024, 1024), Shape(512, 2048, 2048), Shape(2048, 4096, 4096))
QUICK_SHAPES = (Shape(8, 1024, 1024), Shape(256, 1024, 1024))


# --------------------------------------------------------------------------- options


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time tensor-parallel layers against the dense computation (and PyTorch) on one backend.",
    )
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (< 1 min on a 2-core CPU)")
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=None,
        help="default: $TP_GPU_BACKEND, else cupy with a GPU, else numpy",
    )
    parser.add_argument("--devices", type=positive_int, default=None, help="device count (simulated, cupy)")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2, 4, 8], metavar="N")
    parser.add_argument("--dtype", nargs="+", choices=SUPPORTED_DTYPES, default=["float32", "float64"])
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument("--repeat", type=positive_int, default=None, help="timed runs per case (default 20, quick 10)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed runs first (default 2)")
    parser.add_argument(
        "--max-time", type=float, default=10.0, help="stop repeating a case after this many seconds (min 3 runs)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output dir")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 10 if args.quick else 20
    args.shapes = QUICK_SHAPES if args.quick else SHAPES
    return args


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def gpu_names(backend) -> List[str]:
    if backend.name != "cupy":
        return []
    runtime = backend.xp.cuda.runtime
    names = [runtime.getDeviceProperties(d)["name"] for d in backend.devices]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def import_torch():
    """``torch`` and ``torch.nn.functional``, or ``(None, None)`` where torch does not import."""
    try:
        import torch
        import torch.nn.functional as F
    except Exception:  # ImportError, or a broken install
        return None, None
    return torch, F


def machine_info(backend) -> Dict[str, Any]:
    torch, _ = import_torch()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tp_gpu": tp_gpu.__version__,
        "torch": getattr(torch, "__version__", None),
        "backend": backend.name,
        "devices": [str(d) for d in backend.devices],
        "gpus": gpu_names(backend),
        "date": datetime.date.today().isoformat(),
    }


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def file_stem(machine: Dict[str, Any]) -> str:
    """``<machine-slug>-<YYYY-MM-DD>``, the slug from the GPU name on cupy, else the CPU."""
    name = machine["gpus"][0] if machine["gpus"] else machine["cpu"]
    return f"{slugify(name)}-{machine['date']}"


def memory_in_use(backend) -> Dict[str, float]:
    """Peak host RSS of this process so far (MiB) and, on cupy, the memory pools' total (MiB)."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = {"peak_rss_mib": rss_kib / 1024}
    if backend.name == "cupy":
        cupy = backend.xp
        pool = cupy.get_default_memory_pool()
        total = 0
        for d in backend.devices:
            with cupy.cuda.Device(d):
                total += pool.total_bytes()
        out["gpu_pool_mib"] = total / 2**20
    return out


# --------------------------------------------------------------------------- timing


def time_fn(
    fn: Callable[[], Any],
    *,
    sync: Callable[[], None],
    repeat: int,
    warmup: int,
    max_time: float,
    cupy_devices: Optional[tuple] = None,
) -> List[float]:
    """Seconds of each of up to ``repeat`` timed runs of ``fn`` after ``warmup`` untimed runs.

    With ``cupy_devices``, CUDA events on those devices time each run
    (``cupyx.profiler.benchmark``) and a run's time is its largest over the
    devices. Otherwise each run is ``perf_counter`` around ``fn(); sync()``.
    Stops early (after at least 3 runs) once ``max_time`` seconds are spent.
    """
    if cupy_devices:
        from cupyx.profiler import benchmark

        result = benchmark(fn, n_warmup=warmup, n_repeat=repeat, max_duration=max_time, devices=cupy_devices)
        return [float(t) for t in np.asarray(result.gpu_times).max(axis=0)]
    for _ in range(warmup):
        fn()
    sync()
    times: List[float] = []
    started = time.perf_counter()
    while len(times) < repeat and (len(times) < 3 or time.perf_counter() - started < max_time):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def warm_up_machine(seconds: float = 0.5) -> None:
    """Keep the CPU and BLAS busy for ``seconds`` before timing anything.

    The first tens of milliseconds of a process run several times slower
    (BLAS threads starting, clocks ramping up); without this the first case's
    timings are inflated.
    """
    a = np.random.default_rng(0).standard_normal((512, 512))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def backend_timer(backend, args) -> Callable[[Callable[[], Any]], List[float]]:
    """``time_fn`` bound to ``backend``: CUDA events over every device on cupy, else perf_counter."""
    devices = tuple(backend.devices) if backend.name == "cupy" else None

    def timer(fn):
        return time_fn(
            fn,
            sync=backend.synchronize,
            repeat=args.repeat,
            warmup=args.warmup,
            max_time=args.max_time,
            cupy_devices=devices,
        )

    return timer


def torch_timer(torch, args) -> Callable[[Callable[[], Any]], List[float]]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return lambda fn: time_fn(fn, sync=sync, repeat=args.repeat, warmup=args.warmup, max_time=args.max_time)


# --------------------------------------------------------------------------- cases


def split_size(kind: str, shape: Shape) -> int:
    """The dimension the workers split: n_out (column), n_in (row), vocabulary (embedding)."""
    return {"column": shape.n_out, "row": shape.n_in, "embedding": EMBED_VOCAB_FACTOR * shape.n_in}[kind]


def describe(kind: str, shape: Shape) -> str:
    if kind == "embedding":
        return f"{shape.batch} ids, {split_size(kind, shape)}x{shape.n_out} table"
    return f"B={shape.batch}, {shape.n_in}x{shape.n_out}"


def work(kind: str, shape: Shape, dtype: str) -> tuple:
    """``(amount, unit)``: FLOPs of a linear forward, or bytes of the embedding's output."""
    if kind == "embedding":
        return shape.batch * shape.n_out * np.dtype(dtype).itemsize / 1e9, "GB/s"
    return 2 * shape.batch * shape.n_in * shape.n_out / 1e9, "GFLOP/s"


def build_layer(kind: str, shape: Shape, config: TensorParallelConfig):
    """The layer, in inference mode where it has one (``eval()``: forward keeps nothing for backward)."""
    if kind == "column":
        layer = ColumnParallelLinear(shape.n_in, shape.n_out, config, seed=1)
    elif kind == "row":
        layer = RowParallelLinear(shape.n_in, shape.n_out, config, seed=2)
    else:
        layer = ParallelEmbedding(split_size(kind, shape), shape.n_out, seed=3, config=config)
    if hasattr(layer, "eval"):
        layer.eval()
    return layer


def host_input(kind: str, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    if kind == "embedding":
        return rng.integers(0, split_size(kind, shape), size=shape.batch)
    return rng.standard_normal((shape.batch, shape.n_in))


def dense_forward(kind: str, layer, x_dev) -> Callable[[], Any]:
    """The dense computation on the layer's output device, from its full weights."""
    backend, device, xp = layer.backend, layer.output_device, layer.backend.xp
    weight = backend.asarray(layer.full_weight(), layer.dtype, device)
    if kind == "embedding":

        def run():
            with backend.device(device):
                return xp.take(weight, x_dev, axis=0)  # (vocab, dim)[ids] -> (batch, dim)

        return run
    bias = backend.asarray(layer.full_bias(), layer.dtype, device)

    def run():
        with backend.device(device):
            return x_dev @ weight + bias  # (batch, n_in) @ (n_in, n_out) + (n_out,)

    return run


def torch_forward(kind: str, layer, x_host: np.ndarray, torch, F) -> Optional[Callable[[], Any]]:
    """``F.linear`` / ``F.embedding`` on the same data, or None where torch cannot run it."""
    if torch is None:
        return None
    if layer.backend.name == "cupy":
        if not torch.cuda.is_available():
            return None
        device = f"cuda:{layer.output_device}"
    else:
        device = "cpu"
    dtype = getattr(torch, layer.dtype.name)
    weight = torch.as_tensor(np.ascontiguousarray(layer.full_weight()), device=device).to(dtype)
    if kind == "embedding":
        ids = torch.as_tensor(x_host, dtype=torch.int64, device=device)
        return lambda: F.embedding(ids, weight)
    x = torch.as_tensor(x_host, device=device).to(dtype)
    weight_t = weight.T.contiguous()  # F.linear wants (n_out, n_in)
    bias = torch.as_tensor(layer.full_bias(), device=device).to(dtype)
    return lambda: F.linear(x, weight_t, bias)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two host arrays, in float64 (a sanity check of each case)."""
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def summarize(times: Optional[List[float]], amount: float) -> Dict[str, Optional[float]]:
    if not times:
        return {"median_s": None, "rate": None}
    median = statistics.median(times)
    return {"median_s": median, "rate": amount / median}


def run_group(kind: str, shape: Shape, dtype: str, args, backend_name: str, progress: "Progress") -> List[dict]:
    """Every worker count for one (layer, shape, dtype), on the same data.

    Dense is timed again beside each worker count, so each ratio compares runs
    taken moments apart; torch, a reference only, is timed once per group.
    """
    rng = np.random.default_rng(0)
    x_host = host_input(kind, shape, rng)
    amount, unit = work(kind, shape, dtype)
    torch, F = import_torch()
    records: List[Dict[str, Any]] = []
    torch_times, torch_diff, torch_done = None, None, False
    for n in args.workers:
        if split_size(kind, shape) % n:
            progress.note(f"skip: {kind} {describe(kind, shape)}, {n} workers do not divide {split_size(kind, shape)}")
            progress.tick(f"{kind} workers={n}: skipped")
            continue
        config = TensorParallelConfig(n_workers=n, backend=backend_name, devices=args.devices, dtype=dtype)
        layer = build_layer(kind, shape, config)
        timer = backend_timer(layer.backend, args)
        x_dev = layer.backend.asarray(x_host, np.int64 if kind == "embedding" else layer.dtype, layer.output_device)
        dense = dense_forward(kind, layer, x_dev)
        dense_times = timer(dense)
        if not torch_done:  # the logical weights do not depend on n_workers
            torch_done = True
            try:
                torch_fn = torch_forward(kind, layer, x_host, torch, F)
                torch_times = torch_timer(torch, args)(torch_fn) if torch_fn else None
                torch_diff = max_abs_diff(torch_fn().cpu().numpy(), layer.backend.to_host(dense())) if torch_fn else None
            except Exception as exc:  # e.g. a dtype this torch build has no kernel for
                progress.note(f"torch skipped for {kind} {describe(kind, shape)} {dtype}: {type(exc).__name__}: {exc}")
                torch_times = torch_diff = None
        tp = lambda: layer(x_dev)  # noqa: E731
        tp_times = timer(tp)
        diff = max_abs_diff(layer.backend.to_host(tp()), layer.backend.to_host(dense()))
        timings = {"tp": tp_times, "dense": dense_times, "torch": torch_times}
        stats = {name: summarize(times, amount) for name, times in timings.items()}
        record = {
            "layer": kind,
            "shape": describe(kind, shape),
            "batch": shape.batch,
            "n_in": shape.n_in,
            "n_out": shape.n_out,
            "dtype": dtype,
            "n_workers": n,
            "devices": [str(d) for d in layer.devices],
            "unit": unit,
            "work": amount,
            "tp_times_s": tp_times,
            "dense_times_s": dense_times,
            "torch_times_s": torch_times,
            **{f"{name}_{key}": value for name, s in stats.items() for key, value in s.items()},
            "ratio_tp_dense": stats["tp"]["median_s"] / stats["dense"]["median_s"],
            "ratio_tp_torch": stats["tp"]["median_s"] / stats["torch"]["median_s"] if torch_times else None,
            "max_abs_diff_tp_dense": diff,
            "max_abs_diff_torch_dense": torch_diff,
            **memory_in_use(layer.backend),
        }
        records.append(record)
        progress.tick(f"{kind} {describe(kind, shape)} {dtype} workers={n}: TP/dense {record['ratio_tp_dense']:.2f}")
        del layer, tp, dense
    return records


def release_gpu_memory(backend) -> None:
    """Return the cached blocks of CuPy's memory pool on every device (a no-op elsewhere)."""
    if backend.name == "cupy":
        pool = backend.xp.get_default_memory_pool()
        for d in backend.devices:
            with backend.xp.cuda.Device(d):  # the pool acts on the current device
                pool.free_all_blocks()


# --------------------------------------------------------------------------- output


def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def num(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(machine: Dict[str, Any], args, records: List[Dict[str, Any]]) -> str:
    gpus = ", ".join(machine["gpus"]) or "none"
    lines = [
        f"# tp_gpu layer benchmark, {machine['date']}",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} cores); GPU: {gpus}",
        f"- backend: {machine['backend']}, devices {machine['devices']}; NumPy {machine['numpy']}, "
        f"torch {machine['torch'] or 'not installed'}, tp_gpu {machine['tp_gpu']}",
        f"- median of up to {args.repeat} runs after {args.warmup} warm-up{' (--quick)' if args.quick else ''}; "
        "TP/dense < 1 means the tensor-parallel forward is faster than dense on the same backend",
        "- rate: GFLOP/s (2·B·n_in·n_out / t) for linear layers, GB/s of output for the embedding",
        "",
        "| layer | shape | dtype | workers | TP ms | dense ms | torch ms | TP/dense | TP/torch "
        "| TP rate | dense rate | unit | memory MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in records:
        memory = r.get("gpu_pool_mib", r["peak_rss_mib"])
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['n_workers']} | {ms(r['tp_median_s'])} | "
            f"{ms(r['dense_median_s'])} | {ms(r['torch_median_s'])} | {num(r['ratio_tp_dense'])} | "
            f"{num(r['ratio_tp_torch'])} | {num(r['tp_rate'], '.1f')} | {num(r['dense_rate'], '.1f')} | {r['unit']} | "
            f"{memory:.0f} |"
        )
    memory_note = "GPU memory pool total" if machine["gpus"] else "peak host RSS of the process so far"
    lines += ["", f"memory: {memory_note}."]
    return "\n".join(lines) + "\n"


def write_plots(records: List[Dict[str, Any]], stem: Path) -> List[Path]:
    """Ratio vs workers and rate vs size, one panel per layer; [] with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    from matplotlib.ticker import FormatStrFormatter

    def plain_log_labels(axis, values) -> None:
        """Label a log axis 0.5, 2, 8 rather than 5x10^-1; minor ticks only when it spans < 1 decade."""
        narrow = max(values) < 10 * min(values)
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g" if narrow else ""))

    layers = list(dict.fromkeys(r["layer"] for r in records))
    paths = [stem.with_name(stem.name + "-ratio.png"), stem.with_name(stem.name + "-rate.png")]

    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rows = [r for r in records if r["layer"] == layer]
        for key in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
            line = [r for r in rows if (r["shape"], r["dtype"]) == key]
            workers, ratios = [r["n_workers"] for r in line], [r["ratio_tp_dense"] for r in line]
            ax.plot(workers, ratios, marker="o", label=" ".join(key))
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set(title=layer, xlabel="workers", ylabel="TP / dense time", xscale="log", yscale="log")
        ax.set_xticks(sorted({r["n_workers"] for r in rows}), labels=sorted({r["n_workers"] for r in rows}))
        ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
        plain_log_labels(ax.yaxis, [r["ratio_tp_dense"] for r in rows] + [1.0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(layers), figsize=(5 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rows = [r for r in records if r["layer"] == layer]
        for dtype, style in zip(dict.fromkeys(r["dtype"] for r in rows), ("-", "--", ":")):
            by_dtype = [r for r in rows if r["dtype"] == dtype]
            series = {"dense": ("dense_rate", None)}
            series.update({f"TP p={n}": ("tp_rate", n) for n in dict.fromkeys(r["n_workers"] for r in by_dtype)})
            if any(r["torch_rate"] for r in by_dtype):
                series["torch"] = ("torch_rate", None)
            for label, (key, n) in series.items():
                points = {r["work"]: r[key] for r in by_dtype if n is None or r["n_workers"] == n}
                sizes = sorted(points)
                ax.plot(sizes, [points[s] for s in sizes], style, marker="o", label=f"{label} {dtype}")
        ax.set(title=layer, xlabel="GB of output" if layer == "embedding" else "GFLOP per forward", xscale="log")
        ax.set_ylabel(rows[0]["unit"])
        sizes = sorted({r["work"] for r in rows})
        ax.set_xticks(sizes, labels=[f"{s:.3g}" for s in sizes])
        ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_results(machine: Dict[str, Any], args, records: List[Dict[str, Any]]) -> List[Path]:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / file_stem(machine)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "shapes"}
    options["shapes"] = [vars(s) for s in args.shapes]
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps({"machine": machine, "options": options, "results": records}, indent=1) + "\n")
    md_path.write_text(markdown(machine, args, records))
    return [json_path, md_path] + write_plots(records, stem)


# --------------------------------------------------------------------------- main


class Progress:
    """A tqdm bar over the cases when tqdm imports, else one printed line per case."""

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="case")

    def tick(self, message: str) -> None:
        """One case done."""
        self.count += 1
        if self.bar is None:
            print(f"[{self.count}/{self.total}] {message}", flush=True)
        else:
            self.bar.set_description(message[:60])
            self.bar.update(1)

    def note(self, message: str) -> None:
        """A line that stays visible above the bar."""
        if self.bar is None:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    backend_name = resolve_backend_name(args.backend)
    backend = get_backend(backend_name, args.devices)
    machine = machine_info(backend)
    torch_note = f"torch {machine['torch']}" if machine["torch"] else "torch not installed (no torch column)"
    print(f"{machine['cpu']}, {machine['cores']} cores; backend {backend_name} {machine['devices']}; {torch_note}")
    groups = [(k, s, d) for k in args.layers for s in args.shapes for d in args.dtype]
    warm_up_machine()
    progress = Progress(len(groups) * len(args.workers))
    records: List[Dict[str, Any]] = []
    try:
        for kind, shape, dtype in groups:
            records += run_group(kind, shape, dtype, args, backend_name, progress)
            release_gpu_memory(backend)
    finally:
        progress.close()
    if not records:
        print("no case ran (every worker count was skipped); nothing written", file=sys.stderr)
        return 1
    paths = write_results(machine, args, records)
    print(markdown(machine, args, records))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
