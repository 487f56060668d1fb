"""TensorParallelGroup: what every layer built from one config shares.

A group is the backend, the communicator, this process's workers and their
devices, and the output device. Megatron passes its process group to every
layer explicitly; here a layer gets its group from its config with
:func:`get_group`, so that layers built from equal configs share one backend
instance and one communicator.

With several processes (``comm="mpi"`` or ``"nccl"``), process ``r`` of ``s``
holds the consecutive workers ``[r * p / s, (r + 1) * p / s)``, placed
round-robin on its own devices.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Tuple

from .backends import get_backend, resolve_backend_name
from .backends.base import Backend
from .collectives import Blocks, on_devices
from .comm import get_communicator
from .comm.base import Communicator
from .config import TensorParallelConfig
from .errors import ConfigError
from .partition import BlockLayout
from .placement import worker_devices
from .placements import Dense, Replicated

__all__ = ["TensorParallelGroup", "get_group"]


class TensorParallelGroup:
    """The backend, communicator and worker placement of one :class:`TensorParallelConfig`."""

    def __init__(self, config: TensorParallelConfig) -> None:
        self.n_workers: int = config.n_workers
        self.comm: Communicator = get_communicator(config.comm)
        if config.n_workers % self.comm.size:
            raise ConfigError(
                f"n_workers ({config.n_workers}) must be a multiple of the world size ({self.comm.size}) "
                f"with comm={config.comm!r}: every process holds n_workers / {self.comm.size} workers; "
                f"expected one of {[self.comm.size * k for k in (1, 2, 3)]}, ..."
            )
        devices = config.devices
        if devices is None and self.comm.name == "nccl":
            devices = [self.comm.device]  # type: ignore[attr-defined]  # one GPU per process
        self.backend: Backend = get_backend(config.backend, devices)
        #: The device of each of this process's workers, round-robin over the backend's devices.
        self.devices: List[Hashable] = worker_devices(
            config.n_workers // self.comm.size, self.backend.devices
        )
        out = self.devices[0] if config.output_device is None else config.output_device
        if out not in self.backend.devices:
            raise ConfigError(
                f"output_device {out!r} is not a device of the {self.backend.name} backend; "
                f"expected one of {list(self.backend.devices)}"
            )
        #: Where gathered and reduced outputs land.
        self.output_device: Hashable = out
        #: Each device of this process's workers once, in worker order.
        self.distinct_devices: Tuple[Hashable, ...] = tuple(dict.fromkeys(self.devices))
        #: The placements of a value whole on the output device, and copied to every device.
        self.dense: Dense = Dense(out)
        self.replicated: Replicated = Replicated(self.distinct_devices)

    @property
    def workers(self) -> List[int]:
        """The global ids of the workers this process holds (every worker with one process)."""
        local = len(self.devices)
        return list(range(self.comm.rank * local, (self.comm.rank + 1) * local))

    def split(
        self, size: int, unit: int = 1, what: str = "size", pad_to_multiple_of: Optional[int] = None
    ) -> BlockLayout:
        """How a dimension of ``size``, split over every worker in whole ``unit`` s (or padded to
        equal shards of a multiple of ``pad_to_multiple_of``), lies on this process."""
        return BlockLayout.split(
            size, self.devices, self.comm.rank, self.comm.size, unit, what, pad_to_multiple_of
        )

    def on_devices(
        self, fn: Callable[..., Any], *blocks: Blocks, keys: Optional[Iterable[Hashable]] = None
    ) -> Blocks:
        """``{d: fn(blocks[0][d], blocks[1][d], ...)}`` for each device ``d`` of ``keys`` (default:
        those of ``blocks[0]``), each call under its device (see :func:`tp_gpu.collectives.on_devices`)."""
        return on_devices(self.backend, fn, *blocks, keys=keys)

    def on_device(self, device: Hashable, fn: Callable[..., Any], *arrays: Any) -> Any:
        """``fn(*arrays)`` under ``device``, where ``arrays`` live."""
        with self.backend.device(device):
            return fn(*arrays)

    def check_same_on_every_rank(self, what: str, fingerprint: Dict[str, Any]) -> None:
        """Raise ConfigError on every rank unless every rank built ``what`` with the same ``fingerprint``."""
        if self.comm.size == 1:
            return
        mine = {"layer": what, **fingerprint}
        every = self.comm.all_gather_object(mine)
        keys = {key for other in every for key in set(other) | set(mine)}
        differing = sorted(key for key in keys if any(other.get(key) != mine.get(key) for other in every))
        if differing:
            values = "; ".join(
                f"rank {r}: " + ", ".join(f"{k}={every[r].get(k)!r}" for k in differing)
                for r in range(len(every))
            )
            raise ConfigError(
                f"{what} was built differently across the {self.comm.size} {self.comm.name} ranks "
                f"({values}); every rank must pass the same arguments"
            )

    def __repr__(self) -> str:
        return (
            f"TensorParallelGroup(n_workers={self.n_workers}, backend={self.backend.name!r}, "
            f"devices={self.devices}, comm={self.comm.name!r})"
        )


_groups: Dict[Tuple[Any, ...], TensorParallelGroup] = {}


def get_group(config: TensorParallelConfig) -> TensorParallelGroup:
    """The process's group for ``config`` (built on first use; equal configs share one).

    ``gather_output`` and ``dtype`` do not take part: they change what a layer
    computes, not where its workers run.
    """
    backend = resolve_backend_name(config.backend)
    key = (config.n_workers, backend, config.devices, config.output_device, config.comm)
    if key not in _groups:
        _groups[key] = TensorParallelGroup(config)
    return _groups[key]
