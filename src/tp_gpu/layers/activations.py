"""Elementwise activations and their derivatives, generic over the array namespace.

Each activation is a pair ``(forward(xp, x), grad(xp, x, dy))``: the second
returns ``dy * f'(x)`` from the pre-activation ``x``. They are elementwise, so
they apply to each shard of a ShardedTensor on its own device with no
communication.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, NamedTuple, Optional

from ..backends.base import erf_function
from ..errors import ConfigError

__all__ = ["Activation", "ACTIVATIONS", "get_activation"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Activation(NamedTuple):
    name: str
    forward: Callable[[Any, Any], Any]
    grad: Callable[[Any, Any, Any], Any]


def _gelu(xp, x):
    """Exact GELU, PyTorch's default and BERT's: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    return 0.5 * x * (1.0 + erf_function(xp)(x * _SQRT_HALF))


def _gelu_grad(xp, x, dy):
    """d/dx x Phi(x) = Phi(x) + x phi(x), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    cdf = 0.5 * (1.0 + erf_function(xp)(x * _SQRT_HALF))
    return dy * (cdf + x * xp.exp(-0.5 * x * x) * _INV_SQRT_2PI)


def _gelu_tanh(xp, x):
    """GELU, tanh approximation (GPT-2, Megatron): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return 0.5 * x * (1.0 + xp.tanh(inner))


def _gelu_tanh_grad(xp, x, dy):
    """d/dx GELU_tanh(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t =
    tanh(inner)."""
    inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    t = xp.tanh(inner)
    return dy * (
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    )


def _relu(xp, x):
    """max(x, 0)."""
    return xp.maximum(x, 0)


def _relu_grad(xp, x, dy):
    """dy where x > 0, else 0."""
    return dy * (x > 0)


def _identity(xp, x):
    return x


def _identity_grad(xp, x, dy):
    return dy


ACTIVATIONS: Dict[Optional[str], Activation] = {
    "gelu": Activation("gelu", _gelu, _gelu_grad),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_grad),
    "relu": Activation("relu", _relu, _relu_grad),
    None: Activation("none", _identity, _identity_grad),
}


def get_activation(name: Optional[str]) -> Activation:
    """The activation called ``name`` (``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``None``)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}") from None
