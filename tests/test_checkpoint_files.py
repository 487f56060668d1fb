"""Checkpoint files the file system refuses, and partial loads.

Every file-system failure of ``save_checkpoint`` / ``load_checkpoint`` is a
``CheckpointFileError``: a ``CheckpointError`` and an ``OSError`` (a missing
file or folder also a ``FileNotFoundError``) whose message names the path the
caller gave and the cause, never the temporary file; no temporary file is left
behind, and a module being loaded is left unchanged. ``strict=False`` loads the
tensors a module shares with the file and returns the others' names.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from test_checkpoint import assert_unchanged, leftovers, randomize, snapshot

import tp_gpu.checkpoint_format as checkpoint_format
import tp_gpu.checkpoint_io as checkpoint_io
from tp_gpu import (
    CheckpointError,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    TensorParallelConfig,
    load_checkpoint,
    save_checkpoint,
)
from tp_gpu.checkpoint import LoadedCheckpoint
from tp_gpu.errors import CheckpointFileError, CheckpointNotFoundError

CONFIG = TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")


def layer(seed: int = 0) -> ColumnParallelLinear:
    return ColumnParallelLinear(3, 4, CONFIG, seed=seed)


def expect_file_error(call, path, cause, kind=CheckpointFileError, module=None):
    """Run ``call``; check the error's classes, that it names ``path`` and ``cause`` and no temporary file."""
    before = None if module is None else snapshot(module)
    with pytest.raises(CheckpointError) as info:
        call()
    error = info.value
    assert isinstance(error, kind) and isinstance(error, OSError), type(error).__mro__
    message = str(error)
    assert repr(os.fspath(path)) in message, message
    assert cause in message, message
    assert ".tmp" not in message, message
    assert error.filename == os.fspath(path)
    assert isinstance(error.__cause__, OSError)
    if module is not None:
        assert_unchanged(module, before)
    return error


# --- loading -------------------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    target = layer()
    path = tmp_path / "nope.safetensors"
    error = expect_file_error(
        lambda: load_checkpoint(path, target), path, "no such file", CheckpointNotFoundError, target
    )
    assert isinstance(error, FileNotFoundError) and error.errno == errno.ENOENT


def test_load_from_a_missing_folder_names_the_folder(tmp_path):
    path = tmp_path / "run" / "model.safetensors"
    expect_file_error(
        lambda: load_checkpoint(path, layer()),
        path,
        f"the folder {str(tmp_path / 'run')!r} does not exist",
        CheckpointNotFoundError,
    )


def test_load_a_directory(tmp_path):
    """safetensors says "No such device (os error 19)" for a directory."""
    target = layer()
    error = expect_file_error(
        lambda: load_checkpoint(tmp_path, target), tmp_path, "it is a directory, not a file", module=target
    )
    assert error.errno == errno.EISDIR and "os error 19" not in str(error)


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null on this system")
def test_load_a_device():
    expect_file_error(lambda: load_checkpoint("/dev/null", layer()), "/dev/null", "not a regular file")


def test_load_without_permission(tmp_path, monkeypatch):
    """An unreadable file (simulated: as root, chmod 000 still reads) names the path and EACCES."""
    path = tmp_path / "secret.safetensors"
    save_checkpoint(path, layer())
    real = checkpoint_format._safetensors

    def refusing_safetensors():
        _, st_numpy = real()

        def safe_open(name, framework):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)

        return safe_open, st_numpy

    monkeypatch.setattr(checkpoint_format, "_safetensors", refusing_safetensors)
    target = layer(seed=5)
    error = expect_file_error(lambda: load_checkpoint(path, target), path, "(EACCES)", module=target)
    assert error.errno == errno.EACCES


# --- saving --------------------------------------------------------------------------------------


def test_save_to_a_directory(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    error = expect_file_error(lambda: save_checkpoint(folder, layer()), folder, "it is a directory")
    assert "model.safetensors" in str(error)  # says how to save inside it
    assert os.listdir(folder) == [] and leftovers(tmp_path) == []


def test_save_into_a_missing_folder(tmp_path):
    path = tmp_path / "run" / "model.safetensors"
    expect_file_error(
        lambda: save_checkpoint(path, layer()),
        path,
        f"the folder {str(tmp_path / 'run')!r} does not exist",
        CheckpointNotFoundError,
    )
    assert os.listdir(tmp_path) == []


def test_save_on_a_read_only_file_system(tmp_path, monkeypatch):
    """Creating the temporary file fails with EROFS (simulated: a real one needs a mount)."""
    real_open = os.open

    def read_only(name, flags, *args, **kwargs):
        if os.fspath(name).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), name)
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    path = tmp_path / "model.safetensors"
    error = expect_file_error(lambda: save_checkpoint(path, layer()), path, "Read-only file system (EROFS)")
    assert error.errno == errno.EROFS
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "step, code", [("_write_all", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EXDEV)]
)
def test_save_failing_midway_names_the_path_and_leaves_no_temporary_file(
    tmp_path, rng, monkeypatch, step, code
):
    path = tmp_path / "model.safetensors"
    old = layer(seed=1)
    save_checkpoint(path, old)
    old_bytes = path.read_bytes()
    target = checkpoint_io if step == "_write_all" else os

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".model.safetensors.0123456789ab.tmp"))

    changed = layer(seed=2)
    randomize(changed, rng)
    monkeypatch.setattr(target, step, fail)
    error = expect_file_error(
        lambda: save_checkpoint(path, changed), path, f"{os.strerror(code)} ({errno.errorcode[code]})"
    )
    monkeypatch.undo()
    assert error.errno == code
    assert leftovers(tmp_path) == [] and path.read_bytes() == old_bytes


# --- strict=False: a subset, with the missing and unexpected keys ---------------------------------


@pytest.fixture
def two_modules(tmp_path, rng):
    """A file holding an embedding and an MLP, and the modules it was saved from."""
    source = {"embed": ParallelEmbedding(11, 5, CONFIG, seed=1), "mlp": ParallelMLP(5, 7, 3, CONFIG, seed=2)}
    for module in source.values():
        randomize(module, rng)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, source)
    return path, source


def test_one_module_of_a_two_module_file(two_modules):
    path, source = two_modules
    mlp = ParallelMLP(
        5, 7, 3, TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64"), seed=9
    )
    result = load_checkpoint(path, {"mlp": mlp}, strict=False)
    assert isinstance(result, LoadedCheckpoint)
    missing, unexpected, metadata = result
    assert missing == [] and unexpected == ["embed.weight"]
    assert metadata["format"] == "tp_gpu"
    for name, value in source["mlp"].state_dict().items():
        np.testing.assert_array_equal(mlp.state_dict()[name], value, err_msg=name)


def test_module_with_more_parameters_than_the_file(two_modules):
    path, source = two_modules
    head = ColumnParallelLinear(3, 11, CONFIG, seed=4)
    before = snapshot(head)
    embed = ParallelEmbedding(11, 5, CONFIG, seed=8)
    result = load_checkpoint(path, {"embed": embed, "head": head}, strict=False)
    assert result.missing_keys == ["head.weight", "head.bias"]
    assert result.unexpected_keys == ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    np.testing.assert_array_equal(embed.full_weight(), source["embed"].full_weight())
    assert_unchanged(head, before)


def test_strict_load_returns_empty_key_lists(two_modules):
    path, _ = two_modules
    modules = {"embed": ParallelEmbedding(11, 5, CONFIG), "mlp": ParallelMLP(5, 7, 3, CONFIG)}
    assert load_checkpoint(path, modules)[:2] == ([], [])


def test_a_shared_tensor_that_does_not_fit_still_raises(two_modules):
    path, _ = two_modules
    modules = {"embed": ParallelEmbedding(11, 5, CONFIG), "mlp": ParallelMLP(5, 8, 3, CONFIG)}
    before = snapshot(modules)
    with pytest.raises(CheckpointError, match=r"'mlp.fc1.weight': expected shape \(5, 8\), found \(5, 7\)"):
        load_checkpoint(path, modules, strict=False)
    assert_unchanged(modules, before)  # the embedding, which fits, is not loaded either


def test_nothing_shared_is_an_error_with_the_prefix_to_use(two_modules):
    path, _ = two_modules
    mlp = ParallelMLP(5, 7, 3, CONFIG)
    before = snapshot(mlp)
    for strict in (False, True):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, mlp, strict=strict)
        assert "under the prefix 'mlp.'" in str(info.value)
        assert "load_checkpoint(path, {'mlp': module}, strict=False)" in str(info.value)
    assert_unchanged(mlp, before)
