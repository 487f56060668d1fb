"""Writing Hugging Face folders: ``save_pretrained`` for :class:`BertModel` and the decoder models.

The inverse of the loaders (:mod:`.hf_loader` and :func:`.bert.load_hf_weights` for BERT,
:mod:`.decoder_loading` for GPT-2, Llama and Qwen2). A folder holds

* ``config.json``: a config transformers loads (``model_type``, ``architectures``, sizes, eps,
  activation, bias flags, rotary ``rope_parameters``, ``tie_word_embeddings``, token ids,
  ``dtype``); it is checked to read back as the model's own config before anything is gathered;
* ``model.safetensors``, or when the weights exceed ``max_shard_size`` the shards
  ``model-00001-of-0000n.safetensors`` and ``model.safetensors.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``), as transformers names them.

Names and layouts are transformers': BERT without a prefix (``embeddings.*``, ``encoder.layer.{i}.*``,
as ``transformers.BertModel`` saves; no pooler, which the encoder does not have), ``nn.Linear``
weights ``(out, in)``; GPT-2 behind ``transformer.``, ``Conv1D`` weights ``(in, out)`` and
``c_attn = q | k | v`` side by side; Llama and Qwen2 behind ``model.``, ``gate_proj`` and ``up_proj``
taken apart from :class:`~tp_gpu.layers.gated_mlp.GatedMLP`'s interleaved ``gate_up`` (column
``2j`` gate, ``2j + 1`` up); ``lm_head.weight`` only when the head is not tied.

Memory: every tensor's shape is known before any is gathered, so each shard file's header is
written first and its tensors are then gathered and streamed in one at a time. The host holds at
most one exported tensor and what it was gathered from (GPT-2's ``c_attn``: the three it joins;
BERT's Q/K/V and Llama's gate/up: the fused weight they are cut from), about twice the largest.

With several processes every rank calls ``save_pretrained`` (gathering is collective) and rank 0
writes; a failure there is raised on every rank. Atomicity: everything is written and fsynced
into a hidden staging folder ``.NAME.<12 hex>.tmp`` beside the target. A new (or empty) target
is that folder renamed into place, so it appears whole or not at all. In an existing folder
(tokenizer files and the like are kept, as transformers keeps them) the old weights' entry
points (``model.safetensors``, the index) are removed first, the new files renamed in with the
entry point last, then shards of an older export that the new one does not name are removed: an
interrupted save never leaves a partial file under a final name, nor a folder that loads a mix.
Staging folders of killed saves are removed by the next save to the same target (a save holds
an ``flock`` on its ``.lock`` file while it runs, as :mod:`tp_gpu.checkpoint_io` does).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..checkpoint_io import check_path, file_error, fsync_directory, lock_file
from ..collectives import failed_rank
from ..errors import CheckpointError, CheckpointFileError, ConfigError
from .decoder_checkpoint import decoder_tensor_shapes
from .hf_export_names import Fetch, bert_config_dict, bert_fetches, decoder_config_dict, decoder_fetches
from .hf_loader import bert_tensor_shapes

try:  # POSIX; without fcntl (Windows) stale staging folders are left alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["parse_shard_size", "save_pretrained"]

#: transformers' default ``max_shard_size`` (5.x).
DEFAULT_SHARD_SIZE = "50GB"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_ST_DTYPES = {"float16": "F16", "float32": "F32", "float64": "F64"}
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model."}


def parse_shard_size(value: Any) -> int:
    """Bytes of ``max_shard_size``: a positive int, or ``"500MB"`` / ``"5GB"`` (powers of 10) /
    ``"2GiB"`` (powers of 2), as transformers reads it; ConfigError naming the value otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = (
        re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", value.upper())
        if isinstance(value, str)
        else None
    )
    size = int(float(match.group(1)) * _UNITS[match.group(2) or ""]) if match else 0
    if size < 1:
        raise ConfigError(
            "max_shard_size must be a positive number of bytes or a size such as '500MB' or '2GiB', "
            f"got {value!r}"
        )
    return size


# --------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item:
    name: str  # as stored
    shape: Tuple[int, ...]
    fetch: Fetch


def _plan(items: List[_Item], itemsize: int, limit: int) -> List[List[_Item]]:
    """Greedy shards of at most ``limit`` bytes in order, as huggingface_hub splits a state dict
    (a tensor larger than ``limit`` alone in its shard)."""
    shards: List[List[_Item]] = [[]]
    size = 0
    for item in items:
        nbytes = math.prod(item.shape) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    return shards


def _header(items: List[_Item], st_dtype: str, itemsize: int) -> bytes:
    """A safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    entries: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        end = offset + math.prod(item.shape) * itemsize
        entries[item.name] = {"dtype": st_dtype, "shape": list(item.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


# --------------------------------------------------------------------------------------- the folder


class _Staging:
    """The hidden folder ``.NAME.<hex>.tmp`` beside ``target`` that a save writes into, locked."""

    def __init__(self, target: str) -> None:
        self.target = target
        parent, base = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(target) and not os.path.isdir(target):
            raise NotADirectoryError(20, "exists and is not a folder", target)
        pattern = re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{12}}\.tmp")
        for name in os.listdir(parent):  # staging folders of killed saves (their lock is free)
            if pattern.fullmatch(name):
                self._remove_if_stale(os.path.join(parent, name))
        self.path = os.path.join(parent, f".{base}.{secrets.token_hex(6)}.tmp")
        os.mkdir(self.path)
        self._lock_fd: Optional[int] = os.open(
            os.path.join(self.path, ".lock"), os.O_WRONLY | os.O_CREAT, 0o644
        )
        lock_file(self._lock_fd, blocking=True)

    @staticmethod
    def _remove_if_stale(path: str) -> None:
        try:
            fd = os.open(os.path.join(path, ".lock"), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file: being created or being renamed into place; leave it
        try:
            if fcntl is not None and lock_file(fd, blocking=False):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)

    def open(self, name: str) -> BinaryIO:
        return open(os.path.join(self.path, name), "wb")

    def write_json(self, name: str, value: Any) -> None:
        with self.open(name) as fh:
            fh.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    def commit(self, entry: str) -> None:
        """Put the staged files in place, ``entry`` (the weights' entry point) last."""
        os.unlink(os.path.join(self.path, ".lock"))
        names = sorted(os.listdir(self.path), key=lambda n: (n == entry, n != "config.json", n))
        if not os.path.isdir(self.target) or not os.listdir(self.target):
            os.rename(self.path, self.target)  # the whole folder at once (over an empty one too)
        else:
            for old in (SINGLE, INDEX):  # no entry point while the files change: nothing loads a mix
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.target, old))
            fsync_directory(self.target)
            for name in names:
                os.replace(os.path.join(self.path, name), os.path.join(self.target, name))
            for name in os.listdir(self.target):
                if SHARD.fullmatch(name) and name not in names:
                    os.unlink(os.path.join(self.target, name))
            os.rmdir(self.path)
            fsync_directory(self.target)
        fsync_directory(os.path.dirname(self.target))
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.close()


def save_pretrained(model: Any, folder: Any, *, max_shard_size: Any = DEFAULT_SHARD_SIZE) -> None:
    """Write ``model`` (a BertModel or a DecoderForCausalLM) as the Hugging Face folder ``folder``.

    Collective with several processes (every rank calls it; rank 0 writes; a failure is raised on
    every rank). ConfigError for a bad ``max_shard_size`` or a config transformers cannot express,
    CheckpointFileError (an OSError) naming the folder when it cannot be written; both before the
    folder changes. See the module docstring for the files, the names and the atomicity.
    """
    path = os.path.realpath(check_path(folder, "save_pretrained folder"))  # a link: its target
    limit = parse_shard_size(max_shard_size)
    dtype = np.dtype(model.config.dtype)
    if hasattr(model, "decoder_config"):
        config = decoder_config_dict(model.decoder_config, dtype.name)
        prefix = _PREFIX[model.decoder_config.model_type]
        shapes, fetches = decoder_tensor_shapes(model.decoder_config), decoder_fetches(model)
        items = [_Item(n if n == "lm_head.weight" else prefix + n, s, fetches[n]) for n, s in shapes.items()]
    else:
        config = bert_config_dict(model.bert_config, dtype.name)
        fetches = bert_fetches(model)
        items = [_Item(n, s, fetches[n]) for n, s in bert_tensor_shapes(model.bert_config).items()]
    shards = _plan(items, dtype.itemsize, limit)
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    comm = model.group.comm
    writer = _Writer(path, comm.rank == 0)
    _share(comm, writer.failure, path)  # every rank refuses alike, before anything is gathered
    try:
        for file, shard in zip(files, shards):
            writer.begin(file, _header(shard, _ST_DTYPES[dtype.name], dtype.itemsize))
            for item in shard:
                array = np.ascontiguousarray(item.fetch(), dtype=dtype.newbyteorder("<"))  # collective
                if tuple(array.shape) != item.shape:  # the same on every rank
                    raise CheckpointError(
                        f"save_pretrained: {item.name} is {array.shape}, expected {item.shape}"
                    )
                writer.write(array.reshape(-1).view(np.uint8).data)
            writer.end()
        index = None
        if n > 1:
            total = sum(math.prod(item.shape) for item in items) * dtype.itemsize
            weight_map = {item.name: f for f, shard in zip(files, shards) for item in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        writer.finish(config, index)
    except BaseException:
        writer.abort()
        raise
    _share(comm, writer.failure, path)


class _Writer:
    """Rank 0's side of a save (the others' does nothing). An OSError is kept in ``failure`` and
    the staging folder removed; the save goes on gathering, so every rank meets every collective."""

    def __init__(self, path: str, active: bool) -> None:
        self.path = path
        self.failure: Optional[CheckpointFileError] = None
        self.staging: Optional[_Staging] = None
        self.fh: Optional[BinaryIO] = None
        if active:
            with self._guard():
                self.staging = _Staging(path)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            self.failure = file_error(self.path, "write", exc)
            self.abort()

    def begin(self, name: str, header: bytes) -> None:
        if self.staging is not None:
            with self._guard():
                self.fh = self.staging.open(name)
                self.fh.write(header)

    def write(self, data: Any) -> None:
        if self.fh is not None:
            with self._guard():
                self.fh.write(data)

    def end(self) -> None:
        if self.fh is not None:
            with self._guard():
                self.fh.flush()
                os.fsync(self.fh.fileno())
                self.fh.close()
                self.fh = None

    def finish(self, config: Dict[str, Any], index: Optional[Dict[str, Any]]) -> None:
        if self.staging is not None:
            with self._guard():
                self.staging.write_json("config.json", config)
                if index is not None:
                    self.staging.write_json(INDEX, index)
                self.staging.commit(SINGLE if index is None else INDEX)
                self.staging = None

    def abort(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None
        if self.staging is not None:
            self.staging.abort()
            self.staging = None


def _share(comm: Any, failure: Optional[BaseException], path: str) -> None:
    """Raise rank 0's ``failure`` on every rank (itself on rank 0, a CheckpointError elsewhere)."""
    failed = failed_rank(comm, failure)
    if failure is None and failed is not None:
        raise CheckpointError(
            f"rank {failed} failed to write the Hugging Face folder {path!r} (its error there says why)"
        )
    if failure is not None:
        raise failure
