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

from typing import Any, cast

from ..errors import ConfigError
from ..module import Module
from ..parameter import ShardedParameter
from ..regions import (
    SEQUENCE_AXIS,
    copy_to_region,
    gather_from_sequence_parallel_region,
    sequence_layout,
)
from ..sharded import ShardedTensor
from .embedding import ParallelEmbedding
from .gemm import matmul, weight_grad

__all__ = ["TiedLMHead"]


def _logits(x: Any, table: Any) -> Any:
    """``x @ table^T``: (..., H) @ (H, V_d) -> (..., V_d)."""
    return matmul(x, table.T)


def _table_grad(grad: Any, x: Any) -> Any:
    """``dZ^T @ x``: (V_d, N) @ (N, H) -> (V_d, H)."""
    return weight_grad(grad, x)


class TiedLMHead(Module):
    """``Z = X E^T`` with the embedding's table ``E``; returns the logits split on the vocabulary.

    Backward accumulates ``dE_i += dZ_i^T X`` into the shared table and
    returns ``dX = sum_i dZ_i E_i``, reduced onto the output device (one
    reduction, as the column-parallel layer it replaces).

    An input split along the sequence (sequence parallelism: a ShardedTensor
    ``(..., S, H)`` split on axis -2) is all-gathered first, as
    :class:`~tp_gpu.ColumnParallelLinear` does, and ``dX`` is reduce-scattered
    back into such a tensor.
    """

    def __init__(self, embedding: ParallelEmbedding) -> None:
        super().__init__()
        if not isinstance(embedding, ParallelEmbedding):
            raise ConfigError(f"TiedLMHead ties a ParallelEmbedding, got {type(embedding).__name__}")
        self.embedding_layout = embedding.layout
        self.group = embedding.group
        self.dtype = embedding.dtype
        # The same ShardedParameter: one tensor, gradients summed. ParallelEmbedding registers
        # ``weight`` through ``_add_parameter`` and does not declare it, hence the cast.
        self.weight: ShardedParameter = cast(Any, embedding).weight

    def forward(self, x: Any) -> ShardedTensor:
        """Logits ``(..., V)`` as a ShardedTensor split like the embedding's table, for ``x`` ``(..., H)``."""
        if isinstance(x, ShardedTensor):  # split along the sequence: all-gathered, the slices kept
            layout = sequence_layout(self.group, x.shape[-2])
            kept = x.blocks_for(layout, self.dtype, None, "TiedLMHead input", SEQUENCE_AXIS)  # (..., S_d, H)
            inputs = gather_from_sequence_parallel_region.forward(self.group, kept, layout)  # (..., S, H)
            self._keep({"sequence": (kept, layout)})
        else:
            inputs = copy_to_region.forward(self.group, x, self.dtype)  # {d: (..., H)}
            self._keep({"inputs": inputs})
        blocks = self.group.on_devices(_logits, inputs, self.weight.blocks)  # {d: (..., V_d)}
        backend, comm = self.group.backend, self.group.comm
        return ShardedTensor.from_blocks(blocks, -1, self.embedding_layout, backend, comm)

    def backward(self, grad_output: ShardedTensor) -> Any:
        """Accumulate ``dE`` and return ``dX`` ``(..., H)`` on the output device."""
        saved = self._take_saved()
        grads = grad_output.blocks_for(self.embedding_layout, self.dtype, None, "TiedLMHead grad_output")
        if "sequence" in saved:
            kept, layout = saved["sequence"]  # the input's slices, whole again: {d: (..., S, H)}
            inputs = gather_from_sequence_parallel_region.forward(self.group, kept, layout)
        else:
            inputs = saved["inputs"]
        self.weight.accumulate_blocks(self.group.on_devices(_table_grad, grads, inputs))
        partials = self.group.on_devices(matmul, grads, self.weight.blocks)  # (..., V_d) @ (V_d, H)
        if "sequence" in saved:
            blocks = gather_from_sequence_parallel_region.backward(self.group, partials, layout)
            backend, comm = self.group.backend, self.group.comm
            return ShardedTensor.from_blocks(blocks, SEQUENCE_AXIS, layout, backend, comm)
        return copy_to_region.backward(self.group, partials)
