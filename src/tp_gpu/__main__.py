"""``python -m tp_gpu``: the environment, the backend and why, the placement, and a self-check.

The self-check runs every layer at every worker count, forward then backward, against a dense float64
NumPy reference built from the layer's own logical weights (biases made random first), on random data
at odd sizes, judged by the tolerance table of :mod:`tp_gpu.testing`. Timings are the benchmark's job.
Exit status: 1 when a check fails, 2 on a bad option, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import __version__
from .backends import ENV_VAR, get_backend, resolve_backend_name
from .config import BACKEND_NAMES, SUPPORTED_DTYPES, TensorParallelConfig
from .errors import TensorParallelError
from .layers import ColumnParallelLinear, ParallelEmbedding, ParallelMLP, RowParallelLinear
from .layers.loss import VocabParallelCrossEntropy
from .placement import worker_devices
from .placements import Dense
from .tensor import Tensor, tensor
from .testing import compare

#: Self-check sizes, odd on purpose: leading axes, in and out features; the split dim is split_dim(n).
LEAD, IN, OUT, SPLIT = (3, 5), 13, 11, 7
ROWS = math.prod(LEAD)


def split_dim(n_workers: int) -> int:
    """The split dimension for ``n_workers``: ``SPLIT * n + 1``, uneven on every count from 2."""
    return SPLIT * n_workers + 1


#: The quick layer benchmark, relative to a source checkout (it is not part of the installed package).
QUICK_BENCHMARK = Path("benchmarks", "bench_layers.py")


def benchmark_hint(package_dir: Path | None = None) -> str:
    """The command that times the layers in under a minute, runnable from any folder.

    The benchmarks live in the source checkout beside ``src/``; an install
    without one (a wheel) is told where to get them.
    """
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    script = package_dir.parent.parent / QUICK_BENCHMARK  # <checkout>/src/tp_gpu -> <checkout>/benchmarks
    if script.is_file():
        return f"timings (under a minute): {shlex.quote(sys.executable)} {shlex.quote(str(script))} --quick"
    return (
        f"timings: the benchmarks come with the source checkout ({QUICK_BENCHMARK} --quick, under a "
        "minute); this tp_gpu was installed without one"
    )


Stage = dict[str, tuple[Any, np.ndarray, int]]  # quantity -> (actual, float64 reference, summed terms)
Case = Iterator[tuple[str, Stage]]


#: ``--help``'s description: the module docstring's first two paragraphs, as plain text.
DESCRIPTION = (
    "The environment, the backend and why, the placement of workers on devices, and a self-check of "
    "every layer at every worker count, forward then backward, against a dense float64 NumPy reference. "
    "Exit status: 1 when a check fails, 2 on a bad option, else 0."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; argparse exits with status 2 on a bad option."""
    parser = argparse.ArgumentParser(
        prog="python -m tp_gpu",
        description=DESCRIPTION,
    )
    parser.add_argument("--backend", choices=BACKEND_NAMES, help=f"default: ${ENV_VAR}, else auto")
    parser.add_argument("--devices", type=int, help="device count (simulated: 4, cupy: every GPU)")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        metavar="N",
        help="worker counts to check (default: 1 2 4)",
    )
    parser.add_argument(
        "--dtype", choices=SUPPORTED_DTYPES, default="float32", help="compute dtype (default: float32)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random data and weights (default: 0)"
    )
    args = parser.parse_args(argv)
    if min(args.workers) < 1 or (args.devices is not None and args.devices < 1):
        parser.error("--workers and --devices take positive integers")
    return args


def backend_reason(requested: str | None, name: str) -> str:
    """How backend ``name`` was chosen, with why CuPy cannot run when auto fell back to NumPy."""
    env = os.environ.get(ENV_VAR)
    if requested is not None or env:
        return "chosen by --backend" if requested is not None else f"chosen by ${ENV_VAR}={env}"
    if name == "cupy":
        return "auto: CuPy imports and sees a GPU"
    from .backends.cupy_backend import cupy_unavailable_reason

    return f"auto: CuPy cannot run here, so NumPy on the host ({cupy_unavailable_reason()})"


def cupy_lines(backend) -> list[str]:
    """CuPy's version and each GPU's name for a CuPy backend; nothing for the others."""
    if backend.name != "cupy":
        return []
    lines = [f"CuPy     {backend.xp.__version__}"]
    for d in backend.devices:
        name = backend.xp.cuda.runtime.getDeviceProperties(d)["name"]
        lines.append(f"GPU {d:<4} {name.decode() if isinstance(name, bytes) else name}")
    return lines


def print_environment(backend, reason: str) -> None:
    """Versions, the backend and why, and its devices."""
    print("== Environment")
    print(f"tp_gpu   {__version__}")
    print(f"Python   {platform.python_version()} ({sys.executable})")
    print(f"NumPy    {np.__version__}")
    print(f"backend  {backend.name}, {reason}")
    for line in cupy_lines(backend):
        print(line)
    print(f"devices  {list(backend.devices)}\n")


def print_placement(backend, workers: Sequence[int]) -> None:
    """The device of each worker, for each worker count; outputs land on worker 0's device."""
    print(f"== Placement: worker i runs on devices[i % {len(backend.devices)}]")
    for n in workers:
        placement = worker_devices(n, backend.devices)
        print(f"{n:>3} worker(s): devices {placement}, output on {placement[0]!r}")
    print()


def sample(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Standard normal data rounded to ``dtype``, as float64: exactly what the layer sees."""
    return rng.standard_normal(shape).astype(dtype).astype(np.float64)


def token_ids(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Random ids of shape ``LEAD`` in ``[0, vocab)``, both ends of the vocabulary included."""
    ids = rng.integers(0, vocab, size=LEAD)
    ids.flat[0], ids.flat[-1] = 0, vocab - 1
    return ids


def random_biases(layer, rng: np.random.Generator):
    """``layer`` with every bias (zero at init) set to random values through ``load_state_dict``."""
    state = layer.state_dict()
    for name, value in state.items():
        if name.rsplit(".", 1)[-1] == "bias":
            state[name] = rng.standard_normal(value.shape)
    layer.load_state_dict(state)
    return layer


def weight_grads(grads: dict[str, Any], prefix: str, x: np.ndarray, dy: np.ndarray, terms: int) -> Stage:
    """Checks of a linear's ``dW = X^T dY`` and ``db = sum dY`` over every leading axis."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (rows, n_in), (rows, n_out)
    return {
        f"{prefix}dW": (grads[f"{prefix}weight"], x2.T @ dy2, terms),  # (n_in, rows) @ (rows, n_out)
        f"{prefix}db": (grads[f"{prefix}bias"], dy2.sum(axis=0), terms),
    }


def output(layer, y: Optional[Tensor]) -> np.ndarray:
    """``y`` on the host, after checking that it landed whole on ``layer``'s output device."""
    if y is None:
        raise AssertionError("no gradient reached the input")
    if y.placement != Dense(layer.output_device):
        raise AssertionError(f"output placed {y.placement!r}, expected Dense({layer.output_device!r})")
    return y.numpy()


def linear_case(layer, rng: np.random.Generator) -> Case:
    """``Y = X A + b`` and its gradients, for a column- or row-parallel linear."""
    layer = random_biases(layer, rng)
    w, b = layer.full_weight(), layer.full_bias()  # (n_in, n_out), (n_out,); x @ w runs in float64
    x, dy = sample(rng, (*LEAD, layer.n_in), layer.dtype), sample(rng, (*LEAD, layer.n_out), layer.dtype)
    leaf = tensor(x, requires_grad=True)
    y = layer(leaf)
    yield "forward", {"Y": (output(layer, y), x @ w + b, layer.n_in + 1)}  # (..., in) @ (in, out)
    y.backward(dy)
    dx = output(layer, leaf.grad)
    yield "backward", {"dX": (dx, dy @ w.T, layer.n_out), **weight_grads(layer.grads(), "", x, dy, ROWS)}


def column_case(config: TensorParallelConfig, n: int, rng: np.random.Generator) -> Case:
    """ColumnParallelLinear ``IN -> split_dim(n)``, output gathered."""
    yield from linear_case(ColumnParallelLinear(IN, split_dim(n), config=config, seed=n), rng)


def row_case(config: TensorParallelConfig, n: int, rng: np.random.Generator) -> Case:
    """RowParallelLinear ``split_dim(n) -> OUT``, its dense input split by the layer."""
    yield from linear_case(RowParallelLinear(split_dim(n), OUT, config=config, seed=n), rng)


def mlp_case(config: TensorParallelConfig, n: int, rng: np.random.Generator) -> Case:
    """ParallelMLP ``IN -> split_dim(n) -> OUT``: column, GELU on each shard, row."""
    hidden = split_dim(n)
    mlp = random_biases(ParallelMLP(IN, hidden, OUT, config=config, seed=n, activation="gelu"), rng)
    a, a_bias = mlp.fc1.full_weight(), mlp.fc1.full_bias()  # (IN, hidden), (hidden,)
    w, w_bias = mlp.fc2.full_weight(), mlp.fc2.full_bias()  # (hidden, OUT), (OUT,)
    x, dy = sample(rng, (*LEAD, IN), config.dtype), sample(rng, (*LEAD, OUT), config.dtype)
    h, act = x @ a + a_bias, mlp.activation  # (..., hidden); the MLP's own activation, run in float64
    g = act.forward(np, h)
    leaf = tensor(x, requires_grad=True)
    y = mlp(leaf)
    yield "forward", {"Y": (output(mlp.fc2, y), g @ w + w_bias, IN + hidden)}
    y.backward(dy)
    dx = output(mlp.fc2, leaf.grad)
    dh = act.grad(np, h, dy @ w.T)  # (..., OUT) @ (OUT, hidden)
    grads = mlp.grads()
    fc1, fc2 = weight_grads(grads, "fc1.", x, dh, ROWS + OUT), weight_grads(grads, "fc2.", g, dy, ROWS)
    yield "backward", {"dX": (dx, dh @ a.T, OUT + hidden), **fc1, **fc2}


def embedding_case(config: TensorParallelConfig, n: int, rng: np.random.Generator) -> Case:
    """ParallelEmbedding of ``split_dim(n)`` rows of ``IN`` features, looked up by random ids."""
    layer = ParallelEmbedding(split_dim(n), IN, config=config, seed=n)
    table = layer.full_weight()
    ids, dy = token_ids(rng, split_dim(n)), sample(rng, (*LEAD, IN), config.dtype)
    y = layer(ids)
    yield "forward", {"Y": (output(layer, y), table[ids], 1)}  # (vocab, IN)[ids] -> (*LEAD, IN)
    y.backward(dy)
    expected = np.zeros(table.shape)  # float64
    np.add.at(expected, ids, dy)  # repeated ids accumulate
    yield "backward", {"dW": (layer.grads()["weight"], expected, int(np.bincount(ids.ravel()).max()))}


def loss_case(config: TensorParallelConfig, n: int, rng: np.random.Generator) -> Case:
    """A column head ``IN -> V = split_dim(n)`` whose split logits go into VocabParallelCrossEntropy."""
    vocab, split = split_dim(n), dataclasses.replace(config, gather_output=False)
    head = random_biases(ColumnParallelLinear(IN, vocab, config=split, seed=n), rng)
    w, b = head.full_weight(), head.full_bias()
    x, targets = sample(rng, (*LEAD, IN), config.dtype), token_ids(rng, vocab)
    z = x @ w + b  # (..., vocab)
    log_p = z - z.max(axis=-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=-1, keepdims=True))
    loss_fn = VocabParallelCrossEntropy()
    expected = -np.take_along_axis(log_p, targets[..., None], axis=-1).mean()
    leaf = tensor(x, requires_grad=True)
    loss = loss_fn(head(leaf), targets)
    yield "forward", {"loss": (float(loss), expected, IN + vocab)}
    loss.backward()
    dx = output(head, leaf.grad)
    dz = (np.exp(log_p) - np.eye(vocab)[targets]) / targets.size  # d mean loss / dZ
    yield "backward", {"dX": (dx, dz @ w.T, vocab), **weight_grads(head.grads(), "", x, dz, ROWS)}


CASES = (column_case, row_case, mlp_case, embedding_case, loss_case)


def judge(stage: Stage, dtype: str) -> tuple[bool, str]:
    """Compare each quantity of a stage: the verdict, and the worst one or each failure (inf: wrong shape)."""
    found = {k: compare(actual, expected, dtype, terms) for k, (actual, expected, terms) in stage.items()}
    failed = [f"{k} error {r.error:.1e} > allowed {r.allowed:.1e}" for k, r in found.items() if not r.ok]
    if failed:
        return False, "; ".join(failed)
    worst = max(found, key=lambda k: found[k].error / found[k].allowed)
    summary = f"worst {worst}: {found[worst].error:.1e} <= {found[worst].allowed:.1e}"
    return True, f"{' '.join(found):<30} {summary}"


def check_case(case, n: int, config: TensorParallelConfig, rng: np.random.Generator) -> list[bool]:
    """Print one line per stage of ``case`` at ``n`` workers; the verdict of each stage run."""
    name, stages, verdicts = case.__name__.removesuffix("_case"), case(config, n, rng), []
    for stage_name in ("forward", "backward"):
        try:
            ok, summary = judge(next(stages)[1], config.dtype)
        except Exception as exc:  # noqa: BLE001 - a layer that raises fails its check; the others run on
            ok, summary = False, f"{type(exc).__name__}: {exc}"
        verdicts.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name:<9} {stage_name:<8}  workers={n:<3} {summary}")
        if not ok:
            break  # the later stages build on this one
    return verdicts


def print_self_check(args: argparse.Namespace, backend: str) -> bool:
    """Check every case at every worker count; True when every check passes."""
    print(f"== Self-check against a dense float64 NumPy reference ({args.dtype}, seed {args.seed})")
    print(
        f"   sizes: leading {LEAD}, features {IN}/{OUT}, split {SPLIT}n+1 at n workers; tp_gpu.testing allows"
    )
    print("   error <= TOLERANCE[dtype] * sqrt(terms) * max(1, max |reference|)")
    rng, verdicts = np.random.default_rng(args.seed), []
    for n in args.workers:
        config = TensorParallelConfig(n_workers=n, backend=backend, devices=args.devices, dtype=args.dtype)
        for case in CASES:
            verdicts += check_case(case, n, config, rng)
    failed = verdicts.count(False)
    verdict = f"{failed} of {len(verdicts)} checks FAILED" if failed else f"all {len(verdicts)} checks PASS"
    print(f"\nself-check: {verdict}")
    return not failed


def main(argv: Sequence[str] | None = None) -> int:
    """Environment, placement and self-check: 0 when every check passes, 1 if one fails, 2 on a bad option."""
    args = parse_args(argv)
    try:
        name = resolve_backend_name(args.backend)
        backend = get_backend(name, args.devices)
    except TensorParallelError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print_environment(backend, backend_reason(args.backend, name))
    print_placement(backend, args.workers)
    ok = print_self_check(args, name)
    print(benchmark_hint())
    return 0 if ok else 1


def run() -> int:
    """:func:`main`, ending quietly when the reader of stdout goes away (``python -m tp_gpu | head``)."""
    try:
        return main()
    except BrokenPipeError:
        # As the Python docs advise for SIGPIPE: stdout to devnull, so the final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(run())
