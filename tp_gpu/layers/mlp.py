"""ParallelMLP: a column-parallel and a row-parallel linear, chained without communication."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ..config import TensorParallelConfig
from ..errors import ShapeError
from ..parameter import ShardedParameter
from ..sharded import ShardedTensor
from .activations import get_activation
from .base import HasParameters, as_array_like, check_seed, commit_state, stage_state
from .linear import ColumnParallelLinear, RowParallelLinear, _dense_weight, _linear_dense_state

__all__ = ["ParallelMLP"]


class ParallelMLP(HasParameters):
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
        Feature sizes; ``config.n_workers`` must divide ``hidden``.
    config : TensorParallelConfig, optional
        Shared by both layers (``gather_output`` is forced off for ``fc1``).
    seed : int
        ``fc1`` is seeded with ``seed`` and ``fc2`` with ``seed + 1``.
    activation : {"gelu", "relu", None}
        ``"gelu"`` is the tanh approximation used by GPT-2 and Megatron.
    """

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        seed: int = 0,
        activation: Optional[str] = "gelu",
    ) -> None:
        self.activation = get_activation(activation)
        seed = check_seed(seed)
        config = TensorParallelConfig() if config is None else config
        column_config = dataclasses.replace(config, gather_output=False) if isinstance(config, TensorParallelConfig) else config
        self.fc1 = ColumnParallelLinear(n_in, hidden, column_config, seed=seed)
        self.fc2 = RowParallelLinear(hidden, n_out, config, seed=seed + 1, input_is_parallel=True)
        self.config = self.fc2.config
        self._hidden: Optional[ShardedTensor] = None

    @classmethod
    def from_dense(
        cls,
        fc1_weight: Any,
        fc1_bias: Any,
        fc2_weight: Any,
        fc2_bias: Any,
        config: Optional[TensorParallelConfig] = None,
        layout: str = "in_out",
        activation: Optional[str] = "gelu",
    ) -> "ParallelMLP":
        """An MLP holding the dense weights of its two linears, split over ``config``'s workers.

        ``fc1_weight`` is ``(n_in, hidden)`` and ``fc2_weight`` ``(hidden, n_out)``
        for ``layout="in_out"``; with ``layout="out_in"`` both are in PyTorch
        ``nn.Linear``'s layout, so ``nn.Sequential(Linear, GELU("tanh"), Linear)``
        loads from its state dict. A ``None`` bias is zero. See :meth:`load_dense`.
        """
        fc1_weight = as_array_like(fc1_weight, "ParallelMLP.from_dense fc1_weight")
        fc2_weight = as_array_like(fc2_weight, "ParallelMLP.from_dense fc2_weight")
        n_in, hidden = _dense_weight(fc1_weight, layout, "ParallelMLP.from_dense fc1_weight").shape
        hidden2, n_out = _dense_weight(fc2_weight, layout, "ParallelMLP.from_dense fc2_weight").shape
        if hidden2 != hidden:
            raise ShapeError(
                f"ParallelMLP.from_dense: fc1_weight has {hidden} outputs but fc2_weight has {hidden2} inputs; "
                f"expected equal (layout={layout!r})"
            )
        mlp = cls(n_in, hidden, n_out, config, activation=activation)
        mlp.load_dense(fc1_weight, fc1_bias, fc2_weight, fc2_bias, layout)
        return mlp

    def load_dense(self, fc1_weight: Any, fc1_bias: Any, fc2_weight: Any, fc2_bias: Any, layout: str = "in_out") -> None:
        """Overwrite both linears, in place, from dense arrays (see ``ColumnParallelLinear.load_dense``).

        Every array is checked before either layer changes.
        """
        state = {}
        for prefix, layer, weight, bias in (("fc1", self.fc1, fc1_weight, fc1_bias), ("fc2", self.fc2, fc2_weight, fc2_bias)):
            for name, value in _linear_dense_state(layer, weight, bias, layout, f"ParallelMLP {prefix}").items():
                state[f"{prefix}.{name}"] = value
        commit_state(stage_state(self.named_parameters(), state, "ParallelMLP.load_dense"))

    @property
    def training(self) -> bool:
        return self.fc1.training

    @property
    def n_workers(self) -> int:
        return self.config.n_workers

    @property
    def backend(self):
        return self.fc2.backend

    def children(self) -> Dict[str, Any]:
        """The sub-layers by name."""
        return {"fc1": self.fc1, "fc2": self.fc2}

    def forward(self, x: Any) -> Any:
        """``Y`` of shape ``(..., n_out)`` on the output device, for ``x`` of shape ``(..., n_in)``."""
        hidden = self.fc1(x)  # p shards of (..., hidden / p)
        self._hidden = hidden if self.training else None
        xp = self.backend.xp
        activated = hidden.map(lambda h: self.activation.forward(xp, h))
        return self.fc2(activated)

    __call__ = forward

    def backward(self, grad_output: Any) -> Any:
        """Accumulate every gradient and return ``dX`` ``(..., n_in)`` on the output device."""
        grad_activated = self.fc2.backward(grad_output)  # ShardedTensor like the hidden layer
        hidden = self._hidden  # set by forward: fc2.backward has already refused a missing forward
        xp = self.backend.xp
        grads = []
        for h, g, device in zip(hidden.shards, grad_activated.shards, hidden.devices):
            with self.backend.device(device):
                grads.append(self.activation.grad(xp, h, g))  # dH_i = dA_i * act'(H_i)
        return self.fc1.backward(ShardedTensor(grads, hidden.axis, hidden.devices, self.backend, hidden.comm))

    def named_parameters(self) -> List[Tuple[str, ShardedParameter]]:
        """``("fc1.weight", param)``, ... in order."""
        return [(f"{prefix}.{p.name}", p) for prefix, layer in self.children().items() for p in layer.parameters()]

    def train(self, mode: bool = True) -> "ParallelMLP":
        for layer in self.children().values():
            layer.train(mode)
        if not mode:
            self._hidden = None
        return self

    def eval(self) -> "ParallelMLP":
        return self.train(False)

    def __repr__(self) -> str:
        return f"ParallelMLP(fc1={self.fc1!r}, activation={self.activation.name!r}, fc2={self.fc2!r})"
