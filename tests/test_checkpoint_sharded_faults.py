"""Sharded checkpoints that go wrong: corrupted, incomplete or foreign folders, interrupted saves.

Every bad folder raises CheckpointError naming the file and the tensor and leaves the module exactly
as it was; a save interrupted before its index (an error, a full disk) leaves the previous
checkpoint loading and no files of its own; a partial read checks the chunks it reads, and a read
in bounded batches still checks a whole piece's SHA-256.
"""

from __future__ import annotations

import errno
import json
import os
import struct

import numpy as np
import pytest
import safetensors.numpy
from test_checkpoint import assert_unchanged, snapshot
from test_checkpoint_sharded import assert_same_state, config, rank_file, saved_mlp, scramble, spy_reads

import tp_gpu.checkpoint_pieces as pieces
import tp_gpu.checkpoint_sharded as sharded
from tp_gpu import CheckpointError, ColumnParallelLinear, ParallelMLP, load_checkpoint, save_checkpoint
from tp_gpu.errors import CheckpointFileError


def flip_byte_of(path: str, key: str) -> None:
    """Flip one byte inside the stored data of ``key``."""
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        start = 8 + length + json.loads(fh.read(length))[key]["data_offsets"][0] + 3
        fh.seek(start)
        byte = fh.read(1)
        fh.seek(start)
        fh.write(bytes([byte[0] ^ 0x10]))


def expect_refused(folder, *words):
    target = ParallelMLP(6, 10, 6, config(3), seed=5)
    before = snapshot(target)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder, target)
    for word in words:
        assert word in str(info.value), str(info.value)
    assert_unchanged(target, before)
    return info.value


def test_one_flipped_byte_in_a_rank_file_is_refused_naming_the_file_and_tensor(tmp_path):
    _, folder = saved_mlp(tmp_path)
    path = rank_file(folder)
    key = next(k for k in safetensors.numpy.load_file(path) if k.startswith("fc2.weight"))
    flip_byte_of(path, key)
    expect_refused(folder, os.path.basename(path), "'fc2.weight'", "SHA-256")


def test_bad_folders_are_refused_before_anything_changes(tmp_path):
    model, folder = saved_mlp(tmp_path)
    good = (folder / "index.json").read_bytes()
    (folder / "index.json").write_bytes(good[:-40])  # truncated JSON
    expect_refused(folder, "index.json", "not valid JSON")
    (folder / "index.json").write_bytes(good.replace(b'"float64"', b'"float32"', 1))  # changed, still JSON
    expect_refused(folder, "index.json", "SHA-256")
    described = json.loads(good)
    described["format_version"] = 99
    described["index_sha256"] = pieces._digest(described)
    (folder / "index.json").write_text(json.dumps(described))
    expect_refused(folder, "version 99", "upgrade")
    (folder / "index.json").write_bytes(good)
    path = rank_file(folder)
    arrays = safetensors.numpy.load_file(path)
    key = next(k for k in arrays if k.startswith("fc1.weight"))
    safetensors.numpy.save_file({**arrays, key: arrays[key][:-1]}, path)  # a piece of the wrong shape
    expect_refused(folder, os.path.basename(path), "'fc1.weight'", "holds shape")
    os.unlink(path)  # a missing rank file
    expect_refused(folder, os.path.basename(path), "cannot read rank file")
    os.unlink(folder / "index.json")  # a folder whose first save never finished
    error = expect_refused(folder, str(folder), "index.json")
    assert isinstance(error, CheckpointFileError)


def test_a_save_interrupted_before_the_index_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, folder = saved_mlp(tmp_path)
    saved = model.state_dict()
    files, index_bytes = sorted(os.listdir(folder)), (folder / "index.json").read_bytes()
    scramble(model)

    def interrupted(target, data):
        raise RuntimeError("interrupted before the index")

    monkeypatch.setattr(sharded, "_write_index", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_checkpoint(folder, model, sharded=True)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == files and (folder / "index.json").read_bytes() == index_bytes

    def full_disk(path, arrays, metadata):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 100)  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(pieces, "write_rank_file", full_disk)
    with pytest.raises(CheckpointFileError) as info:
        save_checkpoint(folder, model, sharded=True)
    assert info.value.errno == errno.ENOSPC and str(folder) in str(info.value), str(info.value)
    monkeypatch.undo()
    assert sorted(os.listdir(folder)) == files and (folder / "index.json").read_bytes() == index_bytes
    reloaded = ParallelMLP(6, 10, 6, config(3), seed=5)
    load_checkpoint(folder, reloaded)
    for name, value in reloaded.state_dict().items():
        assert np.array_equal(value, saved[name]), name
    save_checkpoint(folder, model, sharded=True)  # the next save works, and removes the old files
    assert len(os.listdir(folder)) == 2 and sorted(os.listdir(folder)) != files
    load_checkpoint(folder, reloaded)
    assert_same_state(reloaded, model)


def test_a_file_in_the_way_is_refused_naming_it(tmp_path):
    model = ParallelMLP(6, 10, 6, config(2), seed=1)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a folder")
    with pytest.raises(CheckpointFileError, match="it is a file, not a folder") as info:
        save_checkpoint(path, model, sharded=True)
    assert str(path) in str(info.value) and path.read_bytes() == b"not a folder"
    save_checkpoint(tmp_path / "ckpt", model, sharded=True)
    modes = {os.stat(tmp_path / "ckpt" / n).st_mode & 0o777 for n in os.listdir(tmp_path / "ckpt")}
    assert len(modes) == 1, modes  # the rank files get the index's mode (a new file's), not 0o600


def test_a_partial_read_checks_the_chunks_it_reads_and_only_those(tmp_path, monkeypatch):
    """What one process of several does: read some columns of the weight (rows of the stored piece)."""
    monkeypatch.setattr(pieces, "CHUNK_BYTES", 96)  # 4 stored rows (weight columns) a chunk
    source = ColumnParallelLinear(3, 40, config(1), seed=1)
    save_checkpoint(tmp_path / "ckpt", source, sharded=True)
    path = rank_file(tmp_path / "ckpt")
    with open(path, "r+b") as fh:  # one flipped byte in stored row 21 (chunk 5: rows 20..23)
        (length,) = struct.unpack("<Q", fh.read(8))
        start = 8 + length + json.loads(fh.read(length))["weight#0"]["data_offsets"][0] + 21 * 24 + 5
        fh.seek(start)
        byte = fh.read(1)
        fh.seek(start)
        fh.write(bytes([byte[0] ^ 0x01]))
    entry = sharded.read_index(str(tmp_path / "ckpt"))["tensors"]["weight"]
    with pieces.PieceReader(str(tmp_path / "ckpt")) as reader:
        part = reader.read("weight", entry, ((0, 3), (2, 19)))  # chunks 0..4 only: rows 0..19
        assert np.array_equal(part, source.weight.full()[:, 2:19])
        with pytest.raises(CheckpointError) as info:
            reader.read("weight", entry, ((1, 2), (19, 21)))  # chunks 4 and 5: rows 16..23
    message = str(info.value)
    assert os.path.basename(path) in message and "'weight'" in message and "rows 16..24" in message, message


def test_pieces_are_read_in_bounded_batches_and_still_checked_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(pieces, "CHUNK_BYTES", 96)  # 4 stored rows of the weight a chunk
    monkeypatch.setattr(pieces, "BATCH_BYTES", 200)  # 2 chunks (8 rows) a batch
    source = ColumnParallelLinear(3, 40, config(1), seed=1)
    save_checkpoint(tmp_path / "ckpt", source, sharded=True)
    reads = spy_reads(monkeypatch)
    target = ColumnParallelLinear(3, 40, config(1), seed=2)
    load_checkpoint(tmp_path / "ckpt", target)
    assert_same_state(target, source)
    assert [r for r in reads if r[0] == "weight#0"] == [
        ("weight#0", a, min(a + 8, 40)) for a in range(0, 40, 8)
    ]
    path = rank_file(tmp_path / "ckpt")
    # Flip a byte of stored row 37, in the last batch: a whole read checks the piece's SHA-256.
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        key_offset = 8 + length + json.loads(fh.read(length))["weight#0"]["data_offsets"][0]
        fh.seek(key_offset + 37 * 24)
        byte = fh.read(1)
        fh.seek(key_offset + 37 * 24)
        fh.write(bytes([byte[0] ^ 0x01]))
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="'weight'.*fails its SHA-256 check"):
        load_checkpoint(tmp_path / "ckpt", target)
    assert_unchanged(target, before)
