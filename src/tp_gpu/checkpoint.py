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

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import training_state
from .comm import LocalComm
from .errors import (
    CheckpointError,
    CheckpointFileError,
    CheckpointNotFoundError,
    ConfigError,
    TensorParallelError,
)
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

#: ``format`` metadata value of every tp_gpu checkpoint.
FORMAT = "tp_gpu"

#: Version of the checkpoint layout written here; files of a newer one are refused.
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]
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


def _safetensors():
    """``(safetensors.safe_open, safetensors.numpy)``, imported on first use."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise TensorParallelError(
            f"checkpoints need the safetensors package, which failed to import ({exc}); pip install "
            f"safetensors"
        ) from exc
    return safetensors.safe_open, safetensors.numpy


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


def _little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` contiguous and little-endian, as safetensors stores it (no copy on little-endian hosts)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(_little_endian(a).reshape(-1).view(np.uint8).tobytes()).hexdigest()


def _summary(values) -> str:
    """One value as its string, several distinct values comma-joined in sorted order."""
    distinct = sorted({str(v) for v in values})
    return ",".join(distinct)


def _metadata(
    module: ModuleLike,
    tensors: Dict[str, np.ndarray],
    named: List[Tuple[str, ShardedParameter]],
    extra: Mapping[str, str],
) -> Dict[str, str]:
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
    described = {
        name: {"shape": list(a.shape), "dtype": a.dtype.name, "sha256": _sha256(a)}
        for name, a in tensors.items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "tp_gpu_version": __version__,
        "n_workers": _summary(leaf.config.n_workers for leaf in leaves),
        "backend": _summary(leaf.backend.name for leaf in leaves),
        "dtype": _summary(a.dtype.name for a in tensors.values()),
        "partition": json.dumps(partition),
        "tensors": json.dumps(described),
        **extra,
    }
    metadata[_METADATA_CHECKSUM] = _metadata_sha256(metadata)
    return metadata


#: Metadata key of the SHA-256 over every other metadata entry.
_METADATA_CHECKSUM = "metadata_sha256"


def _metadata_sha256(metadata: Mapping[str, str]) -> str:
    rest = {k: v for k, v in metadata.items() if k != _METADATA_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _file_error(path: str, action: str, exc: OSError) -> CheckpointFileError:
    """``exc``, met while ``action`` (read or write) the checkpoint ``path``, as the error to raise.

    The message names ``path`` as the caller gave it, never the temporary file, and says why:
    a directory, a missing folder, else the operating system's reason and its errno name.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        cause = "it is a directory, not a file"
        if action == "write":
            cause += f" (to save inside it, give a file name: {os.path.join(path, 'model.safetensors')!r})"
    elif not os.path.isdir(parent):
        what = "is not a folder" if os.path.exists(parent) else "does not exist"
        cause = f"the folder {parent!r} {what}"
    elif action == "read" and not os.path.lexists(path):
        cause = "no such file"
    elif exc.errno is not None and exc.strerror:
        cause = f"{exc.strerror} ({errno.errorcode.get(exc.errno, exc.errno)})"
    else:
        cause = str(exc) or type(exc).__name__
    missing = isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT
    error = (CheckpointNotFoundError if missing else CheckpointFileError)(
        f"cannot {action} checkpoint {path!r}: {cause}"
    )
    error.errno, error.strerror, error.filename = exc.errno, exc.strerror, path
    return error


def _create_exclusive(path: str) -> Tuple[int, str]:
    """Create a new empty file beside ``path`` under a unique hidden name; return ``(fd, name)``."""
    directory, base = os.path.split(path)
    for _ in range(100):
        candidate = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 less the umask, like any new file (mkstemp would make it 0o600).
            return os.open(
                candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            ), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file beside {path!r}")


#: Bytes per write call when saving.
_CHUNK = 64 << 20


def _write_all(fh, data: bytes) -> None:
    """Write ``data`` to the open file ``fh`` in chunks."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start : start + _CHUNK])


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; Windows cannot open a directory).

    File systems that cannot fsync a directory (EINVAL, ENOTSUP) are let be:
    the checkpoint itself is already complete and on disk by then.
    """
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def save_checkpoint(
    path: PathLike,
    module: ModuleLike,
    *,
    optimizer: Optional[Optimizer] = None,
    scaler: Optional[GradScaler] = None,
) -> None:
    """Write ``module``'s logical weights to the safetensors file ``path``, atomically.

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
    and the cause. (A process killed outright can leave a hidden
    ``.NAME.*.tmp`` file beside ``path``; ``path`` itself is still intact.)

    The file is assembled in host memory before it is written: the peak host
    memory of a save is about twice the size of the module's weights.

    With several processes (``comm="mpi"``/``"nccl"``) this is collective:
    every rank must call it; the weights are gathered and rank 0 writes the
    file (on a file system the others can read); a failure there is raised on
    every rank.
    """
    _, st_numpy = _safetensors()
    named = named_parameters(module)
    comm = named[0][1].comm if named else LocalComm()
    tensors = {name: _little_endian(param.full()) for name, param in named}  # collective with several ranks
    extra_tensors, extra_metadata = training_state.collect(as_module(module), named, optimizer, scaler)
    tensors.update({name: _little_endian(a) for name, a in extra_tensors.items()})
    failure = None
    if comm.rank == 0:
        metadata = _metadata(module, tensors, named, extra_metadata)
        data = st_numpy.save(tensors, metadata=metadata)
        del tensors
        try:
            try:
                _write_atomically(os.fspath(path), data)
            except OSError as exc:
                raise _file_error(os.fspath(path), "write", exc) from exc
        except BaseException as exc:
            failure = exc
    if comm.size > 1:
        outcome = comm.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
        if outcome is not None and failure is None:
            raise CheckpointError(f"rank 0 failed to write checkpoint {os.fspath(path)!r}: {outcome}")
    if failure is not None:
        raise failure


def _write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``, fsync
    the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):  # refused before a temporary file exists (os.replace would name it)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    fd, tmp = _create_exclusive(os.path.join(directory, os.path.basename(path)))
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # keep the old checkpoint's permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r} is truncated, corrupted or not a tp_gpu checkpoint: {why}")


def _header(f, path: str) -> Tuple[Dict[str, str], Dict[str, Dict[str, Any]]]:
    """The metadata and the per-tensor descriptions of an open file, checked for consistency."""
    metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is a safetensors file but not a tp_gpu checkpoint (metadata "
            f"format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}). To load other weights, read them into arrays and use "
            "load_dense(weight, bias, layout='out_in' for PyTorch) or load_state_dict"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise _corrupt(path, f"format_version {metadata.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format version {version}, written by tp_gpu "
            f"{metadata.get('tp_gpu_version')}; "
            f"this tp_gpu reads versions up to {FORMAT_VERSION}: upgrade tp_gpu"
        )
    if metadata.get(_METADATA_CHECKSUM) != _metadata_sha256(metadata):
        raise _corrupt(path, "the metadata fails its SHA-256 check: it was changed after saving")
    try:
        described = json.loads(metadata["tensors"])
        described = {
            str(name): {
                "shape": tuple(int(n) for n in d["shape"]),
                "dtype": np.dtype(d["dtype"]),
                "sha256": str(d["sha256"]),
            }
            for name, d in described.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(path, f"the 'tensors' metadata is unreadable ({type(exc).__name__}: {exc})") from None
    stored = sorted(f.keys())
    if stored != sorted(described):
        raise _corrupt(
            path, f"the file holds tensors {stored} but its metadata describes {sorted(described)}"
        )
    return metadata, described


def _prefix_hint(described: Mapping[str, Any], names: List[str]) -> str:
    """A hint, when the checkpoint holds the module's tensors under a prefix, to load them with a dict.

    A file saved from ``{"embed": emb, "mlp": mlp}`` holds ``mlp.fc1.weight``, ...; the MLP alone
    expects ``fc1.weight``: it loads as ``{"mlp": mlp}``.
    """
    wanted = set(names)
    prefixes = set()
    for stored in described:
        parts = stored.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[k:]) in wanted:
                prefixes.add(tuple(parts[:k]))
    if not prefixes:
        return ""
    shown = sorted(prefixes)

    def as_dict(prefix: Tuple[str, ...]) -> str:
        return "".join(f"{{{key!r}: " for key in prefix) + "module" + "}" * len(prefix)

    return (
        f". The checkpoint holds them under the prefix{'es' * (len(shown) > 1)} "
        + ", ".join(repr(".".join(p) + ".") for p in shown)
        + f": load_checkpoint(path, {as_dict(shown[0])}, strict=False) loads those into the module"
    )


def _check_fits(
    path: str,
    described: Dict[str, Dict[str, Any]],
    named: List[Tuple[str, ShardedParameter]],
    strict: bool = True,
) -> Tuple[List[str], List[str]]:
    """``(missing, unexpected)`` names; raise CheckpointError listing every tensor that does not fit.

    A tensor the module and the file share must have the module's shape and dtype. With
    ``strict`` every name must be in both; without, the names they do not share are returned,
    but at least one must be shared.
    """
    problems = []
    expected = dict(named)
    described = {n: d for n, d in described.items() if not training_state.is_training_tensor(n)}
    missing = [name for name in expected if name not in described]
    unexpected = [name for name in described if name not in expected]
    if strict:
        problems += [f"tensor {name!r} is missing from the checkpoint" for name in missing]
        problems += [f"tensor {name!r} is in the checkpoint but not in the module" for name in unexpected]
    elif len(missing) == len(expected):
        shown = sorted(described)
        raise CheckpointError(
            f"checkpoint {path!r} holds none of the module's tensors (it holds "
            f"{shown[:8] + ['...'] * (len(shown) > 8)}; the module expects {list(expected)})"
            + _prefix_hint(described, list(expected))
        )
    for name, param in expected.items():
        found = described.get(name)
        if found is None:
            continue
        if found["shape"] != param.shape:
            problems.append(f"tensor {name!r}: expected shape {param.shape}, found {found['shape']}")
        if found["dtype"] != param.dtype:
            problems.append(
                f"tensor {name!r}: expected dtype {param.dtype.name}, found {found['dtype'].name}"
            )
    if problems:
        hint = _prefix_hint(described, missing) if strict and missing else ""
        raise CheckpointError(
            f"checkpoint {path!r} does not fit the module ({len(problems)} "
            f"problem{'s' * (len(problems) > 1)}): "
            + "; ".join(problems)
            + f". The module expects {[n for n, _ in named]}"
            + hint
        )
    return missing, unexpected


def _open_checked(safe_open: Any, path: str) -> Any:
    """``safe_open(path)``, refusing first what is not a regular file (a directory, a device, a pipe).

    safetensors reports a directory as "No such device (os error 19)", and opening a pipe would
    wait for a writer.
    """
    mode = os.stat(path).st_mode  # FileNotFoundError, PermissionError, NotADirectoryError, ...
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file (a device, pipe or socket)", path)
    return safe_open(path, framework="numpy")


def _read(
    path: PathLike, named=None, strict: bool = True
) -> Tuple[Dict[str, np.ndarray], Dict[str, str], List[str], List[str]]:
    """Read and verify the tensors of ``path``: ``(tensors, metadata, missing, unexpected)``.

    Given ``named``, the file is checked against it first (see :func:`_check_fits`) and only the
    tensors the module has are read; without, every tensor is read.
    """
    safe_open, _ = _safetensors()
    path = os.fspath(path)
    missing: List[str] = []
    unexpected: List[str] = []
    try:
        with _open_checked(safe_open, path) as f:
            metadata, described = _header(f, path)
            if named is not None:
                missing, unexpected = _check_fits(path, described, named, strict)
            skipped = set(unexpected)
            tensors = {name: f.get_tensor(name) for name in described if name not in skipped}
    except CheckpointError:
        raise  # a bad file, or one that does not fit
    except OSError as exc:  # a missing or unreadable file, a directory, ...
        raise _file_error(path, "read", exc) from exc
    except Exception as exc:  # safetensors' SafetensorError on a truncated or malformed file, ...
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    for name, array in tensors.items():
        want = described[name]
        if tuple(array.shape) != want["shape"] or array.dtype != want["dtype"]:
            raise _corrupt(
                path,
                f"tensor {name!r} is stored as {tuple(array.shape)} {array.dtype.name} "
                f"but its metadata says {want['shape']} {want['dtype'].name}",
            )
        if _sha256(array) != want["sha256"]:
            raise _corrupt(
                path, f"tensor {name!r} fails its SHA-256 check: its data was changed after saving"
            )
    return tensors, metadata, missing, unexpected


def load_checkpoint(
    path: PathLike,
    module: ModuleLike,
    strict: bool = True,
    *,
    optimizer: Optional[Optimizer] = None,
    scaler: Optional[GradScaler] = None,
) -> LoadedCheckpoint:
    """Load the checkpoint ``path`` into ``module``, re-sharding every tensor for it.

    ``module`` is what was saved, or the same architecture built with any
    worker count, placement or backend. A loaded tensor must have the module's
    shape and exactly its dtype: a float64 checkpoint does not load into a
    float32 module (to convert, use
    ``module.load_state_dict(read_checkpoint(path).tensors)``, which casts).

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
        found shape or dtype. ``module`` is left exactly as it was.
    CheckpointFileError
        The file cannot be read (missing, a directory, no permission); also an
        ``OSError`` (``CheckpointNotFoundError``, a ``FileNotFoundError``, when missing).
    """
    named = named_parameters(module)
    tensors, metadata, missing, unexpected = _read(path, named, strict)
    staged = [
        (param, param.stage(tensors[name], f"checkpoint tensor {name!r}"))
        for name, param in named
        if name in tensors
    ]
    tree = as_module(module)
    commit_training = training_state.stage(os.fspath(path), tree, named, tensors, metadata, optimizer, scaler)
    for param, blocks in staged:
        param.commit(blocks)
    commit_training()
    return LoadedCheckpoint(missing, unexpected, metadata)


def read_checkpoint(path: PathLike) -> Checkpoint:
    """The tensors (new host arrays, by name) and metadata of the checkpoint ``path``, verified.

    Raises CheckpointError for a truncated, corrupted or foreign file, CheckpointFileError
    (an OSError) for one that cannot be read.
    """
    tensors, metadata, _, _ = _read(path)
    return Checkpoint({name: np.array(a) for name, a in tensors.items()}, dict(metadata))
