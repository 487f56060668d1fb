"""Tensor-parallel layers, the parallel MLP, attention and transformer layer, and the vocab-parallel loss."""

from .attention import ParallelSelfAttention, fuse_qkv, split_fused_qkv
from .bert_embeddings import BertEmbeddings
from .dropout import Dropout
from .embedding import ParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear
from .lm_head import TiedLMHead
from .loss import VocabParallelCrossEntropy
from .mlp import ParallelMLP
from .norm import LayerNorm
from .residual import Residual
from .transformer import ParallelTransformerLayer

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelEmbedding",
    "ParallelMLP",
    "VocabParallelCrossEntropy",
    "Residual",
    "TiedLMHead",
    "Dropout",
    "LayerNorm",
    "ParallelSelfAttention",
    "ParallelTransformerLayer",
    "BertEmbeddings",
    "fuse_qkv",
    "split_fused_qkv",
]
