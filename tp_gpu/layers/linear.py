"""Column- and row-parallel linear layers (Megatron-LM, Shoeybi et al., 2019).

Communication follows Megatron's conjugate pairs:

* column-parallel: the input is copied to every worker (identity forward) and
  the partial input gradients are summed (reduction backward); a gathered
  output is split again in backward (gather forward, split backward);
* row-parallel: the partial outputs are summed (reduction forward) and the
  output gradient is copied to every worker (identity backward); a dense input
  split in forward gets its gradient gathered in backward.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Optional, Union

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ShapeError
from ..init import xavier_uniform
from ..sharded import ShardedTensor
from .base import ParallelModule, as_array_like, check_layout, check_seed, commit_state, stage_state

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _weight_grad(inp: Any, grad: Any) -> Any:
    """``inp^T @ grad`` over every leading axis: (..., a), (..., b) -> (a, b)."""
    inp2 = inp.reshape(-1, inp.shape[-1])
    grad2 = grad.reshape(-1, grad.shape[-1])
    return inp2.T @ grad2  # (a, B) @ (B, b) -> (a, b)


def _bias_grad(grad: Any) -> Any:
    """``grad`` summed over every leading axis: (..., b) -> (b,)."""
    return grad.reshape(-1, grad.shape[-1]).sum(axis=0)


def _blocks_of(layer: ParallelModule, x: ShardedTensor, shape, layout, what: str) -> Dict[Hashable, Any]:
    """The per-device blocks of ``x`` in ``layer``'s dtype and placement, after checking its split.

    ``x`` must be split on its last axis with ``layout``'s sizes (and have
    ``shape`` when given). Shards on other devices than ``layout``'s are moved.
    """
    if (shape is not None and x.shape != shape) or x.axis != x.ndim - 1 or x.split_sizes != layout.sizes:
        expected = f"shape {shape} split" if shape is not None else "split"
        raise ShapeError(
            f"{what} ShardedTensor of shape {x.shape} is split on axis {x.axis} with sizes {x.split_sizes}; "
            f"expected {expected} on the last axis with sizes {layout.sizes}"
        )
    if x.devices != layout.devices:
        moved = collectives.to_placement(layer.backend, x.shards, layout.devices, layer.dtype)
        x = ShardedTensor(moved, x.axis, layout.devices, layer.backend, layer.comm)
    return {device: layer.backend.asarray(block, layer.dtype, device) for device, block in x.device_blocks().items()}


def _dense_weight(weight: Any, layout: str, what: str) -> Any:
    """``weight`` as an array in our ``(n_in, n_out)`` layout (a view, never a copy), checked to be 2-D."""
    layout = check_layout(layout)
    w = as_array_like(weight, what)
    if w.ndim != 2:
        dims = "(n_in, n_out)" if layout == "in_out" else "(n_out, n_in)"
        raise ShapeError(f"{what} must be 2-D {dims} for layout={layout!r}, got shape {tuple(w.shape)}")
    return w if layout == "in_out" else w.T


def _linear_dense_state(layer: ParallelModule, weight: Any, bias: Any, layout: str, what: Optional[str] = None) -> Dict[str, Any]:
    """The state dict ``{"weight": (n_in, n_out), "bias": (n_out,)}`` of dense ``weight`` and ``bias``.

    Checks shapes against ``layer`` with messages in the caller's layout
    (naming ``what``, by default the layer's class); a ``None`` bias is zero.
    Nothing is written.
    """
    name = what or type(layer).__name__
    n_in, n_out = layer.n_in, layer.n_out
    layout = check_layout(layout)
    w = _dense_weight(weight, layout, f"{name} weight")
    if tuple(w.shape) != (n_in, n_out):
        found = tuple(w.shape) if layout == "in_out" else tuple(w.shape)[::-1]
        expected = (n_in, n_out) if layout == "in_out" else (n_out, n_in)
        dims = "(n_in, n_out)" if layout == "in_out" else "(n_out, n_in)"
        raise ShapeError(f"{name} weight must have shape {expected} {dims} for layout={layout!r}, got {found}")
    if bias is None:
        b = np.zeros(n_out, dtype=layer.dtype)
    else:
        b = as_array_like(bias, f"{name} bias")
        if tuple(b.shape) != (n_out,):
            raise ShapeError(f"{name} bias must have shape ({n_out},) (n_out,), got {tuple(b.shape)}")
    return {"weight": w, "bias": b}


class _ParallelLinear(ParallelModule):
    """What the two linear layers share: a logical ``(n_in, n_out)`` weight ``A`` and bias ``b``."""

    _n_in: int
    _n_out: int

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

    @classmethod
    def from_dense(
        cls, weight: Any, bias: Any = None, config: Optional[TensorParallelConfig] = None, layout: str = "in_out", **kwargs
    ):
        """A layer holding the dense ``weight`` (and ``bias``), split over ``config``'s workers.

        ``n_in`` and ``n_out`` come from the weight's shape: ``(n_in, n_out)``
        for ``layout="in_out"``, ``(n_out, n_in)`` for ``layout="out_in"``
        (PyTorch ``nn.Linear``, so ``from_dense(lin.weight, lin.bias,
        layout="out_in")`` loads a torch layer). ``config`` defaults to
        ``TensorParallelConfig()``; the weights are cast to its dtype. A
        ``None`` bias is zero. Other keyword arguments go to the constructor
        (``input_is_parallel`` of the row layer). See :meth:`load_dense`.
        """
        weight = as_array_like(weight, f"{cls.__name__}.from_dense weight")
        n_in, n_out = _dense_weight(weight, layout, f"{cls.__name__}.from_dense weight").shape
        layer = cls(n_in, n_out, config, **kwargs)
        layer.load_dense(weight, bias, layout)
        return layer

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A``, ``(n_in, n_out)``, as a host array."""
        return self._weight.full()

    def full_bias(self) -> np.ndarray:
        """The logical bias ``b``, ``(n_out,)``, as a host array."""
        return self._bias.full()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_in={self._n_in}, n_out={self._n_out}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r})"
        )

    def load_dense(self, weight: Any, bias: Any = None, layout: str = "in_out") -> None:
        """Overwrite the weight and bias, in place, from dense (unsharded) arrays.

        Parameters
        ----------
        weight : array
            The full weight: ``(n_in, n_out)`` for ``layout="in_out"``, or
            PyTorch ``nn.Linear``'s ``(n_out, n_in)`` for ``layout="out_in"``.
            A host array, a device array (split where it lies, no host round
            trip) or any DLPack array such as a ``torch.Tensor``.
        bias : array or None
            The full ``(n_out,)`` bias. ``None`` means *no bias*, as in
            ``nn.Linear(..., bias=False)``: the bias is set to zero, so the
            layer computes exactly ``X A``.
        layout : {"in_out", "out_in"}

        Values are cast to the layer's dtype. Shapes are checked first
        (:class:`ShapeError`, :class:`ConfigError` for a bad ``layout``), and
        nothing changes unless everything is valid. ``full_weight()`` and
        ``full_bias()`` give back exactly what was loaded (in ``in_out``).
        """
        state = _linear_dense_state(self, weight, bias, layout)
        commit_state(stage_state(self.named_parameters(), state, f"{type(self).__name__}.load_dense"))


class ColumnParallelLinear(_ParallelLinear):
    """``Y = X A + b`` with ``A`` split along its output (second) dimension.

    ``A = [A_1, ..., A_p]`` and ``b = [b_1, ..., b_p]``; worker ``i`` holds
    ``A_i`` of shape ``(n_in, n_out / p)`` and computes ``Y_i = X A_i + b_i``.
    With ``gather_output`` the ``Y_i`` are concatenated into ``Y`` on the
    output device; otherwise they stay where they are, as a
    :class:`~tp_gpu.ShardedTensor` split on the last axis, ready for a
    :class:`RowParallelLinear`.

    Backward: ``dA_i = X^T dY_i``, ``db_i = sum(dY_i)`` (each on worker ``i``'s
    device) and ``dX = sum_i dY_i A_i^T``, reduced onto the output device.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features; ``config.n_workers`` must divide ``n_out``.
    config : TensorParallelConfig, optional
        Defaults to ``TensorParallelConfig()`` (2 workers, gathered output).
    seed : int
        Seeds the logical weight, Xavier-uniform over the full ``(n_in, n_out)``;
        the bias starts at zero.
    """

    def __init__(self, n_in: int, n_out: int, config: Optional[TensorParallelConfig] = None, seed: int = 0) -> None:
        super().__init__(config)
        self._n_in = check_positive_int(n_in, "n_in")
        self._n_out = self._split_dim(n_out, "n_out")
        seed = check_seed(seed)
        self._init_placement(n_in=self._n_in, n_out=self._n_out, seed=seed)
        self._out_layout = self._even_layout(self._n_out)
        self._weight = self._add_parameter("weight", xavier_uniform(self._n_in, self._n_out, seed), self._out_layout, axis=1)
        self._bias = self._add_parameter("bias", np.zeros(self._n_out), self._out_layout, axis=0)

    @property
    def weight_shards(self) -> List[Any]:
        """Worker i's ``A_i``, ``(n_in, n_out / p)``, on its device."""
        return self._weight.shards

    @property
    def bias_shards(self) -> List[Any]:
        """Worker i's ``b_i``, ``(n_out / p,)``, on its device."""
        return self._bias.shards

    def forward(self, x: Any) -> Union[Any, ShardedTensor]:
        """``Y = X A + b`` for ``x`` of shape ``(..., n_in)``.

        Returns an array ``(..., n_out)`` on the output device, or with
        ``gather_output=False`` a ShardedTensor whose shard ``i`` is
        ``(..., n_out / p)`` on worker ``i``'s device. ``x`` is copied once per
        device, not once per worker.
        """
        x = self._check_features(x, self._n_in, "ColumnParallelLinear input")
        layout = self._out_layout
        copies = collectives.broadcast(self.backend, x, self._placement, self.dtype)
        blocks = {}
        for device in layout.groups:  # one GEMM per device, for all of its workers
            with self.backend.device(device):
                y = copies[device] @ self._weight.blocks[device]  # (..., n_in) @ (n_in, n_out_d) -> (..., n_out_d)
                y += self._bias.blocks[device]  # (..., n_out_d) + (n_out_d,)
            blocks[device] = y
        out_shape = tuple(x.shape[:-1]) + (self._n_out,)
        self._saved = {"inputs": copies, "out_shape": out_shape} if self.training else None
        if self.config.gather_output:
            return collectives.gather_blocks(self.backend, blocks, -1, layout, self.output_device, self.comm)
        return ShardedTensor.from_blocks(blocks, -1, layout, self.backend, self.comm)

    def _grad_blocks(self, grad_output: Any, out_shape) -> Dict[Hashable, Any]:
        """Each device's block of ``dY``: split from a dense gradient, or a ShardedTensor's blocks."""
        if isinstance(grad_output, ShardedTensor):
            return _blocks_of(self, grad_output, out_shape, self._out_layout, "ColumnParallelLinear grad_output")
        grad = self._check_grad_shape(grad_output, out_shape, "ColumnParallelLinear")
        return collectives.scatter_blocks(self.backend, grad, -1, self._out_layout, self.dtype)

    def backward(self, grad_output: Any) -> Any:
        """Accumulate ``dA_i``, ``db_i`` and return ``dX`` ``(..., n_in)`` on the output device.

        ``grad_output`` is ``dY``: a dense ``(..., n_out)`` array, or a
        ShardedTensor split like the forward output when ``gather_output=False``.
        """
        saved = self._take_saved("ColumnParallelLinear")
        grads = self._grad_blocks(grad_output, saved["out_shape"])
        partials = []
        for device, grad in grads.items():
            with self.backend.device(device):
                self._weight.accumulate(device, _weight_grad(saved["inputs"][device], grad))
                self._bias.accumulate(device, _bias_grad(grad))
                weight = self._weight.blocks[device]
                partials.append(grad @ weight.T)  # (..., n_out_d) @ (n_out_d, n_in) -> (..., n_in)
        return collectives.reduce_sum(self.backend, partials, list(grads), self.output_device, self.comm)


class RowParallelLinear(_ParallelLinear):
    """``Y = X A + b`` with ``A`` split along its input (first) dimension.

    ``A = [A_1; ...; A_p]`` (stacked rows) and ``X = [X_1, ..., X_p]`` (split
    columns); worker ``i`` holds ``A_i`` of shape ``(n_in / p, n_out)`` and
    computes the partial ``X_i A_i``. The partials are summed (all-reduce) on
    the output device and the bias ``b``, kept whole there, is added once:
    ``Y = sum_i X_i A_i + b``.

    Backward: ``dY`` is copied to every worker; ``dA_i = X_i^T dY`` and
    ``dX_i = dY A_i^T`` on worker ``i``'s device, ``db = sum(dY)`` on the output
    device. ``dX`` is returned split like the input was: a ShardedTensor for a
    ShardedTensor input, a gathered array for a dense one.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features; ``config.n_workers`` must divide ``n_in``.
    config : TensorParallelConfig, optional
        Defaults to ``TensorParallelConfig()`` (2 workers).
    seed : int
        Seeds the logical weight, Xavier-uniform over the full ``(n_in, n_out)``;
        the bias starts at zero.
    input_is_parallel : bool
        If True, ``forward`` requires a ShardedTensor input (as Megatron's flag):
        a dense input raises instead of being split silently.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        seed: int = 0,
        input_is_parallel: bool = False,
    ) -> None:
        super().__init__(config)
        self._n_in = self._split_dim(n_in, "n_in")
        self._n_out = check_positive_int(n_out, "n_out")
        seed = check_seed(seed)
        self.input_is_parallel = bool(input_is_parallel)
        self._init_placement(n_in=self._n_in, n_out=self._n_out, seed=seed)
        self._in_layout = self._even_layout(self._n_in)
        self._weight = self._add_parameter("weight", xavier_uniform(self._n_in, self._n_out, seed), self._in_layout, axis=0)
        self._bias = self._add_parameter("bias", np.zeros(self._n_out))

    @property
    def weight_shards(self) -> List[Any]:
        """Worker i's ``A_i``, ``(n_in / p, n_out)``, on its device."""
        return self._weight.shards

    @property
    def bias(self) -> Any:
        """The whole bias ``b``, ``(n_out,)``, on the output device."""
        return self._bias.shards[0]

    @bias.setter
    def bias(self, value: Any) -> None:
        self._bias.load(value)

    def _input_blocks(self, x: Any) -> Dict[Hashable, Any]:
        """Each device's block of ``X``: a dense ``x`` is split, a ShardedTensor is used as it lies."""
        if isinstance(x, ShardedTensor):
            return _blocks_of(self, x, None, self._in_layout, "RowParallelLinear input")
        if self.input_is_parallel:
            raise ShapeError(
                f"RowParallelLinear(input_is_parallel=True) expects a ShardedTensor input, got {type(x).__name__}"
            )
        x = self._check_features(x, self._n_in, "RowParallelLinear input")
        return collectives.scatter_blocks(self.backend, x, -1, self._in_layout, self.dtype)

    def forward(self, x: Union[Any, ShardedTensor]) -> Any:
        """``Y = sum_i X_i A_i + b`` for ``x`` of shape ``(..., n_in)``.

        ``x`` may be an array, split here so that each device receives only its
        workers' columns, or a ShardedTensor split on its last axis like this
        layer's input (the output of a ``ColumnParallelLinear(gather_output=False)``),
        used without re-splitting. Workers sharing a device run one GEMM
        together. Returns ``(..., n_out)`` on the output device.
        """
        blocks = self._input_blocks(x)
        partials = []
        for device, block in blocks.items():
            with self.backend.device(device):
                partials.append(block @ self._weight.blocks[device])  # (..., n_in_d) @ (n_in_d, n_out) -> (..., n_out)
        y = collectives.reduce_sum(self.backend, partials, list(blocks), self.output_device, self.comm)
        with self.backend.device(self.output_device):
            y += self.bias  # (..., n_out) + (n_out,), once, after the reduction
        if self.training:
            self._saved = {"inputs": blocks, "sharded_input": isinstance(x, ShardedTensor), "out_shape": tuple(y.shape)}
        else:
            self._saved = None
        return y

    def backward(self, grad_output: Any) -> Union[Any, ShardedTensor]:
        """Accumulate ``dA_i``, ``db`` and return ``dX``.

        ``grad_output`` is ``dY``, ``(..., n_out)``. ``dX`` is a ShardedTensor
        (shard i ``(..., n_in / p)`` on worker i's device) when the forward
        input was one, else a gathered ``(..., n_in)`` array on the output device.
        """
        saved = self._take_saved("RowParallelLinear")
        grad = self._check_grad_shape(grad_output, saved["out_shape"], "RowParallelLinear")
        # Identity backward of the all-reduce: dY on every worker's device and the output device.
        copies = collectives.broadcast(self.backend, grad, [*self._placement, self.output_device], self.dtype)
        grad_inputs = {}
        for device, block in saved["inputs"].items():
            with self.backend.device(device):
                self._weight.accumulate(device, _weight_grad(block, copies[device]))
                weight = self._weight.blocks[device]
                grad_inputs[device] = copies[device] @ weight.T  # (..., n_out) @ (n_out, n_in_d) -> (..., n_in_d)
        with self.backend.device(self.output_device):
            self._bias.accumulate(self.output_device, _bias_grad(copies[self.output_device]))
        if saved["sharded_input"]:
            return ShardedTensor.from_blocks(grad_inputs, -1, self._in_layout, self.backend, self.comm)
        return collectives.gather_blocks(self.backend, grad_inputs, -1, self._in_layout, self.output_device, self.comm)
