"""Elementwise activations and their derivatives, generic over the array namespace.

Each activation is a pair ``(forward(xp, x), grad(xp, x, dy))``: the second
returns ``dy * f'(x)`` from the pre-activation ``x``. Calling one on a
:class:`~tp_gpu.Tensor` records it on the tape (:class:`ApplyActivation`).
They are elementwise, so they run on each device's block of any placement
but ``Partial`` (``f`` of a sum is not a sum of ``f``), with no communication.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ..autograd import Context, Function
from ..backends.base import erf_function
from ..errors import ConfigError, ShapeError
from ..placements import Partial
from ..tensor import Tensor, new_tensor

__all__ = ["Activation", "ACTIVATIONS", "ApplyActivation", "get_activation"]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Activation(NamedTuple):
    name: str
    forward: Callable[[Any, Any], Any]
    grad: Callable[[Any, Any, Any], Any]

    def __call__(self, x: Tensor) -> Tensor:
        """``f(x)`` on each device's block, recorded on the tape."""
        return ApplyActivation.apply(x, self)


class _ActivationContext(Context):
    __slots__ = ("activation", "x")

    activation: Activation
    x: Tensor


class ApplyActivation(Function):
    """``Y = f(X)`` per device; backward ``dX = dY * f'(X)`` from the kept pre-activation ``X``."""

    ctx_class = _ActivationContext

    @staticmethod
    def forward(ctx: _ActivationContext, x: Tensor, activation: Activation) -> Tensor:
        if isinstance(x.placement, Partial):
            raise ShapeError(
                f"activation {activation.name!r} of partial sums ({x.placement!r}); reduce them first"
            )
        backend = x.backend
        assert backend is not None
        xp = backend.xp
        blocks = {}
        for d, v in x.blocks.items():
            with backend.device(d):
                blocks[d] = activation.forward(xp, v)
        if ctx.needs_input_grad:
            ctx.activation, ctx.x = activation, x
        return new_tensor(blocks, x.placement, x.shape, x.dtype, backend, x.comm)

    @staticmethod
    def backward(ctx: _ActivationContext, grad: Tensor) -> Tuple[Tensor, None]:
        x, backend = ctx.x, grad.backend
        assert backend is not None
        blocks = {}
        for d, g in grad.blocks.items():
            with backend.device(d):
                blocks[d] = ctx.activation.grad(backend.xp, x.blocks[d], g)  # dY * f'(X)
        return new_tensor(blocks, grad.placement, grad.shape, grad.dtype, backend, grad.comm), None


def _gelu(xp, x):
    """Exact GELU, PyTorch's default and BERT's: x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    y = erf_function(xp, x.dtype)(x * _SQRT_HALF)  # a new array, turned into x Phi(x) in place
    y += 1.0
    y *= 0.5
    y *= x
    return y


def _gelu_grad(xp, x, dy):
    """d/dx x Phi(x) = Phi(x) + x phi(x), with phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    cdf = erf_function(xp, x.dtype)(x * _SQRT_HALF)  # new arrays, each worked on in place
    cdf += 1.0
    cdf *= 0.5  # Phi(x)
    pdf = x * x
    pdf *= -0.5
    xp.exp(pdf, out=pdf)
    pdf *= _INV_SQRT_2PI  # phi(x)
    pdf *= x
    cdf += pdf
    cdf *= dy
    return cdf


def _gelu_tanh(xp, x):
    """GELU, tanh approximation (GPT-2, Megatron): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
    with the inner argument as ``x (sqrt(2/pi) + sqrt(2/pi) 0.044715 x^2)``."""
    t = _tanh_inner(xp, x, x * x)
    t += 1.0
    t *= 0.5
    t *= x
    return t


def _gelu_tanh_grad(xp, x, dy):
    """d/dx GELU_tanh(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t =
    tanh(inner)."""
    x2 = x * x  # new arrays, each worked on in place
    t = _tanh_inner(xp, x, x2)
    slope = t * t
    slope -= 1.0
    slope *= -0.5
    slope *= x  # 0.5 x (1 - t^2)
    x2 *= 3.0 * _GELU_CUBIC * _SQRT_2_OVER_PI
    x2 += _SQRT_2_OVER_PI  # sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    slope *= x2
    t += 1.0
    t *= 0.5
    t += slope
    t *= dy
    return t


def _tanh_inner(xp, x, x2):
    """``tanh(sqrt(2/pi) (x + 0.044715 x^3))`` as a new array, from ``x`` and ``x2 = x^2`` (kept)."""
    t = x2 * (_GELU_CUBIC * _SQRT_2_OVER_PI)
    t += _SQRT_2_OVER_PI
    t *= x
    return xp.tanh(t, out=t)


def _relu(xp, x):
    """max(x, 0)."""
    return xp.maximum(x, 0)


def _relu_grad(xp, x, dy):
    """dy where x > 0, else 0."""
    return dy * (x > 0)


def _silu(xp, x):
    """SiLU (swish, Llama's MLP): x sigmoid(x) = x / (1 + e^-x) (see :func:`_one_plus_exp_neg`);
    float16 through float32, whose exponent cap lies where float16's silu is 0 already."""
    if x.dtype == np.float16:
        return _silu(xp, x.astype(np.float32)).astype(np.float16)
    d = _one_plus_exp_neg(xp, x)
    return xp.divide(x, d, out=d)


def _silu_grad(xp, x, dy):
    """d/dx x sigmoid(x) = s (1 + x (1 - s)), s = sigmoid(x) (float16 through float32, as the SiLU)."""
    if x.dtype == np.float16:
        return _silu_grad(xp, x.astype(np.float32), dy.astype(np.float32)).astype(np.float16)
    s = _one_plus_exp_neg(xp, x)
    s = xp.reciprocal(s, out=s)  # sigmoid(x)
    g = 1 - s  # a new array, worked on in place
    g *= x
    g += 1
    g *= s
    g *= dy
    return g


def _one_plus_exp_neg(xp, x):
    """``1 + e^-x`` as a new array, the exponent capped at ``log(max) - 1`` of ``x``'s dtype so that it
    never overflows: past the cap (x below -87 in float32) ``1 / (1 + e^-x)`` is below ``e / max``,
    where the true sigmoid is smaller still, and ``x sigmoid(x)`` rounds to 0 or nearly either way.
    Four passes, where ``exp(-|x|)`` with a ``where`` on the sign took eight."""
    d = -x
    xp.minimum(d, _exp_limit(x.dtype), out=d)
    xp.exp(d, out=d)
    d += 1
    return d


@functools.lru_cache(maxsize=8)
def _exp_limit(dtype: Any) -> float:
    """``log(finfo(dtype).max) - 1``: ``exp`` of it is finite, and so is 1 plus it."""
    return math.log(float(np.finfo(dtype).max)) - 1.0


def _identity(xp, x):
    return x


def _identity_grad(xp, x, dy):
    return dy


ACTIVATIONS: Dict[Optional[str], Activation] = {
    "gelu": Activation("gelu", _gelu, _gelu_grad),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_grad),
    "relu": Activation("relu", _relu, _relu_grad),
    "silu": Activation("silu", _silu, _silu_grad),
    None: Activation("none", _identity, _identity_grad),
}


def get_activation(name: Optional[str]) -> Activation:
    """The activation called ``name`` (``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"silu"`` or ``None``)."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"activation must be one of {list(ACTIVATIONS)}, got {name!r}") from None
