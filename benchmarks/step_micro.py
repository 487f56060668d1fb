"""Micro-benchmarks of the training step's kernels, Adam and the embedding backward, against NumPy's and
PyTorch's ways.

* **Adam** over the parameters of the language model's table and head (``lm``: 50,000 x 512 twice,
  51M numbers) or of an MLP 1024 -> 4096 -> 1024 (``mlp``: 8.4M numbers): :class:`tp_gpu.Adam` over the
  layers' parameters, against the textbook in-place NumPy Adam (whole-array operations with ``out=``
  into one preallocated scratch array per parameter, the baseline of the target), ``torch.optim.Adam``
  (its CPU default, one tensor at a time) and ``torch.optim.Adam(fused=True)``, all on the same weight
  and gradient arrays (torch views them).
* **The embedding backward**, ``dE = 0; dE[ids] += dY``: the library's kernel
  (``backend.scatter_add_rows``), the layer's whole backward, and the NumPy alternatives (sorting the
  ids and ``np.add.reduceat``, the library's earlier kernel; ``np.add.at``; one ``np.bincount``
  per column; the sparse product in compressed-row form, where the library's compressed-column one
  reads the rows in order), against ``torch.zeros(...).index_add_`` and
  ``aten.embedding_dense_backward`` (what ``F.embedding``'s backward runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tp_gpu import Adam, ColumnParallelLinear, ParallelEmbedding, ParallelMLP, TensorParallelConfig

from . import harness
from .step_case import BETAS, EPS, LR

#: The Adam parameter sets: name -> (description, a function of the config giving the layers).
ADAM_SETS: dict[str, tuple[str, Callable[[TensorParallelConfig], list[Any]]]] = {
    "lm": (
        "embedding 50000x512 + head 512->50000",
        lambda c: [ParallelEmbedding(50_000, 512, c), ColumnParallelLinear(512, 50_000, c)],
    ),
    "mlp": ("MLP 1024->4096->1024", lambda c: [ParallelMLP(1024, 4096, 1024, c)]),
}
#: Variants that copy every row of dY (sorting) are skipped above this many bytes of dY.
COPYING_VARIANT_MAX_BYTES = 2**30


def numpy_adam(weights: list[np.ndarray], grads: list[np.ndarray]) -> Callable[[], None]:
    """The textbook in-place NumPy Adam on ``weights``: whole-array operations, each writing with ``out=``
    into its moment, its weight or one preallocated scratch array per parameter."""
    moments = [(np.zeros_like(w), np.zeros_like(w), np.empty_like(w)) for w in weights]
    b1, b2 = BETAS
    state = {"t": 0}

    def step() -> None:
        state["t"] += 1
        t = state["t"]
        for w, g, (m, v, s) in zip(weights, grads, moments):
            np.multiply(g, 1.0 - b1, out=s)
            m *= b1
            m += s
            np.multiply(g, g, out=s)
            s *= 1.0 - b2
            v *= b2
            v += s
            np.sqrt(v, out=s)
            s *= 1.0 / math.sqrt(1.0 - b2**t)
            s += EPS
            np.divide(m, s, out=s)
            s *= LR / (1.0 - b1**t)
            w -= s

    return step


def adam_functions(name: str, dtype: str, torch: Any) -> tuple[dict[str, Callable], int]:
    """The Adam steps compared on parameter set ``name``, and how many numbers they update."""
    config = TensorParallelConfig(n_workers=1, backend="numpy", dtype=dtype)
    params = [p for layer in ADAM_SETS[name][1](config) for p in layer.parameters()]
    rng = np.random.default_rng(0)
    weights, grads = [], []
    for p in params:
        (device,) = p.blocks
        grad = rng.standard_normal(p.blocks[device].shape, dtype=np.float32).astype(dtype) * 1e-3
        p.accumulate(device, grad)  # kept: every step reads the same gradient
        weights.append(p.blocks[device])
        grads.append(grad)
    fns = {
        "tp_gpu Adam": Adam(params, lr=LR, betas=BETAS, eps=EPS).step,
        "numpy in place": numpy_adam(weights, grads),
    }
    if torch is not None:
        for label, extra in (("torch Adam", {}), ("torch Adam fused", {"fused": True})):
            leaves = [torch.from_numpy(w).requires_grad_() for w in weights]
            for leaf, g in zip(leaves, grads):
                leaf.grad = torch.from_numpy(g)
            fns[label] = torch.optim.Adam(leaves, lr=LR, betas=BETAS, eps=EPS, **extra).step
    return fns, sum(w.size for w in weights)


# --------------------------------------------------------------------------- the embedding backward


def sort_reduceat(shape: tuple[int, int], ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The library's earlier kernel: sort the ids, gather the rows, one ``reduceat`` per run."""
    out = np.zeros(shape, dtype=rows.dtype)
    order = np.argsort(ids, kind="stable")
    index, rows = ids[order], np.take(rows, order, axis=0)
    starts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
    out[index[starts]] = np.add.reduceat(rows, starts, axis=0)
    return out


def add_at(shape: tuple[int, int], ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, dtype=rows.dtype)
    np.add.at(out, ids, rows)
    return out


def bincount_columns(shape: tuple[int, int], ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One ``np.bincount(ids, weights=column)`` per column (float64 sums, stored in the rows' dtype)."""
    out = np.empty(shape, dtype=rows.dtype)
    for j in range(shape[1]):
        out[:, j] = np.bincount(ids, weights=rows[:, j], minlength=shape[0])
    return out


def csr_product(shape: tuple[int, int], ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``S @ rows`` with ``S`` in compressed-row form (SciPy sorts the entries by id to build it; the
    product then gathers the rows of each id): the library's first sparse kernel."""
    import scipy.sparse

    ones = np.ones(ids.size, dtype=rows.dtype)
    return scipy.sparse.csr_matrix((ones, (ids, np.arange(ids.size))), shape=(shape[0], ids.size)) @ rows


def layer_backward(layer: ParallelEmbedding, ids: np.ndarray, dy: np.ndarray) -> Callable[[], None]:
    """The layer's backward alone, on the tape: the forward is recorded once here, and each run is
    ``y.backward(dY, retain_graph=True)`` (the graph kept for the next run) into zeroed gradients."""
    y = layer(ids)

    def run() -> None:
        layer.zero_grad()
        y.backward(dy, retain_graph=True)

    return run


def embedding_functions(
    n_ids: int, vocab: int, dim: int, dtype: str, torch: Any
) -> tuple[dict[str, Callable], list[str]]:
    """The embedding backwards compared at ``n_ids`` ids in a ``vocab x dim`` table, and notes."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=n_ids)
    dy = rng.standard_normal((n_ids, dim), dtype=np.float32).astype(dtype)
    config = TensorParallelConfig(n_workers=1, backend="numpy", dtype=dtype)
    layer = ParallelEmbedding(vocab, dim, config)
    shape = (vocab, dim)
    fns: dict[str, Callable] = {
        "tp_gpu kernel": lambda: layer.backend.scatter_add_rows(shape, ids, dy),
        "tp_gpu layer": layer_backward(layer, ids, dy),
        "np.add.at": lambda: add_at(shape, ids, dy),
        "bincount per column": lambda: bincount_columns(shape, ids, dy),
        "scipy CSR product": lambda: csr_product(shape, ids, dy),
    }
    notes = []
    if dy.nbytes <= COPYING_VARIANT_MAX_BYTES:
        fns["sort + reduceat"] = lambda: sort_reduceat(shape, ids, dy)
    else:
        notes.append(f"sort + reduceat skipped at {n_ids} ids: it copies dY ({dy.nbytes / 2**30:.1f} GiB)")
    if torch is not None:
        t_ids, t_dy = torch.from_numpy(ids), torch.from_numpy(dy)
        fns["torch index_add_"] = lambda: torch.zeros(shape, dtype=t_dy.dtype).index_add_(0, t_ids, t_dy)
        backward = torch.ops.aten.embedding_dense_backward
        fns["torch embedding backward"] = lambda: backward(t_dy, t_ids, vocab, -1, False)
    return fns, notes


def check_embedding(fns: dict[str, Callable], dtype: str, n_ids: int) -> dict[str, float]:
    """Every variant's result against ``np.add.at``'s: the largest difference, relative to its largest."""
    from tp_gpu.testing import tolerance

    expected = np.asarray(fns["np.add.at"](), dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1.0)
    errors = {}
    for name, fn in fns.items():
        if name in ("np.add.at", "tp_gpu layer"):
            continue
        got = fn()
        got = got.numpy() if hasattr(got, "numpy") else got
        errors[name] = float(np.abs(got - expected).max()) / scale
        if not errors[name] <= tolerance(dtype, n_ids):
            raise RuntimeError(f"embedding backward {name!r} differs from np.add.at by {errors[name]:.3g}")
    return errors


def time_micro(fns: dict[str, Callable], timing: harness.Timing) -> harness.Timed:
    """``fns`` timed in shuffled rounds (``perf_counter``; every function here finishes on return)."""
    return harness.time_with_retries(fns, harness.cpu_timer(lambda: None), timing)
