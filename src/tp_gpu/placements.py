"""Where a :class:`~tp_gpu.Tensor` lives: its placement (DTensor's ``Shard``, ``Replicate``, ``Partial``).

A tensor's logical value ``T`` is kept as one block per device, ``{device: array}``:

============================  ============================================  ==================================
placement                     blocks                                        logical value
============================  ============================================  ==================================
``Dense(device)``             one block, on ``device`` (:data:`HOST` for    ``T = block``
                              a host array not yet placed)
``Replicated(devices)``       a whole copy on each device                   ``T = block_d`` for every ``d``
``Split(axis, layout)``       device ``d`` holds its workers' slices of     ``T = concat_w slice_w`` along
                              ``axis``, side by side (:class:`BlockLayout`)  ``axis``
``Partial(devices)``          a partial sum on each device                  ``T = sum_d block_d`` (and over
                                                                            the processes)
============================  ============================================  ==================================

Sequence parallelism is ``Split(axis=-2)`` of ``(B, S, H)`` activations; a
column-parallel output is ``Split(axis=-1)``; a row-parallel layer's partial
products are ``Partial``. The gradient of a value has the value's placement,
except that of a ``Replicated`` value, which is ``Partial``: each device's
consumers contribute their own part, ``dT = sum_d dT_d``. The regions
(:mod:`tp_gpu.regions`) are what convert one placement into another.
"""

from __future__ import annotations

from typing import Hashable, Tuple

from .partition import BlockLayout

__all__ = ["HOST", "Placement", "Dense", "Replicated", "Split", "Partial"]

#: The device of a host array that no backend has placed yet (a user's NumPy input).
HOST = "host"


class Placement:
    """Base of the four placements; each is immutable and compares by value."""

    __slots__ = ()

    def key(self) -> Tuple[object, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.key() == self.key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.key()))


class Dense(Placement):
    """The whole value on one device."""

    __slots__ = ("device",)

    def __init__(self, device: Hashable) -> None:
        self.device = device

    def key(self) -> Tuple[object, ...]:
        return (self.device,)

    def __repr__(self) -> str:
        return f"Dense({self.device!r})"


class _OverDevices(Placement):
    """A placement with one whole-shaped block on each of ``devices``."""

    __slots__ = ("devices",)

    def __init__(self, devices: Tuple[Hashable, ...]) -> None:
        self.devices = tuple(devices)

    def key(self) -> Tuple[object, ...]:
        return self.devices

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.devices)!r})"


class Replicated(_OverDevices):
    """A whole copy of the value on each of ``devices``."""

    __slots__ = ()


class Split(Placement):
    """The value split along ``axis`` (non-negative) over the workers, laid out as ``layout``."""

    __slots__ = ("axis", "layout")

    def __init__(self, axis: int, layout: BlockLayout) -> None:
        self.axis = axis
        self.layout = layout

    def key(self) -> Tuple[object, ...]:
        return (self.axis, self.layout)

    def __repr__(self) -> str:
        return f"Split(axis={self.axis}, sizes={self.layout.sizes}, devices={self.layout.devices!r})"


class Partial(_OverDevices):
    """Partial sums on each of ``devices``: the value is their sum (over every process too)."""

    __slots__ = ()
