"""Column- and row-parallel linear layers (Megatron-LM, Shoeybi et al., 2019).

Communication follows Megatron's conjugate pairs:

* column-parallel: the input is copied to every worker (identity forward) and
  the partial input gradients are summed (reduction backward); a gathered
  output is split again in backward (gather forward, split backward);
* row-parallel: the partial outputs are summed (reduction forward) and the
  output gradient is copied to every worker (identity backward); a dense input
  split in forward gets its gradient gathered in backward.

With sequence parallelism (Korthikanti et al., 2022) the activations outside
the layers are split along the sequence axis (axis -2): the column layer
all-gathers such an input before its GEMM and reduce-scatters ``dX``; the row
layer (``config.sequence_parallel``) reduce-scatters its output into sequence
slices and all-gathers ``dY``.

``bias=False`` builds either layer without a bias (``Y = X A``, as
``nn.Linear(..., bias=False)``): no ``bias`` parameter is registered, so state
dicts, checkpoints and optimizers never see one. The GEMMs live in
:mod:`~tp_gpu.layers.gemm`, loading from dense weights in
:mod:`~tp_gpu.layers.linear_loading`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..initializers import xavier_uniform
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..placements import Split
from ..regions import (
    gather_from_region,
    reduce_from_region,
    reduce_scatter_to_sequence_parallel_region,
    replicate,
    split,
)
from ..reused_buffers import ReusedBuffers
from ..tensor import Tensor
from .base import ParallelModule, check_seed
from .gemm import as_rows, bias_grad, matmul, weight_grad
from .linear_functions import ColumnLinear, RowLinear
from .linear_loading import DenseLoading, dense_weight

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "as_rows",
    "matmul",
    "weight_grad",
    "bias_grad",
    "dense_weight",
    "check_bias_flag",
]


def check_bias_flag(bias: Any) -> bool:
    """``bias`` if it is True or False (NumPy's too), else ConfigError."""
    if not isinstance(bias, (bool, np.bool_)):
        raise ConfigError(f"bias must be True or False, got {bias!r}")
    return bool(bias)


class _ParallelLinear(ParallelModule, DenseLoading):
    """What the two linear layers share: a logical ``(n_in, n_out)`` weight ``A`` and bias ``b``
    (``None`` when built with ``bias=False``)."""

    weight: ShardedParameter
    bias: Optional[ShardedParameter]
    layout: BlockLayout

    def __init__(
        self,
        n_in: int,
        n_out: int,
        config: Optional[TensorParallelConfig],
        seed: int,
        unit: int,
        pad: Optional[int],
        bias: bool,
    ) -> None:
        super().__init__(config)
        self.has_bias = check_bias_flag(bias)
        self.n_in = check_positive_int(n_in, "n_in")
        self.n_out = check_positive_int(n_out, "n_out")
        self.seed = check_seed(seed)
        self.unit = check_positive_int(unit, "unit")
        self.pad_to_multiple_of = None if pad is None else check_positive_int(pad, "pad_to_multiple_of")
        fingerprint = {"n_in": self.n_in, "n_out": self.n_out, "seed": self.seed, "unit": self.unit}
        self._join_group(**fingerprint, pad=pad, bias=self.has_bias)
        #: Where a product of at least 32 MiB on the host is written, kept between calls and reused
        #: while nothing holds the last output (:mod:`tp_gpu.reused_buffers`): freshly mapped memory
        #: would fault on every page, every step. ``.clear()`` frees it; ``None`` allocates each call.
        self.output_buffers: Optional[ReusedBuffers] = ReusedBuffers()

    def _add_bias(self, layout: Optional[BlockLayout] = None, axis: Optional[int] = None) -> None:
        """Register the zero bias ``b`` ``(n_out,)`` (split as ``layout`` says, or whole), or with
        ``bias=False`` set ``self.bias = None``: no parameter."""
        if self.has_bias:
            self._add_parameter("bias", np.zeros(self.n_out), layout, axis)
        else:
            self.bias = None

    def _layout(self, layout: Optional[BlockLayout], size: int, what: str) -> BlockLayout:
        """``layout`` checked to split ``size`` over this group's workers, or the balanced split."""
        if layout is None:
            return self.group.split(size, self.unit, what, self.pad_to_multiple_of)
        expected = self.group.split(size, 1, what)
        if not isinstance(layout, BlockLayout) or (layout.total, layout.devices, layout.spans[0][0]) != (
            expected.total,
            expected.devices,
            0,
        ):
            raise ConfigError(
                f"layout must be a BlockLayout of {what}={size} over devices {expected.devices}, "
                f"got {layout!r}"
            )
        return layout

    @property
    def weight_shards(self) -> List[Any]:
        """Worker i's slice of ``A``, on its device."""
        return self.weight.shards

    @property
    def bias_shards(self) -> Optional[List[Any]]:
        """Worker i's slice of ``b`` on its device (column), or the whole ``b`` on the output device
        (row); None without a bias."""
        return None if self.bias is None else self.bias.shards

    @property
    def partition(self) -> List[Tuple[int, int]]:
        """Each of this process's workers' half-open ``[first, last)`` on the split dimension."""
        return list(self.layout.ranges)

    def full_weight(self) -> np.ndarray:
        """The logical weight ``A``, ``(n_in, n_out)``, as a host array."""
        return self.weight.full()

    def full_bias(self) -> Optional[np.ndarray]:
        """The logical bias ``b``, ``(n_out,)``, as a host array; None without a bias."""
        return None if self.bias is None else self.bias.full()

    def extra_repr(self) -> str:
        return (
            f"n_in={self.n_in}, n_out={self.n_out}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r}"
            + ("" if self.has_bias else ", bias=False")
        )


class ColumnParallelLinear(_ParallelLinear):
    """``Y = X A + b`` with ``A`` split along its output (second) dimension.

    ``A = [A_1, ..., A_p]`` and ``b = [b_1, ..., b_p]``; worker ``i`` holds
    ``A_i`` of shape ``(n_in, n_i)``, where the ``n_i`` are ``n_out`` split as
    evenly as possible (any ``n_out``, any ``p``), and computes
    ``Y_i = X A_i + b_i``. With ``gather_output`` the ``Y_i`` are concatenated
    into ``Y`` on the output device; otherwise they stay where they are, as a
    :class:`~tp_gpu.ShardedTensor` split on the last axis, ready for a
    :class:`RowParallelLinear`.

    Backward: ``dA_i = X^T dY_i``, ``db_i = sum(dY_i)`` (each on worker ``i``'s
    device) and ``dX = sum_i dY_i A_i^T``, reduced onto the output device.
    With ``bias=False``: ``Y_i = X A_i`` and no ``db_i``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features.
    config : TensorParallelConfig, optional
        Defaults to ``TensorParallelConfig()`` (2 workers, gathered output).
    seed : int
        Seeds the logical weight, Xavier-uniform over the full ``(n_in, n_out)``;
        the bias starts at zero.
    bias : bool
        ``False``: no bias (``Y = X A``); no ``bias`` parameter is registered.
    unit : int
        Keep groups of ``unit`` consecutive outputs whole on one worker
        (attention heads of ``head_dim`` columns); ``n_out`` must be a multiple.
    pad_to_multiple_of : int, optional
        Pad ``n_out`` so that every worker's shard has the same size, a multiple
        of it (vLLM's ``padding_size``, Megatron's ``make_vocab_size_divisible_by``).
        The padded columns are zero and never appear in ``full_weight()``, state
        dicts, checkpoints or a gathered output; the vocab-parallel loss masks them.
    layout : BlockLayout, optional
        The split of ``n_out`` to use instead of the balanced one (``unit`` and
        padding then do not apply): attention's query heads grouped by the
        key-value head they read (:class:`~tp_gpu.layers.head_plan.HeadPlan`).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        bias: bool = True,
        unit: int = 1,
        pad_to_multiple_of: Optional[int] = None,
        layout: Optional[BlockLayout] = None,
    ) -> None:
        super().__init__(n_in, n_out, config, seed, unit, pad_to_multiple_of, bias)
        self.layout = self._layout(layout, self.n_out, "n_out")
        self._add_parameter("weight", xavier_uniform(self.n_in, self.n_out, self.seed), self.layout, axis=1)
        self._add_bias(self.layout, axis=0)

    def forward(self, x: Any) -> Tensor:
        """``Y = X A + b`` for ``x`` of shape ``(..., n_in)``.

        Returns ``(..., n_out)`` on the output device, or with
        ``gather_output=False`` a ShardedTensor whose shard ``i`` is
        ``(..., n_i)`` on worker ``i``'s device. ``x`` reaches each device once
        (:func:`~tp_gpu.regions.replicate`): a dense ``x`` is copied; one split
        along the sequence (sequence parallelism) is all-gathered, and only its
        slices are kept for backward, which gathers them again (as Megatron-core
        does). Each device runs one GEMM for its workers.
        """
        x = self._check_features(x, self.n_in, "ColumnParallelLinear input")
        x = replicate(x, self.group, self.dtype, "ColumnParallelLinear input")  # (..., n_in) on every device
        y = ColumnLinear.apply(x, self.weight, self.bias, self.output_buffers)  # device d: (..., n_d)
        return gather_from_region(y, self.group) if self.config.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """``Y = X A + b`` with ``A`` split along its input (first) dimension.

    ``A = [A_1; ...; A_p]`` (stacked rows) and ``X = [X_1, ..., X_p]`` (split
    columns, any ``n_in`` on any ``p``); worker ``i`` holds ``A_i`` of shape
    ``(n_i, n_out)`` and computes the partial ``X_i A_i``. The partials are
    summed (all-reduce) on the output device and the bias ``b``, kept whole
    there, is added once: ``Y = sum_i X_i A_i + b``.

    Backward: ``dY`` is copied to every worker; ``dA_i = X_i^T dY`` and
    ``dX_i = dY A_i^T`` on worker ``i``'s device, ``db = sum(dY)`` on the output
    device. ``dX`` is returned split like the input was: a ShardedTensor for a
    ShardedTensor input, a gathered array for a dense one.

    With ``config.sequence_parallel`` the partials are reduce-scattered along
    the sequence axis (-2) instead: device ``d`` gets its slices
    ``Y[S_d] = sum_i (X_i A_i)[S_d] + b``, the whole ``b`` copied to every
    device for its slices, and the output is a ShardedTensor split along the
    sequence. Backward all-gathers ``dY`` (a ShardedTensor split alike; a
    dense ``dY`` is used as it is) onto every device, and
    ``db = sum_d sum(dY[S_d])`` is reduced onto the output device, where ``b`` lives.

    Parameters
    ----------
    n_in, n_out : int
        Input and output features.
    config : TensorParallelConfig, optional
        Defaults to ``TensorParallelConfig()`` (2 workers).
    seed : int
        Seeds the logical weight, Xavier-uniform over the full ``(n_in, n_out)``;
        the bias starts at zero.
    input_is_parallel : bool
        If True, ``forward`` requires a ShardedTensor input (as Megatron's flag):
        a dense input raises instead of being split silently.
    bias : bool
        ``False``: no bias (``Y = sum_i X_i A_i``); no ``bias`` parameter is registered.
    unit : int
        Keep groups of ``unit`` consecutive inputs whole on one worker, so the
        split matches a column layer's ``unit`` split; ``n_in`` must be a multiple.
    pad_to_multiple_of : int, optional
        Pad ``n_in`` to equal shards of a multiple of it, matching a column
        layer padded alike; the padded rows of the weight are zero.
    layout : BlockLayout, optional
        The split of ``n_in`` to use instead of the balanced one, matching a
        column layer built with the same ``layout``.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        input_is_parallel: bool = False,
        bias: bool = True,
        unit: int = 1,
        pad_to_multiple_of: Optional[int] = None,
        layout: Optional[BlockLayout] = None,
    ) -> None:
        super().__init__(n_in, n_out, config, seed, unit, pad_to_multiple_of, bias)
        self.input_is_parallel = bool(input_is_parallel)
        self.layout = self._layout(layout, self.n_in, "n_in")
        self._add_parameter("weight", xavier_uniform(self.n_in, self.n_out, self.seed), self.layout, axis=0)
        self._add_bias()  # whole, on the output device

    def forward(self, x: Any) -> Tensor:
        """``Y = sum_i X_i A_i + b`` for ``x`` of shape ``(..., n_in)``.

        ``x`` may be dense, split here so that each device receives only its
        workers' columns, or a ShardedTensor split on its last axis like this
        layer's input (the output of a ``ColumnParallelLinear(gather_output=False)``),
        used without re-splitting. Workers sharing a device run one GEMM
        together. Returns ``(..., n_out)`` on the output device, or with
        ``config.sequence_parallel`` a ShardedTensor ``(..., S, n_out)`` split
        along the sequence.
        """
        if self.input_is_parallel and not isinstance(getattr(x, "placement", None), Split):
            raise ShapeError(
                f"RowParallelLinear(input_is_parallel=True) expects a ShardedTensor input, got "
                f"{type(x).__name__} placed {getattr(x, 'placement', 'on the host')}"
            )
        x = self._check_features(x, self.n_in, "RowParallelLinear input")
        x = split(
            x, self.group, self.layout, self.dtype, -1, "RowParallelLinear input"
        )  # device d: (.., n_in_d)
        partial = RowLinear.apply(x, self.weight, self.bias, self.output_buffers)  # d: X_d A_d (+ b once)
        if self.config.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, self.group)  # (..., S_d, n_out)
        return reduce_from_region(partial, self.group)  # (..., n_out) on the output device
