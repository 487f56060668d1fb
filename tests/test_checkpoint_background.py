"""save_checkpoint(..., background=True): host copies at the call, the write in a thread.

The file must equal a synchronous save's (tensors bit for bit, same metadata), hold the weights of
the moment of the call while training goes on, and every failure in the thread must surface -- on
wait(), on the next save (which then does not start), on a load of the same path, or at exit --
with its original type, leaving the previous checkpoint loadable. Writes are made slow with a gate
(threading.Event) around the real atomic write, so that "in flight" is certain, not a race.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
from test_resume import make_model, make_optimizer, train

import tp_gpu.checkpoint as checkpoint_module
import tp_gpu.checkpoint_background as background_module
import tp_gpu.checkpoint_pieces as pieces_module
import tp_gpu.checkpoint_sharded as sharded_module
from tp_gpu import (
    CheckpointError,
    CheckpointFileError,
    ConfigError,
    GradScaler,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tp_gpu.checkpoint_background import SaveHandle
from tp_gpu.errors import CheckpointNotFoundError

REAL_WRITE = checkpoint_module.write_atomically


@pytest.fixture(autouse=True)
def no_save_left_pending():
    """Each test starts and ends with no unreported background save in this process."""
    yield
    handle = background_module.pending()
    if handle is not None:
        if handle._thread is not None:
            handle._thread.join()
        handle._reported = True
    background_module._pending = None


class Gate:
    """A write_atomically that, in a background thread, waits for ``open()`` (or fails with ``error``),
    and records its calls. Synchronous saves (in the main thread) pass at once."""

    def __init__(self, error: BaseException | None = None, real=None) -> None:
        self.real = REAL_WRITE if real is None else real
        self.event = threading.Event()
        self.error = error
        self.calls: list[tuple[str, float, float, str]] = []  # (path, start, end, thread name)

    def open(self) -> None:
        self.event.set()

    def __call__(self, path: str, *rest) -> None:
        start = time.perf_counter()
        if threading.current_thread() is not threading.main_thread():
            assert self.event.wait(30), "the test never opened the gate"
        try:
            if self.error is not None:
                raise self.error
            self.real(path, *rest)
        finally:
            self.calls.append((path, start, time.perf_counter(), threading.current_thread().name))


#: format -> (checkpoint name, save_checkpoint keywords, (module, function) that writes its bytes).
FORMATS = {
    "file": ("m.safetensors", {}, (checkpoint_module, "write_atomically")),
    "sharded": ("m", {"sharded": True}, (pieces_module, "write_rank_file")),
}


def install_gate(monkeypatch, fmt: str, error: BaseException | None = None) -> Gate:
    module, name = FORMATS[fmt][2]
    gate = Gate(error, getattr(module, name))
    monkeypatch.setattr(module, name, gate)
    return gate


@pytest.fixture
def gate(monkeypatch):
    return install_gate(monkeypatch, "file")


def assert_resumes_alike(path, model, optimizer, scaler, p, backend, steps=(3, 6), kind="adam"):
    """A fresh model (``p`` workers on ``backend``, as ``model``) loading ``path`` has ``model``'s weights
    bit for bit and trains ``steps`` exactly as ``model`` does from there (``model`` is trained by this)."""
    fresh = make_model(p, backend)
    fresh_optimizer = make_optimizer(kind, fresh)
    fresh_scaler = None if scaler is None else GradScaler()
    load_checkpoint(path, fresh, optimizer=fresh_optimizer, scaler=fresh_scaler)
    for name, value in weights(model).items():
        assert value.tobytes() == weights(fresh)[name].tobytes(), name
    assert train(fresh, fresh_optimizer, *steps, fresh_scaler) == train(model, optimizer, *steps, scaler)


def trained(p=2, backend="numpy", steps=3, kind="adam", scaler=False):
    model = make_model(p, backend)
    optimizer = make_optimizer(kind, model)
    grad_scaler = GradScaler(init_scale=256.0, growth_interval=2) if scaler else None
    train(model, optimizer, 0, steps, grad_scaler)
    return model, optimizer, grad_scaler


def weights(model):
    return {name: p.full() for name, p in checkpoint_module.named_parameters(model)}


def assert_weights(model, expected) -> None:
    assert {n: a.tobytes() for n, a in weights(model).items()} == {
        n: a.tobytes() for n, a in expected.items()
    }


def assert_same_file_contents(a, b) -> None:
    """Two checkpoints with the same metadata and bit-identical tensors (safetensors orders the
    metadata at random, so the bytes of two equal saves differ there)."""
    first, second = read_checkpoint(a), read_checkpoint(b)
    assert first.metadata == second.metadata
    assert sorted(first.tensors) == sorted(second.tensors)
    for name, tensor in first.tensors.items():
        assert tensor.dtype == second.tensors[name].dtype, name
        assert tensor.tobytes() == second.tensors[name].tobytes(), name


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("p, backend", [(1, "numpy"), (3, "numpy"), (4, "sim3")])
def test_background_save_equals_a_synchronous_one_and_resumes_exactly(tmp_path, p, backend, fmt):
    name, keywords, _ = FORMATS[fmt]
    model, optimizer, scaler = trained(p, backend, scaler=True)
    sync, background = tmp_path / "sync" / name, tmp_path / "background" / name
    sync.parent.mkdir(), background.parent.mkdir()
    save_checkpoint(sync, model, optimizer=optimizer, scaler=scaler, **keywords)
    handle = save_checkpoint(
        background, model, optimizer=optimizer, scaler=scaler, background=True, **keywords
    )
    assert isinstance(handle, SaveHandle)
    assert handle.path == str(background)
    handle.wait()
    assert handle.done()
    assert handle.write_seconds is not None
    assert handle.seconds == handle.prepare_seconds + handle.write_seconds
    if fmt == "file":
        assert_same_file_contents(sync, background)
    else:
        assert sorted(f.name.split("-")[0] for f in background.iterdir()) == ["index.json"] + ["rank"]
    state = (weights(model), optimizer.state_dict()["state"])
    for path in (sync, background):  # each loads the same weights and optimizer state, at 2 workers
        clone = make_model(2)
        clone_optimizer = make_optimizer("adam", clone)
        load_checkpoint(path, clone, optimizer=clone_optimizer)
        assert {n: v.tobytes() for n, v in weights(clone).items()} == {
            n: v.tobytes() for n, v in state[0].items()
        }
        loaded_state = clone_optimizer.state_dict()["state"]
        for i, entry in state[1].items():
            for key, value in entry.items():
                assert np.asarray(loaded_state[i][key]).tobytes() == np.asarray(value).tobytes(), (i, key)
    assert_resumes_alike(background, model, optimizer, scaler, p, backend)


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_goes_on_while_the_save_is_in_flight_and_the_file_holds_the_weights_of_the_call(
    tmp_path, monkeypatch, fmt
):
    name, keywords, _ = FORMATS[fmt]
    gate = install_gate(monkeypatch, fmt)
    model, optimizer, _ = trained(p=3, steps=4, kind="sgd")
    at_call = weights(model)
    path = tmp_path / name
    handle = save_checkpoint(path, model, optimizer=optimizer, background=True, **keywords)
    during = train(model, optimizer, 4, 9)  # 5 steps while the write waits at the gate
    assert not handle.done() and not (path / "index.json" if fmt == "sharded" else path).exists()
    after_steps = weights(model)
    assert all(not np.array_equal(after_steps[n], at_call[n]) for n in at_call)
    gate.open()
    handle.wait()
    assert gate.calls[0][3] != threading.current_thread().name  # written in the thread
    # The optimizer state is that of the call too: resuming from it replays the same 5 steps.
    fresh = make_model(2)
    fresh_optimizer = make_optimizer("sgd", fresh)
    load_checkpoint(path, fresh, optimizer=fresh_optimizer)
    assert_weights(fresh, at_call)
    assert train(fresh, fresh_optimizer, 4, 9) == during


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_background_write_error_surfaces_on_wait_with_its_type_and_the_previous_checkpoint_loads(
    tmp_path, monkeypatch, fmt
):
    name, keywords, (module, function) = FORMATS[fmt]
    model, optimizer, _ = trained(steps=2)
    path = tmp_path / name
    save_checkpoint(path, model, optimizer=optimizer, **keywords)
    previous = weights(model)
    train(model, optimizer, 2, 4)
    full = install_gate(monkeypatch, fmt, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    full.open()
    handle = save_checkpoint(path, model, optimizer=optimizer, background=True, **keywords)
    with pytest.raises(
        CheckpointFileError, match=rf"cannot write .*{name}'.*No space left on device"
    ) as info:
        handle.wait()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    with pytest.raises(CheckpointFileError):  # wait() again: the same outcome, the same error
        handle.wait()
    fresh = make_model(2)
    load_checkpoint(path, fresh)
    assert_weights(fresh, previous)
    # Reported on wait(), so the next save goes ahead.
    monkeypatch.setattr(module, function, full.real)
    assert save_checkpoint(path, model, **keywords) is None
    load_checkpoint(path, fresh)
    assert_weights(fresh, weights(model))


@pytest.mark.parametrize("background", [False, True], ids=["then-sync", "then-background"])
def test_an_unreported_error_raises_on_the_next_save_which_does_not_start(tmp_path, gate, background):
    model, _, _ = trained(steps=1)
    folder = tmp_path / "gone"
    folder.mkdir()
    save_checkpoint(folder / "m.safetensors", model, background=True)
    folder.rmdir()  # removed while the save waits at the gate
    gate.open()
    other = tmp_path / "other.safetensors"
    with pytest.raises(CheckpointNotFoundError, match=r"the folder .*gone' does not exist"):
        save_checkpoint(other, model, background=background)
    assert not other.exists()  # the new save did not start
    assert len(gate.calls) == 1
    handle = save_checkpoint(other, model, background=background)  # reported: saving works again
    if handle is not None:
        handle.wait()
    assert read_checkpoint(other).tensors.keys() == weights(model).keys()


def test_a_load_waits_for_a_save_of_its_path_only(tmp_path, gate):
    model, _, _ = trained(steps=1)
    save_checkpoint(tmp_path / "old.safetensors", model)
    path = tmp_path / "m.safetensors"
    handle = save_checkpoint(path, model, background=True)
    load_checkpoint(tmp_path / "old.safetensors", make_model(2))
    assert not handle.done()  # another path: no wait
    threading.Timer(0.3, gate.open).start()
    fresh = make_model(3)
    load_checkpoint(path, fresh)  # no file yet: this must wait for the save
    assert_weights(fresh, weights(model))
    assert background_module.pending() is None


def test_a_load_of_the_same_path_raises_the_background_error(tmp_path, monkeypatch):
    model, _, _ = trained(steps=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    install_gate(monkeypatch, "file", OSError(errno.EIO, os.strerror(errno.EIO))).open()
    save_checkpoint(path, model, background=True)
    with pytest.raises(CheckpointFileError, match="EIO"):
        load_checkpoint(path, make_model(2))
    load_checkpoint(path, make_model(2))  # reported once; the previous file loads


def test_two_background_saves_in_a_row_run_one_after_the_other(tmp_path, gate):
    model, optimizer, _ = trained(steps=1, kind="sgd")
    first = save_checkpoint(tmp_path / "a.safetensors", model, background=True)
    train(model, optimizer, 1, 2)
    threading.Timer(0.3, gate.open).start()
    called = time.perf_counter()
    second = save_checkpoint(tmp_path / "b.safetensors", model, background=True)
    returned = time.perf_counter()
    assert first.done() and returned - called >= 0.25  # the second call waited for the first write
    assert second is not None and second is not first
    second.wait()
    (a_path, a_start, a_end, _), (b_path, b_start, b_end, _) = gate.calls
    assert (a_path, b_path) == (str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert a_end <= b_start  # never two writes at once
    a = read_checkpoint(tmp_path / "a.safetensors").tensors
    b = read_checkpoint(tmp_path / "b.safetensors").tensors
    assert any(not np.array_equal(a[n], b[n]) for n in a)  # each holds its own moment


def test_wait_with_a_timeout(tmp_path, gate):
    model, _, _ = trained(steps=1)
    handle = save_checkpoint(tmp_path / "m.safetensors", model, background=True)
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"m\.safetensors' is still running"):
        handle.wait(timeout=0.05)
    assert 0.04 <= time.perf_counter() - start < 5
    assert handle.seconds is None and not handle.done()
    gate.open()
    handle.wait(timeout=30)
    assert handle.seconds is not None and (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("bad", [-1, "1", float("nan"), True])
def test_a_bad_timeout_is_refused(tmp_path, bad):
    model, _, _ = trained(steps=1)
    handle = save_checkpoint(tmp_path / "m.safetensors", model, background=True)
    with pytest.raises(ConfigError, match=rf"timeout must be None or a number of seconds >= 0, got {bad!r}"):
        handle.wait(timeout=bad)
    handle.wait()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_bad_background_flag_is_refused_before_anything(tmp_path, bad):
    model, _, _ = trained(steps=1)
    with pytest.raises(ConfigError, match=rf"background must be True or False, got {bad!r}"):
        save_checkpoint(tmp_path / "m.safetensors", model, background=bad)
    assert not any(tmp_path.iterdir()) and background_module.pending() is None


Canary = type("Canary", (), {})  # an object only a frame's locals refer to: its weakref dies with them


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fails", [None, MemoryError, OSError], ids=["written", "MemoryError", "OSError"])
def test_the_host_buffers_are_released_when_the_write_ends(tmp_path, monkeypatch, fails, fmt):
    name, keywords, (module, function) = FORMATS[fmt]
    model, optimizer, _ = trained(steps=2)
    refs = []
    prepare_module, prepare_name = (
        (checkpoint_module, "prepare_save") if fmt == "file" else (sharded_module, "prepare_sharded_save")
    )
    real_prepare, real_write = getattr(prepare_module, prepare_name), getattr(module, function)

    def prepare(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        buffers = prepared.tensors if fmt == "file" else prepared.arrays
        refs.extend([weakref.ref(prepared), weakref.ref(next(iter(buffers.values())))])
        return prepared

    def write(path, *rest):  # its locals hold the serialized file (or the shards): so does a canary
        canary = Canary()
        refs.append(weakref.ref(canary))
        if fails is not None:
            raise fails(errno.ENOSPC, "no room") if fails is OSError else fails("no room")
        return real_write(path, *rest)

    monkeypatch.setattr(prepare_module, prepare_name, prepare)
    monkeypatch.setattr(module, function, write)
    handle = save_checkpoint(tmp_path / name, model, optimizer=optimizer, background=True, **keywords)
    with (
        pytest.raises(CheckpointFileError if fails is OSError else fails)
        if fails
        else contextlib.nullcontext()
    ):
        handle.wait()
    assert len(refs) == 3 and [ref() for ref in refs] == [None] * 3  # not held by the handle or the error


def test_the_lock_against_two_saves_at_once_cannot_be_bypassed(tmp_path, gate):
    model, _, _ = trained(steps=1)
    save_checkpoint(tmp_path / "m.safetensors", model, background=True)
    with pytest.raises(CheckpointError, match=r"m\.safetensors' is still unreported"):
        background_module.start(object(), "x", model.parameters()[0].comm, time.perf_counter())  # type: ignore[arg-type]
    gate.open()


EXIT_PROGRAM = """
import sys, time
import tp_gpu.checkpoint as checkpoint_module
from tp_gpu import ColumnParallelLinear, TensorParallelConfig, save_checkpoint
layer = ColumnParallelLinear(6, 8, TensorParallelConfig(n_workers=2, dtype="float64"), seed=3)
real = checkpoint_module.write_atomically
checkpoint_module.write_atomically = lambda path, data: (time.sleep(0.5), real(path, data))
save_checkpoint(sys.argv[1], layer, background=True)
print("program ended")
"""


@pytest.mark.parametrize("fails", [False, True], ids=["completed", "failed"])
def test_at_exit_a_save_in_flight_completes_and_an_unreported_failure_is_raised(tmp_path, fails):
    path = tmp_path / "missing" / "m.safetensors" if fails else tmp_path / "m.safetensors"
    command = [sys.executable, "-c", EXIT_PROGRAM, str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert "program ended" in result.stdout, result.stderr
    if not fails:
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert read_checkpoint(path).tensors["weight"].shape == (6, 8)
        return
    assert (
        f"tp_gpu: the background save of checkpoint '{path}' failed, and nothing waited for it: "
        "CheckpointNotFoundError: cannot write checkpoint" in result.stderr
    ), result.stderr
    assert "tp_gpu.errors.CheckpointNotFoundError" in result.stderr  # the traceback, from the atexit hook
