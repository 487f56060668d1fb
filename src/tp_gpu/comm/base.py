"""The communicator interface under the collectives, and the in-process one.

A communicator joins the *processes* of a run. Inside a process, the workers'
shards meet through :mod:`tp_gpu.collectives` (peer copies between devices);
the communicator then combines one array per process. So every collective is
hierarchical: the local shards are combined first, then the processes talk.

Every method is collective: every rank must call it, in the same order.
"""

from __future__ import annotations

from typing import Any, List, Sequence

from ..backends.base import Backend

__all__ = ["Communicator", "LocalComm"]


class Communicator:
    """Interface of a communicator. ``rank`` is this process's index in ``[0, size)``."""

    name: str = ""
    rank: int = 0
    size: int = 1

    def all_reduce(self, backend: Backend, array: Any, op: str = "sum") -> Any:
        """``op`` ("sum" or "max") of ``array`` over every rank, on ``array``'s device, on every rank."""
        raise NotImplementedError

    def all_gather(self, backend: Backend, array: Any, axis: int) -> Any:
        """Every rank's ``array`` (all of one shape) concatenated along ``axis`` in rank order, on
        every rank."""
        raise NotImplementedError

    def reduce_scatter(self, backend: Backend, array: Any, axis: int, sizes: Sequence[int]) -> Any:
        """This rank's piece of ``sum_ranks array``, on ``array``'s device.

        ``array`` (one shape on every rank) is cut along ``axis`` into pieces of
        ``sizes`` (one per rank, in rank order, any lengths summing to
        ``array.shape[axis]``); rank ``r`` gets ``sum_q array_q[piece r]``.
        This default all-reduces the whole array and keeps the piece (a view):
        about ``2 (s - 1) / s`` of the array crosses per rank on a ring, where a
        native reduce-scatter moves ``(s - 1) / s``.
        """
        axis %= array.ndim
        first = sum(sizes[: self.rank])
        total = self.all_reduce(backend, array, "sum")
        return total[(slice(None),) * axis + (slice(first, first + sizes[self.rank]),)]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        raise NotImplementedError

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """``root``'s ``obj`` on every rank."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalComm(Communicator):
    """One process: every collective is the identity."""

    name = "local"

    def all_reduce(self, backend: Backend, array: Any, op: str = "sum") -> Any:
        return array

    def all_gather(self, backend: Backend, array: Any, axis: int) -> Any:
        return array

    def reduce_scatter(self, backend: Backend, array: Any, axis: int, sizes: Sequence[int]) -> Any:
        return array

    def all_gather_object(self, obj: Any) -> List[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj
