"""Phase borders of a timed step: a clock of laps, timing sides phase by phase, and where the tape's
backward crosses a border.

A step's forward phases end where the code says so (``clock.lap(name)`` after each call). Its backward
is one ``loss.backward()``: the engine runs the layers' backward functions in reverse order, so a
phase of it ends when the gradient of the value that entered the phase's layer is complete.
:class:`PhaseBorder` is the identity on that value, recorded on the tape; its backward runs exactly
then and calls the lap (as a gradient hook on the intermediate tensor does on the torch side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from tp_gpu.autograd import Context, Function
from tp_gpu.tensor import Tensor, new_tensor

from . import harness


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


Phases = dict[str, dict[str, list[float]]]  # side -> phase -> seconds of each kept run


def time_phases(
    fns: Mapping[str, harness.Fn], clocks: Mapping[str, PhaseClock], phases: tuple[str, ...],
    timing: harness.Timing,
) -> tuple[harness.Timed, Phases]:  # fmt: skip
    """Every side's run in the same shuffled rounds (:func:`harness.time_with_retries`), and the
    phases of each kept run: ``clocks[name]`` is the clock side ``name``'s run laps.

    The harness keeps only each run's seconds; the timer here also keeps the run's laps under
    (function, seconds), so that the kept attempt's runs find theirs (a phase not lapped is 0)."""
    timer = harness.cpu_timer(lambda: None)
    clock_of = {fns[name]: clocks[name] for name in fns}
    laps: dict[tuple, dict[str, float]] = {}

    def once(fn: harness.Fn) -> float:
        seconds = timer(fn)
        laps[(fn, seconds)] = clock_of[fn].laps  # start() makes a new dict: this run's stays
        return seconds

    timed = harness.time_with_retries(dict(fns), once, timing)
    kept = {
        name: {ph: [laps[(fns[name], s)].get(ph, 0.0) for s in times] for ph in phases}
        for name, times in timed.times.items()
    }
    return timed, kept


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
