"""ParallelTransformerLayer: self-attention and MLP blocks, each with a residual and a LayerNorm."""

from __future__ import annotations

from typing import Any, Optional

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError
from ..regions import scatter_to_sequence_parallel_region
from ..tensor import Tensor
from .attention import ParallelSelfAttention
from .base import ParallelModule, check_seed
from .dropout import Dropout
from .mlp import ParallelMLP
from .norm import LayerNorm, check_eps

__all__ = ["ParallelTransformerLayer"]


class ParallelTransformerLayer(ParallelModule):
    """One transformer block with tensor-parallel attention and MLP (Vaswani et al., 2017; Megatron-LM).

    Post-norm (BERT, ``pre_norm=False``)::

        h = attention_norm(x + attention(x))
        y = mlp_norm(h + mlp(h))

    Pre-norm (GPT, ``pre_norm=True``)::

        h = x + attention(attention_norm(x))
        y = h + mlp(mlp_norm(h))

    ``attention`` is a :class:`ParallelSelfAttention` and ``mlp`` a
    :class:`ParallelMLP` ``(hidden -> intermediate -> hidden)``: each costs one
    reduction forward and one backward. The residuals and LayerNorms run on
    the output device, where both blocks' outputs land; the tape replays the
    whole block backward (the two paths of each residual summed). With ``dropout > 0``,
    ``attention(.)`` and ``mlp(.)`` above stand for ``dropout1(attention(.))``
    and ``dropout2(mlp(.))`` (PyTorch's ``nn.TransformerEncoderLayer`` names;
    Megatron's hidden dropout), applied before each residual add.

    Sequence parallelism (``config.sequence_parallel``, Korthikanti et al.,
    2022): between the two blocks the activations are a
    :class:`~tp_gpu.ShardedTensor` split along the sequence (axis 1), one
    slice per worker, and the LayerNorms, dropouts and residual adds run on
    each device's slices. ``qkv`` and ``fc1`` all-gather the sequence before
    their GEMMs, ``out`` and ``fc2`` reduce-scatter their outputs into slices:
    an all-gather plus a reduce-scatter per block instead of a reduction and
    a copy, and ``1/p`` of the activations per worker. The layer takes a
    sequence-split ShardedTensor (or a dense ``x``, split on entry) and
    returns one; the result equals the layer without sequence parallelism.

    Hugging Face names (a ``BertLayer``, ``encoder.layer.{i}.`` stripped):

    ========================================  =====================================================
    Hugging Face ``BertLayer``                tp_gpu
    ========================================  =====================================================
    ``attention.self.query/key/value``        ``attention.qkv``, fused
                                              (``attention.load_qkv(..., layout="out_in")``)
    ``attention.output.dense``                ``attention.out`` (weight transposed)
    ``attention.output.LayerNorm``            ``attention_norm``
    ``intermediate.dense``                    ``mlp.fc1`` (weight transposed)
    ``output.dense``                          ``mlp.fc2`` (weight transposed)
    ``output.LayerNorm``                      ``mlp_norm``
    ========================================  =====================================================

    With ``pre_norm`` (GPT-2's ``ln_1`` / ``ln_2``), ``attention_norm`` is the
    norm before the attention and ``mlp_norm`` the one before the MLP.

    Parameters
    ----------
    hidden, n_heads, intermediate : int
        Model width, number of heads (dividing ``hidden``) and MLP width.
    config : TensorParallelConfig, optional
        Shared by every submodule.
    seed : int
        ``attention`` is seeded with ``seed`` (and ``seed + 1``), ``mlp`` with
        ``seed + 2`` (and ``seed + 3``).
    pre_norm : bool
        GPT-style pre-norm instead of BERT's post-norm.
    activation : {"gelu", "gelu_tanh", "relu", None}
        The MLP's; ``"gelu"`` is the exact erf form of BERT and PyTorch.
    eps : float
        Of both LayerNorms (BERT's 1e-12 by default).
    causal : bool
        Causal self-attention (decoders).
    dropout : float in [0, 1)
        Of ``dropout1`` (seeded ``seed + 4``) and ``dropout2`` (``seed + 5``),
        which exist only when it is above 0. Layers with seeds 6 apart draw
        unrelated masks.
    """

    def __init__(
        self,
        hidden: int,
        n_heads: int,
        intermediate: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        pre_norm: bool = False,
        activation: Optional[str] = "gelu",
        eps: float = 1e-12,
        causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(config)
        hidden = check_positive_int(hidden, "hidden")
        n_heads = check_positive_int(n_heads, "n_heads")
        intermediate = check_positive_int(intermediate, "intermediate")
        seed = check_seed(seed)
        eps = check_eps(eps)
        if not isinstance(pre_norm, bool):
            raise ConfigError(f"pre_norm must be True or False, got {pre_norm!r}")
        self.pre_norm = pre_norm
        self.hidden = hidden
        self._join_group(
            hidden=hidden, n_heads=n_heads, intermediate=intermediate, seed=seed, pre_norm=pre_norm
        )
        config = self.config
        self.attention = ParallelSelfAttention(hidden, n_heads, config, seed=seed, causal=causal)
        self.attention_norm = LayerNorm(hidden, config, eps=eps)
        self.mlp = ParallelMLP(hidden, intermediate, hidden, config, seed=seed + 2, activation=activation)
        self.mlp_norm = LayerNorm(hidden, config, eps=eps)
        self.dropout1: Optional[Dropout] = None
        self.dropout2: Optional[Dropout] = None
        if dropout != 0.0:  # validated by Dropout
            self.dropout1 = Dropout(dropout, config, seed=seed + 4)
            self.dropout2 = Dropout(dropout, config, seed=seed + 5)

    def forward(self, x: Any, attention_mask: Any = None) -> Tensor:
        """``y`` ``(B, S, H)``, a Tensor on the output device, for ``x`` ``(B, S, H)``; ``attention_mask``
        as :meth:`ParallelSelfAttention.forward` takes it. Everything is checked before anything changes.

        With ``config.sequence_parallel``, ``x`` (an array, a Tensor, or a
        ShardedTensor split along the sequence, taken as it is) is split along
        the sequence on entry, and ``y`` is a ShardedTensor split alike.
        """
        x = self.attention.check_input(x)
        self.attention.check_mask(attention_mask, x.shape[0], x.shape[1])
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.group, self.dtype)  # device d: (B, S_d, H)
        if self.pre_norm:
            h = x + self._drop1(self.attention(self.attention_norm(x), attention_mask))
            return h + self._drop2(self.mlp(self.mlp_norm(h)))
        h = self.attention_norm(x + self._drop1(self.attention(x, attention_mask)))
        return self.mlp_norm(h + self._drop2(self.mlp(h)))

    def _drop1(self, y: Tensor) -> Tensor:
        """``dropout1(y)``, or ``y`` without dropout."""
        return y if self.dropout1 is None else self.dropout1(y)

    def _drop2(self, y: Tensor) -> Tensor:
        """``dropout2(y)``, or ``y`` without dropout."""
        return y if self.dropout2 is None else self.dropout2(y)

    def extra_repr(self) -> str:
        sequence = ", sequence_parallel=True" if self.config.sequence_parallel else ""
        return f"pre_norm={self.pre_norm}{sequence}"
