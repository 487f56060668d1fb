"""Checkpoints: a module's logical (dense) weights in one safetensors file.

A checkpoint stores every parameter as its full, unsharded value, so it does
not depend on how the module that wrote it was split: it loads into a module
with any worker count, placement, backend (NumPy, simulated devices, CuPy),
and each tensor is re-sharded on the way in. The file is plain safetensors;
its header metadata (strings, as safetensors requires) records:

``format``            ``"tp_gpu"``
``format_version``    ``"1"``
``tp_gpu_version``    the library version that wrote it
``n_workers``         the writer's worker count (``"2,4"`` when a dict of modules mixed them)
``backend``           the writer's backend name(s), the same way
``dtype``             the parameters' dtype(s), the same way
``partition``         JSON ``{name: {"axis", "sizes", "devices"}}``: how each tensor was split
``tensors``           JSON ``{name: {"shape", "dtype", "sha256"}}``: what each tensor must be
``metadata_sha256``   SHA-256 of the other entries (canonical JSON)

The SHA-256 of every tensor's bytes, and of the metadata, catch corruption
that the safetensors format itself cannot (a flipped bit in the data, a
changed digit in the metadata).

Saving is atomic: the file is written under a temporary name in the same
directory, flushed and fsync'ed, then renamed over ``path`` (and the directory
fsync'ed). A save that fails or is interrupted leaves the previous checkpoint
at ``path`` as it was, and no temporary file. Loading reads and checks
everything (integrity, names, shapes, dtypes) before it writes any parameter: a
bad file raises :class:`~tp_gpu.errors.CheckpointError` and leaves the module
unchanged. ``load_checkpoint(path, module, strict=False)`` loads the tensors
the module has and returns the others' names, as ``torch.nn.Module.load_state_dict`` does.

A file that cannot be read or written (missing, a directory, a missing folder,
no permission, a read-only or full file system) raises
:class:`~tp_gpu.errors.CheckpointFileError`, a ``CheckpointError`` and an
``OSError`` (:class:`~tp_gpu.errors.CheckpointNotFoundError`, also a
``FileNotFoundError``, for a missing file or folder) whose message names the
path the caller gave and the cause, never a temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import checkpoint_background, training_state
from .checkpoint_background import SaveHandle
from .checkpoint_format import (  # noqa: F401  (_metadata_sha256, _METADATA_CHECKSUM: for tests and tools)
    _METADATA_CHECKSUM,
    FORMAT,
    FORMAT_VERSION,
    _little_endian,
    _metadata_sha256,
    _safetensors,
    _sha256,
    read,
)
from .checkpoint_io import PathLike, check_path, file_error, write_atomically
from .comm import LocalComm
from .errors import CheckpointError, ConfigError
from .grad_scaler import GradScaler
from .layers.base import ParallelModule
from .module import Module, ModuleDict
from .optim import Optimizer
from .parameter import ShardedParameter

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "Checkpoint",
    "LoadedCheckpoint",
    "FORMAT",
    "FORMAT_VERSION",
]

ModuleLike = Union[Module, Mapping[str, Any]]


class Checkpoint(NamedTuple):
    """What :func:`read_checkpoint` returns."""

    tensors: Dict[str, np.ndarray]  # logical tensors by name, new host arrays
    metadata: Dict[str, str]  # the header metadata, as stored


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns: the keys it left out, as ``load_state_dict`` does, and
    the metadata. Both key lists are empty after a ``strict`` load."""

    missing_keys: List[str]  # the module's parameters that the checkpoint does not hold (left as they were)
    unexpected_keys: List[str]  # the checkpoint's tensors that the module does not have (not read)
    metadata: Dict[str, str]  # the header metadata, as stored (see the module docstring)


def as_module(module: ModuleLike, where: str = "") -> Module:
    """``module`` itself, or a (nested) dict of modules as a :class:`ModuleDict` tree."""
    if isinstance(module, Module):
        return module
    if isinstance(module, Mapping):
        if not module:
            raise ConfigError(
                f"got an empty dict of modules{' at ' + repr(where) if where else ''}; nothing to checkpoint"
            )
        tree = ModuleDict()
        for key, sub in module.items():
            if not isinstance(key, str) or not key or "." in key:
                raise ConfigError(f"module dict keys must be non-empty strings without dots, got {key!r}")
            tree[key] = as_module(sub, f"{where}.{key}" if where else key)
        return tree
    raise ConfigError(
        f"expected a tp_gpu Module or a dict of them, got "
        f"{type(module).__name__}{' at ' + repr(where) if where else ''}"
    )


def named_parameters(module: ModuleLike) -> List[Tuple[str, ShardedParameter]]:
    """``(name, parameter)`` of every parameter of ``module``; names are the checkpoint's tensor names."""
    named = as_module(module).named_parameters()
    if not named:
        raise ConfigError(f"{type(module).__name__} has no parameters; nothing to checkpoint")
    return named


def _summary(values) -> str:
    """One value as its string, several distinct values comma-joined in sorted order."""
    distinct = sorted({str(v) for v in values})
    return ",".join(distinct)


def _metadata_head(
    module: ModuleLike, tensors: Dict[str, np.ndarray], named: List[Tuple[str, ShardedParameter]]
) -> Dict[str, str]:
    """The metadata entries before ``tensors``: what wrote the file and how it was split (cheap)."""
    from . import __version__

    leaves = [m for _, m in as_module(module).named_modules() if isinstance(m, ParallelModule)]
    partition = {
        name: {
            "axis": p.axis,
            "sizes": None if p.layout is None else list(p.layout.sizes),
            "devices": [d if isinstance(d, str) else int(d) for d in p.devices],  # type: ignore[call-overload]
        }
        for name, p in named
    }
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tp_gpu_version": __version__,
        "n_workers": _summary(leaf.config.n_workers for leaf in leaves),
        "backend": _summary(leaf.backend.name for leaf in leaves),
        "dtype": _summary(a.dtype.name for a in tensors.values()),
        "partition": json.dumps(partition),
    }


def _sha256_in_place(a: np.ndarray) -> str:
    """``checkpoint_format._sha256(a)`` without a copy (hashlib lets a background save's training run)."""
    return hashlib.sha256(_little_endian(a).reshape(-1).view(np.uint8).data).hexdigest()


def _metadata_finish(
    head: Mapping[str, str], tensors: Dict[str, np.ndarray], extra: Mapping[str, str]
) -> Dict[str, str]:
    """The whole metadata: ``head``, every tensor's shape, dtype and SHA-256, ``extra``, the checksum."""
    described = {
        name: {"shape": list(a.shape), "dtype": a.dtype.name, "sha256": _sha256_in_place(a)}
        for name, a in tensors.items()
    }
    metadata = {**head, "tensors": json.dumps(described), **extra}
    metadata[_METADATA_CHECKSUM] = _metadata_sha256(metadata)
    return metadata


class SingleFileSave:
    """A prepared single-file save: the logical tensors as new host arrays (rank 0 only), the metadata
    but the checksums. :meth:`write` (no collective: it may run in a thread, see
    :mod:`tp_gpu.checkpoint_background`) writes the file on rank 0, dropping the tensors once serialized."""

    def __init__(
        self, path: str, tensors: Optional[Dict[str, np.ndarray]], head: Dict[str, str], extra: Dict[str, str]
    ) -> None:
        self.path, self.tensors, self.head, self.extra = path, tensors, head, extra

    def write(self) -> None:
        """Write the file (rank 0), or nothing (other ranks). CheckpointFileError on a file-system failure."""
        tensors, self.tensors = self.tensors, None
        if tensors is None:
            return
        _, st_numpy = _safetensors()
        data = st_numpy.save(tensors, metadata=_metadata_finish(self.head, tensors, self.extra))
        del tensors
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            raise file_error(self.path, "write", exc) from exc


def prepare_save(
    path: str, module: ModuleLike, optimizer: Optional[Optimizer] = None, scaler: Optional[GradScaler] = None
) -> SingleFileSave:
    """Gather ``module``'s logical tensors and training state to new host arrays (collective with
    several processes; only rank 0 keeps them) and the metadata: the first half of a save."""
    named = named_parameters(module)
    comm = named[0][1].comm if named else LocalComm()
    tensors = {name: _little_endian(param.full()) for name, param in named}  # collective with several ranks
    extra_tensors, extra_metadata = training_state.collect(as_module(module), named, optimizer, scaler)
    tensors.update({name: _little_endian(a) for name, a in extra_tensors.items()})
    if comm.rank != 0:
        return SingleFileSave(path, None, {}, {})
    return SingleFileSave(path, tensors, _metadata_head(module, tensors, named), extra_metadata)


def save_checkpoint(
    path: PathLike,
    module: ModuleLike,
    *,
    optimizer: Optional[Optimizer] = None,
    scaler: Optional[GradScaler] = None,
    sharded: bool = False,
    background: bool = False,
) -> Optional[SaveHandle]:
    """Write ``module``'s logical weights to the safetensors file ``path``, atomically.

    With ``sharded=True``, ``path`` is a folder in which every process writes its own shards, no
    tensor gathered (see :mod:`tp_gpu.checkpoint_sharded`); the rest of this text is about the file.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file. An existing file is replaced (keeping its
        permissions) only once the new one is complete and on disk.
    module : Module, or dict of them
        A dict's keys prefix its modules' tensor names: ``{"embed": emb, "mlp": mlp}``
        saves ``"embed.weight"``, ``"mlp.fc1.weight"``, ... Dicts may nest.
    optimizer, scaler : optional
        The optimizer training ``module`` and its :class:`~tp_gpu.GradScaler`: their state
        (logical tensors, step counts, settings) and every Dropout's step go into the same
        file, so that :func:`load_checkpoint` resumes training exactly, at any worker count
        (see :mod:`tp_gpu.training_state`).

    Tensors are stored dense, in the module's dtype, whatever its worker count,
    placement or backend; the metadata records those (see the module docstring).
    If anything fails before the rename, the temporary file is removed and
    ``path`` is untouched; a file-system failure (``path`` a directory, a
    missing folder, no permission, a read-only or full file system) raises
    :class:`~tp_gpu.errors.CheckpointFileError` (an ``OSError``) naming ``path``
    and the cause. A process killed outright leaves a hidden ``.NAME.<hex>.tmp``
    file beside ``path`` (``path`` itself is intact); the next save to ``path``
    removes it, and leaves alone those of saves still running in other processes
    (see :mod:`tp_gpu.checkpoint_io`). A ``path`` that is a symbolic link is
    followed: its target is replaced atomically and the link stays.

    The file is assembled in host memory before it is written: the peak host
    memory of a save is about twice the size of the module's weights.

    With several processes (``comm="mpi"``/``"nccl"``) this is collective:
    every rank must call it; the weights are gathered and rank 0 writes the
    file (on a file system the others can read); a failure there is raised on
    every rank.

    With ``background=True`` the tensors are copied to host buffers here, and the
    file is serialized and written in a thread: the call returns a
    :class:`~tp_gpu.checkpoint_background.SaveHandle` (``wait()``, ``done()``) at
    once and training may go on. Without it the call returns None once the file is
    on disk. Either way a background save still in flight is waited for first, and
    its error, if it failed unreported, is raised here instead of saving (see
    :mod:`tp_gpu.checkpoint_background`).
    """
    path = check_path(path)  # before any collective: every rank refuses alike
    if not isinstance(background, bool):
        raise ConfigError(f"background must be True or False, got {background!r}")
    if not isinstance(sharded, bool):
        raise ConfigError(f"sharded must be True or False, got {sharded!r}")
    _safetensors()  # ImportError before any collective
    named = named_parameters(module)
    comm = named[0][1].comm if named else LocalComm()
    checkpoint_background.wait_previous()  # collective; raises the previous background save's error
    started = time.perf_counter()
    if sharded:
        from .checkpoint_sharded import prepare_sharded_save, save_sharded

        if background:
            return checkpoint_background.start(
                prepare_sharded_save(path, module, optimizer, scaler), path, comm, started
            )
        save_sharded(path, module, optimizer, scaler)
        return None
    prepared = prepare_save(path, module, optimizer, scaler)
    if background:
        return checkpoint_background.start(prepared, path, comm, started)
    failure = None
    try:
        prepared.write()
    except BaseException as exc:
        failure = exc
    del prepared
    if comm.size > 1:
        outcome = comm.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if outcome is not None and failure is None:
            raise CheckpointError(f"rank 0 failed to write checkpoint {path!r}: {outcome}")
    if failure is not None:
        raise failure
    return None


def load_checkpoint(
    path: PathLike,
    module: ModuleLike,
    strict: bool = True,
    *,
    optimizer: Optional[Optimizer] = None,
    scaler: Optional[GradScaler] = None,
    dtype_cast: bool = False,
) -> LoadedCheckpoint:
    """Load the checkpoint ``path`` into ``module``, re-sharding every tensor for it.

    ``path`` is a single file or a sharded checkpoint folder (written with ``sharded=True``; read by
    :func:`tp_gpu.checkpoint_sharded.load_sharded`, each process reading only its slices).

    ``module`` is what was saved, or the same architecture built with any
    worker count, placement or backend. A loaded tensor must have the module's
    shape and exactly its dtype: a float64 checkpoint does not load into a
    float32 module, unless ``dtype_cast=True``: then a float tensor of any
    float dtype is rounded to the parameter's (as ``torch.nn.Module.load_state_dict``
    copies), while an integer tensor still never loads into a float parameter.

    With ``strict`` (the default) the file must hold every parameter of
    ``module`` and no other tensor. With ``strict=False`` the tensors both
    have are loaded, and the names of the others are returned, as
    ``torch.nn.Module.load_state_dict(strict=False)`` does: a file saved from
    ``{"embed": emb, "mlp": mlp}`` loads into ``{"mlp": mlp2}`` alone. At least
    one tensor must be shared.

    With ``optimizer`` (and ``scaler``), their state saved beside the weights is
    restored too, re-sharded for this split, as is every Dropout's step: training
    resumes where it stopped. Everything is checked and staged before anything
    changes.

    Loading is not atomic with respect to a forward that another thread runs on
    ``module`` at the same time (neither is PyTorch's ``load_state_dict``): the
    parameters are overwritten in place one after another, so such a forward may
    compute with some old and some new weights. Hold one lock around loads and
    forwards, or load into a second model and switch to it.

    Returns
    -------
    LoadedCheckpoint
        ``(missing_keys, unexpected_keys, metadata)``: the module's parameters
        the file lacks (left as they were), the file's tensors the module lacks
        (not read), both empty when ``strict``, and the checkpoint's metadata
        (strings; see the module docstring).

    Raises
    ------
    CheckpointError
        The file is truncated, corrupted, not a tp_gpu checkpoint, or does not
        fit ``module``; the message names the tensors with the expected and the
        found shape or dtype (the count and the first five; the exception's
        ``problems`` lists them all). ``module`` is left exactly as it was.
    CheckpointFileError
        The file cannot be read (missing, a directory, no permission); also an
        ``OSError`` (``CheckpointNotFoundError``, a ``FileNotFoundError``, when missing).
    """
    path = check_path(path)
    checkpoint_background.wait_for(path)  # a background save of this file in flight: wait, or raise its error
    if os.path.isdir(path):
        from .checkpoint_sharded import load_sharded

        return load_sharded(path, module, strict, optimizer, scaler, dtype_cast)
    if not isinstance(dtype_cast, bool):
        raise ConfigError(f"dtype_cast must be True or False, got {dtype_cast!r}")
    named = named_parameters(module)
    tensors, metadata, missing, unexpected = read(path, named, strict, dtype_cast)
    staged = [
        (param, param.stage(tensors[name], f"checkpoint tensor {name!r}"))
        for name, param in named
        if name in tensors
    ]
    tree = as_module(module)
    commit_training = training_state.stage(path, tree, named, tensors, metadata, optimizer, scaler)
    for param, blocks in staged:
        param.commit(blocks)
    commit_training()
    return LoadedCheckpoint(missing, unexpected, metadata)


def read_checkpoint(path: PathLike) -> Checkpoint:
    """The tensors (new host arrays, by name) and metadata of the checkpoint ``path``, verified.

    Raises CheckpointError for a truncated, corrupted or foreign file, CheckpointFileError
    (an OSError) for one that cannot be read.
    """
    tensors, metadata, _, _ = read(path)
    return Checkpoint({name: np.array(a) for name, a in tensors.items()}, dict(metadata))
