"""Phase borders of a timed step: a clock of laps, and where the tape's backward crosses a border.

A step's forward phases end where the code says so (``clock.lap(name)`` after each call). Its backward
is one ``loss.backward()``: the engine runs the layers' backward functions in reverse order, so a
phase of it ends when the gradient of the value that entered the phase's layer is complete.
:class:`PhaseBorder` is the identity on that value, recorded on the tape; its backward runs exactly
then and calls the lap (as a gradient hook on the intermediate tensor does on the torch side).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tp_gpu.autograd import Context, Function
from tp_gpu.tensor import Tensor, new_tensor


class PhaseClock:
    """The seconds of each phase of the latest run: ``start()``, then ``lap(name)`` at each phase's end."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.last = 0.0

    def start(self) -> None:
        self.laps = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now


class _BorderContext(Context):
    __slots__ = ("mark",)

    mark: Callable[[], None]


class PhaseBorder(Function):
    """``y = x`` (the same blocks, no copy); backward: ``dx = dy``, after calling ``mark()``, when
    ``dy`` is complete. Nothing is kept when nothing is recorded."""

    ctx_class = _BorderContext

    @staticmethod
    def forward(ctx: _BorderContext, x: Tensor, mark: Callable[[], None]) -> Tensor:
        if ctx.needs_input_grad:
            ctx.mark = mark
        out = new_tensor(x.blocks, x.placement, x.shape, x.dtype, x.backend, x.comm)
        out.checks = x.checks
        return out

    @staticmethod
    def backward(ctx: _BorderContext, grad: Tensor) -> tuple[Tensor, None]:
        ctx.mark()
        return grad, None


def border(x: Any, mark: Callable[[], None]) -> Any:
    """``x`` through :class:`PhaseBorder`: ``mark()`` runs when backward has completed ``x``'s gradient."""
    return PhaseBorder.apply(x, mark)
