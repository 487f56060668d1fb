"""Residual: ``y = x + f(x)`` around any module whose output lands on its group's output device."""

from __future__ import annotations

from typing import Any

from .. import collectives
from ..module import Module

__all__ = ["Residual"]


def _add(a: Any, b: Any) -> Any:
    """``a + b``: two arrays of one shape on one device."""
    return a + b


class Residual(Module):
    """``y = x + f(x)``; backward: ``dx = dy + f.backward(dy)``.

    ``f`` (the submodule ``inner``) maps ``(..., n)`` to ``(..., n)`` and has
    a ``group`` (every tensor-parallel layer and ParallelMLP has one). The sum
    runs on the group's output device, where ``f``'s output lands; ``x`` is
    moved there first if it lies elsewhere (the host, another device).
    """

    def __init__(self, inner: Module) -> None:
        super().__init__()
        self.inner = inner

    def _on_output_device(self, x: Any, like: Any) -> Any:
        group = self.inner.group  # type: ignore[attr-defined]
        return collectives.to_devices(group.backend, [x], [group.output_device], like.dtype)[0]

    def forward(self, x: Any) -> Any:
        y = self.inner(x)
        group = self.inner.group  # type: ignore[attr-defined]
        return group.on_device(group.output_device, _add, self._on_output_device(x, y), y)

    def backward(self, grad_output: Any) -> Any:
        grad_inner = self.inner.backward(grad_output)
        group = self.inner.group  # type: ignore[attr-defined]
        grad = self._on_output_device(grad_output, grad_inner)
        return group.on_device(group.output_device, _add, grad, grad_inner)
