"""One comparison: the TP layer, the dense computation and PyTorch on the same data and, where the
layer allows, the same weight arrays; and the check of TP (and torch) against dense.

Weights: where the TP layer holds a parameter whole on its output device (one worker, or every
worker on one device, as on numpy), dense and torch compute with that very array, so that no side
finds its weights warmer in cache; otherwise one copy on the output device serves dense and torch
for every worker count of a group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import tp_gpu
from tp_gpu.placements import Dense
from tp_gpu.testing import compare, tolerance

from .cases import LayerSpec

#: Rows compared at a time, as float64 (keeps the check of a 4 GB output within memory).
CHUNK_BYTES = 64 * 2**20


@dataclass
class Case:
    """One comparison on one layer: the TP, dense and torch runs, and how to check them."""

    spec: LayerSpec
    layer: Any
    mode: str
    tp: Callable[[], Any]
    dense: Callable[[], Any]
    torch: Callable[[], Any] | None
    expected: Callable[[Any], Callable[[int, int], Any]]  # dense's result -> rows of the expected result

    def result(self, out: Any) -> Any:
        """What a TP run returned, as the array compared (gathered, or the weight gradient for ids)."""
        return self.spec.tp_result(self.layer, out)

    @property
    def backend(self) -> Any:
        """The backend of the layer's output (and of dense)."""
        return self.spec.parts(self.layer)[-1].backend

    def keeps_dense(self) -> bool:
        """Whether the check needs dense's whole result."""
        return self.spec.keeps_dense(self.mode)

    def fns(self) -> dict[str, Callable[[], Any]]:
        """The functions timed together: tp, dense and, where it runs, torch."""
        fns = {"tp": self.tp, "dense": self.dense}
        return fns if self.torch is None else {**fns, "torch": self.torch}


def _whole_on(param: Any, backend: Any, device: Any) -> Any | None:
    """The array of ``param`` that holds it whole on ``device`` (its one shard, or the device's block
    when every worker sits on that device), or None."""
    arrays = list(getattr(param, "blocks", {}).values()) or param.shards
    for array in arrays:
        if tuple(array.shape) == tuple(param.shape) and backend.device_of(array) == device:
            return array
    return None


def held_weights(spec: LayerSpec, layer: Any) -> list[Any] | None:
    """The arrays the TP layer computes with, where it holds each whole on its output device (one
    worker, or one device): dense and torch then read the very same memory. None otherwise."""
    params = dict(layer.named_parameters())
    last = spec.parts(layer)[-1]
    held = [_whole_on(params[name], last.backend, last.output_device) for name in spec.param_names]
    return None if any(array is None for array in held) else held


def dense_weights(spec: LayerSpec, layer: Any, shared: dict[str, list[Any]]) -> list[Any]:
    """The weights dense (and torch) use: the layer's own arrays where it holds them whole, else one
    copy on the output device shared by every worker count of the group (``shared``)."""
    held = held_weights(spec, layer)
    if held is not None:
        shared.setdefault("weights", held)
        return held
    if "weights" not in shared:
        last = spec.parts(layer)[-1]
        dtype = np.dtype(last.config.dtype)
        shared["weights"] = [
            last.backend.asarray(p, dtype, last.output_device) for p in spec.logical_params(layer)
        ]
    return shared["weights"]


def leaf_on(backend: Any, x: Any, device: Any) -> tp_gpu.Tensor:
    """``x`` (a backend array on ``device``) as a Dense leaf that requires grad: its gradient, dX,
    is ``leaf.grad`` after a backward, placed where ``x`` lies (no copy of ``x`` is made)."""
    return tp_gpu.Tensor({device: x}, Dense(device), tuple(x.shape), x.dtype, backend, requires_grad=True)


def tp_run(layer: Any, x: Any, dy: Any, dx_leaf: tp_gpu.Tensor | None = None) -> Callable[[], Any]:
    """One TP forward (inference: nothing recorded), or training step on the tape: gradients zeroed,
    the forward recorded, ``y.backward(dY)``. A step returns dX (``dx_leaf.grad``; ``dx_leaf`` is the
    input as a leaf) or, for an input with no gradient (ids), None."""
    if dy is None:

        def forward() -> Any:
            with tp_gpu.no_grad():
                return layer(x)

        return forward

    def step() -> Any:
        layer.zero_grad()
        if dx_leaf is None:
            layer(x).backward(dy)
            return None
        dx_leaf.grad = None
        layer(dx_leaf).backward(dy)
        return dx_leaf.grad

    return step


def make_case(
    spec: LayerSpec,
    mode: str,
    layer: Any,
    data: tuple[np.ndarray, np.ndarray | None],
    shared: dict,
    torch: Any,
) -> Case:
    """The comparison of ``layer`` (in training mode for forward + backward) on ``data`` = (x, dy)."""
    layer.train(mode == "fwd+bwd")
    last = spec.parts(layer)[-1]
    backend, device, dtype = last.backend, last.output_device, np.dtype(last.config.dtype)
    x_host, dy_host = data
    x = backend.asarray(x_host, np.int64 if spec.ids_input else dtype, device)
    dy = None if dy_host is None else backend.asarray(dy_host, dtype, device)
    params = dense_weights(spec, layer, shared)

    def dense() -> Any:
        with backend.device(device):
            return spec.dense(backend, params, x, dy)

    def expected(dense_out: Any) -> Callable[[int, int], Any]:
        return spec.expected_rows(backend, params, x, dense_out, mode)

    torch_fn = None if torch is None else torch_run(spec, torch, backend, params, x, dy)
    leaf = None if dy is None or spec.ids_input else leaf_on(backend, x, device)
    return Case(spec, layer, mode, tp_run(layer, x, dy, leaf), dense, torch_fn, expected)


def torch_run(
    spec: LayerSpec, torch: Any, backend: Any, params: list[Any], x: Any, dy: Any
) -> Callable | None:
    """The same computation in PyTorch, on the same memory as dense (CPU tensors viewing the NumPy
    arrays; CUDA tensors through DLPack on cupy); None where torch cannot run on this backend."""
    if backend.name == "cupy" and not torch.cuda.is_available():
        return None

    def as_tensor(a: Any) -> Any:
        return torch.from_dlpack(a) if backend.name == "cupy" else torch.from_numpy(np.asarray(a))

    F = torch.nn.functional
    backward = dy is not None
    weights = [as_tensor(p).requires_grad_(backward) for p in params]
    inp = as_tensor(x).requires_grad_(backward and not spec.ids_input)
    if not backward:
        return lambda: spec.torch_forward(F, weights, inp)
    grad_out = as_tensor(dy)
    leaves = weights + ([] if spec.ids_input else [inp])
    target = weights[0] if spec.ids_input else inp

    def step() -> Any:
        for t in leaves:
            t.grad = None
        spec.torch_forward(F, weights, inp).backward(grad_out)
        return target.grad

    return step


# --------------------------------------------------------------------------- the check


def _host(a: Any, backend: Any) -> np.ndarray:
    """A tp_gpu Tensor, a backend array or a torch tensor as a host NumPy array."""
    if isinstance(a, tp_gpu.Tensor):
        return a.numpy()
    return a.detach().cpu().numpy() if hasattr(a, "detach") else backend.to_host(a)


def compare_rows(
    got: Any, expected_rows: Callable[[int, int], Any], backend: Any, dtype: str, terms: int
) -> tuple[float, float]:
    """``(max |got - expected|, allowed)``, a chunk of rows at a time, with the allowance of
    :func:`tp_gpu.testing.compare` over the whole arrays: tolerance x max(1, max |expected|).

    ``got`` is a Tensor, a backend array, a host array or a torch tensor; NaN anywhere gives a NaN error.
    """
    if got is None:
        raise ValueError("the run returned nothing to compare")
    rows = max(1, CHUNK_BYTES // (8 * max(1, got.shape[-1])))
    errors, scale = [0.0], 1.0
    for start in range(0, max(1, got.shape[0]), rows):
        actual = _host(got[start : start + rows], backend)
        expected = _host(expected_rows(start, start + rows), backend)
        if actual.shape != expected.shape:
            raise ValueError(f"results differ in shape: {actual.shape} vs {expected.shape}")
        errors.append(compare(actual, expected, dtype, terms).error)
        scale = max(scale, float(np.max(np.abs(expected.astype(np.float64)), initial=0.0)))
    beyond = _host(expected_rows(got.shape[0], got.shape[0] + 1), backend)
    if beyond.shape[0]:
        raise ValueError(f"the result has {got.shape[0]} rows, fewer than expected")
    return float(np.max(errors)), tolerance(dtype, terms) * scale
