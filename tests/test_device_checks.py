"""Ids and targets that already live on a device are range-checked there: no device-to-host copy in
the forward (issue: "the id and target checks cost no device-to-host copy per forward on CuPy").

The simulated backend records copies between devices in ``backend.transfers``; the copies a GPU
pays to bring data to the host (``backend.to_host``, and reading an array as a Python number or
truth value) are recorded here as ``(device, "host")`` entries too, so that a forward can be shown
to make none. A bad id or target still raises IndexOutOfRangeError naming it: when the output or
the loss is read, or at the start of backward, before any gradient is accumulated.
"""

from __future__ import annotations

import numpy as np
import pytest

import tp_gpu
from tp_gpu import (
    IndexOutOfRangeError,
    ParallelEmbedding,
    ShardedTensor,
    TensorParallelConfig,
    TiedLMHead,
    VocabParallelCrossEntropy,
    device_checks,
)
from tp_gpu.backends.simulated import SimArray

HOST = "host"


@pytest.fixture(autouse=True)
def no_leftover_checks():
    """Each test starts and ends with no pending check of this thread."""
    device_checks._pending().clear()
    yield
    device_checks._pending().clear()


def count_host_reads(backend, monkeypatch) -> None:
    """Record every device-to-host read of ``backend``'s arrays as a ``(device, "host")`` transfer."""
    to_host = backend.to_host

    def counted_to_host(arr):
        if isinstance(arr, SimArray):
            backend._record(arr.device, HOST, arr.nbytes)
        return to_host(arr)

    monkeypatch.setattr(backend, "to_host", counted_to_host)

    def reading(name):
        original = getattr(SimArray, name)

        def read(self, *args, **kwargs):
            backend._record(self.device, HOST, self.nbytes)
            return original(self, *args, **kwargs)

        return read

    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        monkeypatch.setattr(SimArray, name, reading(name))


def host_reads(backend) -> int:
    """Device-to-host reads recorded here (and by the backend itself, where it counts them)."""
    own = sum(count for (src, dst), (count, _) in backend.transfers.items() if dst == HOST)
    return max(own, sum(count for count, _ in getattr(backend, "host_reads", {}).values()))


def config(n_workers: int, devices: int = 3) -> TensorParallelConfig:
    return TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=devices, dtype="float64")


def test_reads_are_counted(monkeypatch):
    """Guard: the counter sees a host read, so the zeros below mean something."""
    emb = ParallelEmbedding(10, 4, config(3))
    count_host_reads(emb.backend, monkeypatch)
    emb.backend.reset_transfers()
    np.asarray(emb(np.array([1, 2])))
    assert host_reads(emb.backend) == 1


# --- the embedding -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5, 8])
def test_device_ids_forward_copies_nothing_to_the_host(monkeypatch, rng, n_workers):
    emb = ParallelEmbedding(4 * n_workers + 1, 6, config(n_workers), seed=3)
    backend = emb.backend
    ids = rng.integers(0, emb.vocab_size, size=(3, 5))
    on_device = backend.asarray(ids, np.int64, backend.devices[-1])
    count_host_reads(backend, monkeypatch)
    backend.reset_transfers()
    y = emb(on_device)
    assert host_reads(backend) == 0, backend.transfers
    assert backend.transfers  # the ids did move: between devices
    g = rng.standard_normal((3, 5, 6))
    y.backward(g)  # reads the check: one copy, at the start of backward
    assert host_reads(backend) == 1
    np.testing.assert_array_equal(np.asarray(y), emb.full_weight()[ids])
    expected = np.zeros((emb.vocab_size, 6))
    np.add.at(expected, ids, g)
    np.testing.assert_allclose(emb.weight.full_grad(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
@pytest.mark.parametrize("bad", [12, -1, 10])
def test_bad_device_id_raises_at_backward_naming_it(monkeypatch, rng, n_workers, bad):
    emb = ParallelEmbedding(10, 4, config(n_workers), seed=1)
    backend = emb.backend
    ids = np.array([[1, 9, 3], [0, bad, 2]])
    count_host_reads(backend, monkeypatch)
    backend.reset_transfers()
    y = emb(backend.asarray(ids, np.int64, backend.devices[0]))  # no IndexError: the bad id reads nothing
    assert host_reads(backend) == 0
    with pytest.raises(IndexOutOfRangeError, match=rf"token id {bad} out of range; .*vocab_size=10"):
        y.backward(np.ones((2, 3, 4)))
    assert np.all(emb.weight.full_grad() == 0.0)  # nothing accumulated
    with pytest.raises(IndexOutOfRangeError, match=rf"token id {bad} "):
        np.asarray(y)  # a read raises too


def test_bad_device_id_raises_when_the_output_is_read(monkeypatch):
    emb = ParallelEmbedding(10, 4, config(3))
    with tp_gpu.no_grad():
        y = emb(emb.backend.asarray(np.array([3, 11, 2]), np.int64, 1))
    with pytest.raises(IndexOutOfRangeError, match=r"token id 11 .*1 of 3 ids"):
        y.numpy()
    assert device_checks.pending_checks() == 0


def test_uint64_device_id_is_named_as_passed():
    emb = ParallelEmbedding(10, 4, config(2))
    ids = emb.backend.asarray(np.array([1, 2**64 - 1], dtype=np.uint64), np.uint64, 0)
    y = emb(ids)
    with pytest.raises(IndexOutOfRangeError, match=rf"token id {2**64 - 1} \(beyond int64\)"):
        np.asarray(y)


def test_host_ids_still_raise_before_anything_is_computed(monkeypatch):
    emb = ParallelEmbedding(10, 4, config(3))
    count_host_reads(emb.backend, monkeypatch)
    emb.backend.reset_transfers()
    with pytest.raises(IndexOutOfRangeError, match="token id 10"):
        emb(np.array([1, 10]))
    assert emb.backend.transfers == {}  # nothing moved, nothing read
    assert device_checks.pending_checks() == 0


def test_pending_checks_are_bounded():
    emb = ParallelEmbedding(10, 4, config(2))
    ids = emb.backend.asarray(np.array([1, 2]), np.int64, 0)
    with tp_gpu.no_grad():
        for _ in range(device_checks.MAX_PENDING + 5):
            emb(ids)
    assert device_checks.pending_checks() == device_checks.MAX_PENDING


# --- the loss ------------------------------------------------------------------------------------


def logits_of(backend, n_workers, z):
    devices = tp_gpu.worker_devices(n_workers, backend.devices)
    pieces = np.array_split(z, n_workers, axis=-1)
    shards = [backend.asarray(p, np.float64, d) for p, d in zip(pieces, devices)]
    return ShardedTensor(shards, -1, devices, backend).requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_device_targets_forward_copies_nothing_to_the_host(monkeypatch, rng, n_workers, reduction):
    backend = tp_gpu.get_backend("simulated", 3)
    z = rng.standard_normal((4, 5, 13))
    targets = rng.integers(0, 13, size=(4, 5))
    targets[1, 2] = -100
    loss_fn = VocabParallelCrossEntropy(reduction=reduction, label_smoothing=0.1)
    host_logits = logits_of(backend, n_workers, z)
    expected = loss_fn(host_logits, targets)
    grad = rng.standard_normal((4, 5)) if reduction == "none" else None
    expected.backward(grad)
    count_host_reads(backend, monkeypatch)
    logits = logits_of(backend, n_workers, z)
    backend.reset_transfers()
    loss = loss_fn(logits, backend.asarray(targets, np.int64, backend.devices[-1]))
    assert host_reads(backend) == 0, backend.transfers
    loss.backward(grad)
    np.testing.assert_array_equal(np.asarray(loss), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(logits.grad), np.asarray(host_logits.grad))


@pytest.mark.parametrize("bad", [13, 20, -5])
def test_bad_device_target_raises_at_backward_naming_it(monkeypatch, rng, bad):
    backend = tp_gpu.get_backend("simulated", 3)
    logits = logits_of(backend, 3, rng.standard_normal((5, 13)))
    targets = rng.integers(0, 13, size=5)
    targets[3] = bad
    count_host_reads(backend, monkeypatch)
    backend.reset_transfers()
    loss = VocabParallelCrossEntropy()(logits, backend.asarray(targets, np.int64, 0))
    assert host_reads(backend) == 0
    with pytest.raises(IndexOutOfRangeError, match=rf"target {bad} out of range; .*vocab=13"):
        loss.backward()
    assert logits.grad is None
    with pytest.raises(IndexOutOfRangeError, match=rf"target {bad} "):
        float(loss)


def test_bad_device_target_raises_when_the_loss_is_read(rng):
    backend = tp_gpu.get_backend("simulated", 2)
    logits = logits_of(backend, 2, rng.standard_normal((3, 8)))
    targets = backend.asarray(np.array([1, 8, 2]), np.int64, 1)
    with tp_gpu.no_grad():
        loss = VocabParallelCrossEntropy()(logits, targets)
    with pytest.raises(IndexOutOfRangeError, match="target 8 out of range"):
        float(loss)


# --- a whole model on the device -----------------------------------------------------------------


@pytest.mark.parametrize("n_workers", [1, 3, 4])
def test_model_with_a_bad_device_id_raises_before_any_gradient(monkeypatch, rng, n_workers):
    """Embedding -> tied head -> loss, ids and targets on a device: the forward reads nothing back;
    loss.backward() raises on the bad id before the head or the lookup accumulates anything."""
    emb = ParallelEmbedding(11, 4, config(n_workers), seed=2)
    head = TiedLMHead(emb)
    backend = emb.backend
    ids = rng.integers(0, 11, size=(2, 6))
    ids[1, 4] = 17
    targets = rng.integers(0, 11, size=(2, 6))
    count_host_reads(backend, monkeypatch)
    backend.reset_transfers()
    loss = VocabParallelCrossEntropy()(
        head(emb(backend.asarray(ids, np.int64, 0))), backend.asarray(targets, np.int64, 0)
    )
    assert host_reads(backend) == 0, backend.transfers
    with pytest.raises(IndexOutOfRangeError, match="token id 17"):
        loss.backward()
    assert np.all(emb.weight.full_grad() == 0.0)
