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

from typing import Any

from ..errors import ConfigError
from ..module import Module
from ..regions import copy_to_region
from ..sharded import ShardedTensor
from .embedding import ParallelEmbedding
from .linear import matmul, weight_grad

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
    """

    def __init__(self, embedding: ParallelEmbedding) -> None:
        super().__init__()
        if not isinstance(embedding, ParallelEmbedding):
            raise ConfigError(f"TiedLMHead ties a ParallelEmbedding, got {type(embedding).__name__}")
        self.embedding_layout = embedding.layout
        self.group = embedding.group
        self.dtype = embedding.dtype
        self.weight = embedding.weight  # the same ShardedParameter: one tensor, gradients summed

    def forward(self, x: Any) -> ShardedTensor:
        """Logits ``(..., V)`` as a ShardedTensor split like the embedding's table, for ``x`` ``(..., H)``."""
        inputs = copy_to_region.forward(self.group, x, self.dtype)  # {d: (..., H)}
        blocks = self.group.on_devices(_logits, inputs, self.weight.blocks)  # {d: (..., V_d)}
        self._keep({"inputs": inputs})
        backend, comm = self.group.backend, self.group.comm
        return ShardedTensor.from_blocks(blocks, -1, self.embedding_layout, backend, comm)

    def backward(self, grad_output: ShardedTensor) -> Any:
        """Accumulate ``dE`` and return ``dX`` ``(..., H)`` on the output device."""
        saved = self._take_saved()
        grads = grad_output.blocks_for(self.embedding_layout, self.dtype, None, "TiedLMHead grad_output")
        self.weight.accumulate_blocks(self.group.on_devices(_table_grad, grads, saved["inputs"]))
        partials = self.group.on_devices(matmul, grads, self.weight.blocks)  # (..., V_d) @ (V_d, H)
        return copy_to_region.backward(self.group, partials)
