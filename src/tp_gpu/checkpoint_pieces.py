"""The pieces of a sharded checkpoint: hashing, writing a rank file, checking an index, reading slices.

See :mod:`tp_gpu.checkpoint_sharded` for the folder's layout. A *piece* is one
contiguous part of a logical tensor, stored in one rank file with the tensor's
split axis moved first (``np.moveaxis(piece, axis, 0)``): any range of indices
along the split axis is then one range of leading rows, one contiguous byte
range of the file, which ``safe_open(file, "numpy").get_slice(key)[a:b]`` reads
without reading the rest. Each piece carries the SHA-256 of its bytes and of
every chunk of ``chunk_rows`` leading rows (about :data:`CHUNK_BYTES` each, at
least one row), so a reader that reads only some rows still checks them: it
rounds its range out to whole chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import collectives
from .backends.numpy_backend import CPU, NumpyBackend
from .checkpoint_format import _safetensors
from .checkpoint_io import open_checked
from .errors import CheckpointError, ConfigError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX",
    "CHUNK_BYTES",
    "BATCH_BYTES",
    "chunk_rows",
    "logical_shape",
    "describe",
    "write_rank_file",
    "check_tensor",
    "PieceReader",
    "max_over_ranks",
    "full_box",
]

#: ``format`` of a sharded checkpoint's index, and the version written here (newer ones are refused).
FORMAT = "tp_gpu-sharded"
FORMAT_VERSION = 1

#: The index file of a sharded checkpoint folder: the commit point of a save.
INDEX = "index.json"

#: The index entry holding the SHA-256 of the rest of the index (canonical JSON).
_CHECKSUM = "index_sha256"

#: Names of the rank files and markers: ``rank-<rank>-<save id>.safetensors`` / ``.json``.
_FILES = re.compile(r"rank-(\d+)-([0-9a-f]+)\.(safetensors|json)")


def _rank_file(rank: int, save_id: str, ext: str = "safetensors") -> str:
    """The name of ``rank``'s file (or, with ``ext="json"``, marker) of the save ``save_id``."""
    return f"rank-{rank}-{save_id}.{ext}"


def _remove(path: str) -> None:
    """Remove ``path`` if it can be (a failed save's leftovers; a later save removes what stays)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _digest(value: Dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``value`` without its checksum entry."""
    rest = {k: v for k, v in value.items() if k != _CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


_HOST = NumpyBackend()


def max_over_ranks(comm: Any, values: Sequence[float]) -> np.ndarray:
    """The elementwise maximum of ``values`` (float64, the same length on every rank) over the
    processes of ``comm``: one collective (a host all-reduce) for the ranks' small agreements."""
    vector = np.array(values, dtype=np.float64)
    if comm is None or comm.size == 1:
        return vector
    return np.asarray(collectives.reduce_max(_HOST, {CPU: vector}, CPU, comm))


#: Target bytes per hashed chunk of a piece's leading rows.
CHUNK_BYTES = 4 << 20

#: Most bytes a reader holds of one piece at a time (whole chunks; at least one chunk).
BATCH_BYTES = 64 << 20

Box = Tuple[Tuple[int, int], ...]  # per axis, a half-open [first, last)


def chunk_rows(shape: Sequence[int], itemsize: int) -> int:
    """Leading rows per hashed chunk of a piece of (moved-first) ``shape``: about CHUNK_BYTES, at least 1."""
    row = itemsize * math.prod(shape[1:]) if len(shape) else itemsize
    return max(1, CHUNK_BYTES // max(row, 1))


def logical_shape(stored: Sequence[int], axis: Optional[int]) -> Tuple[int, ...]:
    """The logical shape of a piece stored as ``stored`` with ``axis`` moved first."""
    if axis is None or not len(stored):
        return tuple(stored)
    rest = list(stored[1:])
    rest.insert(axis, stored[0])
    return tuple(rest)


def _chunk_hashes(array: np.ndarray, rows: int, whole: Optional[Any] = None) -> List[str]:
    """SHA-256 of every ``rows`` leading rows of a C-contiguous ``array`` (0-d: of the one value),
    feeding ``whole`` (a hashlib object) the same bytes."""
    flat = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    hashes = []
    for first in range(0, max(flat.shape[0], 1), rows):
        view = np.ascontiguousarray(flat[first : first + rows]).data.cast("B")
        if whole is not None:
            whole.update(view)
        hashes.append(hashlib.sha256(view).hexdigest())
    return hashes


def describe(array: np.ndarray) -> Dict[str, Any]:
    """``{"sha256", "chunk_rows", "chunk_sha256"}`` of a C-contiguous, little-endian (moved-first) piece.

    One pass over the bytes, no copy: the whole hash and each chunk's hash are fed from the same views.
    """
    rows = chunk_rows(array.shape, array.itemsize)
    whole = hashlib.sha256()
    chunks = _chunk_hashes(array, rows, whole)
    return {"sha256": whole.hexdigest(), "chunk_rows": rows, "chunk_sha256": chunks}


def write_rank_file(path: str, arrays: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Write ``arrays`` to the safetensors file ``path`` and fsync it.

    ``safetensors.numpy.save_file`` (0.6 and later) writes from the arrays' own memory, without
    building the file's bytes first: the extra memory is its header.
    """
    _, st_numpy = _safetensors()
    st_numpy.save_file(arrays, path, metadata=metadata)
    # safetensors creates the file 0o600; give it a new file's mode (0o666 less the umask), read off
    # the folder (0o777 less the umask) without touching the process-wide umask.
    os.chmod(path, stat.S_IMODE(os.stat(os.path.dirname(path) or ".").st_mode) & 0o666)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bad(folder: str, name: str, why: str) -> CheckpointError:
    return CheckpointError(f"sharded checkpoint {folder!r}: tensor {name!r}: {why}")


def check_tensor(folder: str, name: str, entry: Any) -> Dict[str, Any]:
    """One tensor entry of an index, checked: its pieces tile the logical shape exactly.

    A whole tensor (``axis`` None) is one piece at the origin of the full shape; a split one is
    pieces of the full extent on every other axis whose ranges along ``axis`` follow each other
    from 0 to its length. Every piece names a plain file name (no folder) and a stored shape that
    is its logical shape with ``axis`` moved first. Raises CheckpointError naming the tensor.
    """
    try:
        shape = tuple(int(n) for n in entry["shape"])
        dtype = np.dtype(entry["dtype"])
        axis = entry["axis"]
        axis = None if axis is None else int(axis)
        pieces: List[Dict[str, Any]] = []
        for p in entry["pieces"]:
            piece: Dict[str, Any] = {
                "file": str(p["file"]),
                "key": str(p["key"]),
                "start": tuple(int(n) for n in p["start"]),
                "shape": tuple(int(n) for n in p["shape"]),
                "sha256": str(p["sha256"]),
                "chunk_rows": int(p["chunk_rows"]),
                "chunk_sha256": [str(h) for h in p["chunk_sha256"]],
            }
            pieces.append(piece)
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(folder, name, f"its index entry is unreadable ({type(exc).__name__}: {exc})") from None
    if axis is not None and not 0 <= axis < len(shape):
        raise _bad(folder, name, f"split axis {axis} is outside its {len(shape)} axes")
    at = 0
    for piece in sorted(pieces, key=lambda p: p["start"][axis] if axis is not None else 0):
        start, stored = piece["start"], piece["shape"]
        logical = logical_shape(stored, axis)
        if os.path.basename(piece["file"]) != piece["file"] or piece["file"] in ("", ".", ".."):
            raise _bad(folder, name, f"a piece names the file {piece['file']!r}; expected a plain file name")
        expected_start = tuple(at if k == axis else 0 for k in range(len(shape)))
        size = logical[axis] if axis is not None else 0
        expected_shape = tuple(size if k == axis else n for k, n in enumerate(shape))
        if axis is None:
            expected_shape = shape
        if len(start) != len(shape) or start != expected_start or logical != expected_shape or size < 0:
            raise _bad(
                folder,
                name,
                f"piece {piece['key']!r} in {piece['file']!r} starts at {start} with shape {logical}; "
                f"expected start {expected_start} and shape {expected_shape} to tile {shape}",
            )
        rows = stored[0] if stored else 1
        if piece["chunk_rows"] < 1 or len(piece["chunk_sha256"]) != max(1, -(-rows // piece["chunk_rows"])):
            raise _bad(folder, name, f"piece {piece['key']!r} has {len(piece['chunk_sha256'])} chunk hashes")
        at += size
    covered = at == (shape[axis] if axis is not None else 0) and (axis is not None or len(pieces) == 1)
    if not covered:
        raise _bad(folder, name, f"its pieces do not cover its shape {shape} (axis {axis})")
    return {"shape": shape, "dtype": dtype, "axis": axis, "pieces": pieces}


def _read_rows(handle: Any, key: str, first: int, last: int) -> np.ndarray:
    """Rows ``[first, last)`` of the stored piece ``key``: a safetensors slice read (a hook for tests)."""
    return handle.get_slice(key)[first:last]


def _read_whole(handle: Any, key: str) -> np.ndarray:
    """The whole stored piece ``key`` (a hook for tests)."""
    return handle.get_tensor(key)


class PieceReader:
    """Reads boxes of logical tensors from the pieces of one checkpoint folder, verifying each byte read.

    A piece is read in batches of whole chunks of at most about :data:`BATCH_BYTES` (one bounded
    buffer), each copied straight into the destination. Files are opened once each, on first use;
    use as a context manager to close them.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._stack = contextlib.ExitStack()
        self._handles: Dict[str, Any] = {}

    def __enter__(self) -> PieceReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _handle(self, name: str, piece: Dict[str, Any]) -> Any:
        file = piece["file"]
        if file not in self._handles:
            path = os.path.join(self.folder, file)
            safe_open, _ = _safetensors()
            try:
                handle = self._stack.enter_context(open_checked(safe_open, path))
            except OSError as exc:
                raise CheckpointError(
                    f"sharded checkpoint {self.folder!r}: cannot read rank file {file!r} (holding tensor "
                    f"{name!r}): {exc.strerror or exc}"
                ) from exc
            except Exception as exc:
                raise CheckpointError(
                    f"sharded checkpoint {self.folder!r}: rank file {file!r} (holding tensor {name!r}) is "
                    f"truncated or corrupted: {type(exc).__name__}: {exc}"
                ) from exc
            self._handles[file] = handle
        handle = self._handles[file]
        try:
            found = handle.get_slice(piece["key"])
            stored_shape = tuple(found.get_shape())
        except Exception:
            raise self._error(name, piece, "is not in the file") from None
        if stored_shape != piece["shape"]:
            raise self._error(name, piece, f"holds shape {stored_shape}, its index says {piece['shape']}")
        return handle

    def _error(self, name: str, piece: Dict[str, Any], why: str) -> CheckpointError:
        return CheckpointError(
            f"sharded checkpoint {self.folder!r}: rank file {piece['file']!r}, piece {piece['key']!r} of "
            f"tensor {name!r}: {why}"
        )

    def _batches(
        self, name: str, piece: Dict[str, Any], dtype: np.dtype, lo: int, hi: int
    ) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row, rows)`` of the stored piece over ``[lo, hi)`` (whole chunks, or the whole
        piece), in verified batches: each batch's chunk hashes, or, when the range is the whole piece,
        the piece's SHA-256 once the last batch is read (before it is yielded)."""
        handle, key, step = self._handle(name, piece), piece["key"], piece["chunk_rows"]
        total = piece["shape"][0]
        whole = (lo, hi) == (0, total)
        row_bytes = dtype.itemsize * math.prod(piece["shape"][1:])
        batch = max(1, BATCH_BYTES // max(row_bytes * step, 1)) * step
        digest = hashlib.sha256()
        for first in range(lo, max(hi, lo + 1), batch):
            last = min(hi, first + batch)
            try:
                one = whole and last - first == total
                data = _read_whole(handle, key) if one else _read_rows(handle, key, first, last)
            except Exception as exc:
                raise self._error(name, piece, f"cannot be read ({type(exc).__name__}: {exc})") from exc
            if data.dtype != dtype or tuple(data.shape[:1]) != (last - first,):
                raise self._error(name, piece, f"reads as {data.shape} {data.dtype.name}, not {dtype.name}")
            data = np.ascontiguousarray(data)
            hashes = _chunk_hashes(data, step, digest if whole else None)
            if not whole and hashes != piece["chunk_sha256"][first // step : -(-last // step)]:
                raise self._error(
                    name,
                    piece,
                    f"rows {first}..{last} fail their SHA-256 check: its data was changed after saving",
                )
            if whole and last == hi and digest.hexdigest() != piece["sha256"]:
                raise self._error(name, piece, "fails its SHA-256 check: its data was changed after saving")
            yield first, data

    def read(
        self, name: str, entry: Dict[str, Any], box: Box, out: Optional[np.ndarray] = None
    ) -> np.ndarray:
        """The part ``box`` of the logical tensor ``name`` (an entry of :func:`check_tensor`) in the
        tensor's axis order, written into ``out`` (shaped like ``box``; a new array by default).

        Only the rows of the pieces that ``box`` overlaps are read, rounded out to whole chunks; a
        whole-stored tensor (``axis`` None) is read whole, to check its SHA-256, even when ``box`` is
        part of it."""
        axis = entry["axis"]
        if out is None:
            out = np.empty(tuple(b - a for a, b in box), dtype=entry["dtype"])
        if not out.ndim:  # a scalar: one piece, read whole
            (piece,) = entry["pieces"]
            data = _read_whole(self._handle(name, piece), piece["key"])
            if (
                data.dtype != entry["dtype"]
                or describe(np.ascontiguousarray(data))["sha256"] != piece["sha256"]
            ):
                raise self._error(name, piece, "fails its SHA-256 check: its data was changed after saving")
            out[...] = data
            return out
        lead = 0 if axis is None else axis  # the logical axis of the stored rows
        for piece in entry["pieces"]:
            start = piece["start"]
            logical = logical_shape(piece["shape"], axis)
            overlap = [(max(a, s), min(b, s + n)) for (a, b), s, n in zip(box, start, logical)]
            if any(a >= b for a, b in overlap):
                continue
            first, last = overlap[lead][0] - start[lead], overlap[lead][1] - start[lead]
            step, total = piece["chunk_rows"], piece["shape"][0]
            lo, hi = (
                (0, total) if axis is None else (first // step * step, min(total, -(-last // step) * step))
            )
            for at, data in self._batches(name, piece, entry["dtype"], lo, hi):
                a, b = max(first, at), min(last, at + data.shape[0])
                if a >= b:
                    continue
                rows = np.moveaxis(data[a - at : b - at], 0, lead)
                source = tuple(
                    slice(None) if k == lead else slice(p - s, q - s)
                    for k, ((p, q), s) in enumerate(zip(overlap, start))
                )
                target = tuple(
                    slice(a + start[lead] - box[k][0], b + start[lead] - box[k][0])
                    if k == lead
                    else slice(p - box[k][0], q - box[k][0])
                    for k, (p, q) in enumerate(overlap)
                )
                out[target] = rows[source]
        return out


def safetensors_dtype_ok(dtype: np.dtype) -> None:
    """Refuse, before anything is written, a dtype that safetensors cannot store."""
    if dtype.kind not in "fiub" or dtype.itemsize > 8:
        raise ConfigError(f"a sharded checkpoint stores float, integer or bool tensors; got dtype {dtype}")


def full_box(shape: Sequence[int]) -> Box:
    """The box of a whole tensor of ``shape``."""
    return tuple((0, int(n)) for n in shape)
