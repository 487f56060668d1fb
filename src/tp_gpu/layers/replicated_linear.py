"""A linear layer held whole on every device: ``Y = X A + b`` computed by each (vLLM's ``ReplicatedLinear``).

For a projection too small to split that every device needs whole: the key
and value projections of grouped-query attention when there are fewer
key-value heads than workers (:mod:`.head_plan`). ``A`` and ``b`` are
``Replicated`` parameters, one copy per device, so no step copies them; each
copy's gradient is a ``Partial`` part, summed over the devices into every
copy (:meth:`~tp_gpu.parameter.ShardedParameter.accumulate_grad`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..config import TensorParallelConfig
from ..initializers import xavier_uniform
from ..regions import replicate
from ..tensor import Tensor
from .linear import _ParallelLinear
from .linear_functions import ReplicatedLinearFunction

__all__ = ["ReplicatedLinear"]


class ReplicatedLinear(_ParallelLinear):
    """``Y = X A + b`` with ``A`` ``(n_in, n_out)`` and ``b`` whole on every device; ``Y`` Replicated.

    ``X`` reaches each device once (:func:`~tp_gpu.regions.replicate`); backward
    sums ``dX = sum_d dY_d A^T`` there. Parameters as :class:`ColumnParallelLinear`'s
    (Xavier-uniform ``A`` seeded by ``seed``, zero ``b``, ``bias=False`` for none).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__(n_in, n_out, config, seed, 1, None, bias)
        self._add_parameter("weight", xavier_uniform(self.n_in, self.n_out, self.seed), replicate=True)
        if self.has_bias:
            self._add_parameter("bias", np.zeros(self.n_out), replicate=True)
        else:
            self.bias = None

    @property
    def partition(self) -> list:
        """Every worker holds the whole output: ``[(0, n_out)]``."""
        return [(0, self.n_out)]

    def forward(self, x: Any) -> Tensor:
        """``Y = X A + b`` ``(..., n_out)`` on every device (Replicated), for ``x`` ``(..., n_in)``."""
        x = self._check_features(x, self.n_in, "ReplicatedLinear input")
        x = replicate(x, self.group, self.dtype, "ReplicatedLinear input")  # (..., n_in) on every device
        return ReplicatedLinearFunction.apply(x, self.weight, self.bias)  # (..., n_out) on every device
