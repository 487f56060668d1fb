"""Tensor-parallel layers, the parallel MLP and the vocab-parallel loss."""

from .embedding import ParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear
from .loss import VocabParallelCrossEntropy
from .mlp import ParallelMLP

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding", "ParallelMLP", "VocabParallelCrossEntropy"]
