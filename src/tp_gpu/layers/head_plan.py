"""Which attention heads each worker holds under grouped-query attention, and vLLM's replication rule.

With ``n_heads`` query heads sharing ``n_kv`` key-value heads, query head
``h`` reads key-value head ``h // g``, ``g = n_heads / n_kv``. Over ``p``
workers (vLLM's ``QKVParallelLinear``):

* ``n_kv >= p``: the key-value heads are split in balanced whole heads, and
  each worker takes the ``g`` query heads of each of its key-value heads, so
  nothing is held twice. 12 query and 4 key-value heads on 3 workers:
  key-value heads 2, 1, 1 and query heads 6, 3, 3.
* ``n_kv < p``: the query heads are split in balanced whole heads, and each
  worker keeps the key-value heads its query heads read, so a key-value
  head is replicated on the workers that use it. 8 query and 2 key-value
  heads on 4 workers: query heads 2, 2, 2, 2 and key-value heads 0, 0, 1, 1.
  The projection weights of the key-value heads are then held whole on every
  device (:class:`~tp_gpu.placements.Replicated`, small: ``n_kv < p``), and
  each device computes and caches only the heads it reads.

Workers on one device keep their heads side by side in one block (in worker
order), so a device attends with all of its workers' heads at once.
:class:`HeadPlan` says, per device, which key-value head of its block each
of its query heads reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from ..config import check_positive_int
from ..errors import ConfigError
from ..partition import BlockLayout, split_sizes

__all__ = ["HeadPlan", "DeviceHeads"]


@dataclass(frozen=True)
class DeviceHeads:
    """The heads of one device's block.

    ``query`` lists the global query heads of the block, in block order;
    ``kv`` the global key-value heads the device keeps (its cache holds
    these, in this order); ``groups`` the runs ``(kv_index, first, count)``:
    query heads ``first .. first + count - 1`` of the block read key-value
    head ``kv[kv_index]``. ``select`` lists, for replicated key-value
    projections, the heads to take out of the whole projection (None when the
    block is the device's own split of the heads).
    """

    query: Tuple[int, ...]
    kv: Tuple[int, ...]
    groups: Tuple[Tuple[int, int, int], ...]
    select: Optional[Tuple[int, ...]]

    @property
    def uniform(self) -> Optional[int]:
        """``r`` when every key-value head ``i`` of ``kv`` is read by query heads ``i r .. i r + r - 1``
        (one batched product serves them all), else None."""
        if not self.groups:
            return None
        r = self.groups[0][2]
        regular = all(g == (i, i * r, r) for i, g in enumerate(self.groups))
        return r if regular else None


@dataclass(frozen=True)
class HeadPlan:
    """How ``n_heads`` query and ``n_kv_heads`` key-value heads of ``head_dim`` lie over the workers.

    ``q_layout`` splits the ``n_heads * head_dim`` query columns (and the
    context's, and the output projection's rows); ``kv_layout`` splits the
    ``n_kv_heads * head_dim`` key and value columns, or is None when they are
    replicated (``n_kv_heads`` below the worker count). ``devices`` gives each
    device's :class:`DeviceHeads`.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    q_layout: BlockLayout
    kv_layout: Optional[BlockLayout]
    devices: Dict[Hashable, DeviceHeads]

    @property
    def replicated(self) -> bool:
        """True when the key-value projections are whole on every device."""
        return self.kv_layout is None

    @property
    def group_size(self) -> int:
        """``g``: query heads per key-value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def build(
        cls,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        devices: Sequence[Hashable],
        rank: int = 0,
        world_size: int = 1,
    ) -> HeadPlan:
        """The plan over ``len(devices) * world_size`` workers, of which this process holds ``devices``.

        >>> plan = HeadPlan.build(8, 2, 4, ["a", "b", "c", "d"])
        >>> [plan.devices[d].kv for d in "abcd"]
        [(0,), (0,), (1,), (1,)]
        """
        n_heads = check_positive_int(n_heads, "num_attention_heads")
        n_kv = check_positive_int(n_kv_heads, "num_key_value_heads")
        head_dim = check_positive_int(head_dim, "head_dim")
        if n_heads % n_kv:
            raise ConfigError(
                f"num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})"
            )
        g = n_heads // n_kv
        workers = len(devices) * world_size
        replicated = n_kv < workers
        if replicated:
            q_counts = split_sizes(n_heads, workers, what="num_attention_heads")
            kv_counts = None
        else:
            kv_counts = split_sizes(n_kv, workers, what="num_key_value_heads")
            q_counts = [c * g for c in kv_counts]
        q_layout = BlockLayout.from_sizes([c * head_dim for c in q_counts], devices, rank, world_size)
        kv_layout = (
            None
            if kv_counts is None
            else BlockLayout.from_sizes([c * head_dim for c in kv_counts], devices, rank, world_size)
        )
        per_device = {
            d: _device_heads(q_layout, kv_layout, workers_of, head_dim, g)
            for d, workers_of in q_layout.groups.items()
        }
        return cls(n_heads, n_kv, head_dim, q_layout, kv_layout, per_device)

    def kv_heads_per_device(self) -> Dict[Hashable, int]:
        """How many key-value heads each device computes and caches."""
        return {d: len(h.kv) for d, h in self.devices.items()}


def _heads(layout: BlockLayout, workers: List[int], head_dim: int) -> List[int]:
    """The global heads of ``workers``' slices of ``layout``, side by side in worker order."""
    heads: List[int] = []
    for w in workers:
        first, last = layout.ranges[w]
        heads.extend(range(first // head_dim, last // head_dim))
    return heads


def _device_heads(
    q_layout: BlockLayout, kv_layout: Optional[BlockLayout], workers: List[int], head_dim: int, g: int
) -> DeviceHeads:
    query = _heads(q_layout, workers, head_dim)
    if kv_layout is None:
        kv = sorted(dict.fromkeys(h // g for h in query))  # the heads its queries read, each once
        select: Optional[Tuple[int, ...]] = tuple(kv)
    else:
        kv = _heads(kv_layout, workers, head_dim)
        select = None
    position = {head: i for i, head in enumerate(kv)}
    groups: List[Tuple[int, int, int]] = []
    for i, h in enumerate(query):  # ascending within each worker: a key-value head's queries are a run
        k = position[h // g]
        if groups and groups[-1][0] == k and groups[-1][1] + groups[-1][2] == i:
            groups[-1] = (k, groups[-1][1], groups[-1][2] + 1)
        else:
            groups.append((k, i, 1))
    return DeviceHeads(tuple(query), tuple(kv), tuple(groups), select)


def kv_index(heads: DeviceHeads) -> np.ndarray:
    """For each query head of the block, the index in ``heads.kv`` of the key-value head it reads."""
    return np.array([k for k, _, count in heads.groups for _ in range(count)], dtype=np.intp)
