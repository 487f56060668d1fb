"""save_checkpoint / load_checkpoint: safetensors files of dense weights, re-sharded on load.

Round trips run on every backend and worker count 1..8; cross-configuration
loads save on one backend and worker count and load on others. Every bad file
(corrupted, truncated, wrong shape, wrong dtype, foreign) must raise
CheckpointError and leave the module exactly as it was; an interrupted save
must leave the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
from conftest import WORKER_COUNTS
from helpers import TOLERANCE
from test_state_dict import KINDS, build, output, sample_input
from test_state_dict import assert_unchanged as assert_module_unchanged
from test_state_dict import snapshot as module_snapshot

import tp_gpu
import tp_gpu.checkpoint as checkpoint_module
import tp_gpu.checkpoint_io as checkpoint_io
from tp_gpu import (
    CheckpointError,
    ColumnParallelLinear,
    ConfigError,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    TensorParallelConfig,
    TensorParallelError,
    VocabParallelCrossEntropy,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


def snapshot(module):
    """Parameter values and block identities of a module or a (nested) dict of modules."""
    return module_snapshot(module, checkpoint_module.named_parameters(module))


def assert_unchanged(module, before) -> None:
    assert_module_unchanged(module, before, checkpoint_module.named_parameters(module))


def randomize(module, rng) -> None:
    """Random values in every parameter (biases start at zero otherwise)."""
    for p in module.parameters():
        p.load(rng.standard_normal(p.shape))


def model(config, seed=0, hidden=840, vocab=840):
    """An embedding and an MLP whose split dimensions every worker count 1..8 divides."""
    return {
        "embed": ParallelEmbedding(vocab, 6, seed=seed, config=config),
        "mlp": ParallelMLP(6, hidden, 5, config, seed=seed),
    }


def assert_close(actual, expected) -> None:
    tol = TOLERANCE["float64"]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))


def header_length(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_round_trip(make_config, rng, tmp_path, kind, n_workers):
    source = build(kind, n_workers, make_config(n_workers), seed=1)
    randomize(source, rng)
    path = tmp_path / "layer.safetensors"
    save_checkpoint(path, source)
    target = build(kind, n_workers, make_config(n_workers), seed=2)
    metadata = load_checkpoint(path, target).metadata
    assert metadata["format"] == "tp_gpu" and metadata["n_workers"] == str(n_workers)
    for name, value in target.state_dict().items():
        np.testing.assert_array_equal(value, source.state_dict()[name], err_msg=name)
    x = sample_input(kind, source, rng)
    np.testing.assert_array_equal(output(target, x), output(source, x))  # same config: bit for bit
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("n_source", WORKER_COUNTS)
def test_load_reshards_to_any_worker_count_and_backend(backend_spec, rng, tmp_path, n_source):
    name, devices = backend_spec
    source = model(
        TensorParallelConfig(n_workers=n_source, backend=name, devices=devices, dtype="float64"), seed=1
    )
    for m in source.values():
        randomize(m, rng)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, source)
    ids = rng.integers(0, 840, size=(3, 4))
    x = rng.standard_normal((3, 6))
    expected_embed, expected_mlp = output(source["embed"], ids), output(source["mlp"], x)
    for n_target in WORKER_COUNTS:
        for target_backend, target_devices in (("numpy", None), ("simulated", 3)):
            config = TensorParallelConfig(
                n_workers=n_target, backend=target_backend, devices=target_devices, dtype="float64"
            )
            target = model(config, seed=2)
            load_checkpoint(path, target)
            for key in ("embed", "mlp"):
                for pname, value in target[key].state_dict().items():
                    np.testing.assert_array_equal(
                        value, source[key].state_dict()[pname], err_msg=f"{key}.{pname}"
                    )
            np.testing.assert_array_equal(output(target["embed"], ids), expected_embed)  # a lookup: exact
            # fc2's reduction order follows the split, so the MLP agrees to rounding across worker counts ...
            assert_close(output(target["mlp"], x), expected_mlp)
            # ... and bit for bit with the same dense weights loaded directly into this configuration.
            direct = ParallelMLP.from_dense(
                *(
                    source["mlp"].state_dict()[k]
                    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
                ),
                config,
            )
            np.testing.assert_array_equal(output(target["mlp"], x), output(direct, x))


def test_issue_example_four_simulated_workers_to_three_and_one_on_numpy(rng, tmp_path):
    """Save with 4 workers on 3 simulated devices; load with 3 and 1 workers on NumPy."""
    path = tmp_path / "mlp.safetensors"
    source = ParallelMLP(
        12, 24, 6, TensorParallelConfig(n_workers=4, backend="simulated", devices=3, dtype="float64"), seed=7
    )
    randomize(source, rng)
    save_checkpoint(path, source)
    x = rng.standard_normal((5, 12))
    dense = source.state_dict()
    hidden = source.activation.forward(np, x @ dense["fc1.weight"] + dense["fc1.bias"])
    reference = hidden @ dense["fc2.weight"] + dense["fc2.bias"]  # dense float64
    assert_close(output(source, x), reference)
    for n in (3, 1):
        target = ParallelMLP(
            12, 24, 6, TensorParallelConfig(n_workers=n, backend="numpy", dtype="float64"), seed=0
        )
        load_checkpoint(path, target)
        for key, value in target.state_dict().items():
            np.testing.assert_array_equal(value, dense[key], err_msg=key)  # the weights: bit for bit
        assert_close(output(target, x), reference)  # the outputs: to float64 rounding (reduction order)


def test_dict_of_modules_and_nesting(rng, tmp_path):
    config = TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64")
    modules = {
        "embed": ParallelEmbedding(8, 4, seed=0, config=config),
        "blocks": {"0": ParallelMLP(4, 6, 4, config), "1": ParallelMLP(4, 6, 4, config, seed=3)},
    }
    for m in (modules["embed"], *modules["blocks"].values()):
        randomize(m, rng)
    path = tmp_path / "nested.safetensors"
    save_checkpoint(path, modules)
    tensors, metadata = read_checkpoint(path)
    assert sorted(tensors) == sorted(
        ["embed.weight"] + [f"blocks.{i}.fc{j}.{p}" for i in "01" for j in "12" for p in ("weight", "bias")]
    )
    np.testing.assert_array_equal(tensors["blocks.1.fc2.weight"], modules["blocks"]["1"].fc2.full_weight())
    fresh = {
        "embed": ParallelEmbedding(
            8, 4, config=TensorParallelConfig(n_workers=4, backend="numpy", dtype="float64")
        ),
        "blocks": {
            "0": ParallelMLP(4, 6, 4, TensorParallelConfig(n_workers=1, dtype="float64")),
            "1": ParallelMLP(4, 6, 4, TensorParallelConfig(n_workers=3, dtype="float64")),
        },
    }
    load_checkpoint(path, fresh)
    np.testing.assert_array_equal(
        fresh["blocks"]["0"].fc1.full_weight(), modules["blocks"]["0"].fc1.full_weight()
    )
    np.testing.assert_array_equal(fresh["embed"].full_weight(), modules["embed"].full_weight())


def test_metadata_records_the_partition(tmp_path):
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float32")
    mlp = ParallelMLP(4, 10, 3, config)
    path = tmp_path / "mlp.safetensors"
    save_checkpoint(path, mlp)
    metadata = read_checkpoint(path).metadata
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["format"] == "tp_gpu"
    assert metadata["format_version"] == "1"
    assert metadata["tp_gpu_version"] == tp_gpu.__version__
    assert (metadata["n_workers"], metadata["backend"], metadata["dtype"]) == ("5", "simulated", "float32")
    partition = json.loads(metadata["partition"])
    assert partition["fc1.weight"] == {"axis": 1, "sizes": [2] * 5, "devices": [0, 1, 2, 0, 1]}
    assert partition["fc2.weight"] == {"axis": 0, "sizes": [2] * 5, "devices": [0, 1, 2, 0, 1]}
    assert partition["fc2.bias"] == {"axis": None, "sizes": None, "devices": [0]}
    described = json.loads(metadata["tensors"])
    assert described["fc1.weight"]["shape"] == [4, 10] and described["fc1.weight"]["dtype"] == "float32"
    with open(path, "rb") as f:  # plain safetensors: any reader sees the dense tensors
        plain = safetensors.numpy.load(f.read())
    np.testing.assert_array_equal(plain["fc2.weight"], mlp.fc2.full_weight())


def test_mixed_modules_summarise_metadata(tmp_path):
    path = tmp_path / "mixed.safetensors"
    auto = ColumnParallelLinear(
        2, 4, TensorParallelConfig(n_workers=4, dtype="float64")
    )  # numpy, cupy with a GPU, or $TP_GPU_BACKEND
    save_checkpoint(
        path,
        {
            "a": auto,
            "b": RowParallelLinear(
                2, 4, TensorParallelConfig(n_workers=2, backend="simulated", dtype="float32")
            ),
        },
    )
    metadata = read_checkpoint(path).metadata
    backends = ",".join(sorted({auto.backend.name, "simulated"}))
    assert (metadata["n_workers"], metadata["backend"], metadata["dtype"]) == (
        "2,4",
        backends,
        "float32,float64",
    )


def test_read_checkpoint_then_load_state_dict_converts_dtype(rng, tmp_path):
    """The documented way to load a float64 checkpoint into a float32 module."""
    source = ColumnParallelLinear(3, 4, TensorParallelConfig(n_workers=2, dtype="float64"), seed=0)
    randomize(source, rng)
    path = tmp_path / "f64.safetensors"
    save_checkpoint(path, source)
    target = ColumnParallelLinear(3, 4, TensorParallelConfig(n_workers=4, dtype="float32"))
    target.load_state_dict(read_checkpoint(path).tensors)
    np.testing.assert_array_equal(target.full_weight(), source.full_weight().astype(np.float32))


def test_path_like_and_overwrite(rng, tmp_path):
    layer = RowParallelLinear(4, 3, TensorParallelConfig(n_workers=2, dtype="float64"))
    path = tmp_path / "w.safetensors"
    save_checkpoint(str(path), layer)
    randomize(layer, rng)
    save_checkpoint(path, layer)  # replaces the first
    fresh = RowParallelLinear(4, 3, TensorParallelConfig(n_workers=4, dtype="float64"))
    load_checkpoint(str(path), fresh)
    np.testing.assert_array_equal(fresh.full_weight(), layer.full_weight())
    assert leftovers(tmp_path) == []


def test_permissions(tmp_path):
    layer = ColumnParallelLinear(2, 2, TensorParallelConfig(n_workers=1, dtype="float64"))
    path = tmp_path / "p.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    save_checkpoint(path, layer)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # like any new file, not mkstemp's 0o600
    os.chmod(path, 0o640)
    save_checkpoint(path, layer)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # an overwrite keeps the old file's permissions


@pytest.mark.parametrize(
    "module, message",
    [
        (VocabParallelCrossEntropy(), "VocabParallelCrossEntropy has no parameters; nothing to checkpoint"),
        ({}, "empty dict"),
        ({1: ColumnParallelLinear(2, 2)}, "keys must be non-empty strings without dots, got 1"),
        ({"a": {"b": 3}}, "got int at 'a.b'"),
        ({"fc1": ColumnParallelLinear(2, 2), "": ColumnParallelLinear(2, 2)}, "non-empty strings"),
    ],
    ids=["loss", "empty", "int-key", "nested-int", "empty-key"],
)
def test_bad_modules(tmp_path, module, message):
    path = tmp_path / "x.safetensors"
    for call in (lambda: save_checkpoint(path, module), lambda: load_checkpoint(path, module)):
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value)
    assert not path.exists()


def test_duplicate_names_rejected(tmp_path):
    mlp = ParallelMLP(2, 2, 2, TensorParallelConfig(n_workers=1, dtype="float64"))
    with pytest.raises(ConfigError, match="keys must be non-empty strings without dots, got 'a.fc1'"):
        save_checkpoint(
            tmp_path / "d.safetensors",
            {
                "a": mlp,
                "a.fc1": ColumnParallelLinear(2, 2, TensorParallelConfig(n_workers=1, dtype="float64")),
            },
        )


# --- bad files: CheckpointError, module untouched ---------------------------------------------


@pytest.fixture
def saved(tmp_path, rng):
    """A saved 3-worker MLP checkpoint and a differently initialised MLP to load it into."""
    path = tmp_path / "mlp.safetensors"
    source = ParallelMLP(
        5, 6, 4, TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64"), seed=1
    )
    randomize(source, rng)
    save_checkpoint(path, source)
    target = ParallelMLP(
        5, 6, 4, TensorParallelConfig(n_workers=2, backend="simulated", devices=3, dtype="float64"), seed=2
    )
    return path, source, target


def expect_checkpoint_error(path, module, *fragments):
    before = snapshot(module)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, module)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert_unchanged(module, before)
    return info.value


def test_checkpoint_error_types():
    assert issubclass(CheckpointError, TensorParallelError)
    assert issubclass(CheckpointError, ValueError)
    assert "CheckpointError" in tp_gpu.__all__ and "CheckpointError" in tp_gpu.errors.__all__


def test_wrong_shape(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, ColumnParallelLinear(7, 12, TensorParallelConfig(n_workers=4, dtype="float64")))
    target = ColumnParallelLinear(
        7, 8, TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64")
    )
    expect_checkpoint_error(
        path,
        target,
        "tensor 'weight': expected shape (7, 8), found (7, 12)",
        "tensor 'bias': expected shape (8,), found (12,)",
        str(path),
    )


def test_wrong_dtype(tmp_path):
    path = tmp_path / "f32.safetensors"
    save_checkpoint(path, RowParallelLinear(6, 3, TensorParallelConfig(n_workers=3, dtype="float32")))
    target = RowParallelLinear(6, 3, TensorParallelConfig(n_workers=2, backend="simulated", dtype="float64"))
    expect_checkpoint_error(
        path,
        target,
        "tensor 'weight': expected dtype float64, found float32",
        "tensor 'bias': expected dtype float64, found float32",
    )


def test_wrong_tensors(saved, tmp_path):
    path, _, target = saved
    expect_checkpoint_error(
        path,
        ColumnParallelLinear(5, 6, TensorParallelConfig(n_workers=3, dtype="float64")),
        "tensor 'weight' is missing",
        "tensor 'fc1.weight' is in the checkpoint but not in the module",
    )
    expect_checkpoint_error(path, {"mlp": target}, "tensor 'mlp.fc1.weight' is missing")


def test_dict_load_is_all_or_nothing(tmp_path, rng):
    """One module of a dict fits, the other does not: neither changes."""
    config = TensorParallelConfig(n_workers=2, dtype="float64")
    path = tmp_path / "pair.safetensors"
    save_checkpoint(path, {"a": ColumnParallelLinear(3, 4, config), "b": ColumnParallelLinear(3, 4, config)})
    target = {
        "a": ColumnParallelLinear(3, 4, config, seed=5),
        "b": ColumnParallelLinear(3, 6, config, seed=6),
    }
    before = {k: snapshot(m) for k, m in target.items()}
    with pytest.raises(CheckpointError, match=r"'b.weight': expected shape \(3, 6\), found \(3, 4\)"):
        load_checkpoint(path, target)
    for k, m in target.items():
        assert_unchanged(m, before[k])


@pytest.mark.parametrize(
    "where",
    ["length", "header-start", "header-middle", "header-end", "data-start", "data-middle", "data-end"],
)
def test_corrupted_file(saved, where):
    path, _, target = saved
    data = bytearray(path.read_bytes())
    n = header_length(path)
    offset = {
        "length": 3,
        "header-start": 8,
        "header-middle": 8 + n // 2,
        "header-end": 8 + n - 2,
        "data-start": 8 + n,
        "data-middle": 8 + n + (len(data) - 8 - n) // 2,
        "data-end": len(data) - 1,
    }[where]
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    error = expect_checkpoint_error(path, target, str(path))
    if where.startswith("data"):
        assert "SHA-256" in str(error)


@pytest.mark.parametrize("keep", [0, 5, 8, 20, "header", "half", "all-but-one"])
def test_truncated_file(saved, keep):
    path, _, target = saved
    data = path.read_bytes()
    n = header_length(path)
    size = {"header": 8 + n, "half": len(data) // 2, "all-but-one": len(data) - 1}.get(keep, keep)
    path.write_bytes(data[:size])
    expect_checkpoint_error(path, target, "truncated, corrupted or not a tp_gpu checkpoint", str(path))


def test_appended_garbage(saved):
    path, _, target = saved
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    expect_checkpoint_error(path, target, str(path))


def test_foreign_safetensors_file(tmp_path):
    """A plain safetensors file (e.g. a PyTorch state dict) is refused, not misread."""
    path = tmp_path / "torch.safetensors"
    safetensors.numpy.save_file({"weight": np.zeros((6, 6)), "bias": np.zeros(6)}, str(path))
    target = ColumnParallelLinear(6, 6, TensorParallelConfig(n_workers=2, dtype="float64"))
    expect_checkpoint_error(path, target, "not a tp_gpu checkpoint", "layout='out_in'")


def rewrite(path, edit_metadata, rehash=True):
    """Rewrite ``path`` with its tensors unchanged and ``edit_metadata(metadata)`` as metadata.

    With ``rehash`` the metadata checksum is recomputed, as a buggy or foreign
    writer would, so that the checks behind it are reached.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit_metadata(metadata)
    if rehash:
        metadata["metadata_sha256"] = checkpoint_module._metadata_sha256(metadata)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def test_edited_metadata_fails_its_checksum(saved):
    path, _, target = saved
    assert read_checkpoint(path).metadata["n_workers"] == "3"
    rewrite(path, lambda m: m.update(n_workers="4"), rehash=False)
    expect_checkpoint_error(path, target, "the metadata fails its SHA-256 check")


def test_every_single_byte_flip_is_caught(saved):
    """Any one corrupted byte of the header, and a sample of the data, raises CheckpointError."""
    path, _, target = saved
    data = path.read_bytes()
    n = header_length(path)
    before = snapshot(target)
    data_offsets = range(8 + n, len(data), max(1, (len(data) - 8 - n) // 50))
    for offset in [*range(8 + n), *data_offsets]:
        for mask in (0x01, 0x80, 0x5A):
            corrupted = bytearray(data)
            corrupted[offset] ^= mask
            path.write_bytes(bytes(corrupted))
            with pytest.raises(CheckpointError):
                load_checkpoint(path, target)
    assert_unchanged(target, before)


def test_newer_format_version(saved):
    path, _, target = saved
    rewrite(path, lambda m: m.update(format_version="2"))
    expect_checkpoint_error(path, target, "format version 2", "upgrade tp_gpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version="one"), "format_version 'one' is not an integer"),
        (lambda m: m.pop("tensors"), "the 'tensors' metadata is unreadable"),
        (lambda m: m.update(tensors="{not json"), "the 'tensors' metadata is unreadable"),
        (
            lambda m: m.update(
                tensors=json.dumps({k: v for k, v in json.loads(m["tensors"]).items() if k != "fc2.bias"})
            ),
            "describes",
        ),
    ],
    ids=["version", "no-tensors", "bad-json", "undescribed-tensor"],
)
def test_tampered_metadata(saved, edit, message):
    path, _, target = saved
    rewrite(path, edit)
    expect_checkpoint_error(path, target, message)


def test_metadata_that_lies_about_a_shape(saved):
    path, _, target = saved

    def lie(m):
        described = json.loads(m["tensors"])
        described["fc2.bias"]["shape"] = [2, 2]
        m["tensors"] = json.dumps(described)

    rewrite(path, lie)
    # The lie is about the module fit first: fc2.bias of (2, 2) does not fit (4,).
    expect_checkpoint_error(path, target, "tensor 'fc2.bias': expected shape (4,), found (2, 2)")
    # Without a module to compare with, the stored tensor contradicts its metadata.
    with pytest.raises(
        CheckpointError, match=r"'fc2.bias' is stored as \(4,\) float64 but its metadata says \(2, 2\)"
    ):
        read_checkpoint(path)


def test_missing_file_is_an_os_error(tmp_path):
    layer = ColumnParallelLinear(2, 2, TensorParallelConfig(n_workers=1, dtype="float64"))
    before = snapshot(layer)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors", layer)
    assert_unchanged(layer, before)


# --- atomic saves ----------------------------------------------------------------------------


def assert_old_checkpoint_intact(path, source) -> None:
    target = ParallelMLP(5, 6, 4, TensorParallelConfig(n_workers=1, dtype="float64"), seed=9)
    load_checkpoint(path, target)
    for name, value in source.state_dict().items():
        np.testing.assert_array_equal(target.state_dict()[name], value, err_msg=name)


@pytest.mark.parametrize(
    "error", [OSError("No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_save_interrupted_midway_keeps_old_checkpoint(saved, rng, monkeypatch, error):
    path, source, _ = saved
    old_bytes = path.read_bytes()
    changed = ParallelMLP(5, 6, 4, TensorParallelConfig(n_workers=3, dtype="float64"), seed=4)
    randomize(changed, rng)
    real_write = checkpoint_io._write_all

    def write_half_then_fail(fh, data):
        real_write(fh, data[: len(data) // 2])
        fh.flush()
        raise error

    monkeypatch.setattr(checkpoint_io, "_write_all", write_half_then_fail)
    with pytest.raises(type(error)):
        save_checkpoint(path, changed)
    assert path.read_bytes() == old_bytes
    assert leftovers(path.parent) == []
    assert_old_checkpoint_intact(path, source)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_save_failing_at_fsync_or_rename_keeps_old_checkpoint(saved, rng, monkeypatch, failing):
    path, source, _ = saved
    changed = ParallelMLP(5, 6, 4, TensorParallelConfig(n_workers=3, dtype="float64"), seed=4)
    randomize(changed, rng)

    def fail(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match=f"simulated {failing} failure"):
        save_checkpoint(path, changed)
    monkeypatch.undo()
    assert leftovers(path.parent) == []
    assert_old_checkpoint_intact(path, source)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    path = tmp_path / "new.safetensors"
    with pytest.raises(OSError, match="boom"):
        save_checkpoint(path, ColumnParallelLinear(2, 2, TensorParallelConfig(n_workers=1, dtype="float64")))
    assert os.listdir(tmp_path) == []


def test_process_killed_midway_keeps_old_checkpoint(saved, tmp_path):
    """A save killed outright (no cleanup runs) still leaves the old checkpoint whole."""
    path, source, _ = saved
    old_bytes = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os
        import tp_gpu, tp_gpu.checkpoint as ck, tp_gpu.checkpoint_io as io
        real = io._write_all
        def die(fh, data):
            real(fh, data[: len(data) // 3])
            fh.flush()
            os._exit(9)  # like SIGKILL or a power cut: no except, no finally
        io._write_all = die
        mlp = tp_gpu.ParallelMLP(5, 6, 4, tp_gpu.TensorParallelConfig(n_workers=2, dtype="float64"), seed=11)
        ck.save_checkpoint({str(path)!r}, mlp)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert path.read_bytes() == old_bytes
    stale = leftovers(path.parent)
    assert len(stale) == 1 and stale[0].startswith(f".{path.name}.")  # hidden, beside the checkpoint
    assert_old_checkpoint_intact(path, source)
