"""Which device each worker runs on.

Worker ``i`` runs on ``devices[i % len(devices)]``: its own device when there
are at least as many devices as workers, round-robin otherwise. For example 8
workers on 3 GPUs get ``0, 1, 2, 0, 1, 2, 0, 1``.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Sequence

from .config import check_positive_int
from .errors import ConfigError

__all__ = ["worker_devices", "workers_by_device"]


def worker_devices(n_workers: int, devices: Sequence[Hashable]) -> List[Hashable]:
    """The device of each of ``n_workers`` workers, round-robin over ``devices``."""
    n_workers = check_positive_int(n_workers, "n_workers")
    if len(devices) == 0:
        raise ConfigError("cannot place workers on an empty device list; expected at least one device")
    return [devices[i % len(devices)] for i in range(n_workers)]


def workers_by_device(placement: Sequence[Hashable]) -> Dict[Hashable, List[int]]:
    """Map each used device to the workers placed on it, in first-use order."""
    groups: Dict[Hashable, List[int]] = {}
    for worker, device in enumerate(placement):
        groups.setdefault(device, []).append(worker)
    return groups
