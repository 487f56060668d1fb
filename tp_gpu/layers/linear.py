"""Column- and row-parallel linear layers (Megatron-LM, Shoeybi et al., 2019)."""

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


class ColumnParallelLinear(ParallelModule):
    """``Y = X A + b`` with ``A`` split along its output (second) dimension.

    ``A = [A_1, ..., A_p]`` and ``b = [b_1, ..., b_p]``; worker ``i`` holds
    ``A_i`` of shape ``(n_in, n_out / p)`` and computes ``Y_i = X A_i + b_i``.
    With ``gather_output`` the ``Y_i`` are concatenated into ``Y`` on the
    output device; otherwise they stay where they are, as a
    :class:`~tp_gpu.ShardedTensor` split on the last axis, ready for a
    :class:`RowParallelLinear`.

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
        self.weight_shards: List[Any] = self._place(xavier_uniform(self._n_in, self._n_out, seed), axis=1)
        self.bias_shards: List[Any] = self._place(np.zeros(self._n_out), axis=0)

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

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
        if self.config.gather_output:
            return collectives.all_gather(self.backend, outputs, -1, self.output_device)
        return ShardedTensor(outputs, -1, self._placement, self.backend)

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A = [A_1, ..., A_p]``, ``(n_in, n_out)``, as a host array."""
        return self._host_concat(self.weight_shards, axis=1)

    def full_bias(self) -> np.ndarray:
        """The logical bias ``b = [b_1, ..., b_p]``, ``(n_out,)``, as a host array."""
        return self._host_concat(self.bias_shards, axis=0)

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

    Parameters
    ----------
    n_in, n_out : int
        Input and output features; ``config.n_workers`` must divide ``n_in``.
    config : TensorParallelConfig, optional
        Defaults to ``TensorParallelConfig()`` (2 workers).
    seed : int
        Seeds the logical weight, Xavier-uniform over the full ``(n_in, n_out)``;
        the bias starts at zero.
    """

    def __init__(self, n_in: int, n_out: int, config: Optional[TensorParallelConfig] = None, seed: int = 0) -> None:
        super().__init__(config)
        self._n_in = self._split_dim(n_in, "n_in")
        self._n_out = check_positive_int(n_out, "n_out")
        seed = check_seed(seed)
        self._init_placement()
        self._ranges = shard_ranges(self._n_in, self.n_workers)
        self.weight_shards: List[Any] = self._place(xavier_uniform(self._n_in, self._n_out, seed), axis=0)
        self.bias: Any = self.backend.asarray(np.zeros(self._n_out), self.dtype, self.output_device)

    @property
    def n_in(self) -> int:
        return self._n_in

    @property
    def n_out(self) -> int:
        return self._n_out

    def _input_pieces(self, x: Any) -> List[Any]:
        """Worker i's ``X_i`` on its device: a dense ``x`` is split, a ShardedTensor is used as is."""
        if not isinstance(x, ShardedTensor):
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
        return y

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A = [A_1; ...; A_p]``, ``(n_in, n_out)``, as a host array."""
        return self._host_concat(self.weight_shards, axis=0)

    def full_bias(self) -> np.ndarray:
        """The bias ``b``, ``(n_out,)``, as a host array."""
        return self.backend.to_host(self.bias).copy()

    def __repr__(self) -> str:
        return (
            f"RowParallelLinear(n_in={self._n_in}, n_out={self._n_out}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r})"
        )
