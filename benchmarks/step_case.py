"""A whole training step of a small language model, phase by phase: TP at each worker count, the dense
NumPy step and a PyTorch twin, on the same weight arrays.

The model the speed targets name: ``ParallelEmbedding -> ParallelMLP (GeLU, tanh) -> ColumnParallelLinear
head (gather_output=False: the logits stay split on the vocabulary) -> VocabParallelCrossEntropy
(mean)``, then the backward of each and one Adam step. Every side runs the same phases, each timed:

* **TP**: the tp_gpu layers and :class:`tp_gpu.Adam`, one model per worker count; the forward is
  recorded on the tape and one ``loss.backward()`` runs every layer's backward, its phases read at
  :class:`~benchmarks.phases.PhaseBorder` marks on the values between the layers (exact borders: the
  engine completes each layer's input gradient before the layer below starts);
* **dense**: the same computation in plain NumPy, in place (``y = x @ W; y += b``; the loss's
  max, shift, exp and softmax gradient in the logits' own buffer, which is kept between steps as
  the default loss keeps its workspace: a new logits array each step would be fresh memory, every
  page of it a page fault), with the kernels the library uses
  for what NumPy has no one call for: ``backend.scatter_add_rows`` for the table gradient and
  :func:`tp_gpu.optim.adam_update` for Adam (so that TP/dense measures the library's overhead);
* **torch**: ``F.embedding -> addmm -> gelu -> addmm -> addmm -> F.cross_entropy``, autograd and
  ``torch.optim.Adam`` (its CPU default, the single-tensor loop); its backward phases are read by
  gradient hooks on the intermediate tensors, so their borders are approximate.

Every side holds the very same weight arrays (the TP layers' blocks are replaced by them after their
values are checked equal; torch views them), and each side's Adam updates them in place: a learning
rate of 1e-4 keeps them well inside their range over a run. Each side keeps its own Adam moments and
drops its gradients at the end of its step, so that only one side's gradients are alive at a time.
Only the ``numpy`` backend is supported (one device: every worker count computes in one block).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tp_gpu import (
    Adam,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
)
from tp_gpu.backends import get_backend
from tp_gpu.layers.activations import get_activation
from tp_gpu.optim import adam_update
from tp_gpu.testing import tolerance

from .cases import MLP_ACTIVATION
from .phases import PhaseClock, border

PHASES = (
    "embedding fwd", "mlp fwd", "head fwd", "loss fwd",
    "loss bwd", "head bwd", "mlp bwd", "embedding bwd", "adam",
)  # fmt: skip
#: The parameters, in the order every side lists them.
PARAM_NAMES = ("embed", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight", "head.bias")
LR, BETAS, EPS = 1e-4, (0.9, 0.999), 1e-8
#: The side that runs the loss in its default mode (the logits kept, a logits-sized array allocated).
KEPT = "tp logits kept"


class StepMismatch(RuntimeError):
    """A TP step's loss, gradients or updated weights differ from dense's by more than rounding."""


@dataclass(frozen=True)
class StepShape:
    """``ids`` token ids, a ``vocab x dim`` table, an MLP ``dim -> hidden -> dim``, a ``dim -> vocab``
    head."""

    ids: int
    vocab: int
    dim: int
    hidden: int

    @classmethod
    def parse(cls, text: str) -> StepShape:
        """``"4096x50000x512x2048"`` -> StepShape(4096, 50000, 512, 2048)."""
        parts = text.lower().replace("_", "").split("x")
        if len(parts) != 4 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise argparse.ArgumentTypeError(
                f"expected IDSxVOCABxDIMxHIDDEN of positive sizes, such as 4096x50000x512x2048; got {text!r}"
            )
        return cls(*(int(part) for part in parts))

    def describe(self) -> str:
        v, d = self.vocab, self.dim
        return f"{self.ids} ids, {v}x{d} table, MLP {d}->{self.hidden}, head ->{v}"

    def parameters(self) -> int:
        """How many numbers the model trains."""
        v, d, h = self.vocab, self.dim, self.hidden
        return v * d + (d * h + h) + (h * d + d) + (d * v + v)

    def terms(self) -> int:
        """The most products summed into one compared number (sets the tolerance)."""
        return max(self.ids, self.vocab, self.dim, self.hidden)


class Side:
    """One way to run the step. ``forward_backward`` leaves the gradients for ``grads`` to read;
    ``update`` applies Adam and drops them; ``run`` is the timed step, both together."""

    def __init__(self) -> None:
        self.clock = PhaseClock()

    def forward_backward(self, ids: Any, targets: Any) -> float:
        raise NotImplementedError

    def grads(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError

    def run(self) -> float:
        loss = self.forward_backward(self.ids, self.targets)
        self.update()
        return loss

    def inputs(self, ids: np.ndarray, targets: np.ndarray) -> None:
        """The ids and targets ``run`` uses, as this side takes them."""
        self.ids, self.targets = ids, targets


class TpStep(Side):
    """The tp_gpu model at ``n_workers`` on the numpy backend, with :class:`tp_gpu.Adam`; the loss
    computes in the logits' memory (``inplace``), as dense does, unless ``inplace=False``."""

    def __init__(self, shape: StepShape, n_workers: int, dtype: str, inplace: bool = True) -> None:
        super().__init__()
        config = TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype=dtype)
        self.embedding = ParallelEmbedding(shape.vocab, shape.dim, config, seed=1)
        self.mlp = ParallelMLP(shape.dim, shape.hidden, shape.dim, config, seed=2, activation=MLP_ACTIVATION)
        self.head = ColumnParallelLinear(
            shape.dim, shape.vocab, dataclasses.replace(config, gather_output=False), seed=3
        )
        self.loss = VocabParallelCrossEntropy(inplace=inplace)
        layers = (self.embedding, self.mlp, self.head)
        params = [p for layer in layers for p in layer.parameters()]
        self.params = dict(zip(PARAM_NAMES, params))
        self.optimizer = Adam(params, lr=LR, betas=BETAS, eps=EPS)

    def logical_weights(self) -> dict[str, np.ndarray]:
        return {name: p.full() for name, p in self.params.items()}

    def share(self, weights: dict[str, np.ndarray]) -> None:
        """Compute with ``weights`` themselves: each parameter's one block is replaced by its array,
        after checking that the block holds the logical parameter, in order."""
        for name, p in self.params.items():
            (device,) = p.blocks
            block = p.blocks[device]
            if block.shape != weights[name].shape or not np.array_equal(block, weights[name]):
                raise ValueError(f"TP's {name} is not laid out as the logical array; cannot share it")
            p.blocks[device] = weights[name]

    def forward_backward(self, ids: Any, targets: Any) -> float:
        lap = self.clock.lap
        self.clock.start()
        x = border(self.embedding(ids), lambda: lap("mlp bwd"))  # dX complete: the MLP's backward ended
        lap("embedding fwd")
        y = border(self.mlp(x), lambda: lap("head bwd"))
        lap("mlp fwd")
        logits = border(self.head(y), lambda: lap("loss bwd"))  # dZ complete: the loss's backward ended
        lap("head fwd")
        loss = self.loss(logits, targets)
        value = float(loss)
        del x, y, logits  # the graph keeps what backward needs
        lap("loss fwd")
        loss.backward()
        lap("embedding bwd")
        return value

    def grads(self) -> dict[str, np.ndarray]:
        return {name: p.full_grad() for name, p in self.params.items()}

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.clock.lap("adam")


class DenseStep(Side):
    """The step in plain NumPy, in place, on ``weights``; the library's kernels for the table gradient
    (``scatter_add_rows``) and Adam (``adam_update``)."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.w = weights
        self.m = {k: np.zeros_like(v) for k, v in weights.items()}
        self.v = {k: np.zeros_like(v) for k, v in weights.items()}
        self.t = 0
        self.g: dict[str, np.ndarray] = {}
        self.logits: np.ndarray | None = None  # (N, vocab), reused while N is the same
        self.backend = get_backend("numpy")
        self.act = get_activation(MLP_ACTIVATION)

    def forward_backward(self, ids: Any, targets: Any) -> float:
        w, lap, act = self.w, self.clock.lap, self.act
        self.clock.start()
        e = np.take(w["embed"], ids, axis=0)  # (N, dim)
        lap("embedding fwd")
        h = e @ w["fc1.weight"]  # (N, dim) @ (dim, hidden)
        h += w["fc1.bias"]
        a = act.forward(np, h)
        y = a @ w["fc2.weight"]  # (N, hidden) @ (hidden, dim)
        y += w["fc2.bias"]
        lap("mlp fwd")
        shape = (y.shape[0], w["head.weight"].shape[1])
        if self.logits is None or self.logits.shape != shape or self.logits.dtype != y.dtype:
            self.logits = np.empty(shape, y.dtype)
        z = np.matmul(y, w["head.weight"], out=self.logits)  # (N, dim) @ (dim, vocab): the logits
        z += w["head.bias"]
        lap("head fwd")
        loss, s = dense_loss(z, targets)
        lap("loss fwd")
        dense_loss_grad(z, s, targets)  # z becomes dZ, in place
        lap("loss bwd")
        g = self.g
        g["head.weight"], g["head.bias"], dy = y.T @ z, z.sum(axis=0), z @ w["head.weight"].T
        del z
        lap("head bwd")
        g["fc2.weight"], g["fc2.bias"], da = a.T @ dy, dy.sum(axis=0), dy @ w["fc2.weight"].T
        dh = act.grad(np, h, da)
        g["fc1.weight"], g["fc1.bias"], de = e.T @ dh, dh.sum(axis=0), dh @ w["fc1.weight"].T
        lap("mlp bwd")
        g["embed"] = self.backend.scatter_add_rows(w["embed"].shape, ids, de)
        lap("embedding bwd")
        return loss

    def grads(self) -> dict[str, np.ndarray]:
        return {k: self.g[k].copy() for k in PARAM_NAMES}

    def update(self) -> None:
        self.t += 1
        for k in PARAM_NAMES:
            adam_update(self.w[k], self.g[k], self.m[k], self.v[k], self.t, LR, BETAS, EPS, np)
        self.g = {}
        self.clock.lap("adam")


def dense_loss(z: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of the logits ``z`` ``(N, V)``; ``z`` becomes ``exp(z - max)`` in place.
    Returns the loss and the row sums ``s`` of those exponentials."""
    z -= z.max(axis=1)[:, None]
    rows = np.arange(z.shape[0])
    picked = z[rows, targets]  # z_t - max
    np.exp(z, out=z)
    s = z.sum(axis=1)
    return float(np.mean(np.log(s) - picked)), s


def dense_loss_grad(z: np.ndarray, s: np.ndarray, targets: np.ndarray) -> None:
    """``dZ = (softmax - onehot) / N`` in place over the exponentials ``z``: one pass, then the targets."""
    n = z.shape[0]
    z *= (1.0 / (n * s)).astype(z.dtype)[:, None]
    z[np.arange(n), targets] -= z.dtype.type(1.0 / n)


class TorchStep(Side):
    """The PyTorch twin, on views of the dense weights: autograd and ``torch.optim.Adam``."""

    def __init__(self, torch: Any, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.torch = torch
        self.leaves = {k: torch.from_numpy(weights[k]).requires_grad_() for k in PARAM_NAMES}
        self.optimizer = torch.optim.Adam(list(self.leaves.values()), lr=LR, betas=BETAS, eps=EPS)

    def inputs(self, ids: np.ndarray, targets: np.ndarray) -> None:
        super().inputs(self.torch.from_numpy(ids), self.torch.from_numpy(targets))

    def forward_backward(self, ids: Any, targets: Any) -> float:
        F, w, lap = self.torch.nn.functional, self.leaves, self.clock.lap
        self.clock.start()
        e = F.embedding(ids, w["embed"])
        lap("embedding fwd")
        h = F.gelu(self.torch.addmm(w["fc1.bias"], e, w["fc1.weight"]), approximate="tanh")
        y = self.torch.addmm(w["fc2.bias"], h, w["fc2.weight"])
        lap("mlp fwd")
        z = self.torch.addmm(w["head.bias"], y, w["head.weight"])
        lap("head fwd")
        loss = F.cross_entropy(z, targets)
        lap("loss fwd")
        for tensor, phase in ((z, "loss bwd"), (y, "head bwd"), (e, "mlp bwd")):
            tensor.register_hook(lambda grad, phase=phase: lap(phase))  # its gradient is complete
        del z, y, h
        loss.backward()
        lap("embedding bwd")
        return float(loss.detach())

    def grads(self) -> dict[str, np.ndarray]:
        return {k: t.grad.numpy().copy() for k, t in self.leaves.items()}

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clock.lap("adam")


# --------------------------------------------------------------------------- the check


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """``max |got - expected| / max |expected|`` (absolute where ``expected`` is all zeros)."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected), initial=0.0)) or 1.0
    return float(np.max(np.abs(got - expected), initial=0.0)) / scale


def one_step(side: Side, weights: dict[str, np.ndarray]) -> dict:
    """One step of ``side`` on its inputs from the current weights: its loss, gradients and the updated
    weights."""
    loss = side.forward_backward(side.ids, side.targets)
    grads = side.grads()
    side.update()
    return {"loss": loss, "grads": grads, "weights": {k: w.copy() for k, w in weights.items()}}


def step_errors(got: dict, expected: dict) -> dict[str, float]:
    """The relative error of the loss, of each gradient and of each updated weight."""
    errors = {"loss": abs(got["loss"] - expected["loss"]) / max(abs(expected["loss"]), 1.0)}
    for kind in ("grads", "weights"):
        for k in PARAM_NAMES:
            errors[f"{kind}:{k}"] = _relative_error(got[kind][k], expected[kind][k])
    return errors


def check_sides(
    sides: dict[str, Side], weights: dict[str, np.ndarray], shape: StepShape, dtype: str
) -> dict[str, Any]:
    """One step of each side from the same weights, compared with dense's; restores the weights after
    each. A TP side further from dense than rounding allows raises :class:`StepMismatch`."""
    allowed = tolerance(dtype, shape.terms())
    start = {k: w.copy() for k, w in weights.items()}

    def restore() -> None:
        for k, w in weights.items():
            w[...] = start[k]

    expected = one_step(sides["dense"], weights)
    restore()
    report: dict[str, Any] = {"allowed_relative_error": allowed, "errors": {}}
    for name, side in sides.items():
        if name == "dense":
            continue
        errors = step_errors(one_step(side, weights), expected)
        restore()
        worst = max(errors, key=lambda k: errors[k])
        report["errors"][name] = {"worst": worst, "error": errors[worst]}
        if name.startswith("tp") and not errors[worst] <= allowed:
            raise StepMismatch(
                f"{name}: {worst} differs from dense's by {errors[worst]:.3g} (relative), more than the "
                f"{allowed:.3g} rounding allows; the step is wrong, so its timing is not reported"
            )
    return report


def build_sides(
    shape: StepShape, dtype: str, workers: list[int], torch: Any, seed: int = 0
) -> tuple[dict[str, Side], dict[str, np.ndarray]]:
    """``{"dense", "torch" (if given), "tp p=N" ...}`` on one set of weight arrays and one batch of
    random ids and targets (both ends of the vocabulary among them); and those weight arrays."""
    tps = {f"tp p={n}": TpStep(shape, n, dtype) for n in workers}
    tps[KEPT] = TpStep(shape, min(workers), dtype, inplace=False)
    weights = next(iter(tps.values())).logical_weights()
    for tp in tps.values():
        tp.share(weights)
    sides: dict[str, Side] = {"dense": DenseStep(weights)}
    if torch is not None:
        sides["torch"] = TorchStep(torch, weights)
    sides.update(tps)
    ids, targets = np.random.default_rng(seed).integers(0, shape.vocab, size=(2, shape.ids))
    ids[0], targets[-1] = 0, shape.vocab - 1
    for side in sides.values():
        side.inputs(ids, targets)
    return sides, weights


def step_functions(sides: dict[str, Side]) -> dict[str, Callable]:
    """Each side's timed step (a bound method, the same object every time: the recorder keys on it)."""
    return {name: side.run for name, side in sides.items()}
