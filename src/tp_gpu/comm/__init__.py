"""Communicators between processes: ``"local"`` (one process), ``"mpi"``, ``"nccl"``.

:func:`get_communicator` returns one communicator per kind per process (MPI and
NCCL are initialised once). Neither mpi4py nor CuPy is imported until asked for.
"""

from __future__ import annotations

from typing import Dict, Optional

from ..config import COMM_NAMES
from ..errors import ConfigError
from .base import Communicator, LocalComm

__all__ = ["Communicator", "LocalComm", "COMM_NAMES", "get_communicator"]

_instances: Dict[str, Communicator] = {}


def get_communicator(name: Optional[str] = None) -> Communicator:
    """The process-wide communicator ``name`` (None means ``"local"``)."""
    name = "local" if name is None else name
    if name not in COMM_NAMES:
        raise ConfigError(f"comm must be one of {COMM_NAMES}, got {name!r}")
    if name not in _instances:
        if name == "local":
            _instances[name] = LocalComm()
        elif name == "mpi":
            from .mpi import MpiComm

            _instances[name] = MpiComm()
        else:
            from .nccl import NcclComm

            _instances[name] = NcclComm()
    return _instances[name]
