"""The key-value cache of generation, allocated once per worker for its own heads.

Each layer keeps, on each device, the keys and values of the key-value heads
that device's query heads read (:class:`~tp_gpu.layers.head_plan.HeadPlan`):
``(B, n_kv_d, capacity, head_dim)`` each. With the key-value heads split,
``n_kv_d`` is ``n_kv / p`` per worker, so a worker's cache falls as ``1 / p``;
with fewer key-value heads than workers each worker keeps the one head its
queries read (vLLM's replication). The prompt fills slots ``0 .. S - 1`` in one
prefill pass, and each decoding step writes one more slot.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, List

from ..backends.base import Backend
from ..config import check_positive_int
from ..errors import ConfigError
from .grouped_attention import LayerCache
from .head_plan import HeadPlan

__all__ = ["KVCache"]


class KVCache:
    """Keys and values of ``n_layers`` layers for ``batch`` rows of up to ``capacity`` positions.

    ``length`` counts the positions filled so far (the same for every row: a
    batch is padded on the left). :meth:`advance` moves it after a forward
    pass has written its positions into every layer.
    """

    def __init__(
        self, plan: HeadPlan, n_layers: int, batch: int, capacity: int, backend: Backend, dtype: Any
    ) -> None:
        self.capacity = check_positive_int(capacity, "capacity")
        self.batch = check_positive_int(batch, "batch")
        self.plan = plan
        self.length = 0
        hd = plan.head_dim
        self.layers: List[LayerCache] = []
        for _ in range(check_positive_int(n_layers, "n_layers")):
            keys, values = {}, {}
            for d, heads in plan.devices.items():
                shape = (batch, len(heads.kv), capacity, hd)  # (B, n_kv_d, T, hd)
                keys[d] = backend.empty(shape, dtype, d)
                values[d] = backend.empty(shape, dtype, d)
            self.layers.append(LayerCache(keys, values))

    def check_room(self, positions: int) -> None:
        """ConfigError unless ``positions`` more fit after the ``length`` filled."""
        if self.length + positions > self.capacity:
            raise ConfigError(
                f"the KV cache holds {self.capacity} positions and {self.length} are filled; "
                f"got {positions} more, expected at most {self.capacity - self.length}"
            )

    def advance(self, positions: int) -> None:
        """Count ``positions`` more as filled (every layer has written them)."""
        self.length += positions

    def nbytes_per_device(self) -> Dict[Hashable, int]:
        """Bytes of keys and values each device holds, over every layer."""
        total: Dict[Hashable, int] = {}
        for layer in self.layers:
            for d in layer.keys:
                total[d] = total.get(d, 0) + int(layer.keys[d].nbytes) + int(layer.values[d].nbytes)
        return total
