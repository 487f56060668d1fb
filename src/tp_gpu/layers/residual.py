"""Residual: ``y = x + f(x)`` around any module."""

from __future__ import annotations

from typing import Any

from ..module import Module
from ..tensor import Tensor

__all__ = ["Residual"]


class Residual(Module):
    """``y = x + f(x)``, so ``dx = dy + df(x)/dx^T dy``; the tape sums the two paths.

    ``f`` (the submodule ``inner``) maps ``(..., n)`` to ``(..., n)``. The sum
    runs where ``f``'s output lives (its group's output device, or each
    device's sequence slices); a host ``x`` is moved there first.
    """

    def __init__(self, inner: Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Tensor:
        return x + self.inner(x)
