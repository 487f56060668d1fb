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

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..initializers import xavier_uniform
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..regions import (
    SEQUENCE_AXIS,
    Blocks,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_parallel_region,
    reduce_from_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_region,
    sequence_layout,
)
from ..sharded import ShardedTensor
from .base import ParallelModule, check_seed
from .gemm import add_in_place, as_rows, bias_grad, matmul, matmul_bias, matmul_transposed, weight_grad
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

    def _add_bias(self, layout: Optional[BlockLayout] = None, axis: Optional[int] = None) -> None:
        """Register the zero bias ``b`` ``(n_out,)`` (split as ``layout`` says, or whole), or with
        ``bias=False`` set ``self.bias = None``: no parameter."""
        if self.has_bias:
            self._add_parameter("bias", np.zeros(self.n_out), layout, axis)
        else:
            self.bias = None

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
    ) -> None:
        super().__init__(n_in, n_out, config, seed, unit, pad_to_multiple_of, bias)
        self.layout = self.group.split(self.n_out, self.unit, "n_out", self.pad_to_multiple_of)
        self._add_parameter("weight", xavier_uniform(self.n_in, self.n_out, self.seed), self.layout, axis=1)
        self._add_bias(self.layout, axis=0)

    def forward(self, x: Any) -> Union[Any, ShardedTensor]:
        """``Y = X A + b`` for ``x`` of shape ``(..., n_in)``.

        Returns an array ``(..., n_out)`` on the output device, or with
        ``gather_output=False`` a ShardedTensor whose shard ``i`` is
        ``(..., n_i)`` on worker ``i``'s device. ``x`` is copied once per
        device, not once per worker, and each device runs one GEMM.

        A ShardedTensor ``x`` split along the sequence (axis -2, as sequence
        parallelism leaves activations; see :func:`~tp_gpu.regions.sequence_layout`)
        is all-gathered instead: each device receives the other devices'
        slices. Only the slices are kept for backward, which gathers them
        again (as Megatron-core does), so the saved input is ``1/p`` of ``X``.
        """
        if isinstance(x, ShardedTensor):
            layout = self._sequence_layout(x)
            what = "ColumnParallelLinear input"
            kept = x.blocks_for(layout, self.dtype, None, what, SEQUENCE_AXIS)  # {d: (..., S_d, n_in)}
            inputs = gather_from_sequence_parallel_region.forward(self.group, kept, layout)  # {d: (.., S, n)}
            saved: Dict[str, Any] = {"sequence": (kept, layout)}
        else:
            x = self._check_features(x, self.n_in, "ColumnParallelLinear input")
            inputs = copy_to_region.forward(self.group, x, self.dtype)  # {d: (..., n_in)}
            saved = {"inputs": inputs}
        if self.bias is None:
            blocks = self.group.on_devices(matmul, inputs, self.weight.blocks)  # {d: (..., n_d)}
        else:
            blocks = self.group.on_devices(matmul_bias, inputs, self.weight.blocks, self.bias.blocks)
        self._keep({**saved, "out_shape": tuple(x.shape[:-1]) + (self.n_out,)})
        if self.config.gather_output:
            return gather_from_region.forward(self.group, blocks, self.layout)
        return ShardedTensor.from_blocks(blocks, -1, self.layout, self.backend, self.comm)

    def _sequence_layout(self, x: ShardedTensor) -> BlockLayout:
        """The sequence layout of a sequence-split input ``x`` ``(..., S, n_in)``, checked (ShapeError)."""
        real = np.dtype(x.dtype).kind in "iuf"
        if x.ndim < 2 or x.shape[-1] != self.n_in or x.axis != x.ndim - 2 or not real:
            raise ShapeError(
                f"ColumnParallelLinear takes a ShardedTensor input split along the sequence: shape "
                f"(..., S, {self.n_in}) of real numbers split on axis -2; got {x!r}"
            )
        return sequence_layout(self.group, x.shape[-2])

    def backward(self, grad_output: Any) -> Any:
        """Accumulate ``dA_i``, ``db_i`` and return ``dX`` ``(..., n_in)`` on the output device.

        ``grad_output`` is ``dY``: a dense ``(..., n_out)`` array, or a
        ShardedTensor split like the forward output when ``gather_output=False``.
        After a sequence-split input, ``dX = sum_i dY_i A_i^T`` is reduce-scattered
        into a ShardedTensor split like that input.
        """
        saved = self._take_saved()
        if isinstance(grad_output, ShardedTensor):
            grads = grad_output.blocks_for(
                self.layout, self.dtype, saved["out_shape"], "ColumnParallelLinear grad_output"
            )
        else:
            grad = self._check_grad_shape(grad_output, saved["out_shape"], "ColumnParallelLinear")
            grads = gather_from_region.backward(self.group, grad, self.layout, self.dtype)
        if "sequence" in saved:
            kept, layout = saved["sequence"]  # the input's slices again, whole: {d: (..., S, n_in)}
            inputs = gather_from_sequence_parallel_region.forward(self.group, kept, layout)
        else:
            inputs = saved["inputs"]
        self.weight.accumulate_blocks(self.group.on_devices(weight_grad, inputs, grads))
        if self.bias is not None:
            self.bias.accumulate_blocks(self.group.on_devices(bias_grad, grads))  # {d: (n_d,)}
        partials = self.group.on_devices(matmul_transposed, grads, self.weight.blocks)  # {d: (..., n_in)}
        if "sequence" in saved:
            blocks = gather_from_sequence_parallel_region.backward(self.group, partials, layout)
            return ShardedTensor.from_blocks(blocks, SEQUENCE_AXIS, layout, self.backend, self.comm)
        return copy_to_region.backward(self.group, partials)


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
    ) -> None:
        super().__init__(n_in, n_out, config, seed, unit, pad_to_multiple_of, bias)
        self.input_is_parallel = bool(input_is_parallel)
        self.layout = self.group.split(self.n_in, self.unit, "n_in", self.pad_to_multiple_of)
        self._add_parameter("weight", xavier_uniform(self.n_in, self.n_out, self.seed), self.layout, axis=0)
        self._add_bias()  # whole, on the output device

    def _input_blocks(self, x: Any) -> Blocks:
        """Each device's block of ``X``: a dense ``x`` is split, a ShardedTensor is used as it lies."""
        if isinstance(x, ShardedTensor):
            return x.blocks_for(self.layout, self.dtype, None, "RowParallelLinear input")
        if self.input_is_parallel:
            raise ShapeError(
                f"RowParallelLinear(input_is_parallel=True) expects a ShardedTensor input, got "
                f"{type(x).__name__}"
            )
        x = self._check_features(x, self.n_in, "RowParallelLinear input")
        return scatter_to_region.forward(self.group, x, self.layout, self.dtype)

    def forward(self, x: Union[Any, ShardedTensor]) -> Any:
        """``Y = sum_i X_i A_i + b`` for ``x`` of shape ``(..., n_in)``.

        ``x`` may be an array, split here so that each device receives only its
        workers' columns, or a ShardedTensor split on its last axis like this
        layer's input (the output of a ``ColumnParallelLinear(gather_output=False)``),
        used without re-splitting. Workers sharing a device run one GEMM
        together. Returns ``(..., n_out)`` on the output device, or with
        ``config.sequence_parallel`` a ShardedTensor ``(..., S, n_out)`` split
        along the sequence.
        """
        inputs = self._input_blocks(x)  # {d: (..., n_in_d)}
        partials = self.group.on_devices(matmul, inputs, self.weight.blocks)  # {d: (..., n_out)}
        if self.config.sequence_parallel:
            return self._reduce_scatter(partials, inputs, isinstance(x, ShardedTensor))
        y = reduce_from_region.forward(self.group, partials)  # (..., n_out), a new array
        if self.bias is not None:
            y = self.group.on_device(
                self.output_device, add_in_place, y, self.bias.blocks[self.output_device]
            )
        self._keep(
            {"inputs": inputs, "sharded_input": isinstance(x, ShardedTensor), "out_shape": tuple(y.shape)}
        )
        return y

    def _reduce_scatter(self, partials: Blocks, inputs: Blocks, sharded_input: bool) -> ShardedTensor:
        """``Y[S_d] = sum_i (X_i A_i)[S_d] + b`` on each device ``d``: the sequence-parallel output."""
        out_shape = tuple(next(iter(partials.values())).shape)  # (..., S, n_out)
        if len(out_shape) < 2:
            raise ShapeError(
                f"RowParallelLinear with sequence_parallel needs an input of shape (..., S, {self.n_in}) "
                f"with a sequence axis, got {out_shape[:-1] + (self.n_in,)}"
            )
        layout = sequence_layout(self.group, out_shape[-2])
        blocks = reduce_scatter_to_sequence_parallel_region.forward(self.group, partials, layout)
        if self.bias is not None:
            biases = copy_to_region.forward(self.group, self.bias.blocks[self.output_device], self.dtype)
            blocks = self.group.on_devices(
                add_in_place, blocks, biases, keys=blocks
            )  # {d: (..., S_d, n_out)}
        self._keep(
            {"inputs": inputs, "sharded_input": sharded_input, "out_shape": out_shape, "sequence": layout}
        )
        return ShardedTensor.from_blocks(blocks, SEQUENCE_AXIS, layout, self.backend, self.comm)

    def backward(self, grad_output: Any) -> Union[Any, ShardedTensor]:
        """Accumulate ``dA_i``, ``db`` and return ``dX``.

        ``grad_output`` is ``dY``, ``(..., n_out)``. ``dX`` is a ShardedTensor
        (shard i ``(..., n_i)`` on worker i's device) when the forward input
        was one, else a gathered ``(..., n_in)`` array on the output device.
        """
        saved = self._take_saved()
        out = self.output_device
        if isinstance(grad_output, ShardedTensor) and saved.get("sequence") is not None:
            layout = saved["sequence"]
            grads = grad_output.blocks_for(
                layout, self.dtype, saved["out_shape"], "RowParallelLinear grad_output", SEQUENCE_AXIS
            )  # {d: (..., S_d, n_out)}
            copies = reduce_scatter_to_sequence_parallel_region.backward(self.group, grads, layout)
            if self.bias is not None:
                db = copy_to_region.backward(self.group, self.group.on_devices(bias_grad, grads))  # sum_d
                self.bias.accumulate(out, db)
        else:
            grad = self._check_grad_shape(grad_output, saved["out_shape"], "RowParallelLinear")
            copies = reduce_from_region.backward(self.group, grad, self.dtype, also=[out])  # {d: (.., n_out)}
            if self.bias is not None:
                self.bias.accumulate(out, self.group.on_device(out, bias_grad, copies[out]))
        inputs = saved["inputs"]
        self.weight.accumulate_blocks(self.group.on_devices(weight_grad, inputs, copies))
        grad_inputs = self.group.on_devices(matmul_transposed, copies, self.weight.blocks, keys=inputs)
        if saved["sharded_input"]:
            return ShardedTensor.from_blocks(grad_inputs, -1, self.layout, self.backend, self.comm)
        return scatter_to_region.backward(self.group, grad_inputs, self.layout)
