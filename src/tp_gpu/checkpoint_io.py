"""The file-system side of checkpoints: path checks, atomic writes, leftover cleanup, file errors.

A save writes under a temporary name ``.NAME.<12 hex digits>.tmp`` beside the
target, holds an exclusive ``flock`` on it for as long as it writes, fsyncs it
and renames it over the target. A save that is killed outright (``kill -9``, a
power cut) leaves that hidden file behind: the next save to the same target
removes every such file whose lock it can take, i.e. whose writer is gone. A
save running at the same time in another process holds its lock, so its file
is left alone. (Where ``fcntl`` is missing, on Windows, nothing is removed.)

A target that is a symbolic link is followed, as ``cp`` and most editors do:
the new file is written beside the link's final target and renamed over it,
so the link stays a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from typing import Any, List, Tuple, Union

from .errors import CheckpointFileError, CheckpointNotFoundError, ConfigError

try:  # POSIX; Windows has no fcntl, and then leftovers are not cleaned
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "PathLike",
    "check_path",
    "file_error",
    "write_atomically",
    "remove_stale_temporaries",
    "temporary_pattern",
    "open_checked",
    "lock_file",
    "fsync_directory",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Bytes per write call when saving.
CHUNK = 64 << 20


def check_path(path: Any, what: str = "checkpoint path") -> str:
    """``path`` as a ``str``, or ConfigError naming what was given and what is expected.

    Accepts ``str``, ``bytes`` and ``os.PathLike``; refuses anything else, an empty path and a path
    with a NUL byte (which no operating system can open), before anything is read or written.
    """
    try:
        text = os.fspath(path)
    except TypeError:
        raise ConfigError(
            f"{what} must be a str, bytes or os.PathLike (e.g. 'model.safetensors'), got "
            f"{type(path).__name__} {path!r}"
        ) from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ConfigError(f"{what} must be a file name, got the empty string")
    if "\0" in text:
        raise ConfigError(f"{what} must not contain a NUL byte ('\\x00'), got {text!r}")
    return text


def file_error(path: str, action: str, exc: OSError) -> CheckpointFileError:
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


def temporary_pattern(target: str) -> re.Pattern[str]:
    """The names of the temporary files that a save to ``target`` writes: ``.NAME.<12 hex>.tmp``."""
    return re.compile(rf"\.{re.escape(os.path.basename(target))}\.[0-9a-f]{{12}}\.tmp")


def lock_file(fd: int, blocking: bool) -> bool:
    """Take an exclusive flock on ``fd``; False when ``blocking`` is False and another holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _create_locked(target: str) -> Tuple[int, str]:
    """A new empty file ``.NAME.<hex>.tmp`` beside ``target``, created and locked: ``(fd, name)``.

    The lock tells :func:`remove_stale_temporaries` in other processes that the file is in use.
    A cleaner may remove the file between its creation and the lock; then the name no longer
    leads to the open file, and another name is tried.
    """
    directory, base = os.path.split(target)
    for _ in range(100):
        candidate = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            # 0o666 less the umask, like any new file (mkstemp would make it 0o600).
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        try:
            lock_file(fd, blocking=True)
            same = os.path.samestat(os.fstat(fd), os.stat(candidate))
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(candidate)
            raise
        if same:
            return fd, candidate
        os.close(fd)
    raise FileExistsError(f"could not create a unique temporary file beside {target!r}")


def remove_stale_temporaries(target: str) -> List[str]:
    """Remove the temporary files that killed saves to ``target`` left beside it; return their names.

    Only names of :func:`temporary_pattern` are considered, and of those only the ones whose
    flock can be taken at once: a save in progress (in any process) holds the lock on its
    file, and the kernel drops it when that process ends, however it ends.
    """
    if fcntl is None:  # pragma: no cover - Windows: no way to tell a live save from a dead one
        return []
    directory = os.path.dirname(target) or "."
    pattern = temporary_pattern(target)
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone already, a link, or not ours to read
        try:
            if lock_file(fd, blocking=False) and os.path.samestat(os.fstat(fd), os.lstat(path)):
                os.unlink(path)  # still locked by us, so no save can have taken it meanwhile
                removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _write_all(fh: Any, data: bytes) -> None:
    """Write ``data`` to the open file ``fh`` in chunks of :data:`CHUNK` bytes."""
    view = memoryview(data)
    for start in range(0, len(view), CHUNK):
        fh.write(view[start : start + CHUNK])


def fsync_directory(directory: str) -> None:
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


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a locked temporary file beside ``path`` (beside its final target when
    ``path`` is a symbolic link), fsync it, rename it over that target, fsync the directory.

    Leftovers of earlier saves that were killed are removed first (see
    :func:`remove_stale_temporaries`). On any failure the temporary file is removed and the
    target is as it was.
    """
    target = os.path.realpath(path)  # a symbolic link is followed: the link stays, its target changes
    directory = os.path.dirname(target)
    if os.path.isdir(target):  # refused before a temporary file exists (os.replace would name it)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    remove_stale_temporaries(target)
    fd, tmp = _create_locked(target)
    try:
        with os.fdopen(os.dup(fd), "wb") as fh:  # the lock stays on ``fd`` until after the rename
            _write_all(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))  # keep the old checkpoint's permissions
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    fsync_directory(directory)


def open_checked(safe_open: Any, path: str) -> Any:
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
