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

from typing import Any, List, Optional, Union

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ShapeError
from ..init import xavier_uniform
from ..partition import shard_ranges
from ..sharded import ShardedTensor
from .base import ParallelModule, check_seed

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]


def _weight_grad(inp: Any, grad: Any) -> Any:
    """``inp^T @ grad`` over every leading axis: (..., a), (..., b) -> (a, b)."""
    inp2 = inp.reshape(-1, inp.shape[-1])
    grad2 = grad.reshape(-1, grad.shape[-1])
    return inp2.T @ grad2  # (a, B) @ (B, b) -> (a, b)


def _bias_grad(grad: Any) -> Any:
    """``grad`` summed over every leading axis: (..., b) -> (b,)."""
    return grad.reshape(-1, grad.shape[-1]).sum(axis=0)


class ColumnParallelLinear(ParallelModule):
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
        self._init_placement()
        self._ranges = shard_ranges(self._n_out, self.n_workers)
        self._weight = self._add_parameter("weight", xavier_uniform(self._n_in, self._n_out, seed), axis=1)
        self._bias = self._add_parameter("bias", np.zeros(self._n_out), axis=0)

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

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
        copies = collectives.broadcast(self.backend, x, self._placement, self.dtype)
        outputs = []
        for weight, bias, device in zip(self.weight_shards, self.bias_shards, self._placement):
            with self.backend.device(device):
                y = copies[device] @ weight  # (..., n_in) @ (n_in, n_out_i) -> (..., n_out_i)
                y += bias  # (..., n_out_i) + (n_out_i,)
            outputs.append(y)
        out_shape = tuple(x.shape[:-1]) + (self._n_out,)
        self._saved = {"inputs": copies, "out_shape": out_shape} if self.training else None
        if self.config.gather_output:
            return collectives.all_gather(self.backend, outputs, -1, self.output_device)
        return ShardedTensor(outputs, -1, self._placement, self.backend)

    def _grad_pieces(self, grad_output: Any, out_shape) -> List[Any]:
        """Worker i's ``dY_i``: split from a dense gradient, or the shards of a ShardedTensor."""
        expected = [last - first for first, last in self._ranges]
        if isinstance(grad_output, ShardedTensor):
            if grad_output.shape != out_shape or grad_output.axis != len(out_shape) - 1 or grad_output.split_sizes != expected:
                raise ShapeError(
                    f"ColumnParallelLinear grad_output ShardedTensor has shape {grad_output.shape}, axis "
                    f"{grad_output.axis}, sizes {grad_output.split_sizes}; expected shape {out_shape} split on the "
                    f"last axis with sizes {expected}"
                )
            return collectives.to_placement(self.backend, grad_output.shards, self._placement, self.dtype)
        grad = self._check_grad_shape(grad_output, out_shape, "ColumnParallelLinear")
        return collectives.scatter(self.backend, grad, -1, self._ranges, self._placement, self.dtype)

    def backward(self, grad_output: Any) -> Any:
        """Accumulate ``dA_i``, ``db_i`` and return ``dX`` ``(..., n_in)`` on the output device.

        ``grad_output`` is ``dY``: a dense ``(..., n_out)`` array, or a
        ShardedTensor split like the forward output when ``gather_output=False``.
        """
        saved = self._take_saved("ColumnParallelLinear")
        pieces = self._grad_pieces(grad_output, saved["out_shape"])
        partials = []
        for i, (grad, weight, device) in enumerate(zip(pieces, self.weight_shards, self._placement)):
            inp = saved["inputs"][device]
            with self.backend.device(device):
                self._weight.accumulate(i, _weight_grad(inp, grad))
                self._bias.accumulate(i, _bias_grad(grad))
                partials.append(grad @ weight.T)  # (..., n_out_i) @ (n_out_i, n_in) -> (..., n_in)
        return collectives.reduce_sum(self.backend, partials, self._placement, self.output_device)

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A = [A_1, ..., A_p]``, ``(n_in, n_out)``, as a host array."""
        return self._weight.full()

    def full_bias(self) -> np.ndarray:
        """The logical bias ``b = [b_1, ..., b_p]``, ``(n_out,)``, as a host array."""
        return self._bias.full()

    def __repr__(self) -> str:
        return (
            f"ColumnParallelLinear(n_in={self._n_in}, n_out={self._n_out}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r})"
        )


class RowParallelLinear(ParallelModule):
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
        self._init_placement()
        self._ranges = shard_ranges(self._n_in, self.n_workers)
        self._weight = self._add_parameter("weight", xavier_uniform(self._n_in, self._n_out, seed), axis=0)
        self._bias = self._add_parameter("bias", np.zeros(self._n_out), axis=None)

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

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
        value = self._check_grad_shape(value, (self._n_out,), "RowParallelLinear bias")
        self._bias.shards[0] = self.backend.asarray(value, self.dtype, self.output_device)

    def _input_pieces(self, x: Any) -> List[Any]:
        """Worker i's ``X_i`` on its device: a dense ``x`` is split, a ShardedTensor is used as is."""
        if not isinstance(x, ShardedTensor):
            if self.input_is_parallel:
                raise ShapeError(
                    f"RowParallelLinear(input_is_parallel=True) expects a ShardedTensor input, got {type(x).__name__}"
                )
            x = self._check_features(x, self._n_in, "RowParallelLinear input")
            return collectives.scatter(self.backend, x, -1, self._ranges, self._placement, self.dtype)
        expected = [last - first for first, last in self._ranges]
        if x.axis != x.ndim - 1 or x.split_sizes != expected:
            raise ShapeError(
                f"RowParallelLinear input ShardedTensor of shape {x.shape} is split on axis {x.axis} "
                f"with sizes {x.split_sizes}; expected axis {x.ndim - 1} (the last) with sizes {expected}"
            )
        return collectives.to_placement(self.backend, x.shards, self._placement, self.dtype)

    def forward(self, x: Union[Any, ShardedTensor]) -> Any:
        """``Y = sum_i X_i A_i + b`` for ``x`` of shape ``(..., n_in)``.

        ``x`` may be an array, split here so that each worker receives only its
        ``X_i``, or a ShardedTensor split on its last axis like this layer's
        input (the output of a ``ColumnParallelLinear(gather_output=False)``),
        used without re-splitting. Returns ``(..., n_out)`` on the output device.
        """
        pieces = self._input_pieces(x)
        partials = []
        for piece, weight, device in zip(pieces, self.weight_shards, self._placement):
            with self.backend.device(device):
                partials.append(piece @ weight)  # (..., n_in_i) @ (n_in_i, n_out) -> (..., n_out)
        y = collectives.reduce_sum(self.backend, partials, self._placement, self.output_device)
        with self.backend.device(self.output_device):
            y += self.bias  # (..., n_out) + (n_out,), once, after the reduction
        if self.training:
            self._saved = {"pieces": pieces, "sharded_input": isinstance(x, ShardedTensor), "out_shape": tuple(y.shape)}
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
        grad_inputs = []
        for i, (piece, weight, device) in enumerate(zip(saved["pieces"], self.weight_shards, self._placement)):
            with self.backend.device(device):
                self._weight.accumulate(i, _weight_grad(piece, copies[device]))
                grad_inputs.append(copies[device] @ weight.T)  # (..., n_out) @ (n_out, n_in_i) -> (..., n_in_i)
        with self.backend.device(self.output_device):
            self._bias.accumulate(0, _bias_grad(copies[self.output_device]))
        if saved["sharded_input"]:
            return ShardedTensor(grad_inputs, -1, self._placement, self.backend)
        return collectives.all_gather(self.backend, grad_inputs, -1, self.output_device)

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A = [A_1; ...; A_p]``, ``(n_in, n_out)``, as a host array."""
        return self._weight.full()

    def full_bias(self) -> np.ndarray:
        """The bias ``b``, ``(n_out,)``, as a host array."""
        return self._bias.full()

    def __repr__(self) -> str:
        return (
            f"RowParallelLinear(n_in={self._n_in}, n_out={self._n_out}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r})"
        )
