"""Activation memory a transformer layer keeps per worker, with and without sequence parallelism.

One ``ParallelTransformerLayer`` (pre-norm, causal, dropout on) runs a
training-mode forward, recorded on the autograd tape, on the simulated backend
with 8 devices, for p = 1, 2, 4 and 8 workers (one device each). Then every
array the recorded graph keeps for backward (the contexts of its nodes, walked
from the output: saved tensors, a sequence all-gather's rebuild recipe counted
as the slices it holds; parameters and their per-device copies left out) is
counted on the device it lives on, once per underlying buffer (a view counts
the buffer it keeps alive). The arrays are grouped by the function that keeps
them, by where they belong (Korthikanti et al., 2022, section 4):

* **between the TP regions**: what LayerNorm keeps (``xhat``, ``rstd``), the
  dropout masks, and the inputs the column-parallel ``qkv`` and ``fc1`` keep
  (the LayerNorm outputs: ``(B, S, H)`` per device without sequence
  parallelism). Residual adds keep nothing (``d(x + f) = dy``);
* **inside the TP regions**: attention's ``q, k, v`` and probabilities, the
  MLP's hidden layer and the row layers' inputs, already split over the
  workers by heads or columns.

Without sequence parallelism the first group is replicated (on the output
device, and the column inputs on every device); with it, each worker holds
its slice of the sequence, so it falls as ``1/p``. The table gives the
largest per-device figure (the worker that runs out of memory first), checks
first that the two layers agree, and also counts the bytes each training step
(forward and backward) moves between devices.

    python benchmarks/activation_memory.py            # writes benchmarks/results/activation-memory-<date>.md
    python benchmarks/activation_memory.py --out -    # print only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: import tp_gpu from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import benchmarks  # noqa: F401  (puts the checkout's src/ on the path)

import tp_gpu
from tp_gpu import ParallelTransformerLayer, Tensor, TensorParallelConfig
from tp_gpu.autograd import Node, _Rebuild
from tp_gpu.layers.dropout import DropoutFunction
from tp_gpu.layers.linear_functions import ColumnLinear
from tp_gpu.layers.norm import LayerNormFunction
from tp_gpu.parameter import ShardedParameter
from tp_gpu.regions import CopyToRegion

DEVICES = 8
WORKERS = (1, 2, 4, 8)
RESULTS = Path(__file__).resolve().parent / "results"

#: What each kind of module keeps, by the region it belongs to.
BETWEEN, INSIDE = "between TP regions", "inside TP regions"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 4  # B
    seq: int = 128  # S
    hidden: int = 256  # H
    heads: int = 8
    intermediate: int = 1024  # MLP width, 4 H


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _is_parameter(t: Tensor) -> bool:
    """A parameter, or a parameter's copy onto each device (LayerNorm's weight beside sequence
    slices): weights, not activations."""
    node = t.grad_fn
    return isinstance(t, ShardedParameter) or (
        node is not None
        and node.function is CopyToRegion
        and isinstance(node.edges[0][0] if node.edges[0] else None, ShardedParameter)
    )


def _arrays(value: Any) -> Iterator[np.ndarray]:
    """Every activation array inside ``value`` (dicts, lists, tuples, Tensors, rebuild recipes)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from _arrays(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _arrays(v)
    elif isinstance(value, _Rebuild):  # the sequence all-gather's output, kept as its slices
        yield from _arrays([cell.cell_contents for cell in value.recompute.__closure__ or ()])
    elif isinstance(value, Tensor):
        if not _is_parameter(value):
            yield from _arrays(value.blocks)
    elif isinstance(value, np.ndarray):
        yield value


def _region(node: Node) -> str:
    """Which group the arrays a recorded function keeps belong to."""
    if node.function in (LayerNormFunction, DropoutFunction, ColumnLinear):
        return BETWEEN  # the column layers keep their input: the activation between the regions
    return INSIDE


def _context_values(node: Node) -> List[Any]:
    """What ``node``'s context holds: every slot its class declares (saved tensors included)."""
    ctx = node.ctx
    slots = [s for cls in type(ctx).__mro__ for s in getattr(cls, "__slots__", ())]
    return [getattr(ctx, s) for s in slots if s != "needs_input_grad" and hasattr(ctx, s)]


def kept_bytes(y: Tensor, backend: Any) -> Dict[str, Dict[Any, int]]:
    """``{group: {device: bytes}}`` of the buffers the graph behind ``y`` keeps for backward."""
    counted: set = set()
    out: Dict[str, Dict[Any, int]] = {BETWEEN: {}, INSIDE: {}}
    nodes: set = set()
    stack = [] if y.grad_fn is None else [y.grad_fn]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        region = _region(node)
        for array in _arrays(_context_values(node)):
            root = _root(array)
            if id(root) in counted:
                continue
            counted.add(id(root))
            device = backend.device_of(array)
            out[region][device] = out[region].get(device, 0) + root.nbytes
        stack.extend(e[0] for e in node.edges if e is not None and isinstance(e[0], Node))
    return out


def transfer_bytes(backend: Any) -> tuple:
    """``(bytes moved between devices in all, most bytes received by one device)``; copies from the
    host (the input and the gradient arriving) are left out."""
    into: Dict[Any, int] = {}
    for (src, dst), (_, nbytes) in backend.transfers.items():
        if src != "host":
            into[dst] = into.get(dst, 0) + nbytes
    return sum(into.values()), max(into.values(), default=0)


def measure(shape: Shape, p: int, sequence_parallel: bool, dtype: str, x: np.ndarray, g: np.ndarray):
    """``(kept bytes by group and device, output, dX, bytes moved in one step)`` of one layer."""
    config = TensorParallelConfig(
        n_workers=p, backend="simulated", devices=DEVICES, dtype=dtype, sequence_parallel=sequence_parallel
    )
    layer = ParallelTransformerLayer(
        shape.hidden, shape.heads, shape.intermediate, config, seed=0, pre_norm=True, causal=True, dropout=0.1
    )
    backend = layer.backend
    backend.reset_transfers()
    leaf = tp_gpu.tensor(x, requires_grad=True)
    y = layer(leaf)
    kept = kept_bytes(y, backend)
    y.backward(g)
    moved = transfer_bytes(backend)
    assert leaf.grad is not None
    return kept, np.asarray(y), np.asarray(leaf.grad), moved


def run(shape: Shape, dtype: str, workers: Sequence[int]) -> List[Dict[Any, Any]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape.batch, shape.seq, shape.hidden)).astype(dtype)
    g = rng.standard_normal((shape.batch, shape.seq, shape.hidden)).astype(dtype)
    rows = []
    for p in workers:
        base, y0, dx0, moved0 = measure(shape, p, False, dtype, x, g)
        sp, y1, dx1, moved1 = measure(shape, p, True, dtype, x, g)
        tol = 1e-12 if dtype == "float64" else 1e-4
        for what, a, b in (("output", y1, y0), ("dX", dx1, dx0)):
            if not np.allclose(a, b, rtol=tol, atol=tol):
                raise SystemExit(f"p={p}: the sequence-parallel {what} differs from the layer without it")
        row: Dict[Any, Any] = {"p": p, "moved": moved0, "moved_sp": moved1}  # (all, most into one device)
        for key, kept in (("base", base), ("sp", sp)):
            for region in (BETWEEN, INSIDE):
                row[key, region] = max(kept[region].values(), default=0)
            row[key, "total"] = max(sum(kept[r].get(d, 0) for r in (BETWEEN, INSIDE)) for d in range(DEVICES))
        rows.append(row)
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render(rows: List[Dict[Any, Any]], shape: Shape, dtype: str) -> str:
    first = rows[0]
    lines = [
        f"# Activation memory per worker, with and without sequence parallelism ({datetime.date.today()})",
        "",
        f"One pre-norm causal `ParallelTransformerLayer` with dropout 0.1: B={shape.batch}, S={shape.seq}, "
        f"H={shape.hidden}, {shape.heads} heads, MLP {shape.intermediate}, {dtype}; simulated backend, "
        f"{DEVICES} devices, one worker per device. MiB kept for backward after one training-mode forward, "
        "on the device that keeps the most (`python benchmarks/activation_memory.py`).",
        "",
        "*Between TP regions*: LayerNorm's `xhat`/`rstd`, the dropout masks and the column layers' kept "
        "inputs (residual adds keep nothing). *Inside*: attention's q, k, v and probabilities, the MLP "
        "hidden layer, the row layers' inputs.",
        "",
        "| p | between, no SP | between, SP | SP / no SP | between SP × p / p=1 | inside, no SP | inside, SP "
        "| total, no SP | total, SP | moved per step, no SP | SP | most into one device, no SP | SP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        p = row["p"]
        between, between_sp = row["base", BETWEEN], row["sp", BETWEEN]
        lines.append(
            f"| {p} | {_mib(between)} | {_mib(between_sp)} | {between_sp / between:.3f} "
            f"| {between_sp * p / first['sp', BETWEEN]:.3f} | {_mib(row['base', INSIDE])} "
            f"| {_mib(row['sp', INSIDE])} | {_mib(row['base', 'total'])} | {_mib(row['sp', 'total'])} "
            f"| {_mib(row['moved'][0])} | {_mib(row['moved_sp'][0])} "
            f"| {_mib(row['moved'][1])} | {_mib(row['moved_sp'][1])} |"
        )
    lines += [
        "",
        "With sequence parallelism the memory between the regions falls as 1/p (the column "
        "`between SP × p / p=1` stays at 1); without it, it does not fall at all. The column layers keep "
        "only their sequence slice and all-gather it again in backward (as Megatron-core does), which "
        "is why SP moves more per step in all (one more all-gather per block); but its reduce-scatters and "
        "all-gathers spread the traffic evenly over the devices, where without it the output device "
        "receives every partial sum. *Moved*: MiB copied between devices in one forward and backward "
        "(host copies of the input and gradient left out).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16"])
    parser.add_argument("--batch", type=int, default=Shape.batch)
    parser.add_argument("--seq", type=int, default=Shape.seq)
    parser.add_argument("--hidden", type=int, default=Shape.hidden)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--intermediate", type=int, default=Shape.intermediate)
    parser.add_argument("--workers", type=int, nargs="+", default=list(WORKERS))
    parser.add_argument("--out", default=None, help="Markdown file to write ('-': print only)")
    args = parser.parse_args(argv)
    shape = Shape(args.batch, args.seq, args.hidden, args.heads, args.intermediate)
    table = render(run(shape, args.dtype, args.workers), shape, args.dtype)
    print(table)
    if args.out != "-":
        path = Path(args.out) if args.out else RESULTS / f"activation-memory-{datetime.date.today()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
