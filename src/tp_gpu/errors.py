"""The exceptions tp_gpu raises.

Every error is a :class:`TensorParallelError`. Errors about a bad value the
caller passed (a configuration, a shape, an index) also subclass
:class:`ValueError`, so ``except ValueError`` keeps working for code that does
not know about tp_gpu. Messages name the value received and the value expected.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Type, TypeVar

__all__ = [
    "TensorParallelError",
    "ConfigError",
    "ShapeError",
    "IndexOutOfRangeError",
    "BackendUnavailableError",
    "DeviceMismatchError",
    "CommError",
    "CheckpointError",
    "CheckpointFileError",
    "CheckpointNotFoundError",
    "SHOWN_PROBLEMS",
    "summarize_problems",
    "short_list",
    "error_with_problems",
]

#: How many problems an error message lists before it says how many more there are.
SHOWN_PROBLEMS = 5

E = TypeVar("E", bound="TensorParallelError")


class TensorParallelError(Exception):
    """Base class of every error raised by tp_gpu.

    ``problems`` lists every problem an error found, one string each: an error about many things
    (a checkpoint whose 77 tensors have the wrong dtype) names a count and the first
    :data:`SHOWN_PROBLEMS` in its message and carries the full list here. It is ``[]`` for an
    error about one thing.
    """

    problems: List[str] = []


def summarize_problems(problems: Sequence[str], shown: int = SHOWN_PROBLEMS) -> str:
    """``"N problems: p1; ...; p5; and N-5 more; all N are in the exception's .problems"``.

    One problem reads ``"1 problem: p1"``.

    The count comes first, then the first ``shown`` problems in order; the text stays short however
    many there are.
    """
    n = len(problems)
    if n == 1:
        return f"1 problem: {problems[0]}"
    text = f"{n} problems: " + "; ".join(problems[:shown])
    if n > shown:
        text += f"; and {n - shown} more; all {n} are in the exception's .problems"
    return text


def short_list(items: Sequence[str], shown: int = SHOWN_PROBLEMS) -> str:
    """``items`` as ``['a', 'b', ...]``, or past ``shown`` items ``['a', ..., 'e'] and N more``."""
    items = list(items)
    if len(items) <= shown:
        return str(items)
    return f"{items[:shown]} and {len(items) - shown} more"


def error_with_problems(cls: Type[E], head: str, problems: Iterable[str], tail: str = "") -> E:
    """A ``cls`` whose message is ``head (summary)tail`` and whose ``problems`` is the full list."""
    listed = list(problems)
    error = cls(f"{head} ({summarize_problems(listed)}){tail}")
    error.problems = listed
    return error


class ConfigError(TensorParallelError, ValueError):
    """A configuration value is invalid (worker count, dtype, devices, ...)."""


class ShapeError(TensorParallelError, ValueError):
    """An array has the wrong shape, rank or dtype kind for the operation."""


class IndexOutOfRangeError(TensorParallelError, ValueError):
    """A token id lies outside ``[0, vocab_size)``."""


class BackendUnavailableError(TensorParallelError):
    """The requested backend cannot run here; the message says why."""


class DeviceMismatchError(TensorParallelError):
    """An operation mixed arrays of different devices, or ran off its device."""


class CommError(TensorParallelError):
    """A collective between processes failed or timed out (a peer rank may have died)."""


class CheckpointError(TensorParallelError, ValueError):
    """A checkpoint file is truncated, corrupted, not a tp_gpu checkpoint, or does not fit the module.

    The message names the file and, for a mismatch, the tensor with the
    expected and the found shape or dtype. The module is left unchanged.
    A file that cannot be read or written at all raises the subclass
    :class:`CheckpointFileError`, which is also an :class:`OSError`.
    """


class CheckpointFileError(CheckpointError, OSError):
    """A checkpoint file cannot be read or written: a missing file or folder, a directory, no
    permission, a read-only or full file system, a failed fsync or rename.

    Also an :class:`OSError`, so ``except OSError`` keeps working. The message names the path the
    caller gave (never a temporary file) and the cause; ``errno`` and ``strerror`` are those of the
    underlying OSError (which is also ``__cause__``), ``filename`` is the caller's path.
    """

    def __str__(self) -> str:
        # OSError.__str__ would print "[Errno N] strerror: filename" once filename is set.
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(CheckpointFileError, FileNotFoundError):
    """The checkpoint file does not exist (also a :class:`FileNotFoundError`)."""
