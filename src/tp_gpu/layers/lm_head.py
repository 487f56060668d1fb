"""TiedLMHead: the output projection that shares the vocab-parallel embedding's table (GPT-2, BERT).

With the table ``E`` of shape ``(V, H)`` split by vocabulary rows as
``E = [E_1; ...; E_p]``, the logits are ``Z = X E^T``: worker ``i`` computes
``Z_i = X E_i^T``, its vocabulary slice, so the logits come out split on the
vocabulary exactly as :class:`~tp_gpu.VocabParallelCrossEntropy` takes them.
The head holds no weight of its own: its ``weight`` *is* the embedding's
:class:`~tp_gpu.ShardedParameter`, so a state dict holds one tensor and its
gradient is the sum of both uses (``dE = dE_lookup + dZ^T X``).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, cast

import numpy as np

from ..autograd import Context, Function
from ..errors import ConfigError, ShapeError
from ..module import Module
from ..parameter import ShardedParameter
from ..placements import Partial, Split
from ..regions import replicate
from ..reused_buffers import ReusedBuffers, gemm_output
from ..tensor import Tensor, new_tensor
from .embedding import ParallelEmbedding
from .gemm import matmul, weight_grad

__all__ = ["TiedLMHead", "TiedLogits"]


class _TiedContext(Context):
    __slots__ = ("weight",)
    weight: ShardedParameter


class TiedLogits(Function):
    """``Z_d = X E_d^T`` for ``X`` whole on every device and the table's row blocks ``E_d``: a
    ``Split(-1)`` ``Z`` laid out like the table. Backward: ``dE_d = dZ_d^T X`` and the ``Partial``
    ``dX_d = dZ_d E_d`` (the region before the head sums or reduce-scatters it)."""

    ctx_class = _TiedContext

    @staticmethod
    def forward(
        ctx: _TiedContext, x: Tensor, weight: ShardedParameter, outputs: Optional[ReusedBuffers] = None
    ) -> Tensor:
        backend, layout = weight.backend, weight.layout
        assert backend is not None and layout is not None
        blocks = {}
        for d, table in weight.blocks.items():
            with backend.device(d):
                out = gemm_output(outputs, backend, d, x.blocks[d], table.T)
                blocks[d] = matmul(x.blocks[d], table.T, out)  # (..., H) @ (H, V_d) -> (..., V_d)
        if ctx.needs_input_grad:
            ctx.save_for_backward(x)
            ctx.weight = weight
        shape = x.shape[:-1] + (weight.shape[0],)
        return new_tensor(blocks, Split(x.ndim - 1, layout), shape, weight.dtype, backend, weight.comm)

    @staticmethod
    def backward(ctx: _TiedContext, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None]:
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        backend = weight.backend
        assert backend is not None
        needs = ctx.needs_input_grad
        dw, dx = {}, {}
        for d, table in weight.blocks.items():
            g = grad.blocks[d]  # dZ_d, (..., V_d)
            with backend.device(d):
                if needs[1]:
                    dw[d] = weight_grad(g, x.blocks[d])  # (..., V_d)^T (..., H) -> (V_d, H)
                if needs[0]:
                    dx[d] = matmul(g, table)  # (..., V_d) @ (V_d, H) -> (..., H)
        grad_x = new_tensor(dx, Partial(tuple(dx)), x.shape, grad.dtype, backend, grad.comm) if dx else None
        grad_w = (
            new_tensor(dw, weight.placement, weight.shape, weight.dtype, backend, weight.comm) if dw else None
        )
        return grad_x, grad_w, None  # dX, dE; outputs


class TiedLMHead(Module):
    """``Z = X E^T`` with the embedding's table ``E``; returns the logits split on the vocabulary.

    Backward (on the tape, :class:`TiedLogits`) accumulates ``dE_i += dZ_i^T X``
    into the shared table, on top of the lookup's gradient, and gives
    ``dX = sum_i dZ_i E_i`` reduced onto the output device (one reduction, as
    the column-parallel layer it replaces).

    An input split along the sequence (sequence parallelism: a ShardedTensor
    ``(..., S, H)`` split on axis -2) is all-gathered first, as
    :class:`~tp_gpu.ColumnParallelLinear` does (only its slices are kept for
    backward), and ``dX`` is reduce-scattered back into such a tensor.
    """

    def __init__(self, embedding: ParallelEmbedding) -> None:
        super().__init__()
        if not isinstance(embedding, ParallelEmbedding):
            raise ConfigError(f"TiedLMHead ties a ParallelEmbedding, got {type(embedding).__name__}")
        self.embedding_layout = embedding.layout
        self._group = embedding.group
        self.dtype = embedding.dtype
        # The same ShardedParameter: one tensor, gradients summed. ParallelEmbedding registers
        # ``weight`` through ``_add_parameter`` and does not declare it, hence the cast.
        self.weight: ShardedParameter = cast(Any, embedding).weight
        #: Where logits of at least 32 MiB on the host are written, kept between calls and reused
        #: while nothing holds the last ones (:mod:`tp_gpu.reused_buffers`). ``None`` allocates.
        self.output_buffers: Optional[ReusedBuffers] = ReusedBuffers()

    def forward(self, x: Any) -> Tensor:
        """Logits ``(..., V)`` as a ShardedTensor split like the embedding's table, for ``x`` ``(..., H)``."""
        hidden = self.weight.shape[1]
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        if not shape or shape[-1] != hidden:
            raise ShapeError(f"TiedLMHead input must have shape (..., {hidden}), got {shape}")
        x = replicate(x, self.group, self.dtype, "TiedLMHead input")  # (..., H) on every device
        return TiedLogits.apply(x, self.weight, self.output_buffers)  # device d: (..., V_d)
