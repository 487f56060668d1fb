"""The CuPy/NCCL code's Python side, run against a small fake of the CuPy API (no GPU needed).

The fake keeps what the real API enforces or does that the code depends on:
the argument order of ``cudaMemcpyPeerAsync`` and of NCCL's ``reduce``; an
event records only on a stream of the device it was created on; kernels and
allocations happen on the current device; ``cupy.ascontiguousarray`` turns a
0-d array into shape ``(1,)``; a zero-size array has ``data.ptr == 0``. What
only a GPU shows (timing, real stream overlap, NCCL itself) is in test_cupy.py.
"""

from __future__ import annotations

import itertools
import sys
import types

import numpy as np
import pytest

from tp_gpu.backends import cupy_backend
from tp_gpu.backends.cupy_backend import CupyBackend, enable_peer_access
from tp_gpu.comm import nccl_local
from tp_gpu.comm.nccl import NcclComm
from tp_gpu.errors import ConfigError


class FakeCupy:
    """Just enough of ``cupy`` for the backend's copies and the NCCL wrappers, with a log."""

    def __init__(self, n_devices: int = 3) -> None:
        self.n_devices = n_devices
        self.current = 0
        self.log = []
        self.buffers = {}  # ptr -> FakeArray owning it
        self._ptrs = itertools.count(4096, 4096)
        fake = self

        class Device:
            def __init__(self, device=None) -> None:
                self.id = fake.current if device is None else device

            def __enter__(self):
                self._saved, fake.current = fake.current, self.id
                return self

            def __exit__(self, *exc):
                fake.current = self._saved

            def use(self):
                fake.current = self.id

            def synchronize(self):
                fake.log.append(("sync", self.id))

        class Stream:
            def __init__(self, device: int) -> None:
                self.device, self.ptr = device, 1000 + device

            def wait_event(self, event):
                assert event.recorded_on is not None, "waiting on an event never recorded"
                fake.log.append(("wait", self.device, event.recorded_on))

        streams = {d: Stream(d) for d in range(n_devices)}

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False) -> None:
                self.device, self.recorded_on = fake.current, None

            def record(self, stream=None):
                stream = streams[fake.current] if stream is None else stream
                assert stream.device == self.device, "cudaEventRecord: event and stream on different devices"
                self.recorded_on = stream.device
                fake.log.append(("record", stream.device))

        def memcpyPeerAsync(dst, dst_device, src, src_device, size, stream):
            out, arr = fake.buffers[dst], fake.buffers[src]
            assert (out.device.id, arr.device.id) == (dst_device, src_device)
            assert arr.flags.c_contiguous and size <= arr.nbytes and size <= out.nbytes
            out._values.reshape(-1).view(np.uint8)[:size] = arr._values.reshape(-1).view(np.uint8)[:size]
            fake.log.append(("memcpy", dst_device, src_device, size, stream))

        self.cuda = types.SimpleNamespace(
            Device=Device,
            Event=Event,
            get_current_stream=lambda device_id=-1: streams[fake.current if device_id == -1 else device_id],
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: fake.n_devices,
                memcpyPeerAsync=memcpyPeerAsync,
                deviceCanAccessPeer=lambda device, peer: 1,
                deviceEnablePeerAccess=None,
                CUDARuntimeError=RuntimeError,
            ),
        )

    def wrap(self, values) -> "FakeArray":
        """``values`` (NumPy) as an array on the current device."""
        return FakeArray(self, np.asarray(values))

    def asarray(self, x, dtype=None):
        return self.wrap(np.array(x, dtype=dtype))

    def empty(self, shape, dtype):
        return self.wrap(np.zeros(shape, dtype=dtype))

    def ascontiguousarray(self, a):
        assert a.device.id == self.current, "a kernel on an array of another device"
        if a.ndim == 0:
            return self.wrap(a._values.reshape(1))
        return a if a.flags.c_contiguous else self.wrap(np.ascontiguousarray(a._values))

    def concatenate(self, arrays, axis):
        return self.wrap(np.concatenate([a._values for a in arrays], axis=axis))


class FakeArray:
    __module__ = "cupy.fake"  # is_cupy_array() recognises CuPy arrays by their module

    def __init__(self, fake: FakeCupy, values: np.ndarray) -> None:
        self._values, self.device = values, types.SimpleNamespace(id=fake.current)
        ptr = next(fake._ptrs) if values.size else 0
        fake.buffers[ptr] = self
        self.data = types.SimpleNamespace(ptr=ptr)

    shape = property(lambda self: self._values.shape)
    dtype = property(lambda self: self._values.dtype)
    ndim = property(lambda self: self._values.ndim)
    size = property(lambda self: self._values.size)
    nbytes = property(lambda self: self._values.nbytes)
    flags = property(lambda self: self._values.flags)
    T = property(lambda self: FakeArray._view(self, self._values.T))

    def _view(self, values):
        view = object.__new__(FakeArray)
        view._values, view.device, view.data = values, self.device, types.SimpleNamespace(ptr=-1)  # not a buffer start
        return view

    def __getitem__(self, index):
        return self._view(self._values[index])

    def get(self):
        return self._values.copy()


def fake_backend(fake: FakeCupy, devices=(0, 1, 2)) -> CupyBackend:
    backend = object.__new__(CupyBackend)
    backend.xp, backend.devices, backend.nccl = fake, tuple(devices), None
    return backend


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.arange(12.0).reshape(3, 4).T,  # not contiguous: copied contiguous on the source first
        np.array(2.5, dtype=np.float32),  # 0-d: keeps its shape ()
    ],
    ids=["float16", "transposed", "0-d"],
)
def test_to_device_is_a_peer_copy_ordered_by_events(values):
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(2):
        arr = fake.wrap(values)
    moved = backend.to_device(arr, 0)
    assert moved.device.id == 0 and moved.shape == values.shape and moved.dtype == values.dtype
    np.testing.assert_array_equal(moved.get(), values)
    # Producer on the source recorded, the destination waits, the copy runs on the destination's
    # stream, and the source's stream waits for the copy before it can reuse the buffer.
    assert fake.log == [
        ("record", 2),
        ("wait", 0, 2),
        ("memcpy", 0, 2, values.nbytes, 1000),
        ("record", 0),
        ("wait", 2, 0),
    ]
    assert fake.current == 0  # the caller's current device is restored


def test_to_device_of_a_zero_size_array_copies_nothing():
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(1):
        arr = fake.wrap(np.zeros((0, 3), dtype=np.float32))
    assert arr.data.ptr == 0
    moved = backend.to_device(arr, 2)
    assert (moved.device.id, moved.shape, moved.dtype) == (2, (0, 3), np.float32)
    assert fake.log == []


def test_to_device_on_the_same_device_is_the_array_itself():
    fake = FakeCupy()
    arr = fake.wrap(np.ones(3))
    assert fake_backend(fake).to_device(arr, 0) is arr


def test_device_ids_out_of_range_are_config_errors(monkeypatch):
    fake = FakeCupy(n_devices=2)
    monkeypatch.setattr(cupy_backend, "import_cupy", lambda: fake)
    monkeypatch.delenv("TP_GPU_NCCL", raising=False)
    fake.cuda.runtime._deviceEnsurePeerAccess = lambda peer: None
    assert CupyBackend([1, 0]).devices == (1, 0)
    for bad in ([2], [0, -1]):
        with pytest.raises(ConfigError, match="does not exist"):
            CupyBackend(bad)


def test_peer_access_uses_cupys_ensure_which_clears_already_enabled():
    fake = FakeCupy(n_devices=2)
    calls = []
    fake.cuda.runtime._deviceEnsurePeerAccess = lambda peer: calls.append((fake.current, peer))
    enable_peer_access(fake, (0, 1))
    assert calls == [(0, 1), (1, 0)]


def test_peer_access_without_ensure_tolerates_already_enabled_only():
    fake = FakeCupy(n_devices=2)

    def enable(peer):
        raise RuntimeError("cudaErrorPeerAccessAlreadyEnabled: peer access is already enabled")

    fake.cuda.runtime.deviceEnablePeerAccess = enable
    enable_peer_access(fake, (0, 1))

    def fail(peer):
        raise RuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    fake.cuda.runtime.deviceEnablePeerAccess = fail
    with pytest.raises(RuntimeError, match="InvalidDevice"):
        enable_peer_access(fake, (0, 1))


# --- in-process NCCL -----------------------------------------------------------


class FakeNcclModule:
    available = True
    NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM, NCCL_MAX = 6, 7, 8, 0, 2

    def __init__(self, fake: FakeCupy) -> None:
        self.fake, self.log, self.inits = fake, [], 0
        module = self

        class NcclCommunicator:
            def __init__(self, rank: int) -> None:
                self.rank = rank

            @staticmethod
            def initAll(devices):
                module.inits += 1
                return [NcclCommunicator(r) for r in range(len(devices))]

            def reduce(self, sendbuf, recvbuf, count, datatype, op, root, stream):
                module.log.append(("reduce", self.rank, sendbuf, recvbuf, count, datatype, op, root, stream))

        self.NcclCommunicator = NcclCommunicator

    def groupStart(self):
        self.log.append("groupStart")

    def groupEnd(self):
        self.log.append("groupEnd")


@pytest.fixture
def fake_nccl(monkeypatch):
    fake = FakeCupy()
    module = FakeNcclModule(fake)
    cuda = types.ModuleType("cupy.cuda")
    cuda.nccl = module
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", module)
    monkeypatch.setattr(nccl_local, "_instances", {})
    monkeypatch.setenv("TP_GPU_NCCL", "1")
    return fake, module


def test_in_process_nccl_is_built_once_per_set_of_gpus(fake_nccl):
    fake, module = fake_nccl
    first = nccl_local.maybe_in_process_nccl(fake, [0, 1, 2])
    assert nccl_local.maybe_in_process_nccl(fake, (0, 1, 2)) is first
    assert module.inits == 1
    assert nccl_local.maybe_in_process_nccl(fake, [0, 1]) is not first
    assert module.inits == 2


@pytest.mark.parametrize("shape", [(2, 3), ()], ids=["2-d", "0-d"])
def test_in_process_nccl_reduce_arguments(fake_nccl, shape):
    fake, module = fake_nccl
    comm = nccl_local.maybe_in_process_nccl(fake, [0, 1, 2])
    arrays = {}
    for d in (0, 1, 2):
        with fake.cuda.Device(d):
            arrays[d] = fake.wrap(np.full(shape, float(d), dtype=np.float32))
    assert comm.can_reduce(arrays, 1, "add")
    out = comm.reduce(arrays, 1, "add")
    assert (out.device.id, out.shape, out.dtype) == (1, shape, np.float32)
    count = int(np.prod(shape))
    assert module.log[0] == "groupStart" and module.log[-1] == "groupEnd"
    reduces = module.log[1:-1]
    # rank r on device r sends its buffer; only the root (rank 1) receives into ``out``; each on its device's stream
    assert [r[:2] for r in reduces] == [("reduce", 0), ("reduce", 1), ("reduce", 2)]
    for r, (_, rank, send, recv, n, dtype, op, root, stream) in enumerate(reduces):
        assert fake.buffers[send].device.id == r and (n, dtype, op, root, stream) == (count, 7, 0, 1, 1000 + r)
    assert reduces[1][3] == out.data.ptr


# --- NCCL between processes ----------------------------------------------------


class FakeProcessGroup:
    """cupyx.distributed's NCCL backend as if every one of ``size`` ranks held the same array."""

    def __init__(self, fake: FakeCupy, size: int) -> None:
        self.fake, self.size, self.calls = fake, size, []

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        assert in_array.device.id == out_array.device.id == self.fake.current
        assert in_array.size == out_array.size
        self.calls.append(("all_reduce", in_array.device.id, op))
        out_array._values[...] = (in_array._values * self.size).reshape(out_array.shape)

    def all_gather(self, in_array, out_array, count, stream=None):
        assert in_array.device.id == out_array.device.id == self.fake.current and count == in_array.size
        self.calls.append(("all_gather", in_array.device.id, count))
        out_array._values[...] = in_array._values


def fake_nccl_comm(fake: FakeCupy, device: int, size: int = 2) -> NcclComm:
    comm = object.__new__(NcclComm)
    comm._cupy, comm.device, comm.rank, comm.size = fake, device, 0, size
    comm._nccl = FakeProcessGroup(fake, size)
    return comm


def test_nccl_comm_allgathers_host_arrays_through_its_gpu():
    """Full parameters (checkpoints) are assembled on the host and gathered with the host backend."""
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=1)
    span = np.arange(6.0).reshape(2, 3)
    out = comm.allgather(None, span, 1)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.concatenate([span, span], axis=1))
    assert comm._nccl.calls == [("all_gather", 1, 6)]


def test_nccl_comm_allreduce_keeps_0d_shapes():
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=0)
    total = comm.allreduce(fake_backend(fake), fake.wrap(np.array(1.5)), "max")
    assert total.shape == () and float(total.get()) == 3.0
    assert comm._nccl.calls == [("all_reduce", 0, "max")]


def test_nccl_comm_stages_arrays_on_another_gpu_through_its_own():
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=0)
    with fake.cuda.Device(2):
        local = fake.wrap(np.arange(4.0))
    total = comm.allreduce(fake_backend(fake), local, "sum")
    assert total.device.id == 2
    np.testing.assert_array_equal(total.get(), 2 * np.arange(4.0))
    assert comm._nccl.calls == [("all_reduce", 0, "sum")]


def test_nccl_comm_refuses_other_arrays():
    comm = fake_nccl_comm(FakeCupy(), device=0)
    with pytest.raises(ConfigError, match="CuPy and NumPy arrays only"):
        comm.allreduce(None, [1.0, 2.0])


def test_nccl_comm_ranks_from_the_environment_beat_an_mpi_singleton(monkeypatch):
    """Processes started with TP_GPU_RANK/TP_GPU_WORLD_SIZE (no mpirun) rendezvous over the TCP store."""
    fake = FakeCupy(n_devices=2)
    seen = {}

    def init_process_group(n_devices, rank, *, use_mpi=False):
        seen.update(n_devices=n_devices, rank=rank, use_mpi=use_mpi)
        return object()

    distributed = types.ModuleType("cupyx.distributed")
    distributed.init_process_group = init_process_group
    cupyx = types.ModuleType("cupyx")
    cupyx.distributed = distributed
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.distributed", distributed)
    import tp_gpu.comm.mpi as mpi_module
    import tp_gpu.comm.nccl as nccl_module

    monkeypatch.setattr(nccl_module, "import_cupy", lambda: fake)
    singleton = types.SimpleNamespace(rank=0, size=1)
    monkeypatch.setattr(mpi_module, "MpiComm", lambda: singleton)
    for var in nccl_module._RANK_VARS + nccl_module._SIZE_VARS + nccl_module._LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)

    monkeypatch.setenv("TP_GPU_RANK", "3")
    monkeypatch.setenv("TP_GPU_WORLD_SIZE", "4")
    comm = NcclComm()
    assert (comm.rank, comm.size, comm.device) == (3, 4, 1)
    assert seen == {"n_devices": 4, "rank": 3, "use_mpi": False}

    monkeypatch.delenv("TP_GPU_RANK")
    monkeypatch.delenv("TP_GPU_WORLD_SIZE")
    comm = NcclComm()  # a real one-process job: MPI is as good as anything
    assert (comm.rank, comm.size) == (0, 1) and seen["use_mpi"] is True

    mpirun = types.SimpleNamespace(rank=2, size=3)
    monkeypatch.setattr(mpi_module, "MpiComm", lambda: mpirun)
    comm = NcclComm()
    assert (comm.rank, comm.size, comm.device) == (2, 3, 0) and seen == {"n_devices": 3, "rank": 2, "use_mpi": True}
