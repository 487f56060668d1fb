"""Optimizers that update every parameter in place, each device block on its own device.

Each takes the parameters of one or more modules (``layer.parameters()``) and
keeps its state (momentum, Adam moments) block by block, beside the block.
Updates follow PyTorch's definitions, so a tensor-parallel model and its dense
twin take the same steps.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Dict, Hashable, Iterable, List, Optional, Tuple

import numpy as np

from . import collectives
from .errors import ConfigError
from .parameter import ShardedParameter

__all__ = ["SGD", "Adam"]


def _check_params(params: Iterable[ShardedParameter]) -> List[ShardedParameter]:
    params = list(params)
    if not params:
        raise ConfigError("the optimizer got no parameters; pass module.parameters()")
    for p in params:
        if not isinstance(p, ShardedParameter):
            raise ConfigError(
                f"optimizer parameters must be ShardedParameter objects, got {type(p).__name__}"
            )
    if len({id(p) for p in params}) != len(params):
        raise ConfigError("a parameter appears more than once in the optimizer's parameter list")
    return params


def _check_number(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value < high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}), got {value!r}")
    return float(value)


class _Optimizer:
    def __init__(self, params: Iterable[ShardedParameter]) -> None:
        self.params = _check_params(params)
        # One state slot per device block of every parameter, next to the block.
        self._state: List[Dict[Hashable, Optional[Any]]] = [dict.fromkeys(p.blocks) for p in self.params]

    def zero_grad(self) -> None:
        """Forget the gradients of every parameter."""
        for p in self.params:
            p.zero_grad()

    def step(self) -> None:
        """Update every block that has a gradient, in place, under its device.

        Float16 parameters are updated in float32: the gradient is widened,
        the state is kept in float32, and the float32 result is rounded back
        into the float16 block (as ``torch.optim`` under AMP).
        """
        for p, states in zip(self.params, self._state):
            xp = p.backend.xp
            keys = [d for d, g in p.grad_blocks.items() if g is not None]
            update = partial(self._update_block, xp)
            states.update(
                collectives.on_devices(p.backend, update, p.blocks, p.grad_blocks, states, keys=keys)
            )

    def _update_block(self, xp: Any, block: Any, grad: Any, state: Optional[Any]) -> Any:
        if block.dtype.itemsize >= 4:
            return self._update(block, grad, state, xp)
        wide = block.astype(np.float32)
        state = self._update(wide, grad.astype(np.float32), state, xp)
        block[...] = wide
        return state

    def _update(self, shard: Any, grad: Any, state: Optional[Any], xp: Any) -> Any:
        raise NotImplementedError


class SGD(_Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum, as ``torch.optim.SGD``.

    ``v <- momentum * v + g`` (``v = g`` on the first step), ``w <- w - lr * v``.
    """

    def __init__(self, params: Iterable[ShardedParameter], lr: float, momentum: float = 0.0) -> None:
        self.lr = _check_number(lr, "lr", 0.0, math.inf, low_open=True)
        self.momentum = _check_number(momentum, "momentum", 0.0, 1.0)
        super().__init__(params)

    def _update(self, shard, grad, velocity, xp):
        if self.momentum:
            if velocity is None:
                velocity = grad.copy()
            else:
                velocity *= self.momentum
                velocity += grad
            grad = velocity
        shard -= self.lr * grad
        return velocity


class Adam(_Optimizer):
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam`` without weight decay.

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``w <- w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, where ``t``
    counts the steps in which that parameter had a gradient (as in PyTorch).
    """

    def __init__(
        self,
        params: Iterable[ShardedParameter],
        lr: float,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr = _check_number(lr, "lr", 0.0, math.inf, low_open=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_number(betas[0], "betas[0]", 0.0, 1.0),
            _check_number(betas[1], "betas[1]", 0.0, 1.0),
        )
        self.eps = _check_number(eps, "eps", 0.0, math.inf, low_open=True)
        super().__init__(params)

    def _update(self, shard, grad, state, xp):
        b1, b2 = self.betas
        m, v, t = (xp.zeros_like(grad), xp.zeros_like(grad), 0) if state is None else state
        t += 1
        m *= b1
        m += (1.0 - b1) * grad
        v *= b2
        v += (1.0 - b2) * grad * grad
        m_hat = m / (1.0 - b1**t)
        v_hat = v / (1.0 - b2**t)
        shard -= self.lr * m_hat / (xp.sqrt(v_hat) + self.eps)
        return m, v, t
