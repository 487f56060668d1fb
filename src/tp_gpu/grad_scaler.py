"""GradScaler: dynamic loss scaling for float16 training, with ``torch.amp.GradScaler``'s semantics.

Float16 gradients underflow: scaling the loss by ``S`` before backward scales
every gradient by ``S`` and keeps them representable. Before the optimizer
step the gradients are divided by ``S`` again (``unscale_``); if any of them is
inf or NaN (the scale was too large) the step is skipped and ``S`` shrinks by
``backoff_factor``; after ``growth_interval`` steps without one, ``S`` grows by
``growth_factor``, unless the grown scale would overflow float32. As in
PyTorch, the scale is a float32 number: it starts as ``float32(init_scale)``,
and each change is computed in float64 and rounded to float32
(``float32(S * factor)``), so a scaler's trajectory equals
``torch.amp.GradScaler``'s step for step, near overflow too (2^127 does not
grow to 2^128, which float32 cannot hold). The inf/NaN check covers every block on every device and
every process, so all ranks skip together; the host reads its result once per
backend (:func:`tp_gpu.device_totals.total_to_host`), not once per block.

As with PyTorch's, the scale enters through the loss::

    loss = loss_fn(model(x), targets)
    scaler.scale(loss).backward()   # d(S loss) = S d(loss)
    scaler.step(optimizer)          # unscales, then steps unless a gradient is inf/NaN
    scaler.update()
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from . import collectives
from .device_totals import total_to_host
from .errors import ConfigError, ShapeError
from .optim import Optimizer
from .parameter import ShardedParameter
from .tensor import Tensor

__all__ = ["GradScaler"]


def _positive(value: Any, name: str, above_one: Optional[bool] = None) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0  # value stays Any here: numbers.Real declares no ">"
    if ok and above_one is True:
        ok = value > 1.0
    if ok and above_one is False:
        ok = value < 1.0
    if not ok:
        bound = {True: "> 1", False: "in (0, 1)", None: "> 0"}[above_one]
        raise ConfigError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _float32_scale(value: Any, name: str) -> np.float32:
    """``value`` (checked by :func:`_positive`) rounded to float32, or ConfigError when float32 cannot
    hold it (it overflows to inf or underflows to 0)."""
    scale = _to_float32(_positive(value, name))
    if not (np.isfinite(scale) and scale > 0):
        largest = float(np.finfo(np.float32).max)
        raise ConfigError(
            f"{name} must be a positive number float32 can hold (up to {largest:.4g}), got {value!r}"
        )
    return scale


def _to_float32(value: float) -> np.float32:
    """``value`` rounded to float32 (inf where it overflows, without NumPy's overflow warning)."""
    with np.errstate(over="ignore"):
        return np.float32(value)


def _interval(value: Any, name: str = "growth_interval") -> int:
    """``value`` as an int >= 1, or ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _tracker(value: Any, interval: int) -> int:
    """``value`` as the count of clean steps since the scale last changed: an int in [0, interval)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or not 0 <= int(value) < interval:
        raise ConfigError(
            f"_growth_tracker must be an integer in [0, growth_interval={interval}), got {value!r}"
        )
    return int(value)


def _check_optimizer(optimizer: Any, what: str) -> Optimizer:
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(
            f"GradScaler.{what} takes a tp_gpu Optimizer (SGD, Adam), got {type(optimizer).__name__}"
        )
    return optimizer


def _unscale_block(xp: Any, inverse: float, grad: Any) -> Any:
    """``grad *= inverse`` in place; returns whether an element is inf or NaN (a 0-d bool array on
    ``grad``'s device: nothing is read on the host here)."""
    grad *= inverse
    return xp.logical_not(xp.isfinite(grad).all())


def _unscale_and_check(params: List[ShardedParameter], inverse: float) -> bool:
    """Multiply every gradient block of ``params`` by ``inverse``; return whether one holds an inf or
    NaN on this process. The devices' flags are combined on the devices and read on the host once per
    backend."""
    by_backend: Dict[int, List[ShardedParameter]] = {}
    for p in params:
        by_backend.setdefault(id(p.backend), []).append(p)
    found = False
    for group in by_backend.values():
        backend = group[0].backend
        unscale = partial(_unscale_block, backend.xp, inverse)
        flags = [
            collectives.on_devices(
                backend, unscale, p.grad_blocks, keys=[d for d, g in p.grad_blocks.items() if g is not None]
            )
            for p in group
        ]
        flags = [f for f in flags if f]  # parameters without any gradient have no flag
        found = (bool(total_to_host(backend, flags, "max")) if flags else False) or found
    return found


class GradScaler:
    """Dynamic loss scaling (``torch.amp.GradScaler``'s defaults and state dict keys)."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        self._scale: np.float32 = _float32_scale(init_scale, "init_scale")
        self._growth_factor: float = _positive(growth_factor, "growth_factor", above_one=True)
        self._backoff_factor: float = _positive(backoff_factor, "backoff_factor", above_one=False)
        self._growth_interval: int = _interval(growth_interval)
        self._growth_tracker: int = 0
        self.enabled: bool = bool(enabled)
        self._found_inf: Dict[int, bool] = {}  # per optimizer unscaled since the last update

    def get_scale(self) -> float:
        """The current scale, a float32 value (1.0 when disabled)."""
        return float(self._scale) if self.enabled else 1.0

    def scale(self, loss: Any = 1.0) -> Any:
        """``loss * scale``: a loss Tensor scaled (recorded, so its ``backward`` scales every gradient),
        or a real number (a loss gradient to pass to ``backward``).

        Anything else (a string, a bool, an array) raises ConfigError.
        """
        if isinstance(loss, Tensor):
            return loss * self.get_scale()
        ok = isinstance(loss, numbers.Real) and not isinstance(loss, bool)
        if not ok:
            raise ConfigError(
                f"GradScaler.scale takes a loss Tensor or a loss gradient as a real number (e.g. 1.0), got "
                f"{type(loss).__name__} {loss!r}"
            )
        return float(loss) * self.get_scale()

    def unscale_(self, optimizer: Optimizer) -> bool:
        """Divide ``optimizer``'s gradients by the scale, in place; return whether one is inf/NaN.

        Calling it twice before :meth:`update` raises, as in PyTorch.
        """
        _check_optimizer(optimizer, "unscale_")
        if not self.enabled:
            return False
        if id(optimizer) in self._found_inf:
            raise ConfigError("unscale_() has already been called on this optimizer since the last update()")
        inverse = float(_to_float32(1.0 / float(self._scale)))  # as torch: 1 / S in float64, then float32
        local = _unscale_and_check(optimizer.params, inverse)
        comm = optimizer.params[0].comm
        found = collectives.all_reduce_host_scalar(comm, 1.0 if local else 0.0, "max") > 0.0
        self._found_inf[id(optimizer)] = found
        return found

    def step(self, optimizer: Optimizer) -> bool:
        """Unscale (if not done yet), then step ``optimizer`` unless a gradient was inf/NaN.

        Returns whether it stepped."""
        _check_optimizer(optimizer, "step")
        if not self.enabled:
            optimizer.step()
            return True
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)]:
            return False
        optimizer.step()
        return True

    def update(self, new_scale: Optional[float] = None) -> None:
        """Shrink the scale after an inf/NaN, grow it after ``growth_interval`` clean steps unless the
        grown scale would overflow float32 (PyTorch's ``_amp_update_scale_``): ``float32(S * factor)``."""
        if not self.enabled:
            return
        if new_scale is not None:
            self._scale = _float32_scale(new_scale, "new_scale")
        elif any(self._found_inf.values()):
            self._scale = _to_float32(float(self._scale) * self._backoff_factor)
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self._growth_interval:
                grown = _to_float32(float(self._scale) * self._growth_factor)
                if np.isfinite(grown):  # PyTorch keeps the scale when growing it would overflow
                    self._scale = grown
                self._growth_tracker = 0
        self._found_inf.clear()

    def state_dict(self) -> Dict[str, Any]:
        """The scale and its settings, under ``torch.amp.GradScaler.state_dict()``'s keys."""
        if not self.enabled:
            return {}
        return {
            "scale": float(self._scale),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; every value is checked, by the constructor's checks, before any
        is set (ConfigError naming the bad one; the scaler is left as it was)."""
        if not isinstance(state, Mapping):
            raise ShapeError(
                f"GradScaler.load_state_dict takes a dict (GradScaler.state_dict()), got "
                f"{type(state).__name__}"
            )
        if not state:
            return
        try:
            interval = _interval(state["growth_interval"])
            values = (
                _float32_scale(state["scale"], "scale"),
                _positive(state["growth_factor"], "growth_factor", above_one=True),
                _positive(state["backoff_factor"], "backoff_factor", above_one=False),
                interval,
                _tracker(state["_growth_tracker"], interval),
            )
        except KeyError as exc:
            raise ShapeError(
                f"GradScaler state dict misses {exc}; expected the keys of GradScaler.state_dict()"
            ) from None
        (
            self._scale,
            self._growth_factor,
            self._backoff_factor,
            self._growth_interval,
            self._growth_tracker,
        ) = values
