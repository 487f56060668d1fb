"""save_checkpoint(..., background=True): host copies at the call, the write in a thread.

The file must equal a synchronous save's (tensors bit for bit, same metadata), hold the weights of
the moment of the call while training goes on, and every failure in the thread must surface -- on
wait(), on the next save (which then does not start), on a load of the same path, or at exit --
with its original type, leaving the previous checkpoint loadable. Writes are made slow with a gate
(threading.Event) around the real atomic write, so that "in flight" is certain, not a race.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
from test_resume import make_model, make_optimizer, train

import tp_gpu.checkpoint as checkpoint_module
import tp_gpu.checkpoint_background as background_module
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

    def __init__(self, error: BaseException | None = None) -> None:
        self.event = threading.Event()
        self.error = error
        self.calls: list[tuple[str, float, float, str]] = []  # (path, start, end, thread name)

    def open(self) -> None:
        self.event.set()

    def __call__(self, path: str, data: bytes) -> None:
        start = time.perf_counter()
        if threading.current_thread() is not threading.main_thread():
            assert self.event.wait(30), "the test never opened the gate"
        try:
            if self.error is not None:
                raise self.error
            REAL_WRITE(path, data)
        finally:
            self.calls.append((path, start, time.perf_counter(), threading.current_thread().name))


@pytest.fixture
def gate(monkeypatch):
    g = Gate()
    monkeypatch.setattr(checkpoint_module, "write_atomically", g)
    return g


def trained(p=2, backend="numpy", steps=3, kind="adam", scaler=False):
    model = make_model(p, backend)
    optimizer = make_optimizer(kind, model)
    grad_scaler = GradScaler(init_scale=256.0, growth_interval=2) if scaler else None
    train(model, optimizer, 0, steps, grad_scaler)
    return model, optimizer, grad_scaler


def weights(model):
    return {name: p.full() for name, p in checkpoint_module.named_parameters(model)}


def assert_same_file_contents(a, b) -> None:
    """Two checkpoints with the same metadata and bit-identical tensors (safetensors orders the
    metadata at random, so the bytes of two equal saves differ there)."""
    first, second = read_checkpoint(a), read_checkpoint(b)
    assert first.metadata == second.metadata
    assert sorted(first.tensors) == sorted(second.tensors)
    for name, tensor in first.tensors.items():
        assert tensor.dtype == second.tensors[name].dtype, name
        assert tensor.tobytes() == second.tensors[name].tobytes(), name


@pytest.mark.parametrize("p, backend", [(1, "numpy"), (3, "numpy"), (4, "sim3")])
def test_background_file_equals_a_synchronous_save_and_resumes_exactly(tmp_path, p, backend):
    model, optimizer, scaler = trained(p, backend, scaler=True)
    save_checkpoint(tmp_path / "sync.safetensors", model, optimizer=optimizer, scaler=scaler)
    handle = save_checkpoint(
        tmp_path / "background.safetensors", model, optimizer=optimizer, scaler=scaler, background=True
    )
    assert isinstance(handle, SaveHandle)
    assert handle.path == str(tmp_path / "background.safetensors")
    handle.wait()
    assert handle.done()
    assert handle.write_seconds is not None
    assert handle.seconds == handle.prepare_seconds + handle.write_seconds
    assert_same_file_contents(tmp_path / "sync.safetensors", tmp_path / "background.safetensors")
    expected = train(model, optimizer, 3, 6, scaler)
    fresh = make_model(p, backend)
    fresh_optimizer = make_optimizer("adam", fresh)
    fresh_scaler = GradScaler()
    load_checkpoint(
        tmp_path / "background.safetensors", fresh, optimizer=fresh_optimizer, scaler=fresh_scaler
    )
    assert train(fresh, fresh_optimizer, 3, 6, fresh_scaler) == expected
    for name, value in weights(model).items():
        assert value.tobytes() == weights(fresh)[name].tobytes(), name


def test_synchronous_save_returns_none(tmp_path):
    model, _, _ = trained(steps=1)
    assert save_checkpoint(tmp_path / "m.safetensors", model) is None


def test_training_goes_on_while_the_save_is_in_flight_and_the_file_holds_the_weights_of_the_call(
    tmp_path, gate
):
    model, optimizer, _ = trained(p=3, steps=4, kind="sgd")
    at_call = weights(model)
    path = tmp_path / "m.safetensors"
    handle = save_checkpoint(path, model, optimizer=optimizer, background=True)
    during = train(model, optimizer, 4, 9)  # 5 steps while the write waits at the gate
    assert not handle.done() and not path.exists()
    after_steps = weights(model)
    assert all(not np.array_equal(after_steps[n], at_call[n]) for n in at_call)
    gate.open()
    handle.wait()
    assert gate.calls[0][3] != threading.current_thread().name  # written in the thread
    saved = read_checkpoint(path).tensors
    for name, value in at_call.items():
        assert saved[name].tobytes() == value.tobytes(), name
    # The optimizer state is that of the call too: resuming from it replays the same 5 steps.
    fresh = make_model(2)
    fresh_optimizer = make_optimizer("sgd", fresh)
    load_checkpoint(path, fresh, optimizer=fresh_optimizer)
    assert train(fresh, fresh_optimizer, 4, 9) == during


def test_a_background_write_error_surfaces_on_wait_with_its_type_and_the_previous_checkpoint_loads(
    tmp_path, monkeypatch
):
    model, optimizer, _ = trained(steps=2)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, optimizer=optimizer)
    previous = weights(model)
    train(model, optimizer, 2, 4)
    full = Gate(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    full.open()
    monkeypatch.setattr(checkpoint_module, "write_atomically", full)
    handle = save_checkpoint(path, model, optimizer=optimizer, background=True)
    with pytest.raises(
        CheckpointFileError, match=r"cannot write checkpoint .*m\.safetensors'.*ENOSPC"
    ) as info:
        handle.wait()
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    with pytest.raises(CheckpointFileError):  # wait() again: the same outcome, the same error
        handle.wait()
    fresh = make_model(2)
    load_checkpoint(path, fresh)
    for name, value in previous.items():
        assert weights(fresh)[name].tobytes() == value.tobytes(), name
    # Reported on wait(), so the next save goes ahead.
    monkeypatch.setattr(checkpoint_module, "write_atomically", REAL_WRITE)
    assert save_checkpoint(path, model) is None
    assert read_checkpoint(path).tensors.keys() == weights(model).keys()


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


def test_a_load_of_the_same_path_waits_for_the_save_first(tmp_path, gate):
    model, _, _ = trained(steps=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, background=True)
    threading.Timer(0.3, gate.open).start()
    fresh = make_model(3)
    load_checkpoint(path, fresh)  # no file yet: this must wait for the save
    for name, value in weights(model).items():
        assert weights(fresh)[name].tobytes() == value.tobytes(), name
    assert background_module.pending() is None


def test_a_load_of_the_same_path_raises_the_background_error(tmp_path, monkeypatch):
    model, _, _ = trained(steps=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    failing = Gate(OSError(errno.EIO, os.strerror(errno.EIO)))
    failing.open()
    monkeypatch.setattr(checkpoint_module, "write_atomically", failing)
    save_checkpoint(path, model, background=True)
    with pytest.raises(CheckpointFileError, match="EIO"):
        load_checkpoint(path, make_model(2))
    load_checkpoint(path, make_model(2))  # reported once; the previous file loads


def test_a_load_of_another_path_does_not_wait(tmp_path, gate):
    model, _, _ = trained(steps=1)
    save_checkpoint(tmp_path / "old.safetensors", model)
    handle = save_checkpoint(tmp_path / "new.safetensors", model, background=True)
    load_checkpoint(tmp_path / "old.safetensors", make_model(2))
    assert not handle.done()
    gate.open()
    handle.wait()


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


@pytest.mark.parametrize("fails", [False, True], ids=["written", "failed"])
def test_the_host_buffers_are_released_when_the_write_ends(tmp_path, monkeypatch, fails):
    model, optimizer, _ = trained(steps=2)
    refs = []

    def prepare(*args, **kwargs):
        prepared = REAL_PREPARE(*args, **kwargs)
        refs.extend([weakref.ref(prepared), weakref.ref(next(iter(prepared.tensors.values())))])
        return prepared

    REAL_PREPARE = checkpoint_module.prepare_save
    monkeypatch.setattr(checkpoint_module, "prepare_save", prepare)
    if fails:
        failing = Gate(MemoryError("no room to serialize"))
        failing.open()
        monkeypatch.setattr(checkpoint_module, "write_atomically", failing)
    handle = save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer, background=True)
    with pytest.raises(MemoryError) if fails else _nothing():
        handle.wait()
    assert [ref() for ref in refs] == [None, None]  # nothing (not the handle, not the error) holds them


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_lock_against_two_saves_at_once_cannot_be_bypassed(tmp_path, gate):
    model, _, _ = trained(steps=1)
    save_checkpoint(tmp_path / "m.safetensors", model, background=True)
    with pytest.raises(CheckpointError, match=r"m\.safetensors' is still unreported"):
        background_module.start(object(), "x", model.parameters()[0].comm, time.perf_counter())  # type: ignore[arg-type]
    gate.open()


def _run_python(script: str, tmp_path) -> subprocess.CompletedProcess:
    code = textwrap.dedent(script).format(folder=str(tmp_path))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


PROGRAM_HEAD = """
    import time
    import tp_gpu.checkpoint as checkpoint_module
    from tp_gpu import ColumnParallelLinear, TensorParallelConfig, save_checkpoint, read_checkpoint
    layer = ColumnParallelLinear(6, 8, TensorParallelConfig(n_workers=2, dtype="float64"), seed=3)
"""


def test_an_unreported_failure_is_raised_at_exit(tmp_path):
    result = _run_python(
        PROGRAM_HEAD
        + """
    save_checkpoint("{folder}/missing/m.safetensors", layer, background=True)
    print("program ended")
    """,
        tmp_path,
    )
    assert "program ended" in result.stdout
    assert (
        "tp_gpu: the background save of checkpoint '" + str(tmp_path) + "/missing/m.safetensors' failed, "
        "and nothing waited for it: CheckpointNotFoundError: cannot write checkpoint" in result.stderr
    ), result.stderr
    assert "tp_gpu.errors.CheckpointNotFoundError" in result.stderr  # the traceback, from the atexit hook


def test_a_save_in_flight_at_exit_is_completed(tmp_path):
    result = _run_python(
        PROGRAM_HEAD
        + """
    real = checkpoint_module.write_atomically
    checkpoint_module.write_atomically = lambda path, data: (time.sleep(0.5), real(path, data))
    save_checkpoint("{folder}/m.safetensors", layer, background=True)
    """,
        tmp_path,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert read_checkpoint(tmp_path / "m.safetensors").tensors["weight"].shape == (6, 8)
