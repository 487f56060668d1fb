"""Tensor-parallel layers, the parallel MLPs, attention (multi-head and grouped-query), the transformer layer,
norms, rotary embeddings and the vocab-parallel loss."""

from .attention import ParallelSelfAttention, fuse_qkv, split_fused_qkv
from .bert_embeddings import BertEmbeddings
from .decoder_attention import AttentionStep, DecoderAttention
from .dropout import Dropout
from .embedding import ParallelEmbedding
from .gated_mlp import GatedMLP
from .head_plan import HeadPlan
from .kv_cache import KVCache
from .linear import ColumnParallelLinear, RowParallelLinear
from .lm_head import TiedLMHead
from .loss import VocabParallelCrossEntropy
from .mlp import ParallelMLP
from .norm import LayerNorm
from .replicated_linear import ReplicatedLinear
from .residual import Residual
from .rms_norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
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
    "ReplicatedLinear",
    "RMSNorm",
    "GatedMLP",
    "RotaryEmbedding",
    "apply_rotary",
    "DecoderAttention",
    "AttentionStep",
    "HeadPlan",
    "KVCache",
]
