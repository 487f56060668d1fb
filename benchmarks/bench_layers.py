"""Benchmark the tensor-parallel layers against the dense computation on the same backend.

For each layer (column, row, embedding, MLP), shape, dtype, mode (forward, or
forward + backward) and worker count, times the tensor-parallel layer and, on
the same backend and the same data, the dense computation from the layer's own
logical weights:

* column / row: ``x @ W + b`` with ``W = layer.full_weight()`` on the output device;
* embedding: ``take(table, ids)``;
* MLP: ``act(x @ W1 + b1) @ W2 + b2`` (the layer's own activation, GeLU tanh);
* forward + backward: the forward, then the hand-written backward
  ``dX = dY W^T, dW = X^T dY, db = sum dY`` (through the activation for the
  MLP; ``dE = scatter_add(zeros, ids, dY)`` for the embedding).

Where PyTorch imports, also times ``torch.nn.functional.linear`` /
``F.embedding`` (MLP: ``F.linear -> F.gelu(approximate="tanh") -> F.linear``;
forward + backward through autograd) on the same data: CPU torch, with as many
threads as NumPy's BLAS, for the numpy and simulated backends; CUDA torch on
the output GPU for cupy.

Timing: on CPU backends the cases of one comparison run interleaved (one run
of TP, one of dense, again) with ``time.perf_counter`` around
``fn(); backend.synchronize()``, after warm-up, and the median is reported; on
CuPy ``cupyx.profiler.benchmark(..., devices=...)`` over every participating
device, the slowest device deciding each run.

Memory: the peak bytes allocated while one TP run executes (its result held)
minus the same for one dense run: NumPy allocations as counted by
``tracemalloc``, CuPy allocations from its memory pool (a memory hook).

Writes into ``--out`` (default ``benchmarks/results``), named
``<machine>-<backend>-<YYYY-MM-DD>`` (``-quick`` added for ``--quick``):

* ``.json``: machine, options and every raw timing;
* ``.md``: the speed targets of issue 5 checked, then a table of every case;
* ``-ratio.png`` and ``-rate.png``: plots, when matplotlib imports.

Run ``python benchmarks/bench_layers.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

try:
    import tp_gpu
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tp_gpu

from tp_gpu import ColumnParallelLinear, ParallelEmbedding, ParallelMLP, RowParallelLinear, TensorParallelConfig
from tp_gpu.backends import get_backend, resolve_backend_name
from tp_gpu.config import BACKEND_NAMES, SUPPORTED_DTYPES
from tp_gpu.layers.activations import get_activation

LAYERS = ("column", "row", "embedding", "mlp")
MODES = ("fwd", "fwd+bwd")

#: The MLP benchmarked is ``ParallelMLP(n_in, hidden=n_out, n_out=n_in)``: two n_in x n_out GEMMs.
MLP_ACTIVATION = "gelu"


@dataclass(frozen=True)
class Shape:
    """A problem size.

    Linears and MLP: ``batch`` rows of ``n_in`` features, a weight ``(n_in, n_out)``
    (the MLP's hidden size is ``n_out`` and it maps back to ``n_in``).
    Embedding: ``batch`` ids, a table of ``n_in`` (vocabulary) rows of ``n_out`` columns.
    """

    batch: int
    n_in: int
    n_out: int

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """``"8x1024x1024"`` -> Shape(8, 1024, 1024)."""
        try:
            batch, n_in, n_out = (int(v.replace("_", "")) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected BATCHxN_INxN_OUT such as 8x1024x1024, got {text!r}") from None
        if min(batch, n_in, n_out) < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
        return cls(batch, n_in, n_out)


# From latency-bound (small batch) to throughput-bound (large batch and weights).
LINEAR_SHAPES = (Shape(8, 1024, 1024), Shape(256, 1024, 1024), Shape(512, 2048, 2048), Shape(2048, 4096, 4096))
QUICK_LINEAR_SHAPES = (Shape(8, 1024, 1024), Shape(256, 1024, 1024))
# Embedding: (ids, vocabulary, dim). The last is issue 5's target: 1M ids, vocabulary 50,000, dim 1024.
EMBED_SHAPES = (Shape(8, 8192, 1024), Shape(256, 8192, 1024), Shape(16384, 50_000, 1024), Shape(1_000_000, 50_000, 1024))
QUICK_EMBED_SHAPES = (Shape(8, 8192, 1024), Shape(256, 8192, 1024))

#: Forward + backward is skipped for outputs larger than this (it holds a gradient as large as the output too).
BWD_MAX_OUTPUT_BYTES = 2 * 2**30

#: A timed sequence stops after this many runs, however fast each run is (keeps the JSON small).
MAX_RUNS = 100

#: Warm-up runs go on for at least this many seconds (and at least ``--warmup`` runs): on a small VM, the
#: first BLAS call after any idle moment or after another thread pool ran (torch's) can take 10x longer
#: while the sleeping BLAS threads are woken; warm-up keeps that out of the timed runs.
MIN_WARMUP_S = 0.05

#: Rounding allowed between TP and dense, relative, per dtype: they may add the same products in a
#: different order (row-parallel partial sums, per-device GEMMs). A timing of a wrong result is void.
ROUNDING = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}


# --------------------------------------------------------------------------- options


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time tensor-parallel layers against the dense computation (and PyTorch) on one backend, "
        "forward and forward+backward; write JSON, Markdown and PNG plots.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="the two 1024x1024 shapes, float32 (and float16 on cupy), few repeats: < 1 min on a 2-core CPU",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=None,
        help="default: $TP_GPU_BACKEND, else cupy with a GPU, else numpy",
    )
    parser.add_argument("--devices", type=positive_int, default=None, help="device count (simulated, cupy)")
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2, 4, 8], metavar="N")
    parser.add_argument(
        "--dtype", nargs="+", choices=SUPPORTED_DTYPES, default=None,
        help="compute dtypes (default: float32 float64, --quick float32; and float16 on cupy)",
    )
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="default: both")
    parser.add_argument(
        "--shapes", nargs="+", type=Shape.parse, default=None, metavar="BxNINxNOUT",
        help="linear / MLP shapes (default: 8x1024x1024 256x1024x1024 512x2048x2048 2048x4096x4096)",
    )
    parser.add_argument(
        "--embed-shapes", nargs="+", type=Shape.parse, default=None, metavar="IDSxVOCABxDIM",
        help="embedding shapes (default: 8x8192x1024 256x8192x1024 16384x50000x1024 1000000x50000x1024)",
    )
    parser.add_argument("--no-torch", action="store_true", help="do not time PyTorch even where it imports")
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="set NumPy's BLAS (OpenBLAS) and torch's CPU thread counts (default: leave BLAS as it is; "
        "torch gets BLAS's count)",
    )
    parser.add_argument("--repeat", type=positive_int, default=None, help="timed runs per case, at least (default 20, quick 5)")
    parser.add_argument("--warmup", type=positive_int, default=2, help="untimed runs first (default 2)")
    parser.add_argument(
        "--max-time", type=float, default=None,
        help="stop repeating a comparison after this many seconds, at least 3 runs each (default 10, quick 0.5)",
    )
    parser.add_argument(
        "--min-time", type=float, default=None,
        help="keep repeating fast cases for at least this many seconds (default 0.3, quick 0.02)",
    )
    parser.add_argument(
        "--retries", type=int, default=None,
        help="re-time a comparison whose runs look disturbed (spread or load), up to this many times (default 2, quick 1)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output dir")
    parser.add_argument(
        "--update", type=Path, default=None, metavar="JSON",
        help="re-time the selected cases and replace them in an earlier run's JSON (then redraw its table and "
        "plots): for cases a disturbed machine spoiled; the JSON records what was re-run and when",
    )
    parser.add_argument(
        "--render", type=Path, default=None, metavar="JSON",
        help="time nothing: rewrite the Markdown table and the plots of an earlier run from its JSON, beside it",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.repeat is None:
        args.repeat = 5 if quick else 20
    if args.max_time is None:
        args.max_time = 0.5 if quick else 10.0
    if args.min_time is None:
        args.min_time = 0.02 if quick else 0.3
    if args.retries is None:
        args.retries = 1 if quick else 2
    if args.shapes is None:
        args.shapes = list(QUICK_LINEAR_SHAPES if quick else LINEAR_SHAPES)
    if args.embed_shapes is None:
        args.embed_shapes = list(QUICK_EMBED_SHAPES if quick else EMBED_SHAPES)
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


def memory_total_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpu_names(backend) -> List[str]:
    if backend.name != "cupy":
        return []
    runtime = backend.xp.cuda.runtime
    names = [runtime.getDeviceProperties(d)["name"] for d in backend.devices]
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _openblas_libs() -> List[str]:
    """Paths of the OpenBLAS libraries mapped into this process (NumPy's), found in /proc/self/maps."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and line.split()[-1].startswith("/")})


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count to ``n`` (through its C API); False where it cannot be found."""
    for path in _openblas_libs():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                       "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, symbol):
                getattr(lib, symbol)(ctypes.c_int(n))
                return True
    return False


def blas_info() -> Dict[str, Any]:
    """NumPy's BLAS (name, version) and its thread count where it can be read (OpenBLAS), else None."""
    info: Dict[str, Any] = {"name": None, "version": None, "threads": None}
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        info["name"], info["version"] = blas.get("name"), blas.get("version")
    except (AttributeError, KeyError, TypeError):
        pass
    try:  # the OpenBLAS NumPy loaded, found among this process's mapped libraries
        for path in _openblas_libs():
            lib = ctypes.CDLL(path)
            for symbol in ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                           "openblas_get_num_threads64_", "openblas_get_num_threads"):
                if hasattr(lib, symbol):
                    info["threads"] = int(getattr(lib, symbol)())
                    return info
    except OSError:
        pass
    return info


def import_torch(enabled: bool = True):
    """``torch`` and ``torch.nn.functional``, or ``(None, None)`` where torch does not import."""
    if not enabled:
        return None, None
    try:
        import torch
        import torch.nn.functional as F
    except Exception:  # ImportError, or a broken install
        return None, None
    return torch, F


def tp_gpu_source() -> Dict[str, Any]:
    """Where the measured tp_gpu was imported from, and its git commit (``+dirty`` if modified)."""
    root = Path(tp_gpu.__file__).resolve().parent.parent
    out: Dict[str, Any] = {"path": str(root), "commit": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "tp_gpu"],
                                   capture_output=True, text=True, timeout=10)
            out["commit"] = commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def machine_info(backend, torch, blas) -> Dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas,
        "tp_gpu": tp_gpu.__version__,
        "tp_gpu_source": tp_gpu_source(),
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "backend": backend.name,
        "devices": [str(d) for d in backend.devices],
        "gpus": gpu_names(backend),
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg_start": list(os.getloadavg()),
    }


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "machine"


def file_stem(machine: Dict[str, Any], quick: bool) -> str:
    """``<machine>-<backend>-<YYYY-MM-DD>[-quick]``, the machine from the GPU name on cupy, else the CPU."""
    name = machine["gpus"][0] if machine["gpus"] else machine["cpu"]
    return f"{slugify(name)}-{machine['backend']}-{machine['date']}" + ("-quick" if quick else "")


# --------------------------------------------------------------------------- memory


def _cupy_peak(backend, fn: Callable[[], Any], keep: bool) -> Tuple[Optional[int], str, Any]:
    """Peak bytes CuPy's pools hand out (over every device) while ``fn()`` runs and its result is held.

    Untested here (no GPU on the machine this was written on). Uses a
    ``cupy.cuda.MemoryHook`` counting pool mallocs and frees; falls back to
    the change of ``used_bytes()`` (what stays allocated) if the hook fails.
    """
    cupy = backend.xp
    try:
        from cupy.cuda import memory_hook

        class PeakHook(memory_hook.MemoryHook):
            name = "tp_gpu_bench_peak"

            def __init__(self) -> None:
                self.current = 0
                self.peak = 0

            def malloc_postprocess(self, **kwargs) -> None:
                self.current += int(kwargs.get("mem_size", 0))
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kwargs) -> None:
                self.current -= int(kwargs.get("mem_size", 0))

        hook = PeakHook()
        with hook:
            out = fn()
            backend.synchronize()
        return hook.peak, "cupy memory-pool peak (MemoryHook)", out if keep else None
    except Exception:  # an older or newer hook interface: fall back to what stays allocated
        pool = cupy.get_default_memory_pool()

        def used() -> int:
            total = 0
            for d in backend.devices:
                with cupy.cuda.Device(d):
                    total += pool.used_bytes()
            return total

        before = used()
        out = fn()
        backend.synchronize()
        after = used()
        return after - before, "cupy memory-pool used_bytes delta", out if keep else None


def measure_peak(backend, fn: Callable[[], Any], keep: bool = True) -> Tuple[Optional[int], str, Any]:
    """``(bytes, how, result)``: the peak memory allocated while ``fn()`` runs, its result held,
    above what was allocated at the start; and the result (None unless ``keep``).

    NumPy (and the simulated backend's NumPy arrays) report their data buffers
    to ``tracemalloc``, so on CPU backends this is the largest amount of
    array memory alive at once during the call. On CuPy, pool allocations.
    """
    gc.collect(0)
    if backend.name == "cupy":
        return _cupy_peak(backend, fn, keep)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    return peak - base, "tracemalloc peak", out if keep else None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- timing


def spread(times: Sequence[float]) -> float:
    """Relative spread of ``times``: interquartile range / median (range / median below 5 runs)."""
    median = statistics.median(times)
    if median <= 0:
        return 0.0
    if len(times) < 5:
        return (max(times) - min(times)) / median
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / median


def time_interleaved(
    fns: Dict[str, Callable[[], Any]],
    *,
    sync: Callable[[], None],
    repeat: int,
    warmup: int,
    max_time: float,
    min_time: float,
) -> Dict[str, List[float]]:
    """Seconds of each timed run of each of ``fns``, run in turn (one of each, then again).

    Each function gets ``warmup`` untimed runs first, more until ``MIN_WARMUP_S``
    seconds are spent, fewer if they take more than ``max_time / 4``. Then rounds of one timed run each (``fn();
    sync()`` between ``perf_counter`` readings) go on until every function has
    ``repeat`` runs and ``min_time`` seconds have passed, or, after at least 3
    rounds, ``max_time`` seconds have, or ``MAX_RUNS`` rounds. Interleaving
    exposes the runs compared to the same load on a shared machine.
    """
    for fn in fns.values():
        spent, runs = 0.0, 0
        while (runs < warmup or spent < MIN_WARMUP_S) and runs < MAX_RUNS and (runs == 0 or spent <= max_time / 4):
            start = time.perf_counter()
            fn()
            sync()
            spent += time.perf_counter() - start
            runs += 1
    times: Dict[str, List[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    rounds = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no cycle collection inside a timed run
    try:
        while True:
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
            rounds += 1
            elapsed = time.perf_counter() - started
            if rounds >= MAX_RUNS or (rounds >= 3 and elapsed >= max_time) or (rounds >= repeat and elapsed >= min_time):
                return times
    finally:
        if gc_was_enabled:
            gc.enable()


def time_cupy(fn: Callable[[], Any], devices: tuple, args) -> List[float]:
    """Per-run seconds of ``fn`` with CUDA events on every one of ``devices``, the slowest device per run.

    Untested here (no GPU on the machine this was written on).
    """
    from cupyx.profiler import benchmark

    result = benchmark(fn, n_warmup=args.warmup, n_repeat=args.repeat, max_duration=args.max_time, devices=devices)
    return [float(t) for t in np.asarray(result.gpu_times).reshape(len(devices), -1).max(axis=0)]


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


# --------------------------------------------------------------------------- cases


def split_size(kind: str, shape: Shape) -> int:
    """The dimension the workers split: n_out (column, MLP hidden), n_in (row), vocabulary (embedding)."""
    return {"column": shape.n_out, "row": shape.n_in, "mlp": shape.n_out, "embedding": shape.n_in}[kind]


def out_features(kind: str, shape: Shape) -> int:
    return shape.n_in if kind == "mlp" else shape.n_out


def describe(kind: str, shape: Shape) -> str:
    if kind == "embedding":
        return f"{shape.batch} ids, {shape.n_in}x{shape.n_out} table"
    if kind == "mlp":
        return f"B={shape.batch}, {shape.n_in}->{shape.n_out}->{shape.n_in}"
    return f"B={shape.batch}, {shape.n_in}x{shape.n_out}"


def output_bytes(kind: str, shape: Shape, dtype: str) -> int:
    return shape.batch * out_features(kind, shape) * np.dtype(dtype).itemsize


def work(kind: str, shape: Shape, dtype: str, mode: str) -> Tuple[float, str]:
    """``(amount, unit)`` of one run: GFLOP of the GEMMs (forward + backward = 3x forward),
    or for the embedding GB of output written (forward + backward: 2x, the gradient read back)."""
    factor = 3 if mode == "fwd+bwd" else 1
    if kind == "embedding":
        return (2 if mode == "fwd+bwd" else 1) * output_bytes(kind, shape, dtype) / 1e9, "GB/s"
    gemms = 2 if kind == "mlp" else 1
    return factor * gemms * 2 * shape.batch * shape.n_in * shape.n_out / 1e9, "GFLOP/s"


def build_layer(kind: str, shape: Shape, config: TensorParallelConfig, mode: str):
    """The layer, in training mode for forward + backward, else inference mode (forward keeps nothing)."""
    if kind == "column":
        layer = ColumnParallelLinear(shape.n_in, shape.n_out, config, seed=1)
    elif kind == "row":
        layer = RowParallelLinear(shape.n_in, shape.n_out, config, seed=2)
    elif kind == "mlp":
        layer = ParallelMLP(shape.n_in, shape.n_out, shape.n_in, config, seed=4, activation=MLP_ACTIVATION)
    else:
        layer = ParallelEmbedding(shape.n_in, shape.n_out, seed=3, config=config)
    layer.train(mode == "fwd+bwd")
    return layer


def dense_params(kind: str, layer) -> List[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """The layer's logical (weight, bias) pairs as host arrays, in the order the dense computation uses them."""
    if kind == "mlp":
        return [(layer.fc1.full_weight(), layer.fc1.full_bias()), (layer.fc2.full_weight(), layer.fc2.full_bias())]
    if kind == "embedding":
        return [(layer.full_weight(), None)]
    return [(layer.full_weight(), layer.full_bias())]


def output_device(layer):
    return layer.fc2.output_device if isinstance(layer, ParallelMLP) else layer.output_device


@dataclass
class Case:
    """One comparison: the TP run, the dense run, and a check that they agree."""

    tp: Callable[[], Any]
    dense: Callable[[], Any]
    compare: Callable[[Any, Any], float]  # max abs difference, given what tp() and dense() returned
    keep_dense: bool = True  # False: compare() needs no dense result (it recomputes it piecewise)


def max_abs_diff(backend, device, a, b, chunk_bytes: int = 64 * 2**20) -> float:
    """Largest ``|a - b|`` of two arrays on ``device``, in float64, a chunk of rows at a time."""
    if a.shape != b.shape:
        raise ValueError(f"TP and dense results differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(1, chunk_bytes // (8 * a2.shape[1]))
    worst = 0.0
    with backend.device(device):
        for start in range(0, a2.shape[0], rows):
            d = a2[start:start + rows].astype(np.float64) - b2[start:start + rows].astype(np.float64)
            worst = max(worst, float(abs(d).max()))
    return worst


def host_max_abs_diff(a: np.ndarray, b: np.ndarray, chunk_bytes: int = 64 * 2**20) -> float:
    """Largest ``|a - b|`` of two host arrays, in float64, a chunk of rows at a time."""
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(1, chunk_bytes // (8 * a2.shape[1]))
    worst = 0.0
    for start in range(0, a2.shape[0], rows):
        d = a2[start:start + rows].astype(np.float64) - b2[start:start + rows].astype(np.float64)
        worst = max(worst, float(np.abs(d).max(initial=0.0)))
    return worst


class ResultMismatch(RuntimeError):
    """TP and dense disagree by more than rounding: the layer is wrong, and its timing means nothing."""


def tolerance(kind: str, shape: Shape, dtype: str, mode: str) -> float:
    """Largest ``max |TP - dense|`` accepted: ``ROUNDING[dtype] * sqrt(terms summed per element)``.

    Inputs and output gradients are N(0, 1) and weights Xavier-scaled, so the
    outputs and input gradients are of order 1 and rounding errors grow like the
    square root of the terms summed: ``max(n_in, n_out)`` in a linear layer or
    the MLP, one in an embedding lookup, and at most ``n_ids`` (repeated ids)
    in an embedding's table gradient.
    """
    if kind == "embedding":
        terms = 1 if mode == "fwd" else shape.batch
    else:
        terms = max(shape.n_in, shape.n_out)
    return ROUNDING[dtype] * math.sqrt(terms)


def make_case(kind: str, mode: str, layer, x_host: np.ndarray, dy_host: Optional[np.ndarray]) -> Case:
    """TP and dense runs of ``layer`` on ``x_host`` (ids for the embedding), backward from ``dy_host``."""
    backend, device = layer.backend, output_device(layer)
    xp, dtype = backend.xp, np.dtype(layer.config.dtype)
    x = backend.asarray(x_host, np.int64 if kind == "embedding" else dtype, device)
    dy = None if dy_host is None else backend.asarray(dy_host, dtype, device)
    params = [
        (backend.asarray(w, dtype, device), None if b is None else backend.asarray(b, dtype, device))
        for w, b in dense_params(kind, layer)
    ]
    backward = mode == "fwd+bwd"

    def tp():
        if not backward:
            return layer(x)
        layer.zero_grad()  # a training step: gradients start from zero
        layer(x)
        return layer.backward(dy)

    if kind == "embedding":
        (table, _), = params

        def dense_take(ids):
            with backend.device(device):
                return xp.take(table, ids, axis=0)  # (vocab, dim)[ids] -> (n_ids, dim)

        def dense():
            y = dense_take(x)
            if not backward:
                return y
            with backend.device(device):
                d_table = xp.zeros(table.shape, dtype=dtype)
                backend.scatter_add(d_table, x.reshape(-1), dy.reshape(-1, table.shape[1]))  # dE[ids] += dY
            return d_table

        def compare(out, dense_out):
            if backward:  # the table gradients; backward returns None
                got = backend.asarray(layer.grads()["weight"], dtype, device)
                return max_abs_diff(backend, device, got, dense_out)
            # The output (GBs for 1M ids) against a dense take of the same ids, a slice at a time.
            rows = max(1, (64 * 2**20) // (8 * out.shape[-1]))
            return max(
                max_abs_diff(backend, device, out[s:s + rows], dense_take(x[s:s + rows]))
                for s in range(0, out.shape[0], rows)
            )

        return Case(tp, dense, compare, keep_dense=backward)

    if kind == "mlp":
        act = get_activation(MLP_ACTIVATION)
        (w1, b1), (w2, b2) = params

        def dense():
            with backend.device(device):
                h = x @ w1  # (B, n_in) @ (n_in, hidden) -> (B, hidden)
                h += b1
                a = act.forward(xp, h)
                y = a @ w2  # (B, hidden) @ (hidden, n_in) -> (B, n_in)
                y += b2
                if not backward:
                    return y
                da = dy @ w2.T  # (B, n_in) @ (n_in, hidden) -> (B, hidden)
                dw2 = a.T @ dy  # (hidden, B) @ (B, n_in)
                db2 = dy.sum(axis=0)
                dh = act.grad(xp, h, da)
                dw1 = x.T @ dh  # (n_in, B) @ (B, hidden)
                db1 = dh.sum(axis=0)
                dx = dh @ w1.T  # (B, hidden) @ (hidden, n_in) -> (B, n_in)
                del dw2, db2, dw1, db1
                return dx

    else:  # column, row
        (w, b), = params

        def dense():
            with backend.device(device):
                y = x @ w + b  # (B, n_in) @ (n_in, n_out) + (n_out,) -> (B, n_out)
                if not backward:
                    return y
                dx = dy @ w.T  # (B, n_out) @ (n_out, n_in) -> (B, n_in)
                dw = x.T @ dy  # (n_in, B) @ (B, n_out) -> (n_in, n_out)
                db = dy.sum(axis=0)
                del dw, db
                return dx

    def compare(got, dense_out):
        if hasattr(got, "gather"):  # a ShardedTensor
            got = got.gather(device)
        return max_abs_diff(backend, device, backend.asarray(got, dtype, device), dense_out)

    return Case(tp, dense, compare)


def torch_case(kind: str, mode: str, layer, x_host, dy_host, torch, F) -> Optional[Tuple[Callable[[], Any], Any]]:
    """``(fn, device)``: the same computation in PyTorch, or None where torch cannot run it here.

    CPU torch for the numpy and simulated backends; CUDA torch on the output
    GPU for cupy (when ``torch.cuda.is_available()``).
    """
    if torch is None:
        return None
    if layer.backend.name == "cupy":
        if not torch.cuda.is_available():
            return None
        device = f"cuda:{output_device(layer)}"
    else:
        device = "cpu"
    dtype = getattr(torch, np.dtype(layer.config.dtype).name)
    backward = mode == "fwd+bwd"

    def tensor(a, grad=False, dt=dtype):
        t = torch.as_tensor(np.ascontiguousarray(a), device=device).to(dt)
        return t.requires_grad_(grad) if grad else t

    dy = None if dy_host is None else tensor(dy_host)
    if kind == "embedding":
        table = tensor(layer.full_weight(), backward)
        ids = tensor(x_host, dt=torch.int64)
        if not backward:
            return (lambda: F.embedding(ids, table)), device

        def run_emb():
            table.grad = None
            F.embedding(ids, table).backward(dy)
            return table.grad

        return run_emb, device
    x = tensor(x_host, backward)
    # F.linear wants the weight as (n_out, n_in): the transpose of ours, made contiguous once.
    linears = [(tensor(w.T, backward), tensor(b, backward)) for w, b in dense_params(kind, layer)]
    leaves = [x] + [t for pair in linears for t in pair]

    def forward():
        if kind == "mlp":
            (w1, b1), (w2, b2) = linears
            return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)
        (w, b), = linears
        return F.linear(x, w, b)

    if not backward:
        return forward, device

    def run():
        for t in leaves:
            t.grad = None
        forward().backward(dy)
        return x.grad

    return run, device


# --------------------------------------------------------------------------- running


def run_comparison(fns: Dict[str, Callable[[], Any]], backend, args, cupy_devices=None) -> Dict[str, Any]:
    """Time ``fns`` (re-timing up to ``args.retries`` times when disturbed); every attempt is kept."""
    attempts = []
    for _ in range(1 + max(0, args.retries)):
        load_before = os.getloadavg()[0]
        if cupy_devices is not None:
            times = {name: time_cupy(fn, cupy_devices, args) for name, fn in fns.items()}
        else:
            times = time_interleaved(
                fns, sync=backend.synchronize, repeat=args.repeat, warmup=args.warmup,
                max_time=args.max_time, min_time=args.min_time,
            )
        load_after = os.getloadavg()[0]
        worst = max(spread(t) for t in times.values())
        attempts.append({"times_s": times, "spread": worst, "load_1min": [load_before, load_after]})
        # Disturbed: runs of one function spread by more than 25 % (fast cases: 40 %), or the machine
        # busier than this benchmark alone would make it (its BLAS threads count as load).
        fast = min(statistics.median(t) for t in times.values()) < 2e-3
        busy = max(load_before, load_after) > (os.cpu_count() or 1) + 1.0
        if worst <= (0.40 if fast else 0.25) and not busy:
            break
    best = min(attempts, key=lambda a: a["spread"])
    return {"best": best, "attempts": attempts}


def summarize(times: Optional[List[float]], amount: float) -> Dict[str, Optional[float]]:
    if not times:
        return {"median_s": None, "rate": None}
    median = statistics.median(times)
    return {"median_s": median, "rate": amount / median}


def time_torch(kind, mode, layer, x_host, dy_host, torch, F, args, progress, label) -> Tuple[Optional[dict], Optional[float]]:
    """PyTorch's timings for this comparison, and its max abs difference from dense; (None, None) if none."""
    try:
        built = torch_case(kind, mode, layer, x_host, dy_host, torch, F)
        if built is None:
            return None, None
        fn, device = built
        if device.startswith("cuda"):
            timed = run_comparison({"torch": fn}, layer.backend, args, cupy_devices=(output_device(layer),))
        else:
            timed = run_comparison({"torch": fn}, layer.backend, args)
        if kind == "embedding" and mode == "fwd":  # outputs can be GBs: compare a slice of ids at a time
            table, ids = layer.full_weight().astype(layer.dtype), np.asarray(x_host)
            weight = torch.as_tensor(table, device=device)
            step = max(1, (64 * 2**20) // (8 * table.shape[1]))
            diff = max(
                host_max_abs_diff(F.embedding(torch.as_tensor(ids[s:s + step], device=device), weight).cpu().numpy(),
                                  np.take(table, ids[s:s + step], axis=0))
                for s in range(0, ids.size, step)
            )
            return timed, diff
        expected = layer.backend.to_host(make_case(kind, mode, layer, x_host, dy_host).dense())
        got = fn().detach().cpu().numpy()
        return timed, host_max_abs_diff(got, expected)
    except Exception as exc:  # e.g. a dtype this torch build has no kernel for
        progress.note(f"torch skipped for {label}: {type(exc).__name__}: {exc}")
        return None, None


def run_group(kind: str, shape: Shape, dtype: str, mode: str, args, backend_name: str, torch, F, progress) -> List[dict]:
    """Every worker count for one (layer, shape, dtype, mode), on the same data.

    Dense is timed again beside each worker count, interleaved with TP, so each
    ratio compares runs taken moments apart; torch, a reference, is timed once
    per group (the logical weights do not depend on the worker count).
    """
    label = f"{kind} {describe(kind, shape)} {dtype} {mode}"
    if mode == "fwd+bwd" and output_bytes(kind, shape, dtype) > BWD_MAX_OUTPUT_BYTES:
        progress.note(f"skip: {label}: output of {output_bytes(kind, shape, dtype) / 2**30:.1f} GiB; "
                      f"forward + backward runs only below {BWD_MAX_OUTPUT_BYTES / 2**30:.0f} GiB")
        for n in args.workers:
            progress.tick(f"{kind} workers={n}: skipped")
        return []
    rng = np.random.default_rng(0)
    if kind == "embedding":
        x_host = rng.integers(0, shape.n_in, size=shape.batch)
        x_host[0], x_host[-1] = 0, shape.n_in - 1  # both ends of the vocabulary
    else:
        x_host = rng.standard_normal((shape.batch, shape.n_in), dtype=np.float32).astype(dtype)
    dy_host = (
        rng.standard_normal((shape.batch, out_features(kind, shape)), dtype=np.float32).astype(dtype)
        if mode == "fwd+bwd" else None
    )
    amount, unit = work(kind, shape, dtype, mode)
    out_nbytes = output_bytes(kind, shape, dtype)
    records: List[Dict[str, Any]] = []
    torch_timed, torch_diff, torch_done = None, None, False
    for n in args.workers:
        if split_size(kind, shape) % n:
            progress.note(f"skip: {label}, {n} workers do not divide {split_size(kind, shape)}")
            progress.tick(f"{kind} workers={n}: skipped")
            continue
        config = TensorParallelConfig(n_workers=n, backend=backend_name, devices=args.devices, dtype=dtype)
        layer = build_layer(kind, shape, config, mode)
        backend = layer.backend
        case = make_case(kind, mode, layer, x_host, dy_host)
        if not torch_done:
            torch_done = True
            torch_timed, torch_diff = time_torch(kind, mode, layer, x_host, dy_host, torch, F, args, progress, label)
        cupy_devices = tuple(backend.devices) if backend.name == "cupy" else None
        timed = run_comparison({"tp": case.tp, "dense": case.dense}, backend, args, cupy_devices)
        tp_times, dense_times = timed["best"]["times_s"]["tp"], timed["best"]["times_s"]["dense"]
        torch_times = torch_timed["best"]["times_s"]["torch"] if torch_timed else None
        # One more run of each, memory measured, results compared.
        tp_peak, how, tp_out = measure_peak(backend, case.tp)
        dense_peak, _, dense_out = measure_peak(backend, case.dense, keep=case.keep_dense)
        diff = case.compare(tp_out, dense_out)
        del tp_out, dense_out
        allowed = tolerance(kind, shape, dtype, mode)
        if not diff <= allowed:  # also NaN
            raise ResultMismatch(
                f"{label}, {n} workers: TP and dense differ by up to {diff:.3g}, more than the {allowed:.3g} "
                "rounding allows; the layer is wrong, so its timing is not reported"
            )
        stats = {name: summarize(t, amount) for name, t in (("tp", tp_times), ("dense", dense_times), ("torch", torch_times))}
        record = {
            "layer": kind,
            "shape": describe(kind, shape),
            "batch": shape.batch,
            "n_in": shape.n_in,
            "n_out": shape.n_out,
            "dtype": dtype,
            "mode": mode,
            "n_workers": n,
            "devices": [str(d) for d in (layer.fc2 if kind == "mlp" else layer).devices],
            "unit": unit,
            "work": amount,
            "output_bytes": out_nbytes,
            "tp_times_s": tp_times,
            "dense_times_s": dense_times,
            # torch runs once per (layer, shape, dtype, mode): its raw times are kept in the group's first record.
            "torch_times_s": torch_times if not records else None,
            **{f"{name}_{key}": value for name, s in stats.items() for key, value in s.items()},
            "ratio_tp_dense": stats["tp"]["median_s"] / stats["dense"]["median_s"],
            "ratio_tp_torch": stats["tp"]["median_s"] / stats["torch"]["median_s"] if torch_times else None,
            "ratio_dense_torch": stats["dense"]["median_s"] / stats["torch"]["median_s"] if torch_times else None,
            "spread": timed["best"]["spread"],
            "load_1min": timed["best"]["load_1min"],
            # Every timing attempt; the raw times of the one kept are tp_times_s / dense_times_s above.
            "attempts": [
                {"spread": a["spread"], "load_1min": a["load_1min"], "kept": a is timed["best"],
                 **({} if a is timed["best"] else {"tp_times_s": a["times_s"]["tp"], "dense_times_s": a["times_s"]["dense"]})}
                for a in timed["attempts"]
            ],
            "torch_attempts": len(torch_timed["attempts"]) if torch_timed else None,
            "max_abs_diff_tp_dense": diff,
            "max_abs_diff_torch_dense": torch_diff,
            "tp_peak_bytes": tp_peak,
            "dense_peak_bytes": dense_peak,
            "extra_peak_bytes": None if tp_peak is None or dense_peak is None else tp_peak - dense_peak,
            "extra_peak_over_output": None if tp_peak is None or dense_peak is None else (tp_peak - dense_peak) / out_nbytes,
            "memory_measure": how,
            "peak_rss_mib": peak_rss_mib(),
        }
        records.append(record)
        progress.tick(f"{kind} {describe(kind, shape)} {dtype} {mode} p={n}: TP/dense {record['ratio_tp_dense']:.2f}")
        del layer, case, timed
    gc.collect()
    return records


def release_gpu_memory(backend) -> None:
    """Return the cached blocks of CuPy's memory pool on every device (a no-op elsewhere)."""
    if backend.name == "cupy":
        pool = backend.xp.get_default_memory_pool()
        for d in backend.devices:
            with backend.xp.cuda.Device(d):  # the pool acts on the current device
                pool.free_all_blocks()


# --------------------------------------------------------------------------- targets

#: Issue 5's speed targets, checked against the forward timings: (name, layers, shape, dtype, limit).
TARGETS = (
    ("throughput-bound forward <= 1.05x dense", ("column", "row", "mlp"), Shape(2048, 4096, 4096), "float32", 1.05),
    ("latency-bound forward <= 1.5x dense", ("column", "row", "mlp"), Shape(8, 1024, 1024), "float32", 1.5),
    ("embedding forward <= 1.5x dense take", ("embedding",), Shape(1_000_000, 50_000, 1024), "float32", 1.5),
)


#: The memory target is checked on outputs at least this large (smaller ones measure Python's objects).
MEMORY_TARGET_MIN_OUTPUT = 2**20


def target_rows(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (target, layer): the worst TP/dense over the worker counts measured, and pass/fail."""
    rows = []
    for name, layers, shape, dtype, limit in TARGETS:
        for kind in layers:
            hits = [r for r in records if r["layer"] == kind and r["mode"] == "fwd" and r["dtype"] == dtype
                    and (r["batch"], r["n_in"], r["n_out"]) == (shape.batch, shape.n_in, shape.n_out)]
            if not hits:
                continue
            worst = max(hits, key=lambda r: r["ratio_tp_dense"])
            rows.append({
                "target": name, "layer": kind, "shape": describe(kind, shape), "dtype": dtype, "limit": limit,
                "ratios": {r["n_workers"]: r["ratio_tp_dense"] for r in hits},
                "worst": worst["ratio_tp_dense"], "worst_workers": worst["n_workers"],
                "pass": worst["ratio_tp_dense"] <= limit,
            })
    # Buffers, not Python's own objects (a few KB, which tracemalloc counts too): outputs of 1 MiB and more.
    fwd = [r for r in records if r["mode"] == "fwd" and r["extra_peak_over_output"] is not None
           and r["output_bytes"] >= MEMORY_TARGET_MIN_OUTPUT]
    if fwd:
        worst = max(fwd, key=lambda r: r["extra_peak_over_output"])
        rows.append({
            "target": "peak extra memory <= 1 output buffer", "layer": "all", "shape": "forward, outputs >= 1 MiB",
            "dtype": "all", "limit": 1.0, "ratios": {}, "worst": worst["extra_peak_over_output"],
            "worst_workers": worst["n_workers"], "worst_case": f"{worst['layer']} {worst['shape']} {worst['dtype']}",
            "pass": worst["extra_peak_over_output"] <= 1.0,
        })
    return rows


# --------------------------------------------------------------------------- output


def ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def num(value: Optional[float], fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def targets_markdown(rows: List[Dict[str, Any]], workers: Sequence[int]) -> List[str]:
    if not rows:
        return []
    lines = [
        "| target | layer | shape | dtype | " + " | ".join(f"p={n}" for n in workers) + " | worst | met? |",
        "|---|---|---|---|" + "---:|" * len(workers) + "---:|---|",
    ]
    for t in rows:
        per = " | ".join(num(t["ratios"].get(n)) for n in workers)
        worst = num(t["worst"]) + (f" ({t['worst_case']}, p={t['worst_workers']})" if "worst_case" in t else "")
        lines.append(f"| {t['target']} | {t['layer']} | {t['shape']} | {t['dtype']} | {per} | {worst} | "
                     f"{'yes' if t['pass'] else '**no**'} |")
    return lines


def markdown(machine: Dict[str, Any], args, records: List[Dict[str, Any]]) -> str:
    gpus = ", ".join(machine["gpus"]) or "none"
    blas = machine["blas"]
    source = machine["tp_gpu_source"]
    load = machine.get("load_avg_start", [None])[0], machine.get("load_avg_end", [None])[0]
    torch_threads = "" if machine["torch_threads"] is None else f" ({machine['torch_threads']} threads)"
    lines = [
        f"# tp_gpu layer benchmark, {machine['date']}{' (--quick)' if args.quick else ''}",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} cores, {num(machine['memory_gib'], '.0f')} GiB); GPU: {gpus}",
        f"- backend: {machine['backend']}, devices {machine['devices']}; NumPy {machine['numpy']} "
        f"({blas['name']} {blas['version']}, {blas['threads']} threads); torch {machine['torch'] or 'not installed'}"
        f"{torch_threads}; "
        f"tp_gpu {machine['tp_gpu']} at commit {source['commit'] or 'unknown'}",
        f"- load average (1 min) at start {num(load[0])}, at end {num(load[1])}",
        f"- CPU: median of at least {args.repeat} interleaved runs (TP, dense, TP, ...) after {args.warmup} warm-up, "
        f"at most {args.max_time:g} s per comparison; re-timed up to {args.retries} times when disturbed",
        "- **TP/dense < 1: the tensor-parallel layer is faster than dense on the same backend; > 1: slower**",
        "- rate: GFLOP/s of the GEMMs (2·B·n_in·n_out per GEMM; forward + backward counts 3x) for linears and MLP; "
        "GB/s of output for the embedding (forward + backward: 2x)",
        "- extra mem: peak memory of one TP run minus that of one dense run, in output buffers "
        "(<= 1 is issue 5's target; < 0: TP needs less)",
        "- MLP: `ParallelMLP(n_in, hidden=n_out, n_out=n_in)`, GeLU (tanh)",
    ]
    for rerun in machine.get("reruns", []):
        lines.append(f"- re-timed at {rerun['started']} (load average {num(rerun['load_avg'][0][0])}), replacing "
                     f"{len(rerun['replaced'])} case(s) whose first timing was disturbed; marked *re-run* below")
    lines += [""]
    targets = target_rows(records)
    if targets:
        lines += ["## Issue 5 targets (forward, TP/dense at each worker count)", ""]
        lines += targets_markdown(targets, args.workers) + [""]
    lines += [
        "## Every case",
        "",
        "| layer | shape | dtype | mode | workers | TP ms | dense ms | torch ms | TP/dense | TP/torch "
        "| TP rate | dense rate | torch rate | unit | extra mem | spread |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['dtype']} | {r['mode']}{' *re-run*' if r.get('rerun') else ''} | "
            f"{r['n_workers']} | {ms(r['tp_median_s'])} | "
            f"{ms(r['dense_median_s'])} | {ms(r['torch_median_s'])} | {num(r['ratio_tp_dense'])} | "
            f"{num(r['ratio_tp_torch'])} | {num(r['tp_rate'], '.1f')} | {num(r['dense_rate'], '.1f')} | "
            f"{num(r['torch_rate'], '.1f')} | {r['unit']} | {num(r['extra_peak_over_output'])} | {num(r['spread'])} |"
        )
    lines += ["", "spread: interquartile range of the runs / median (range / median below 5 runs), the worse of TP and dense."]
    return "\n".join(lines) + "\n"


def write_plots(records: List[Dict[str, Any]], stem: Path) -> List[Path]:
    """Ratio vs workers and rate vs size, one panel per layer and mode; [] with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    layers = list(dict.fromkeys(r["layer"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    paths = [stem.with_name(stem.name + "-ratio.png"), stem.with_name(stem.name + "-rate.png")]
    dtype_styles = {"float32": "-", "float64": "--", "float16": ":"}

    fig, axes = plt.subplots(len(modes), len(layers), figsize=(4.2 * len(layers), 3.4 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for ax, layer in zip(axes[row], layers):
            rows = [r for r in records if r["layer"] == layer and r["mode"] == mode]
            if not rows:
                ax.set_visible(False)
                continue
            shapes = list(dict.fromkeys(r["shape"] for r in rows))
            colors = {s: f"C{i}" for i, s in enumerate(shapes)}
            for key in dict.fromkeys((r["shape"], r["dtype"]) for r in rows):
                line = [r for r in rows if (r["shape"], r["dtype"]) == key]
                ax.plot([r["n_workers"] for r in line], [r["ratio_tp_dense"] for r in line], dtype_styles.get(key[1], "-"),
                        color=colors[key[0]], marker="o", markersize=3, label=f"{key[0]} {key[1].replace('float', 'f')}")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            if mode == "fwd":  # issue 5's limits: 1.05 throughput-bound, 1.5 latency-bound and embedding
                for limit in (1.05, 1.5):
                    ax.axhline(limit, color="gray", linewidth=0.6, linestyle=":")
            ticks = sorted({r["n_workers"] for r in rows})
            ax.set(title=f"{layer}, {mode}", xlabel="workers", ylabel="TP / dense time", xscale="log")
            ax.set_xticks(ticks, labels=[str(t) for t in ticks])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=5.5)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=72)
    plt.close(fig)
    _shrink_png(paths[0])

    fig, axes = plt.subplots(len(modes), len(layers), figsize=(4.2 * len(layers), 3.4 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for ax, layer in zip(axes[row], layers):
            rows = [r for r in records if r["layer"] == layer and r["mode"] == mode]
            if not rows:
                ax.set_visible(False)
                continue
            for dtype in dict.fromkeys(r["dtype"] for r in rows):
                by_dtype = [r for r in rows if r["dtype"] == dtype]
                workers = sorted({r["n_workers"] for r in by_dtype})
                series = {"dense": ("dense_rate", None, "C0")}
                series[f"TP p={workers[0]}"] = ("tp_rate", workers[0], "C1")
                if len(workers) > 1:
                    series[f"TP p={workers[-1]}"] = ("tp_rate", workers[-1], "C2")
                if any(r["torch_rate"] for r in by_dtype):
                    series["torch"] = ("torch_rate", None, "C3")
                for label, (key, n, color) in series.items():
                    points = {r["work"]: r[key] for r in by_dtype if (n is None or r["n_workers"] == n) and r[key]}
                    sizes = sorted(points)
                    ax.plot(sizes, [points[s] for s in sizes], dtype_styles.get(dtype, "-"), color=color, marker="o",
                            markersize=3, label=f"{label} {dtype.replace('float', 'f')}")
            unit_work = "GB moved per run" if layer == "embedding" else "GFLOP per run"
            ax.set(title=f"{layer}, {mode}", xlabel=unit_work, xscale="log", yscale="log", ylabel=rows[0]["unit"])
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            rates = [v for r in rows for v in (r["tp_rate"], r["dense_rate"], r["torch_rate"]) if v]
            narrow = max(rates) < 10 * min(rates)  # within a decade: label the minor ticks too, plainly
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if narrow else NullFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=6)
            ax.legend(fontsize=5.5)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=72)
    plt.close(fig)
    _shrink_png(paths[1])
    return paths


def _shrink_png(path: Path) -> None:
    """Re-save a plot with a 64-colour palette (a third of the size; plots have few colours)."""
    try:
        from PIL import Image  # Pillow comes with matplotlib
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)


def _rounded(value: Any) -> Any:
    """``value`` with every float rounded to 4 significant digits (timings are not more precise)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_json(path: Path, header: Dict[str, Any], records: List[Dict[str, Any]]) -> None:
    """``{**header, "results": records}`` as JSON, readable yet small: the header indented, then one
    line per case, times to 4 significant digits."""
    head = json.dumps(header, indent=1)[:-2]
    lines = [json.dumps(_rounded(r), separators=(",", ":")) for r in records]
    path.write_text(head + ',\n "results": [\n' + ",\n".join(lines) + "\n ]\n}\n")


def write_results(machine: Dict[str, Any], args, records: List[Dict[str, Any]], plots: bool = True) -> List[Path]:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / file_stem(machine, args.quick)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("shapes", "embed_shapes")}
    options["shapes"] = [vars(s) for s in args.shapes]
    options["embed_shapes"] = [vars(s) for s in args.embed_shapes]
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    records = [_rounded(r) for r in records]  # as stored: the table then matches a --render of the JSON
    write_json(json_path, {"machine": machine, "options": options, "targets": target_rows(records)}, records)
    md_path.write_text(markdown(machine, args, records))
    return [json_path, md_path] + (write_plots(records, stem) if plots else [])


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
            self.bar.set_description(message[:70])
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


def case_key(r: Dict[str, Any]) -> tuple:
    return (r["layer"], r["batch"], r["n_in"], r["n_out"], r["dtype"], r["mode"], r["n_workers"])


def update(path: Path, machine: Dict[str, Any], args, records: List[Dict[str, Any]]) -> int:
    """Replace ``records``' cases in the run stored at ``path``, note the re-run there, and redraw."""
    data = json.loads(path.read_text())
    new = {case_key(r): r for r in records}
    replaced = []
    for i, old in enumerate(data["results"]):
        if case_key(old) in new:
            data["results"][i] = dict(new.pop(case_key(old)), rerun=machine["started"])
            replaced.append(" ".join(map(str, case_key(old))))
    data["results"] += [dict(r, rerun=machine["started"]) for r in new.values()]
    data["machine"].setdefault("reruns", []).append({
        "started": machine["started"], "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg": [machine["load_avg_start"], list(os.getloadavg())], "tp_gpu_source": machine["tp_gpu_source"],
        "argv": sys.argv[1:], "replaced": replaced, "added": [" ".join(map(str, case_key(r))) for r in new.values()],
    })
    header = {"machine": data["machine"], "options": data["options"], "targets": target_rows(data["results"])}
    write_json(path, header, data["results"])
    print(f"replaced {len(replaced)} and added {len(new)} case(s) in {path}")
    return render(path)


def render(path: Path) -> int:
    """Rewrite ``<stem>.md`` and the plots from ``<stem>.json`` (e.g. after changing how they are drawn)."""
    data = json.loads(path.read_text())
    options = dict(data["options"])
    options["out"] = path.parent
    args = argparse.Namespace(**options)
    records = data["results"]
    stem = path.with_suffix("")
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(data["machine"], args, records))
    paths = [md_path] + write_plots(records, stem)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    backend_name = resolve_backend_name(args.backend)
    backend = get_backend(backend_name, args.devices)
    if args.dtype is None:
        args.dtype = ["float32"] if args.quick else ["float32", "float64"]
        args.dtype += ["float16"] if backend_name == "cupy" else []
    if args.threads is not None and not set_blas_threads(args.threads):
        print(f"note: could not set NumPy's BLAS threads to {args.threads} (not OpenBLAS?); "
              "set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before starting instead")
    blas = blas_info()
    torch, F = import_torch(not args.no_torch)
    if torch is not None and backend_name != "cupy":
        torch.set_num_threads(args.threads or blas["threads"] or os.cpu_count() or 1)  # as many as NumPy's BLAS
    machine = machine_info(backend, torch, blas)
    torch_note = f"torch {machine['torch']} ({machine['torch_threads']} threads)" if torch else "no torch"
    print(f"{machine['cpu']}, {machine['cores']} cores; backend {backend_name} {machine['devices']}; "
          f"BLAS threads {blas['threads']}; {torch_note}; tp_gpu from {machine['tp_gpu_source']['path']}")
    groups = [
        (kind, shape, dtype, mode)
        for kind in args.layers
        for shape in (args.embed_shapes if kind == "embedding" else args.shapes)
        for dtype in args.dtype
        for mode in args.mode
    ]
    warm_up_machine()
    progress = Progress(len(groups) * len(args.workers))
    records: List[Dict[str, Any]] = []
    try:
        for kind, shape, dtype, mode in groups:
            records += run_group(kind, shape, dtype, mode, args, backend_name, torch, F, progress)
            release_gpu_memory(backend)
            if records and args.update is None:  # what is done so far survives an interrupted run (plots at the end)
                machine["complete"] = False
                write_results(machine, args, records, plots=False)
    finally:
        progress.close()
    if not records:
        print("no case ran (every worker count was skipped); nothing written", file=sys.stderr)
        return 1
    if args.update is not None:
        return update(args.update, machine, args, records)
    machine["complete"] = True
    machine["load_avg_end"] = list(os.getloadavg())
    machine["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    paths = write_results(machine, args, records)
    md = paths[1].read_text()  # the table as written (from the rounded records), not built again
    print(md if len(records) <= 200 else md.split("## Every case")[0])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
