"""Loading a sharded checkpoint folder (see :mod:`tp_gpu.checkpoint_sharded` for its layout).

Each process reads, for every device block of every parameter (and optimizer
state tensor), only the logical ranges that block holds, from the pieces that
overlap them (:class:`~tp_gpu.checkpoint_pieces.PieceReader`: leading-row
slices rounded out to whole hashed chunks). Everything is read, verified and
staged on the devices before anything changes; with several processes the
ranks then agree, so that an error on one is raised on all and none commits.
"""

from __future__ import annotations

import errno
import json
import os
from functools import partial
from typing import Any, Callable, Dict, Hashable, List, Optional

import numpy as np

from . import collectives, training_state
from .checkpoint_format import check_fits
from .checkpoint_io import PathLike, check_path, file_error
from .checkpoint_pieces import (
    _CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    PieceReader,
    _digest,
    check_tensor,
    full_box,
)
from .errors import CheckpointError, ConfigError
from .optim import Optimizer, _state_dtype
from .parameter import ShardedParameter

__all__ = ["load_sharded", "read_index"]


def read_index(path: str) -> Dict[str, Any]:
    """The index of the sharded checkpoint folder ``path``, every tensor entry checked."""
    target = os.path.join(path, INDEX)
    if not os.path.lexists(target):  # a CheckpointFileError (EISDIR), as for any folder that is no checkpoint
        cause = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        error = file_error(path, "read", cause)
        error.args = (
            f"{error}, and not a sharded checkpoint folder: it has no {INDEX} (not a sharded "
            "checkpoint, or one whose first save did not finish)",
        )
        raise error from cause
    try:
        with open(target, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise file_error(target, "read", exc) from exc
    try:
        index = json.loads(data)
        if not isinstance(index, dict):
            raise ValueError(f"expected a JSON object, got {type(index).__name__}")
    except ValueError as exc:
        raise CheckpointError(f"sharded checkpoint {path!r}: {INDEX} is not valid JSON ({exc})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(
            f"{target!r} is not a tp_gpu sharded checkpoint index (format={index.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    version = index.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{target!r} has sharded format version {version!r} (written by tp_gpu "
            f"{index.get('tp_gpu_version')}); "
            f"this tp_gpu reads versions up to {FORMAT_VERSION}: upgrade tp_gpu"
        )
    if index.get(_CHECKSUM) != _digest(index):
        raise CheckpointError(
            f"sharded checkpoint {path!r}: {INDEX} fails its SHA-256 check: it was changed after saving"
        )
    tensors = index.get("tensors")
    if not isinstance(tensors, dict) or not isinstance(index.get("training", {}), dict):
        raise CheckpointError(f"sharded checkpoint {path!r}: {INDEX} has no 'tensors' object")
    index["tensors"] = {str(name): check_tensor(path, name, entry) for name, entry in tensors.items()}
    return index


def _along(axis: int, index: slice) -> tuple:
    return (slice(None),) * axis + (index,)


def _blocks(
    reader: PieceReader, name: str, entry: Dict[str, Any], p: ShardedParameter, dtype: Any
) -> Dict[Hashable, Any]:
    """Each device block of the stored tensor ``name``, laid out like ``p`` and cast to ``dtype``, on its
    device; only the ranges each block holds are read (padding stays zero)."""
    if p.layout is None or p.axis is None:
        full = reader.read(name, entry, full_box(p.shape))
        return collectives.broadcast(p.backend, full, p.block_devices, dtype)
    axis, layout = p.axis % len(p.shape), p.layout
    blocks = {}
    for device, workers in layout.groups.items():
        shape = list(p.shape)
        shape[axis] = layout.block_lengths[device]
        host = np.zeros(shape, entry["dtype"])
        run = layout.run(device)
        parts = (
            [(run, (0, run[1] - run[0]))] if run else [(layout.ranges[w], layout.local[w]) for w in workers]
        )
        for (first, last), (lo, hi) in parts:
            if last > first:
                box = tuple((first, last) if k == axis else (0, n) for k, n in enumerate(p.shape))
                reader.read(name, entry, box, out=host[_along(axis, slice(lo, hi))])
        blocks[device] = collectives.to_device(p.backend, host, device, dtype)
    return blocks


def _stage_optimizer(
    path: str, reader: PieceReader, index: Dict[str, Any], named, optimizer: Optimizer
) -> Callable[[], None]:
    saved = index.get("training", {}).get("optimizer")
    if saved is None:
        raise CheckpointError(
            f"sharded checkpoint {path!r} holds no optimizer state; it was saved without optimizer="
        )
    if saved.get("type") != type(optimizer).__name__:
        raise CheckpointError(
            f"sharded checkpoint {path!r} holds {saved.get('type')} state; "
            f"expected {type(optimizer).__name__}'s"
        )
    settings = {"param_groups": saved.get("param_groups", [{}]), "state": {}}
    optimizer._settings_of(settings)  # ConfigError before anything changes
    tensors = index["tensors"]
    staged: Dict[int, Dict[Hashable, Dict[str, Any]]] = {}
    for i, name in training_state._names(named, optimizer).items():
        if name not in saved.get("steps", {}):
            continue
        prefix = f"{training_state.PREFIX}{name}/"
        keys = [t[len(prefix) :] for t in tensors if t.startswith(prefix)]
        missing = [k for k in optimizer.STATE_KEYS if k not in keys]
        if missing:
            raise CheckpointError(
                f"sharded checkpoint {path!r}: optimizer state of {name!r} misses {missing}"
            )
        p = optimizer.params[i]
        arrays = {}
        for key in keys:
            entry = tensors[prefix + key]
            if entry["shape"] != tuple(p.shape) or entry["dtype"].kind != "f":
                raise CheckpointError(
                    f"sharded checkpoint {path!r}: tensor {prefix + key!r} is {entry['shape']} "
                    f"{entry['dtype'].name}; expected {tuple(p.shape)} float like its parameter"
                )
            dtype = np.float32 if key == "master" else _state_dtype(p)
            arrays[key] = _blocks(reader, prefix + key, entry, p, dtype)
        step = int(saved["steps"][name])
        staged[i] = {d: {"step": step, **{k: a[d] for k, a in arrays.items()}} for d in p.blocks}
    return lambda: optimizer.commit_state_dict(settings, staged)


def _metadata(index: Dict[str, Any]) -> Dict[str, str]:
    """The index's header entries as strings (as a single-file checkpoint's metadata)."""
    keys = (
        "format",
        "format_version",
        "tp_gpu_version",
        "save_id",
        "world_size",
        "n_workers",
        "backend",
        "dtype",
    )
    metadata = {k: str(index.get(k)) for k in keys}
    metadata[training_state.METADATA_KEY] = json.dumps(index.get("training", {}))
    return metadata


def load_sharded(
    path: PathLike,
    module: Any,
    strict: bool = True,
    optimizer: Optional[Optimizer] = None,
    scaler: Any = None,
    dtype_cast: bool = False,
):
    """Load the sharded checkpoint folder ``path`` into ``module`` (and ``optimizer``, ``scaler``, the
    dropout steps), re-sharded for its worker count and processes; see ``load_checkpoint``.

    Returns the same :class:`~tp_gpu.checkpoint.LoadedCheckpoint`. Raises CheckpointError naming the
    file and tensor for a bad index, a missing or corrupted rank file, a piece of the wrong shape or
    a failed hash, before anything changes; with several processes, on every rank alike.
    """
    from .checkpoint import LoadedCheckpoint, as_module, named_parameters

    path = check_path(path)
    if not isinstance(dtype_cast, bool):
        raise ConfigError(f"dtype_cast must be True or False, got {dtype_cast!r}")
    named = named_parameters(module)
    comm = named[0][1].comm
    failure: Optional[BaseException] = None
    commits: List[Callable[[], None]] = []
    try:
        index = read_index(path)
        tensors = index["tensors"]
        missing, unexpected = check_fits(path, tensors, named, strict, dtype_cast)
        with PieceReader(path) as reader:
            for name, p in named:
                if name in tensors:
                    blocks = _blocks(reader, name, tensors[name], p, p.dtype)
                    commits.append(partial(p.commit, blocks))
            if optimizer is not None:
                commits.append(_stage_optimizer(path, reader, index, named, optimizer))
        metadata = _metadata(index)
        commits.append(training_state.stage(path, as_module(module), named, {}, metadata, None, scaler))
    except Exception as exc:
        failure = exc
    failed = collectives.failed_rank(comm, failure)
    if failure is None and failed is not None:
        raise CheckpointError(
            f"rank {failed} failed to load sharded checkpoint {path!r} (its error is raised there); "
            "nothing was loaded"
        )
    if failure is not None:
        raise failure
    for commit in commits:
        commit()
    return LoadedCheckpoint(missing, unexpected, metadata)
