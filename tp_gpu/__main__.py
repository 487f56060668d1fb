"""``python -m tp_gpu``: environment, placement, self-check and quick timings.

Prints four sections in plain text:

1. **Environment**: tp_gpu, Python and NumPy versions, the backend chosen and
   why (``--backend``, ``$TP_GPU_BACKEND`` or auto), whether CuPy can run here
   (and if not, why), the GPU names on CuPy, and the backend's devices.
2. **Placement**: for each worker count, the device each worker runs on.
3. **Self-check**: every layer (column, row, column -> row chained, embedding)
   at every worker count against a dense float64 NumPy reference built from
   the layer's own ``full_weight()`` / ``full_bias()``, on random data at odd
   sizes. Layers start with a zero bias, so the check gives each a random one
   first; otherwise the bias path would go unchecked.
4. **Timings**: median time of the tensor-parallel forward against the dense
   forward (``x @ W + b`` with ``W = layer.full_weight()`` on one device of
   the same backend, ``table[ids]`` for the embedding), and their ratio.

The exit status is 1 when any self-check fails, 2 on a bad option, else 0.

Examples::

    python -m tp_gpu
    python -m tp_gpu --backend simulated --devices 3 --workers 1 2 4 8
    TP_GPU_BACKEND=simulated python -m tp_gpu
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from . import __version__
from .backends import ENV_VAR, get_backend, resolve_backend_name
from .config import BACKEND_NAMES, SUPPORTED_DTYPES, TensorParallelConfig
from .errors import TensorParallelError
from .layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear

#: Max abs error allowed against the float64 reference, per compute dtype.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-2}

# Self-check sizes: odd, and the split dimension is CHECK_SPLIT * n_workers.
CHECK_BATCH, CHECK_IN, CHECK_OUT, CHECK_SPLIT, CHECK_SEQ = 7, 13, 11, 7, 5

# Timing sizes: moderate, so the whole run takes seconds on a small CPU.
TIME_BATCH, TIME_FEATURES = 64, 1024
TIME_VOCAB, TIME_TOKENS = 8192, (64, 16)

WARMUP = 2


@dataclass
class Case:
    """One layer on prepared inputs, with three ways to compute its output."""

    name: str  # e.g. "column 7x13->21"
    layer: Any  # the tensor-parallel layer (the last one for a chain)
    run_tp: Callable[[], Any]  # tensor-parallel forward
    run_dense: Callable[[], Any]  # same math on one device of the same backend, full weights
    reference: Callable[[], np.ndarray]  # dense float64 NumPy on the host


# --------------------------------------------------------------------------- options


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tp_gpu",
        description="Show the environment and worker placement, self-check every layer against a "
        "dense float64 reference, and time tensor-parallel vs dense forwards.",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default=None,
        help=f"backend to use (default: ${ENV_VAR}, else cupy when a GPU is usable, else numpy)",
    )
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="device count for simulated or cupy (default: 4 simulated, every visible GPU); numpy has 1",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        nargs="+",
        default=[1, 2, 4],
        metavar="N",
        help="worker counts to place, check and time (default: 1 2 4)",
    )
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32", help="compute dtype (default: float32)")
    parser.add_argument(
        "--repeat", type=positive_int, default=10, help="timed runs per case; the median is shown (default: 10)"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- environment


def backend_choice(requested: Optional[str]) -> tuple:
    """``(name, why)``: the backend name that will be used and how it was chosen."""
    name = resolve_backend_name(requested)
    env = os.environ.get(ENV_VAR)
    if requested is not None:
        why = "explicit (--backend)"
    elif env:
        why = f"environment variable {ENV_VAR}={env}"
    elif name == "cupy":
        why = "auto: CuPy imports and a GPU is visible"
    else:
        why = "auto: no usable CuPy GPU, so NumPy on the host"
    return name, why


def cupy_status() -> str:
    """Whether CuPy can run here, and if not, why."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy not installed"
    from .backends.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    return "usable (imports, GPU visible)" if reason is None else f"not usable: {reason}"


def gpu_names(backend) -> List[str]:
    """``"id: name"`` of each GPU of a CuPy backend."""
    runtime = backend.xp.cuda.runtime
    names = []
    for d in backend.devices:
        name = runtime.getDeviceProperties(d)["name"]
        names.append(f"{d}: {name.decode() if isinstance(name, bytes) else name}")
    return names


def print_environment(backend, why: str) -> None:
    print("== Environment")
    print(f"tp_gpu   {__version__}")
    print(f"Python   {platform.python_version()} ({sys.executable})")
    print(f"NumPy    {np.__version__}")
    print(f"backend  {backend.name}  ({why})")
    print(f"CuPy     {cupy_status()}")
    if backend.name == "cupy":
        for line in gpu_names(backend):
            print(f"GPU      {line}")
    print(f"devices  {list(backend.devices)}")
    print()


# --------------------------------------------------------------------------- placement


def make_config(args: argparse.Namespace, backend_name: str, n_workers: int, **kwargs) -> TensorParallelConfig:
    return TensorParallelConfig(
        n_workers=n_workers, backend=backend_name, devices=args.devices, dtype=args.dtype, **kwargs
    )


def print_placement(args: argparse.Namespace, backend_name: str) -> None:
    print("== Placement (worker i -> devices[i % len(devices)])")
    for n in args.workers:
        layer = ColumnParallelLinear(1, n, make_config(args, backend_name, n))
        print(f"{n:>3} worker(s): devices {layer.devices}, output on {layer.output_device!r}")
    print()


# --------------------------------------------------------------------------- cases


def set_random_bias(layer, rng: np.random.Generator) -> None:
    """Overwrite a linear layer's bias (zero at init) in place with random values.

    Column: shard i of ``bias_shards`` on worker i's device; row: the whole
    ``bias`` on the output device.
    """
    if isinstance(layer, ColumnParallelLinear):
        arrays, devices = layer.bias_shards, layer.devices
    else:
        arrays, devices = [layer.bias], [layer.output_device]
    pieces = np.split(rng.standard_normal(layer.n_out), len(arrays))
    for array, piece, device in zip(arrays, pieces, devices):
        with layer.backend.device(device):
            array[...] = layer.backend.asarray(piece, array.dtype, device)


def inference_mode(layer):
    """The layer in inference mode where it has one (``eval()``), so forward keeps nothing for backward."""
    if hasattr(layer, "eval"):
        layer.eval()
    return layer


def linear_case(name: str, layers: Sequence[Any], x: np.ndarray) -> Case:
    """A case for ``layers`` applied in turn to ``x``, with dense versions from their full weights."""
    last = layers[-1]
    backend, device, dtype = last.backend, last.output_device, last.dtype
    x_dev = backend.asarray(x, dtype, device)
    host = [(layer.full_weight(), layer.full_bias()) for layer in layers]
    on_device = [(backend.asarray(w, dtype, device), backend.asarray(b, dtype, device)) for w, b in host]

    def run_tp():
        y = x_dev
        for layer in layers:
            y = layer(y)
        return y

    def run_dense():
        with backend.device(device):
            y = x_dev
            for w, b in on_device:
                y = y @ w + b  # (batch, n_in) @ (n_in, n_out) + (n_out,) -> (batch, n_out)
            return y

    def reference():
        y = x.astype(dtype).astype(np.float64)  # the input the layer actually sees
        for w, b in host:
            y = y @ w.astype(np.float64) + b.astype(np.float64)
        return y

    return Case(name, last, run_tp, run_dense, reference)


def column_case(config, batch: int, n_in: int, n_out: int, rng) -> Case:
    layer = inference_mode(ColumnParallelLinear(n_in, n_out, config, seed=1))
    set_random_bias(layer, rng)
    return linear_case(f"column {batch}x{n_in}->{n_out}", [layer], rng.standard_normal((batch, n_in)))


def row_case(config, batch: int, n_in: int, n_out: int, rng) -> Case:
    layer = inference_mode(RowParallelLinear(n_in, n_out, config, seed=2))
    set_random_bias(layer, rng)
    return linear_case(f"row {batch}x{n_in}->{n_out}", [layer], rng.standard_normal((batch, n_in)))


def chain_case(config, batch: int, n_in: int, n_hidden: int, rng) -> Case:
    """ColumnParallelLinear(gather_output=False) -> RowParallelLinear, back to ``n_in`` features."""
    column = inference_mode(ColumnParallelLinear(n_in, n_hidden, replace(config, gather_output=False), seed=3))
    row = inference_mode(RowParallelLinear(n_hidden, n_in, config, seed=4))
    set_random_bias(column, rng)
    set_random_bias(row, rng)
    name = f"column->row {batch}x{n_in}->{n_hidden}->{n_in}"
    return linear_case(name, [column, row], rng.standard_normal((batch, n_in)))


def embedding_case(config, ids_shape: tuple, vocab: int, dim: int, rng) -> Case:
    layer = inference_mode(ParallelEmbedding(vocab, dim, seed=5, config=config))
    backend, device = layer.backend, layer.output_device
    ids = rng.integers(0, vocab, size=ids_shape)
    ids.flat[0], ids.flat[-1] = 0, vocab - 1  # both ends of the vocabulary
    table = layer.full_weight()
    ids_dev = backend.asarray(ids, np.int64, device)
    table_dev = backend.asarray(table, layer.dtype, device)

    def run_dense():
        with backend.device(device):
            return backend.xp.take(table_dev, ids_dev, axis=0)  # (vocab, dim)[ids] -> (*ids.shape, dim)

    shape = "x".join(map(str, ids_shape))
    return Case(
        f"embedding {shape} ids, {vocab}x{dim}",
        layer,
        lambda: layer(ids_dev),
        run_dense,
        lambda: table.astype(np.float64)[ids],
    )


def round_up(size: int, n: int) -> int:
    """The smallest multiple of ``n`` that is >= ``size``."""
    return -(-size // n) * n


# --------------------------------------------------------------------------- self-check


def self_check_cases(config, n: int, rng) -> List[Case]:
    split = CHECK_SPLIT * n
    return [
        column_case(config, CHECK_BATCH, CHECK_IN, split, rng),
        row_case(config, CHECK_BATCH, split, CHECK_OUT, rng),
        chain_case(config, CHECK_BATCH, CHECK_IN, split, rng),
        embedding_case(config, (CHECK_BATCH, CHECK_SEQ), split, CHECK_IN, rng),
    ]


def print_self_check(args: argparse.Namespace, backend_name: str) -> bool:
    """Print one line per (layer, worker count); True when every line passes."""
    tol = TOLERANCE[args.dtype]
    print(f"== Self-check vs dense float64 reference ({args.dtype}, tolerance {tol:g} max abs error)")
    rng = np.random.default_rng(0)
    all_ok = True
    for n in args.workers:
        for case in self_check_cases(make_config(args, backend_name, n), n, rng):
            backend, expected_device = case.layer.backend, case.layer.output_device
            y = case.run_tp()
            on_device = backend.device_of(y) == expected_device
            error = float(np.max(np.abs(backend.to_host(y).astype(np.float64) - case.reference())))
            ok = error <= tol and on_device
            all_ok &= ok
            where = "" if on_device else f"  output on {backend.device_of(y)!r}, expected {expected_device!r}"
            print(f"{'PASS' if ok else 'FAIL'}  {case.name:<36} workers={n:<3} max abs error {error:.2e}{where}")
    print()
    return all_ok


# --------------------------------------------------------------------------- timings


def median_seconds(fn: Callable[[], Any], backend, repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs after warm-up, synchronising the backend."""
    for _ in range(WARMUP):
        fn()
    backend.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        backend.synchronize()  # CuPy work is asynchronous
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_up_machine(seconds: float = 0.3) -> None:
    """Keep the CPU and BLAS busy for a moment: a process's first milliseconds run slow."""
    a = np.random.default_rng(0).standard_normal((256, 256))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def timing_cases(config, n: int, rng) -> List[Case]:
    features = round_up(TIME_FEATURES, n)
    return [
        column_case(config, TIME_BATCH, TIME_FEATURES, features, rng),
        row_case(config, TIME_BATCH, features, TIME_FEATURES, rng),
        chain_case(config, TIME_BATCH, TIME_FEATURES, features, rng),
        embedding_case(config, TIME_TOKENS, round_up(TIME_VOCAB, n), TIME_FEATURES, rng),
    ]


def print_timings(args: argparse.Namespace, backend_name: str) -> None:
    print(f"== Timings: median of {args.repeat} runs after {WARMUP} warm-up, {args.dtype}, {backend_name}")
    print("   TP/dense < 1: tensor-parallel forward faster than dense on the same backend")
    print(f"{'layer':<40} {'workers':>7} {'TP ms':>9} {'dense ms':>9} {'TP/dense':>9}")
    rng = np.random.default_rng(1)
    warm_up_machine()
    for n in args.workers:
        for case in timing_cases(make_config(args, backend_name, n), n, rng):
            backend = case.layer.backend
            tp = median_seconds(case.run_tp, backend, args.repeat)
            dense = median_seconds(case.run_dense, backend, args.repeat)
            print(f"{case.name:<40} {n:>7} {tp * 1e3:>9.3f} {dense * 1e3:>9.3f} {tp / dense:>9.2f}")
    print()


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        backend_name, why = backend_choice(args.backend)
        backend = get_backend(backend_name, args.devices)
        print_environment(backend, why)
        print_placement(args, backend_name)
        ok = print_self_check(args, backend_name)
        print_timings(args, backend_name)
    except TensorParallelError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print("self-check: all PASS" if ok else "self-check: FAILED (see FAIL lines above)")
    return 0 if ok else 1


def run() -> int:
    """:func:`main`, ending quietly when the reader of stdout goes away (``python -m tp_gpu | head``)."""
    try:
        return main()
    except BrokenPipeError:
        # As the Python docs advise for SIGPIPE: point stdout at devnull so the
        # interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run())
