"""Tensor-parallel layers."""

from .embedding import ParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding"]
