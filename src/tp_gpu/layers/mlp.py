"""ParallelMLP: a column-parallel and a row-parallel linear, chained without communication."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, ShapeError
from ..module import Module
from ..tensor import Tensor
from .activations import get_activation
from .base import check_seed
from .linear import ColumnParallelLinear, RowParallelLinear, check_bias_flag, dense_weight
from .linear_loading import is_no_bias

__all__ = ["ParallelMLP"]


class ParallelMLP(Module):
    """``Y = act(X A + a) B + b``, Megatron's transformer MLP.

    ``fc1`` is a :class:`ColumnParallelLinear` (``A = [A_1, ..., A_p]``) with
    ``gather_output=False``; the activation is applied to each shard
    ``H_i = X A_i + a_i`` on its own device; ``fc2`` is a
    :class:`RowParallelLinear` (``B = [B_1; ...; B_p]``) that takes those shards
    as its split input. Forward needs one reduction (in ``fc2``), backward one
    (of ``dX`` in ``fc1``); nothing moves between the two layers.

    Parameters
    ----------
    n_in, hidden, n_out : int
        Feature sizes; ``hidden`` splits over any worker count.
    config : TensorParallelConfig, optional
        Shared by both layers (``gather_output`` is forced off for ``fc1``).
    seed : int
        ``fc1`` is seeded with ``seed`` and ``fc2`` with ``seed + 1``.
    activation : {"gelu", "gelu_tanh", "relu", None}
        ``"gelu"`` is the exact erf form (PyTorch's default), ``"gelu_tanh"``
        the tanh approximation of GPT-2 and Megatron.
    bias : bool
        ``False`` builds both linears without a bias, ``Y = act(X A) B``
        (Megatron's ``add_bias_linear=False``, Llama-style MLPs): no
        ``fc1.bias`` / ``fc2.bias`` parameters.
    """

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        activation: Optional[str] = "gelu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.activation = get_activation(activation)
        bias = check_bias_flag(bias)
        seed = check_seed(seed)
        for value, name in ((n_in, "n_in"), (hidden, "hidden"), (n_out, "n_out")):
            check_positive_int(value, name)  # named as the MLP calls them, before either linear is built
        config = TensorParallelConfig() if config is None else config
        if not isinstance(config, TensorParallelConfig):
            raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
        self.fc1 = ColumnParallelLinear(
            n_in, hidden, dataclasses.replace(config, gather_output=False), seed=seed, bias=bias
        )
        self.fc2 = RowParallelLinear(hidden, n_out, config, seed=seed + 1, input_is_parallel=True, bias=bias)
        self.config = config

    @classmethod
    def from_dense(
        cls,
        fc1_weight: Any,
        fc1_bias: Any,
        fc2_weight: Any,
        fc2_bias: Any,
        config: Optional[TensorParallelConfig] = None,
        *,
        layout: Optional[str] = None,
        activation: Optional[str] = "gelu",
    ) -> ParallelMLP:
        """An MLP holding the dense weights of its two linears, split over ``config``'s workers.

        ``fc1_weight`` is ``(n_in, hidden)`` and ``fc2_weight`` ``(hidden, n_out)``
        for ``layout="in_out"`` (the default for arrays; a ``torch.Tensor`` needs its layout
        given); with ``layout="out_in"`` both are in PyTorch
        ``nn.Linear``'s layout, so ``nn.Sequential(Linear, GELU(), Linear)``
        loads from its state dict. A ``None`` bias is zero; ``False`` for both
        biases builds the MLP with ``bias=False`` (one ``False`` and one bias
        is a ConfigError: the MLP has biases in both linears or in neither).
        See :meth:`load_dense`.
        """
        n_in, hidden = dense_weight(fc1_weight, layout, "ParallelMLP.from_dense fc1_weight").shape
        hidden2, n_out = dense_weight(fc2_weight, layout, "ParallelMLP.from_dense fc2_weight").shape
        if hidden2 != hidden:
            raise ShapeError(
                f"ParallelMLP.from_dense: fc1_weight has {hidden} outputs but fc2_weight has "
                f"{hidden2} inputs; "
                f"expected equal (layout={layout!r})"
            )
        no_bias = [is_no_bias(b) for b in (fc1_bias, fc2_bias)]
        if no_bias[0] != no_bias[1]:
            raise ConfigError(
                f"ParallelMLP.from_dense: fc1_bias is {'False' if no_bias[0] else 'given'} but fc2_bias is "
                f"{'False' if no_bias[1] else 'given'}; expected a bias (or None, zero) for both linears or "
                "False for both (ParallelMLP(bias=False))"
            )
        mlp = cls(n_in, hidden, n_out, config, activation=activation, bias=not no_bias[0])
        mlp.load_dense(fc1_weight, fc1_bias, fc2_weight, fc2_bias, layout=layout)
        return mlp

    def load_dense(
        self, fc1_weight: Any, fc1_bias: Any, fc2_weight: Any, fc2_bias: Any, *, layout: Optional[str] = None
    ) -> None:
        """Overwrite both linears, in place, from dense arrays (see ``ColumnParallelLinear.load_dense``).

        Every array is checked before either layer changes.
        """
        state = {}
        for prefix, weight, bias in (("fc1", fc1_weight, fc1_bias), ("fc2", fc2_weight, fc2_bias)):
            layer = getattr(self, prefix)
            for name, value in layer.dense_state(weight, bias, layout, f"ParallelMLP {prefix}").items():
                state[f"{prefix}.{name}"] = value
        self.load_state_dict(state)

    def forward(self, x: Any) -> Tensor:
        """``Y`` of shape ``(..., n_out)`` on the output device, for ``x`` of shape ``(..., n_in)``."""
        return self.fc2(
            self.activation(self.fc1(x))
        )  # (..., n_in) -> p shards of (..., hidden_i) -> (..., n_out)

    def extra_repr(self) -> str:
        return f"activation={self.activation.name!r}" + ("" if self.fc1.has_bias else ", bias=False")
