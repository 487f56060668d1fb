"""ParallelTransformerLayer: self-attention and MLP blocks, each with a residual and a LayerNorm."""

from __future__ import annotations

from typing import Any, Optional

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError
from ..regions import SEQUENCE_AXIS, scatter_to_sequence_parallel_region, sequence_layout
from ..sharded import ShardedTensor
from .attention import ParallelSelfAttention
from .base import ParallelModule, check_seed
from .dropout import Dropout
from .mlp import ParallelMLP
from .norm import LayerNorm, check_eps

__all__ = ["ParallelTransformerLayer"]


def add(a: Any, b: Any) -> Any:
    """``a + b``, a new array: (..., H) + (..., H)."""
    return a + b


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
    the output device, where both blocks' outputs land. With ``dropout > 0``,
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

    Backward (post-norm): ``dz = mlp_norm.backward(dy)``, ``dh = dz + mlp.backward(dz)``,
    ``dz' = attention_norm.backward(dh)``, ``dx = dz' + attention.backward(dz')``;
    (pre-norm): ``dh = dy + mlp_norm.backward(mlp.backward(dy))``,
    ``dx = dh + attention_norm.backward(attention.backward(dh))``.

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

    def forward(self, x: Any, attention_mask: Any = None) -> Any:
        """``y`` ``(B, S, H)`` on the output device for ``x`` ``(B, S, H)``; ``attention_mask`` as
        :meth:`ParallelSelfAttention.forward` takes it. Everything is checked before anything changes.

        With ``config.sequence_parallel``, ``y`` is a ShardedTensor split along
        the sequence, and ``x`` a dense array (split here) or such a ShardedTensor.
        """
        x = self._enter(x, attention_mask)
        drop1, drop2 = self.dropout1, self.dropout2
        if self.pre_norm:
            h = self._add(x, self._drop(drop1, self.attention(self.attention_norm(x), attention_mask)))
            return self._add(h, self._drop(drop2, self.mlp(self.mlp_norm(h))))
        h = self.attention_norm(self._add(x, self._drop(drop1, self.attention(x, attention_mask))))
        return self.mlp_norm(self._add(h, self._drop(drop2, self.mlp(h))))

    def _enter(self, x: Any, attention_mask: Any) -> Any:
        """``x`` checked (with the mask) and placed: on the output device, or split along the
        sequence over the workers' devices with sequence parallelism."""
        x = self.attention.check_input(x)
        self.attention.check_mask(attention_mask, x.shape[0], x.shape[1])
        if not self.config.sequence_parallel:
            out = self.output_device
            (x,) = collectives.to_devices(self.backend, [x], [out], self.dtype)  # (B, S, H) on the output
            self._keep({"shape": tuple(x.shape)})
            return x
        layout = sequence_layout(self.group, x.shape[1])
        if isinstance(x, ShardedTensor):
            blocks = x.blocks_for(layout, self.dtype, None, "ParallelTransformerLayer input", SEQUENCE_AXIS)
        else:
            blocks = scatter_to_sequence_parallel_region.forward(self.group, x, layout, self.dtype)
        self._keep({"shape": tuple(x.shape), "sequence": (layout, not isinstance(x, ShardedTensor))})
        return ShardedTensor.from_blocks(blocks, SEQUENCE_AXIS, layout, self.backend, self.comm)

    def _add(self, a: Any, b: Any) -> Any:
        """The residual ``a + b``: on the output device, or on each device's slices."""
        if isinstance(a, ShardedTensor):
            blocks = self.group.on_devices(add, a.device_blocks(), b.device_blocks())  # {d: (B, S_d, H)}
            return ShardedTensor.from_blocks(blocks, a.axis, a.layout, self.backend, a.comm)
        return self.group.on_device(self.output_device, add, a, b)

    @staticmethod
    def _drop(dropout: Optional[Dropout], y: Any) -> Any:
        return y if dropout is None else dropout(y)

    @staticmethod
    def _drop_backward(dropout: Optional[Dropout], grad: Any) -> Any:
        return grad if dropout is None else dropout.backward(grad)

    def backward(self, grad_output: Any) -> Any:
        """Accumulate every gradient and return ``dX`` ``(B, S, H)``: on the output device, or with
        sequence parallelism split like the forward input (dense for a dense input)."""
        saved = self._saved if self._saved is not None else self._take_saved()  # raises: no forward
        sequence = saved.get("sequence")
        grad = self._check_grad_shape(
            grad_output, saved["shape"], "ParallelTransformerLayer", sharded=sequence is not None
        )
        self._take_saved()  # only once the gradient is known to fit
        if sequence is None:
            (dy,) = collectives.to_devices(self.backend, [grad], [self.output_device], self.dtype)
        else:
            dy = self._enter_grad(grad, sequence[0])
        drop1, drop2 = self.dropout1, self.dropout2
        if self.pre_norm:
            dh = self._add(dy, self.mlp_norm.backward(self.mlp.backward(self._drop_backward(drop2, dy))))
            dx = self.attention_norm.backward(self.attention.backward(self._drop_backward(drop1, dh)))
            dx = self._add(dh, dx)
        else:
            dz = self.mlp_norm.backward(dy)
            dm = self.mlp.backward(self._drop_backward(drop2, dz))
            dh = self.attention_norm.backward(self._add(dz, dm))
            dx = self._add(dh, self.attention.backward(self._drop_backward(drop1, dh)))
        if sequence is not None and sequence[1]:  # a dense input: its gradient gathered, dense
            return scatter_to_sequence_parallel_region.backward(self.group, dx.device_blocks(), sequence[0])
        return dx

    def _enter_grad(self, grad: Any, layout: Any) -> ShardedTensor:
        """``dY`` split along the sequence like the output: a ShardedTensor's blocks, or ``dY`` split."""
        if isinstance(grad, ShardedTensor):
            what = "ParallelTransformerLayer grad_output"
            blocks = grad.blocks_for(layout, self.dtype, None, what, SEQUENCE_AXIS)
        else:
            blocks = scatter_to_sequence_parallel_region.forward(self.group, grad, layout, self.dtype)
        return ShardedTensor.from_blocks(blocks, SEQUENCE_AXIS, layout, self.backend, self.comm)

    def extra_repr(self) -> str:
        sequence = ", sequence_parallel=True" if self.config.sequence_parallel else ""
        return f"pre_norm={self.pre_norm}{sequence}"
