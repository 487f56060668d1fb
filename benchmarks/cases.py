"""One spec per layer kind, and the comparison a spec makes: TP, dense and torch on the same data.

Each spec says how to build its layer, what the dense computation is (from the layer's own logical
weights, on the layer's output device, in place), what PyTorch computes, how much work a run does
and how many terms each output element sums (which sets the tolerance). Adding a layer kind is
adding a spec to :data:`SPECS`; nothing else switches on the kind.

Shapes: linears and the MLP take ``batch`` rows of ``n_in`` features through an ``(n_in, n_out)``
weight (the MLP's hidden size is ``n_out`` and it maps back to ``n_in``); the embedding looks up
``batch`` ids in a table of ``n_in`` (vocabulary) rows of ``n_out`` columns.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from tp_gpu import (
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    TensorParallelConfig,
)
from tp_gpu.layers.activations import get_activation

MODES = ("fwd", "fwd+bwd")

#: The MLP benchmarked is ``ParallelMLP(n_in, hidden=n_out, n_out=n_in)``: two n_in x n_out GEMMs and
#: GeLU's tanh approximation (GPT-2's and Megatron's; torch's ``F.gelu(approximate="tanh")``).
MLP_ACTIVATION = "gelu_tanh"


@dataclass(frozen=True)
class Shape:
    """A problem size: ``batch`` rows (or ids), ``n_in`` and ``n_out`` (vocabulary and dimension)."""

    batch: int
    n_in: int
    n_out: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"8x1024x1024"`` -> Shape(8, 1024, 1024)."""
        try:
            batch, n_in, n_out = (int(v.replace("_", "")) for v in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected BATCHxN_INxN_OUT such as 8x1024x1024, got {text!r}"
            ) from None
        if min(batch, n_in, n_out) < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
        return cls(batch, n_in, n_out)


def _linear_forward(x: Any, w: Any, b: Any) -> Any:
    """Dense ``y = x @ w; y += b``: in place, as the TP layers add their bias (no output-sized temporary)."""
    y = x @ w  # (B, n_in) @ (n_in, n_out) -> (B, n_out)
    y += b
    return y


def _linear_backward(x: Any, w: Any, dy: Any, grads: list[Any]) -> Any:
    """Dense backward: ``dW = x^T dy`` and ``db = sum dy`` appended to ``grads`` (kept to the end of the
    step, as a training step keeps them for the optimizer); returns ``dx = dy w^T``."""
    grads.append(x.T @ dy)  # (n_in, B) @ (B, n_out) -> (n_in, n_out)
    grads.append(dy.sum(axis=0))
    return dy @ w.T  # (B, n_out) @ (n_out, n_in) -> (B, n_in)


class LayerSpec:
    """A linear-like layer kind; subclasses name it, build it and override what differs."""

    name: str
    seed: int
    #: The field of :class:`Shape` that the workers split.
    split: str
    #: The option holding this kind's shapes (``--shapes`` or ``--embed-shapes``).
    shape_option: ClassVar[str] = "shapes"
    #: The layer's parameters, by ``named_parameters()`` name, in the order dense takes them.
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")
    #: The input is integer ids (no gradient); forward + backward then compares the weight gradient.
    ids_input: ClassVar[bool] = False
    gemms: ClassVar[int] = 1

    def build(self, shape: Shape, config: TensorParallelConfig) -> Any:
        """The tensor-parallel layer for ``shape``."""
        raise NotImplementedError

    def parts(self, layer: Any) -> list[Any]:
        """The primitive layers inside ``layer``; the last one produces the output."""
        return [layer]

    def out_features(self, shape: Shape) -> int:
        return shape.n_out

    def output_bytes(self, shape: Shape, dtype: str) -> int:
        return shape.batch * self.out_features(shape) * np.dtype(dtype).itemsize

    def describe(self, shape: Shape) -> str:
        return f"B={shape.batch}, {shape.n_in}x{shape.n_out}"

    def work(self, shape: Shape, dtype: str, mode: str) -> tuple[float, str]:
        """``(GFLOP, "GFLOP/s")`` of one run's GEMMs (2 B n_in n_out each; forward + backward: 3x)."""
        factor = 3 if mode == "fwd+bwd" else 1
        return factor * self.gemms * 2 * shape.batch * shape.n_in * shape.n_out / 1e9, "GFLOP/s"

    def terms(self, shape: Shape, mode: str) -> int:
        """Products summed into each compared element (outputs and input gradients are of order 1)."""
        return max(shape.n_in, shape.n_out)

    def make_input(self, shape: Shape, dtype: str, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal((shape.batch, shape.n_in), dtype=np.float32).astype(dtype)

    def logical_params(self, layer: Any) -> list[np.ndarray]:
        """The layer's logical parameters as host arrays, in :attr:`param_names` order."""
        return [layer.full_weight(), layer.full_bias()]

    def dense(self, backend: Any, params: list[Any], x: Any, dy: Any) -> Any:
        """The dense forward, or with ``dy`` the forward and backward; returns what is compared."""
        w, b = params
        y = _linear_forward(x, w, b)
        return y if dy is None else _linear_backward(x, w, dy, [])

    def torch_forward(self, F: Any, params: list[Any], x: Any) -> Any:
        w, b = params
        return F.linear(x, w.t(), b)  # F.linear wants (n_out, n_in): a transposed view, no copy

    def tp_result(self, layer: Any, out: Any) -> Any:
        """What the TP run returned (a ShardedTensor gathered) or, for ids, the weight gradient."""
        return out.gather(self.parts(layer)[-1].output_device) if hasattr(out, "gather") else out

    def expected_rows(self, backend: Any, params: list[Any], x: Any, dense_out: Any, mode: str) -> Callable:
        """``rows(start, stop)`` of the dense result (from ``dense_out`` unless :meth:`keeps_dense`)."""
        return lambda start, stop: dense_out[start:stop]

    def keeps_dense(self, mode: str) -> bool:
        """Whether the check needs dense's whole result (else :meth:`expected_rows` recomputes it)."""
        return True


class LinearSpec(LayerSpec):
    """A parallel linear layer: ``ColumnParallelLinear`` (output columns split, outputs gathered) or
    ``RowParallelLinear`` (input rows split, partial outputs summed)."""

    def __init__(self, name: str, seed: int, layer_class: type, split: str) -> None:
        self.name, self.seed, self.layer_class, self.split = name, seed, layer_class, split

    def build(self, shape: Shape, config: TensorParallelConfig) -> Any:
        return self.layer_class(shape.n_in, shape.n_out, config, seed=self.seed)


class MlpSpec(LayerSpec):
    """``ParallelMLP(n_in, hidden=n_out, n_out=n_in)``, GeLU (tanh): column -> act -> row."""

    name, seed, split, gemms = "mlp", 4, "n_out", 2
    param_names = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

    def build(self, shape: Shape, config: TensorParallelConfig) -> Any:
        return ParallelMLP(
            shape.n_in, shape.n_out, shape.n_in, config, seed=self.seed, activation=MLP_ACTIVATION
        )

    def parts(self, layer: Any) -> list[Any]:
        return [layer.fc1, layer.fc2]

    def out_features(self, shape: Shape) -> int:
        return shape.n_in

    def describe(self, shape: Shape) -> str:
        return f"B={shape.batch}, {shape.n_in}->{shape.n_out}->{shape.n_in}"

    def logical_params(self, layer: Any) -> list[np.ndarray]:
        return [array for part in self.parts(layer) for array in LayerSpec.logical_params(self, part)]

    def dense(self, backend: Any, params: list[Any], x: Any, dy: Any) -> Any:
        act, xp = get_activation(MLP_ACTIVATION), backend.xp
        w1, b1, w2, b2 = params
        h = _linear_forward(x, w1, b1)  # (B, n_in) -> (B, hidden)
        a = act.forward(xp, h)
        y = _linear_forward(a, w2, b2)  # (B, hidden) -> (B, n_in)
        if dy is None:
            return y
        grads: list[Any] = []
        dh = act.grad(xp, h, _linear_backward(a, w2, dy, grads))  # dA = dY W2^T, through the activation
        return _linear_backward(x, w1, dh, grads)

    def torch_forward(self, F: Any, params: list[Any], x: Any) -> Any:
        w1, b1, w2, b2 = params
        return F.linear(F.gelu(F.linear(x, w1.t(), b1), approximate="tanh"), w2.t(), b2)


class EmbeddingSpec(LayerSpec):
    """``ParallelEmbedding``: the vocabulary split; ``batch`` ids looked up in ``(n_in, n_out)``."""

    name, seed, split = "embedding", 3, "n_in"
    shape_option = "embed_shapes"
    param_names = ("weight",)
    ids_input = True

    def build(self, shape: Shape, config: TensorParallelConfig) -> Any:
        return ParallelEmbedding(shape.n_in, shape.n_out, config=config, seed=self.seed)

    def describe(self, shape: Shape) -> str:
        return f"{shape.batch} ids, {shape.n_in}x{shape.n_out} table"

    def work(self, shape: Shape, dtype: str, mode: str) -> tuple[float, str]:
        """``(GB, "GB/s")`` of output written (forward + backward: 2x, the gradient read back)."""
        return (2 if mode == "fwd+bwd" else 1) * self.output_bytes(shape, dtype) / 1e9, "GB/s"

    def terms(self, shape: Shape, mode: str) -> int:
        """A lookup sums nothing; a table gradient row sums up to ``batch`` (repeated ids)."""
        return 1 if mode == "fwd" else shape.batch

    def make_input(self, shape: Shape, dtype: str, rng: np.random.Generator) -> np.ndarray:
        ids = rng.integers(0, shape.n_in, size=shape.batch)
        ids[0], ids[-1] = 0, shape.n_in - 1  # both ends of the vocabulary
        return ids

    def logical_params(self, layer: Any) -> list[np.ndarray]:
        return [layer.full_weight()]

    def dense(self, backend: Any, params: list[Any], x: Any, dy: Any) -> Any:
        (table,) = params
        y = backend.xp.take(table, x, axis=0)  # (vocab, dim)[ids] -> (n_ids, dim)
        if dy is None:
            return y
        # dE = 0; dE[ids] += dY, with the backend's kernel, as the layer's backward uses
        return backend.scatter_add_rows(table.shape, x.reshape(-1), dy.reshape(-1, table.shape[1]))

    def torch_forward(self, F: Any, params: list[Any], x: Any) -> Any:
        return F.embedding(x, params[0])

    def tp_result(self, layer: Any, out: Any) -> Any:
        return layer.grads()["weight"] if out is None else out  # backward returns None: ids have no gradient

    def expected_rows(self, backend: Any, params: list[Any], x: Any, dense_out: Any, mode: str) -> Callable:
        if mode == "fwd+bwd":
            return LayerSpec.expected_rows(self, backend, params, x, dense_out, mode)
        return lambda start, stop: self.dense(backend, params, x[start:stop], None)  # the output can be GBs

    def keeps_dense(self, mode: str) -> bool:
        return mode == "fwd+bwd"


SPECS: dict[str, LayerSpec] = {
    spec.name: spec
    for spec in (
        LinearSpec("column", 1, ColumnParallelLinear, split="n_out"),
        LinearSpec("row", 2, RowParallelLinear, split="n_in"),
        EmbeddingSpec(),
        MlpSpec(),
    )
}
LAYERS = tuple(SPECS)
