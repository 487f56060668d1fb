"""ParallelTransformerLayer: self-attention and MLP blocks, each with a residual and a LayerNorm."""

from __future__ import annotations

from typing import Any, Optional

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError
from .attention import ParallelSelfAttention
from .base import ParallelModule, check_seed
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
    the output device, where both blocks' outputs land.

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

    def forward(self, x: Any, attention_mask: Any = None) -> Any:
        """``y`` ``(B, S, H)`` on the output device for ``x`` ``(B, S, H)``; ``attention_mask`` as
        :meth:`ParallelSelfAttention.forward` takes it. Everything is checked before anything changes."""
        x = self.attention.check_input(x)
        self.attention.check_mask(attention_mask, x.shape[0], x.shape[1])
        out = self.output_device
        (x,) = collectives.to_devices(self.backend, [x], [out], self.dtype)  # (B, S, H) on the output device
        self._keep({"shape": tuple(x.shape)})
        if self.pre_norm:
            h = self.group.on_device(out, add, x, self.attention(self.attention_norm(x), attention_mask))
            return self.group.on_device(out, add, h, self.mlp(self.mlp_norm(h)))
        h = self.attention_norm(self.group.on_device(out, add, x, self.attention(x, attention_mask)))
        return self.mlp_norm(self.group.on_device(out, add, h, self.mlp(h)))

    def backward(self, grad_output: Any) -> Any:
        """Accumulate every gradient and return ``dX`` ``(B, S, H)`` on the output device."""
        if self._saved is None:
            self._take_saved()  # raises: no forward in training mode
        grad = self._check_grad_shape(grad_output, self._saved["shape"], "ParallelTransformerLayer")
        self._take_saved()  # only once the gradient is known to fit
        out = self.output_device
        (dy,) = collectives.to_devices(self.backend, [grad], [out], self.dtype)  # (B, S, H)
        if self.pre_norm:
            dh = self.group.on_device(out, add, dy, self.mlp_norm.backward(self.mlp.backward(dy)))
            dx = self.attention_norm.backward(self.attention.backward(dh))
            return self.group.on_device(out, add, dh, dx)
        dz = self.mlp_norm.backward(dy)
        dh = self.attention_norm.backward(self.group.on_device(out, add, dz, self.mlp.backward(dz)))
        return self.group.on_device(out, add, dh, self.attention.backward(dh))

    def extra_repr(self) -> str:
        return f"pre_norm={self.pre_norm}"
