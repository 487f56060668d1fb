"""Sharded checkpoints: a folder in which every process writes its own shards and reads only what it needs.

``save_checkpoint(path, module, sharded=True)`` writes the folder ``path/``::

    index.json                         the commit point: what every tensor is and where its pieces lie
    rank-0-<save id>.safetensors       rank 0's pieces (and the whole tensors)
    rank-1-<save id>.safetensors       rank 1's pieces, ...

A *piece* is the part of one logical tensor that one process holds: for a
tensor split along ``axis`` (placement ``Split``), the range of each worker
along ``axis`` (the ranges of the workers of one device block are merged into
one piece when they are consecutive); a whole tensor (``Dense``,
``Replicated``) is one piece, written by rank 0 only. Nothing is gathered. A
piece is stored with its split axis moved first (``np.moveaxis(piece, axis,
0)``), so a range along the split axis is one range of leading rows, one
contiguous byte range in the file, read with
``safe_open(file, "numpy").get_slice(key)[a:b]``. Optimizer state (Adam's
``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``, float16 parameters'
float32 ``master``) is laid out like its parameter and stored the same way as
``optimizer/<parameter>/<key>``.

``index.json`` (JSON, checked by its own SHA-256)::

    {"format": "tp_gpu-sharded", "format_version": 1, "tp_gpu_version": "0.x",
     "save_id": "3f2a...", "world_size": 2, "n_workers": "4", "backend": "numpy", "dtype": "float64",
     "tensors": {
       "fc1.weight": {"shape": [8, 10], "dtype": "float64", "axis": 1, "pieces": [
         {"file": "rank-0-3f2a....safetensors", "key": "fc1.weight#0", "start": [0, 0],
          "shape": [6, 8], "sha256": "...", "chunk_rows": 65536, "chunk_sha256": ["..."]},
         {"file": "rank-1-3f2a....safetensors", "key": "fc1.weight#0", "start": [0, 6],
          "shape": [4, 8], ...}]},
       "fc2.bias": {"shape": [8], "dtype": "float64", "axis": null, "pieces": [{"start": [0], ...}]}},
     "training": {"dropout_steps": {...}, "optimizer": {"type", "param_groups", "steps"}, "scaler": {...}},
     "index_sha256": "..."}

In that example (``ParallelMLP(8, 10, 8)`` at 4 workers over 2 processes)
``fc1.weight`` (8 x 10, split on axis 1 as 3, 3, 2, 2 columns) has two pieces:
rank 0's 6 columns stored as 6 x 8, rank 1's 4 as 4 x 8. ``start`` is the piece's offset on every
axis of the logical tensor; ``shape`` the stored (moved-first) shape;
``chunk_sha256`` the SHA-256 of every ``chunk_rows`` leading rows (about 4 MiB,
at least one row), ``sha256`` that of the whole piece.

**Saving** is two phases: :func:`prepare_sharded_save` (collective: the ranks
agree on a save id and on the tensors; each copies its own blocks into host
buffers, so training may go on) and :meth:`PreparedSave.write` (no
collective): each rank writes its file and fsyncs it, then a small marker
``rank-<r>-<id>.json`` with its pieces' hashes; rank 0 waits for every marker
(``TP_GPU_COMM_TIMEOUT`` seconds, 600 by default), writes ``index.json``
atomically (temporary file, fsync, rename) and removes the files of older
saves. Until that rename the previous index and its files are untouched: a
save that is killed or runs out of disk leaves the previous checkpoint
loadable (its files go at the next save). A save holds its own shards in host
memory, no more; concurrent saves into one folder are not supported.

**Loading** (:func:`load_sharded`, through ``load_checkpoint`` given a folder)
works at any worker count over any number of processes: each process reads,
for each of its device blocks, only the rows of the pieces it overlaps,
rounded out to whole chunks whose hashes it checks (a piece read whole: its
SHA-256), in batches of at most 64 MiB. Everything is checked and staged before
any change; with several processes the ranks agree first: an error on one is raised on all.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Any, Dict, Hashable, List, Optional, Tuple

import numpy as np

from . import checkpoint_pieces as pieces
from . import collectives, training_state
from .checkpoint_io import check_path, file_error, write_atomically
from .checkpoint_pieces import _CHECKSUM, _FILES, FORMAT, FORMAT_VERSION, INDEX, _digest, _rank_file, _remove
from .checkpoint_sharded_load import load_sharded, read_index  # noqa: F401  (the load side, re-exported)
from .errors import CheckpointError, CheckpointFileError, ConfigError
from .layers.base import ParallelModule
from .optim import Optimizer, _state_dtype
from .parameter import ShardedParameter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INDEX",
    "PreparedSave",
    "prepare_sharded_save",
    "save_sharded",
    "load_sharded",
]


Named = List[Tuple[str, ShardedParameter]]


def _along(axis: int, index: slice) -> Tuple[slice, ...]:
    return (slice(None),) * axis + (index,)


def _parts(p: ShardedParameter, device: Hashable) -> List[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """``(global range, range in the device block)`` of each piece of ``device``'s block of split ``p``."""
    layout = p.layout
    assert layout is not None
    run = layout.run(device)
    if run is not None:
        return [(run, (0, run[1] - run[0]))]
    return [(layout.ranges[w], layout.local[w]) for w in layout.groups[device]]


def _whole(p: ShardedParameter) -> bool:
    return p.layout is None or p.axis is None


class PreparedSave:
    """One process's part of a sharded save, with its shards already in host buffers; see :meth:`write`."""

    def __init__(
        self, path: str, rank: int, world_size: int, save_id: str, skeleton: Optional[Dict[str, Any]]
    ):
        self.path, self.rank, self.world_size, self.save_id = path, rank, world_size, save_id
        self.skeleton = skeleton  # rank 0: the index without pieces
        self.arrays: Dict[str, np.ndarray] = {}  # stored key -> moved-first host copy
        self.pieces: List[Tuple[str, str, Tuple[int, ...]]] = []  # (tensor, key, logical start)
        self.timeout = float(os.environ.get("TP_GPU_COMM_TIMEOUT", 600))
        self.committed = False  # rank 0: the index names this save's files; never remove them after

    def add(self, name: str, host: np.ndarray, start: Tuple[int, ...]) -> None:
        key = f"{name}#{sum(1 for t, _, _ in self.pieces if t == name)}"
        self.arrays[key] = host
        self.pieces.append((name, key, start))

    def write(self) -> None:
        """Write this process's file and marker; on rank 0 also wait for every marker and commit the index.
        No collective. CheckpointFileError (an OSError) for a file-system failure, CheckpointError
        when another rank failed or its marker did not come in time."""
        file = os.path.join(self.path, _rank_file(self.rank, self.save_id))
        try:
            try:
                os.makedirs(self.path, exist_ok=True)
                described: Dict[str, List[Dict[str, Any]]] = {}
                for name, key, start in self.pieces:
                    entry = {"file": os.path.basename(file), "key": key, "start": list(start)}
                    entry["shape"] = list(self.arrays[key].shape)
                    described.setdefault(name, []).append({**entry, **pieces.describe(self.arrays[key])})
                pieces.write_rank_file(file, self.arrays, {"format": FORMAT, "save_id": self.save_id})
                self.arrays = {}  # the buffers are on disk: let them go
                marker = {"save_id": self.save_id, "rank": self.rank, "pieces": described}
                write_atomically(self._marker(self.rank), json.dumps(marker).encode())
            except OSError as exc:
                raise self._file_error(exc, file) from exc
            if self.rank == 0:
                self._commit()
        except BaseException as exc:
            self._give_up(exc)
            raise

    def _marker(self, rank: int) -> str:
        return os.path.join(self.path, _rank_file(rank, self.save_id, "json"))

    def _file_error(self, exc: OSError, file: str) -> CheckpointFileError:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            error = file_error(self.path, "write", exc)
            error.args = (f"cannot write sharded checkpoint {self.path!r}: it is a file, not a folder",)
            return error
        cause = exc.strerror or str(exc)
        error = CheckpointFileError(
            f"cannot write sharded checkpoint {self.path!r}: {cause} (writing {file!r})"
        )
        error.errno, error.strerror, error.filename = exc.errno, exc.strerror, self.path
        return error

    def _give_up(self, exc: BaseException) -> None:
        """After a failure: remove this save's files that nothing references, tell rank 0 (best effort)."""
        self.arrays = {}
        if self.committed:
            return
        mine = [_rank_file(self.rank, self.save_id)] + ([] if self.rank else self._save_files())
        for name in mine:
            _remove(os.path.join(self.path, name))
        if self.rank:
            try:
                write_atomically(
                    self._marker(self.rank), json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                )
            except OSError:
                pass  # rank 0 will time out waiting

    def discard(self) -> None:
        """Remove this rank's files of a save that failed on some rank (call once every rank is done
        writing); nothing once the index names them."""
        try:
            with open(os.path.join(self.path, INDEX), "rb") as fh:
                named = json.loads(fh.read()).get("save_id") == self.save_id
        except (OSError, ValueError, AttributeError):
            named = False
        if not (self.committed or named):
            for name in self._save_files():
                if name.startswith(f"rank-{self.rank}-"):
                    _remove(os.path.join(self.path, name))

    def _save_files(self) -> List[str]:
        try:
            return [
                n for n in os.listdir(self.path) if (m := _FILES.fullmatch(n)) and m.group(2) == self.save_id
            ]
        except OSError:
            return []

    def _wait_for_markers(self) -> List[Dict[str, Any]]:
        markers: Dict[int, Dict[str, Any]] = {}
        deadline, pause = time.monotonic() + self.timeout, 0.002
        while len(markers) < self.world_size:
            for rank in range(self.world_size):
                if rank not in markers and os.path.exists(self._marker(rank)):
                    with open(self._marker(rank), "rb") as fh:
                        marker = json.loads(fh.read())
                    if "error" in marker:
                        raise CheckpointError(
                            f"rank {rank} failed to write its shards of sharded checkpoint {self.path!r}: "
                            f"{marker['error']}"
                        )
                    markers[rank] = marker
            if len(markers) < self.world_size:
                if time.monotonic() > deadline:
                    late = sorted(set(range(self.world_size)) - set(markers))
                    raise CheckpointError(
                        f"sharded checkpoint {self.path!r}: ranks {late} did not finish writing their shards "
                        f"within {self.timeout:g} s (TP_GPU_COMM_TIMEOUT); the previous checkpoint is kept"
                    )
                time.sleep(pause)
                pause = min(2 * pause, 0.1)
        return [markers[r] for r in range(self.world_size)]

    def _commit(self) -> None:
        assert self.skeleton is not None
        index = json.loads(json.dumps(self.skeleton))
        for marker in self._wait_for_markers():
            for name, described in marker["pieces"].items():
                index["tensors"][name]["pieces"].extend(described)
        for name, entry in index["tensors"].items():
            pieces.check_tensor(self.path, name, entry)
        index[_CHECKSUM] = _digest(index)
        target = os.path.join(self.path, INDEX)
        try:
            _write_index(target, json.dumps(index, indent=1).encode())
        except OSError as exc:
            raise self._file_error(exc, target) from exc
        self.committed = True
        try:
            names = os.listdir(self.path)
        except OSError:
            return  # the older files stay until a later save; the checkpoint is complete
        for name in names:
            found = _FILES.fullmatch(name)
            if found and (found.group(2) != self.save_id or found.group(3) == "json"):
                _remove(os.path.join(self.path, name))


def _write_index(target: str, data: bytes) -> None:
    """The commit point of a save (a hook for tests that interrupt a save just before it)."""
    write_atomically(target, data)


def _host_copy(
    p: ShardedParameter, block: Any, axis: Optional[int], rows: Optional[Tuple[int, int]]
) -> np.ndarray:
    """A new C-contiguous little-endian host array of ``block`` (its ``rows`` along ``axis``, moved first)."""
    host = collectives.to_host(p.backend, block)
    if axis is not None and rows is not None:
        host = np.moveaxis(host[_along(axis, slice(*rows))], axis, 0)
    return np.array(host, dtype=host.dtype.newbyteorder("<"), order="C", copy=True)


def _add_tensor(
    save: PreparedSave, tensors: Dict[str, Any], name: str, p: ShardedParameter, blocks: Dict[Hashable, Any]
) -> None:
    """Describe tensor ``name`` (laid out like ``p``, values ``blocks``) and queue this process's pieces."""
    dtype = np.dtype(next(iter(blocks.values())).dtype)
    pieces.safetensors_dtype_ok(dtype)
    axis = None if _whole(p) else p.axis % len(p.shape)  # type: ignore[operator]
    tensors[name] = {"shape": list(p.shape), "dtype": dtype.name, "axis": axis, "pieces": []}
    if axis is None:
        if save.rank == 0:
            save.add(name, _host_copy(p, blocks[p.block_devices[0]], None, None), (0,) * len(p.shape))
        return
    for device in p.layout.groups:  # type: ignore[union-attr]
        for (first, last), local in _parts(p, device):
            if last > first:
                start = tuple(first if k == axis else 0 for k in range(len(p.shape)))
                save.add(name, _host_copy(p, blocks[device], axis, local), start)


def _optimizer_state(optimizer: Optimizer, named: Named) -> List[Tuple[int, int]]:
    """This process's ``(step, has master weights)`` of each of the optimizer's parameters
    (``named`` must hold them all)."""
    training_state._names(named, optimizer)  # ConfigError for a parameter outside the module
    return [
        (max(b.get("step", 0) for b in blocks.values()), int(any("master" in b for b in blocks.values())))
        for blocks in optimizer._state
    ]


def _descriptions(named: Named) -> List[Any]:
    """What every rank must agree on: each parameter's name, shape, dtype and split axis."""
    return [(n, list(p.shape), np.dtype(p.dtype).name, None if _whole(p) else p.axis) for n, p in named]


def prepare_sharded_save(
    path: str, module: Any, optimizer: Optional[Optimizer] = None, scaler: Any = None
) -> PreparedSave:
    """Phase one of a sharded save (collective with several processes): agree on a save id and the
    tensors, and copy this process's blocks of every tensor into host buffers. Returns the
    :class:`PreparedSave` whose :meth:`~PreparedSave.write` puts them on disk."""
    from . import __version__
    from .checkpoint import as_module, named_parameters

    path = check_path(path)
    named = named_parameters(module)
    tree = as_module(module)
    comm = named[0][1].comm
    optimized = [] if optimizer is None else _optimizer_state(optimizer, named)
    digest = int(_digest({"tensors": _descriptions(named)})[:12], 16)
    agreed = pieces.max_over_ranks(
        comm, [secrets.randbits(48), digest, -digest] + [s for s, _ in optimized] + [m for _, m in optimized]
    )
    if agreed[1] != -agreed[2]:
        raise ConfigError(
            f"sharded save to {path!r}: the ranks hold different tensors (names, shapes, dtypes, split "
            "axes); every rank must save the same model"
        )
    save_id = f"{int(agreed[0]):012x}"
    save = PreparedSave(path, comm.rank, comm.size, save_id, None)
    tensors: Dict[str, Any] = {}
    for name, p in named:
        _add_tensor(save, tensors, name, p, p.blocks)
    training: Dict[str, Any] = {"dropout_steps": training_state._dropout_steps(tree)}
    if optimizer is not None:
        steps = {}
        names = training_state._names(named, optimizer)
        for i, (p, blocks) in enumerate(zip(optimizer.params, optimizer._state)):
            step, master = int(agreed[3 + i]), bool(agreed[3 + len(optimized) + i])
            if not step:
                continue
            steps[names[i]] = step
            for key in list(optimizer.STATE_KEYS) + (["master"] if master else []):
                dtype = np.float32 if key == "master" else _state_dtype(p)
                values = {d: b[key] if key in b else _zeros(p, d, dtype) for d, b in blocks.items()}
                _add_tensor(save, tensors, f"{training_state.PREFIX}{names[i]}/{key}", p, values)
        training["optimizer"] = {
            "type": type(optimizer).__name__,
            "param_groups": training_state._jsonable([optimizer.hyperparameters()]),
            "steps": steps,
        }
    if scaler is not None:
        training["scaler"] = scaler.state_dict()
    leaves = [m for _, m in tree.named_modules() if isinstance(m, ParallelModule)]
    if save.rank == 0:
        save.skeleton = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tp_gpu_version": __version__,
            "save_id": save_id,
            "world_size": comm.size,
            "n_workers": ",".join(sorted({str(leaf.config.n_workers) for leaf in leaves})),
            "backend": ",".join(sorted({leaf.backend.name for leaf in leaves})),
            "dtype": ",".join(sorted({np.dtype(p.dtype).name for _, p in named})),
            "tensors": tensors,
            "training": training,
        }
    return save


def _zeros(p: ShardedParameter, device: Hashable, dtype: Any) -> Any:
    with p.backend.device(device):
        return p.backend.xp.zeros(p.blocks[device].shape, dtype=dtype)


def save_sharded(path: str, module: Any, optimizer: Optional[Optimizer] = None, scaler: Any = None) -> None:
    """Prepare and write a sharded save, then report any rank's failure on every rank (collective)."""
    from .checkpoint import named_parameters

    comm = named_parameters(module)[0][1].comm
    prepared = prepare_sharded_save(path, module, optimizer, scaler)
    failure: Optional[BaseException] = None
    try:
        prepared.write()
    except Exception as exc:
        failure = exc
    failed = collectives.failed_rank(comm, failure)
    if failed is not None:  # every rank is done writing: remove what this save left on any rank
        prepared.discard()
    if failure is None and failed is not None:
        raise CheckpointError(
            f"rank {failed} failed to save sharded checkpoint {prepared.path!r} (its error is raised "
            "there); the previous checkpoint is kept"
        )
    if failure is not None:
        raise failure
