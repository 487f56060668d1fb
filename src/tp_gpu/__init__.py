"""tp_gpu: Megatron-style tensor-parallel layers on CUDA GPUs (CuPy) or NumPy.

Importing tp_gpu never imports CuPy; the backend is chosen when a layer is built.
"""

from .autograd import Function, FunctionContext, enable_grad, is_grad_enabled, no_grad
from .backends import get_backend
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .checkpoint_background import SaveHandle
from .comm import get_communicator
from .config import TensorParallelConfig
from .errors import *  # noqa: F403  (every exception, as listed in errors.__all__)
from .errors import __all__ as _error_names
from .grad_scaler import GradScaler
from .group import TensorParallelGroup, get_group
from .host import to_numpy
from .layers import (
    BertEmbeddings,
    ColumnParallelLinear,
    DecoderAttention,
    Dropout,
    GatedMLP,
    LayerNorm,
    ParallelEmbedding,
    ParallelMLP,
    ParallelSelfAttention,
    ParallelTransformerLayer,
    ReplicatedLinear,
    Residual,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TiedLMHead,
    VocabParallelCrossEntropy,
    apply_rotary,
)
from .module import IncompatibleKeys, Module, ModuleDict, Sequential
from .optim import SGD, Adam, Optimizer, clip_grad_norm
from .parameter import ShardedParameter
from .placement import worker_devices
from .placements import Dense, Partial, Replicated, Split
from .shape_ops import cat
from .sharded import ShardedTensor
from .tensor import Tensor, tensor
from .torch_interop import from_torch

__version__ = "0.1.0"

__all__ = [
    "Tensor",
    "tensor",
    "cat",
    "Dense",
    "Replicated",
    "Split",
    "Partial",
    "Function",
    "FunctionContext",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "TensorParallelConfig",
    "TensorParallelGroup",
    "get_group",
    "Module",
    "Sequential",
    "ModuleDict",
    "IncompatibleKeys",
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ParallelEmbedding",
    "ParallelMLP",
    "Residual",
    "TiedLMHead",
    "VocabParallelCrossEntropy",
    "LayerNorm",
    "ParallelSelfAttention",
    "ParallelTransformerLayer",
    "BertEmbeddings",
    "ReplicatedLinear",
    "RMSNorm",
    "GatedMLP",
    "RotaryEmbedding",
    "apply_rotary",
    "DecoderAttention",
    "ShardedTensor",
    "ShardedParameter",
    "SGD",
    "Adam",
    "Optimizer",
    "clip_grad_norm",
    "GradScaler",
    "Dropout",
    *_error_names,
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "SaveHandle",
    "from_torch",
    "to_numpy",
    "get_backend",
    "get_communicator",
    "worker_devices",
    "__version__",
]
