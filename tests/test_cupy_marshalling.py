"""The CuPy/NCCL code's Python side, run against a small fake of the CuPy API (no GPU needed).

The fake keeps what the real API enforces or does that the code depends on:
the argument order of ``cudaMemcpyPeerAsync`` and of NCCL's ``reduce``; an
event records only on a stream of the device it was created on; kernels and
allocations happen on the current device; ``ndarray.get()`` copies on the
current device's stream; ``cupy.ascontiguousarray`` turns a 0-d array into
shape ``(1,)``; a zero-size array has ``data.ptr == 0``. Where a test checks a
belief about CuPy itself (where ``_deviceEnsurePeerAccess`` lives, cupyx's TCP
store), it reads the installed CuPy, without a GPU. What only a GPU shows
(timing, real stream overlap, NCCL itself) is in test_cupy.py.
"""

from __future__ import annotations

import gc
import itertools
import os
import socket
import subprocess
import sys
import textwrap
import types
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
from helpers import skip_unless_cupy_imports

from tp_gpu import ColumnParallelLinear, TensorParallelConfig
from tp_gpu.backends import cupy_backend, host_array
from tp_gpu.backends.cupy_backend import CupyBackend, enable_peer_access
from tp_gpu.comm import nccl as nccl_module
from tp_gpu.comm import nccl_local
from tp_gpu.comm.nccl import NcclComm
from tp_gpu.errors import BackendUnavailableError, ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_cupy_state(monkeypatch):
    """Each test starts with no copy streams, no copies in flight and no probe result cached."""
    monkeypatch.setattr(cupy_backend, "_copy_streams", {})
    monkeypatch.setattr(cupy_backend, "_in_flight", [])
    monkeypatch.setattr(cupy_backend, "_probed", {})


class FakeCupy:
    """Just enough of ``cupy`` for the backend's copies and the NCCL wrappers, with a log.

    Streams are named by ``ptr`` in the log: ``1000 + d`` is device d's
    current (default) stream, ``2000 + d`` the first stream created on it.
    """

    float32, int64, uint8 = np.float32, np.int64, np.uint8

    def __init__(self, n_devices: int = 3) -> None:
        self.n_devices = n_devices
        self.current = 0
        self.log = []
        self.gets = []  # (array's device, current device) of every ndarray.get()
        self.buffers = {}  # ptr -> FakeArray owning it
        self.events = []
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
                for event in fake.events:
                    if event.device == self.id:
                        event.done = True

        created = itertools.count()

        class Stream:
            def __init__(self, null=False, non_blocking=False, ptds=False, priority=None, *, _ptr=None):
                self.device, self.non_blocking = fake.current, non_blocking
                self.ptr = 2000 + self.device + 100 * next(created) if _ptr is None else _ptr

            def wait_event(self, event):
                assert event.recorded_on is not None, "waiting on an event never recorded"
                fake.log.append(("wait", self.ptr, event.recorded_on))

            def synchronize(self):
                fake.log.append(("sync stream", self.ptr))

        streams = {}
        for d in range(n_devices):
            self.current = d
            streams[d] = Stream(_ptr=1000 + d)
        self.current = 0

        class Event:
            def __init__(self, block=False, disable_timing=False, interprocess=False) -> None:
                self.device, self.recorded_on, self.done = fake.current, None, False
                fake.events.append(self)

            def record(self, stream=None):
                stream = streams[fake.current] if stream is None else stream
                assert stream.device == self.device, "cudaEventRecord: event and stream on different devices"
                self.recorded_on = stream.ptr
                fake.log.append(("record", stream.ptr))

        def memcpyPeerAsync(dst, dst_device, src, src_device, size, stream):
            out, arr = fake.buffers[dst], fake.buffers[src]
            assert (out.device.id, arr.device.id) == (dst_device, src_device)
            assert arr.flags.c_contiguous and size <= arr.nbytes and size <= out.nbytes
            out._values.reshape(-1).view(np.uint8)[:size] = arr._values.reshape(-1).view(np.uint8)[:size]
            fake.log.append(("memcpy", dst_device, src_device, size, stream))

        self.cuda = types.SimpleNamespace(
            Device=Device,
            Event=Event,
            Stream=Stream,
            get_current_stream=lambda device_id=-1: streams[fake.current if device_id == -1 else device_id],
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: fake.n_devices,
                memcpyPeerAsync=memcpyPeerAsync,
                deviceCanAccessPeer=lambda device, peer: 1,
                deviceEnablePeerAccess=None,
                CUDARuntimeError=RuntimeError,
            ),
        )

    def wrap(self, values) -> FakeArray:
        """``values`` (NumPy) as an array on the current device."""
        return FakeArray(self, np.asarray(values))

    def asarray(self, x, dtype=None):
        return self.wrap(np.array(x, dtype=dtype))

    def empty(self, shape, dtype):
        return self.wrap(np.zeros(shape, dtype=dtype))

    def ones(self, shape, dtype):
        return self.wrap(np.ones(shape, dtype=dtype))

    def ascontiguousarray(self, a):
        assert a.device.id == self.current, "a kernel on an array of another device"
        if a.ndim == 0:
            return self.wrap(a._values.reshape(1))
        return a if a.flags.c_contiguous else self.wrap(np.ascontiguousarray(a._values))

    def concatenate(self, arrays, axis):
        return self.wrap(np.concatenate([a._values for a in arrays], axis=axis))

    def copyto(self, dst, src, casting="same_kind", where=None):
        assert dst.device.id == self.current and where.device.id == self.current, "a kernel on another device"
        self.log.append(("copyto", dst.device.id))
        np.copyto(dst._values, src, casting=casting, where=True if where is None else where._values)


class FakeArray:
    __module__ = "cupy.fake"  # is_cupy_array() recognises CuPy arrays by their module

    def __init__(self, fake: FakeCupy, values: np.ndarray) -> None:
        self._fake, self._values, self.device = fake, values, fake.cuda.Device(fake.current)
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
        view._fake, view._values, view.device = self._fake, values, self.device
        view.data = types.SimpleNamespace(ptr=-1)  # not a buffer start
        return view

    def __getitem__(self, index):
        return self._view(self._values[index])

    def reshape(self, *shape):
        return self._view(self._values.reshape(*shape))

    def get(self):
        self._fake.gets.append((self.device.id, self._fake.current))
        return self._values.copy()


def fake_backend(fake: FakeCupy, devices=(0, 1, 2)) -> CupyBackend:
    backend = object.__new__(CupyBackend)
    backend.xp, backend.devices = fake, tuple(devices)
    return backend


# --- peer copies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.arange(12.0).reshape(3, 4).T,  # not contiguous: copied contiguous on the source first
        np.array(2.5, dtype=np.float32),  # 0-d: keeps its shape ()
    ],
    ids=["float16", "transposed", "0-d"],
)
def test_to_device_is_a_peer_copy_on_the_destinations_copy_stream(values):
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(2):
        arr = fake.wrap(values)
    moved = backend.to_device(arr, 0)
    assert moved.device.id == 0 and moved.shape == values.shape and moved.dtype == values.dtype
    np.testing.assert_array_equal(moved.get(), values)
    (copy,) = cupy_backend._copy_streams.values()
    assert (copy.device, copy.non_blocking) == (0, True)
    # The source's stream records the point where the source is complete, the destination's stream
    # the point where the memory of ``out`` is free; the copy stream waits on both, copies, and the
    # destination's stream waits for the copy. The source's stream waits for nothing.
    assert fake.log == [
        ("record", 1002),
        ("record", 1000),
        ("wait", copy.ptr, 1002),
        ("wait", copy.ptr, 1000),
        ("memcpy", 0, 2, values.nbytes, copy.ptr),
        ("record", copy.ptr),
        ("wait", 1000, copy.ptr),
    ]
    assert fake.current == 0  # the caller's current device is restored


def test_copy_streams_are_made_once_per_gpu():
    fake = FakeCupy()
    backend, other = fake_backend(fake), fake_backend(fake)
    with fake.cuda.Device(1):
        arr = fake.wrap(np.ones(4))
    backend.to_device(arr, 0)
    other.to_device(arr, 0)  # every backend of the process shares the copy streams
    backend.to_device(arr, 2)
    assert sorted(stream.device for stream in cupy_backend._copy_streams.values()) == [0, 2]


@pytest.mark.parametrize("contiguous", [True, False], ids=["the array itself", "its contiguous copy"])
def test_the_copys_source_stays_alive_until_its_event_completes(contiguous):
    """Dropping the source right after the call must not free its memory before the copy has read it."""
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(1):
        arr = fake.wrap(np.arange(6.0).reshape(2, 3) if contiguous else np.arange(6.0).reshape(3, 2).T)
    backend.to_device(arr, 0)
    fake.buffers.clear()  # the fake's own references
    ((event, (source,)),) = cupy_backend._in_flight
    assert (source is arr) == contiguous
    source = weakref.ref(source)
    del arr
    gc.collect()
    assert source() is not None  # the copy may not have run yet
    with fake.cuda.Device(2):
        backend.to_device(fake.wrap(np.ones(2)), 0)  # a later copy checks earlier events, waiting for none
    gc.collect()
    assert source() is not None and len(cupy_backend._in_flight) == 2
    event.done = True
    backend.synchronize()
    gc.collect()
    assert source() is None and cupy_backend._in_flight == []


def test_to_device_of_a_zero_size_array_copies_nothing():
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(1):
        arr = fake.wrap(np.zeros((0, 3), dtype=np.float32))
    assert arr.data.ptr == 0
    moved = backend.to_device(arr, 2)
    assert (moved.device.id, moved.shape, moved.dtype) == (2, (0, 3), np.float32)
    assert fake.log == [] and cupy_backend._in_flight == []


def test_to_device_on_the_same_device_is_the_array_itself():
    fake = FakeCupy()
    arr = fake.wrap(np.ones(3))
    assert fake_backend(fake).to_device(arr, 0) is arr


def test_zero_rows_is_one_kernel_not_a_boolean_mask_assignment():
    """``rows[mask] = 0`` would synchronise with the GPU; the fake has no ``__setitem__`` to fall back on."""
    fake = FakeCupy()
    backend = fake_backend(fake)
    with fake.cuda.Device(1):
        rows = fake.wrap(np.arange(24.0).reshape(2, 3, 4))
        mask = fake.wrap(np.array([[True, False, True], [False, False, True]]))
        backend.zero_rows(rows, mask)
    expected = np.arange(24.0).reshape(2, 3, 4)
    expected[np.array([[True, False, True], [False, False, True]])] = 0
    np.testing.assert_array_equal(rows.get(), expected)
    assert fake.log == [("copyto", 1)]


@pytest.mark.parametrize("masked", [False, True])
def test_scatter_add_rows_gives_the_host_versions_sums(masked):
    """Run with NumPy as the array namespace: the same result as the host version, bit for bit."""
    from tp_gpu.backends import NumpyBackend

    rng = np.random.default_rng(0)
    index = rng.integers(-3, 9, size=40)  # ids another device owns read as out-of-range local indices
    mask = (index >= 0) & (index < 6) if masked else None
    if not masked:
        index = np.clip(index, 0, 5)
    rows = rng.standard_normal((40, 3)).astype(np.float32)
    cupy_like = object.__new__(CupyBackend)
    cupy_like.xp = np
    got = cupy_like.scatter_add_rows((6, 3), index, rows, mask)
    expected = NumpyBackend().scatter_add_rows((6, 3), index, rows, mask)
    assert got.shape == (6, 3) and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


def test_host_array_reads_a_cupy_array_on_its_own_device():
    """``get()`` copies on the current device's stream: that must be the stream of the array's device."""
    fake = FakeCupy()
    with fake.cuda.Device(2):
        arr = fake.wrap(np.arange(3.0))
    assert fake.current == 0
    np.testing.assert_array_equal(host_array(arr), np.arange(3.0))
    assert fake.gets == [(2, 2)] and fake.current == 0


def test_device_ids_out_of_range_are_config_errors(monkeypatch, fake_ensure):
    fake = FakeCupy(n_devices=2)
    monkeypatch.setattr(cupy_backend, "import_cupy", lambda probe=True: fake)
    monkeypatch.delenv("TP_GPU_NCCL", raising=False)
    backend = CupyBackend([1, 0])
    assert backend.devices == (1, 0)
    assert not hasattr(backend, "nccl")  # in-process NCCL is a reduction strategy of the collectives
    for bad in ([2], [0, -1]):
        with pytest.raises(ConfigError, match="does not exist"):
            CupyBackend(bad)


def test_a_layer_on_the_cupy_backend_sends_only_numpy_arrays_through_host_array(monkeypatch, fake_ensure):
    """A layer's initial weights reach its GPUs through ``host_array`` as NumPy arrays: the guard of
    test_torch_interop's CUDA tests (no torch tensor through the host) must let those through."""
    fake = FakeCupy(n_devices=2)
    monkeypatch.setattr(cupy_backend, "import_cupy", lambda probe=True: fake)
    seen = []
    to_host = cupy_backend.host_array
    monkeypatch.setattr(cupy_backend, "host_array", lambda x: seen.append(type(x)) or to_host(x))
    layer = ColumnParallelLinear(8, 4, TensorParallelConfig(n_workers=2, backend="cupy", dtype="float64"))
    assert [w.device.id for w in layer.weight_shards] == [0, 1]
    assert seen and set(seen) == {np.ndarray}


# --- peer access -----------------------------------------------------------------


@pytest.fixture
def fake_ensure(monkeypatch):
    """A stand-in for ``cupy_backends.cuda.api.runtime``, where CuPy defines ``_deviceEnsurePeerAccess``."""
    runtime = types.ModuleType("cupy_backends.cuda.api.runtime")
    runtime.calls = []
    runtime._deviceEnsurePeerAccess = lambda peer: runtime.calls.append(peer)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api.runtime", runtime)
    return runtime


def test_peer_access_uses_cupys_ensure_from_cupy_backends(fake_ensure):
    fake = FakeCupy(n_devices=2)
    current = []
    fake_ensure._deviceEnsurePeerAccess = lambda peer: current.append((fake.current, peer))
    assert not hasattr(fake.cuda.runtime, "_deviceEnsurePeerAccess")  # as cupy/cuda/runtime.py has it
    enable_peer_access(fake, (0, 1))
    assert current == [(0, 1), (1, 0)]


def test_cupy_defines_ensure_peer_access_where_it_is_looked_up():
    """Against the installed CuPy (no GPU needed): the private function is in cupy_backends, and the
    module ``cupy.cuda.runtime`` does not re-export it (its ``import *`` skips ``_`` names)."""
    skip_unless_cupy_imports()
    import cupy.cuda.runtime as public_runtime
    from cupy_backends.cuda.api import runtime as backend_runtime

    assert cupy_backend._ensure_peer_access_function() is backend_runtime._deviceEnsurePeerAccess
    assert not hasattr(public_runtime, "_deviceEnsurePeerAccess")


def test_peer_access_without_ensure_tolerates_already_enabled_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.api.runtime", None)  # ``import`` raises ImportError
    assert cupy_backend._ensure_peer_access_function() is None
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


# --- the check that CuPy can run -------------------------------------------------


class _NoNvrtc:
    """A device array whose first kernel fails the way a CuPy without NVRTC does."""

    def __mul__(self, other):
        raise RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: cannot open shared object file")


def _probe_module(monkeypatch, asarray=np.asarray, count=1):
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: count))
    cupy.asarray, cupy.asnumpy = asarray, np.asarray
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return cupy


def test_cupy_that_runs_a_kernel_and_a_gemm_is_chosen(monkeypatch):
    cupy = _probe_module(monkeypatch)
    assert cupy_backend.cupy_unavailable_reason() is None
    assert cupy_backend.import_cupy() is cupy


def test_cupy_without_nvrtc_is_not_chosen_and_says_why(monkeypatch):
    _probe_module(monkeypatch, asarray=lambda x: _NoNvrtc())
    with pytest.warns(RuntimeWarning, match="will not use CuPy") as caught:
        reason = cupy_backend.cupy_unavailable_reason()
    assert len(caught) == 1
    assert "libnvrtc" in reason and "cupy-cuda12x[ctk]" in reason and "cupy-cuda13x[ctk]" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # probed once per process: no second warning
        assert cupy_backend.cupy_unavailable_reason() == reason
        with pytest.raises(BackendUnavailableError, match="libnvrtc"):
            cupy_backend.import_cupy()
    assert cupy_backend.import_cupy(probe=False) is sys.modules["cupy"]


def test_cupy_with_a_wrong_gemm_is_not_chosen(monkeypatch):
    _probe_module(monkeypatch, asarray=lambda x: np.zeros_like(x))
    with pytest.warns(RuntimeWarning):
        assert "wrong result" in cupy_backend.cupy_unavailable_reason()


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
                assert isinstance(devices, list), "initAll takes an int or a list (a tuple raises ValueError)"
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


def test_in_process_nccl_only_when_asked_for_and_useful(fake_nccl, monkeypatch):
    fake, module = fake_nccl
    assert nccl_local.maybe_in_process_nccl(fake, [0]) is None  # one GPU: nothing to reduce across
    module.available = False
    assert nccl_local.maybe_in_process_nccl(fake, [0, 1]) is None
    module.available = True
    monkeypatch.delenv("TP_GPU_NCCL")
    assert nccl_local.maybe_in_process_nccl(fake, [0, 1]) is None
    assert module.inits == 0


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
    # rank r on device r sends its buffer; only the root (rank 1) receives into ``out``; each on its
    # device's stream
    assert [r[:2] for r in reduces] == [("reduce", 0), ("reduce", 1), ("reduce", 2)]
    for r, (_, _, send, _, n, dtype, op, root, stream) in enumerate(reduces):
        assert fake.buffers[send].device.id == r
        assert (n, dtype, op, root, stream) == (count, 7, 0, 1, 1000 + r)
    assert reduces[1][3] == out.data.ptr


def test_in_process_nccl_declines_what_it_cannot_reduce(fake_nccl):
    fake, _ = fake_nccl
    comm = nccl_local.maybe_in_process_nccl(fake, [0, 1])
    arrays = {}
    for d in (0, 1):
        with fake.cuda.Device(d):
            arrays[d] = fake.wrap(np.ones((2, 2), dtype=np.float32))
    assert comm.can_reduce(arrays, 0, "maximum")
    assert not comm.can_reduce(arrays, 0, "minimum")  # only "add" and "maximum"
    assert not comm.can_reduce({0: arrays[0]}, 0, "add")  # every GPU must take part
    assert not comm.can_reduce(arrays, 2, "add")  # the destination must be one of them
    with fake.cuda.Device(1):
        assert not comm.can_reduce({0: arrays[0], 1: fake.wrap(np.ones(4, dtype=np.float32))}, 0, "add")
        assert not comm.can_reduce({0: arrays[0], 1: fake.wrap(np.ones((2, 2), dtype=np.int32))}, 0, "add")


# --- NCCL between processes ----------------------------------------------------


class FakeProcessGroup:
    """cupyx.distributed's NCCL backend as if every one of ``size`` ranks held the same array."""

    def __init__(self, fake: FakeCupy, size: int, rank: int = 0) -> None:
        self.fake, self.size, self.rank, self.calls = fake, size, rank, []

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        assert in_array.device.id == out_array.device.id == self.fake.current
        assert in_array.size == out_array.size
        self.calls.append(("all_reduce", in_array.device.id, op))
        out_array._values[...] = (in_array._values * self.size).reshape(out_array.shape)

    def all_gather(self, in_array, out_array, count, stream=None):
        assert in_array.device.id == out_array.device.id == self.fake.current and count == in_array.size
        self.calls.append(("all_gather", in_array.device.id, count))
        out_array._values[...] = in_array._values

    def barrier(self):
        raise AssertionError("cupyx's barrier goes through the TCP store, which is stopped after start-up")


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
    out = comm.all_gather(None, span, 1)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.concatenate([span, span], axis=1))
    assert comm._nccl.calls == [("all_gather", 1, 6)]


def test_nccl_comm_allreduce_keeps_0d_shapes():
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=0)
    total = comm.all_reduce(fake_backend(fake), fake.wrap(np.array(1.5)), "max")
    assert total.shape == () and float(total.get()) == 3.0
    assert comm._nccl.calls == [("all_reduce", 0, "max")]


def test_nccl_comm_stages_arrays_on_another_gpu_through_its_own():
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=0)
    with fake.cuda.Device(2):
        local = fake.wrap(np.arange(4.0))
    total = comm.all_reduce(fake_backend(fake), local, "sum")
    assert total.device.id == 2
    np.testing.assert_array_equal(total.get(), 2 * np.arange(4.0))
    assert comm._nccl.calls == [("all_reduce", 0, "sum")]


def test_nccl_comm_refuses_other_arrays():
    comm = fake_nccl_comm(FakeCupy(), device=0)
    with pytest.raises(ConfigError, match="CuPy and NumPy arrays only"):
        comm.all_reduce(None, [1.0, 2.0])


def test_nccl_barrier_is_a_one_element_all_reduce_waited_for_on_its_gpu():
    fake = FakeCupy()
    comm = fake_nccl_comm(fake, device=2)
    comm.barrier()
    assert comm._nccl.calls == [("all_reduce", 2, "sum")]
    assert fake.log == [("sync stream", 1002)] and fake.current == 0


class FakeStore:
    """cupyx's TCPStore as the comm sees it: a server process, stopped by ``stop()``."""

    def __init__(self) -> None:
        self._process = types.SimpleNamespace(alive=True, joined=0, terminated=False)
        self._process.is_alive = lambda: self._process.alive
        self._process.join = lambda timeout=None: None
        self._process.terminate = lambda: None

    def stop(self):
        self._process.alive = False


def _no_mpi():
    raise BackendUnavailableError("mpi4py is not installed")


@pytest.fixture
def fake_distributed(monkeypatch):
    """``cupyx.distributed`` whose ``init_process_group`` records its arguments; no MPI; fake CuPy."""
    fake = FakeCupy(n_devices=2)
    seen = {}

    def init_process_group(n_devices, rank, *, use_mpi=False):
        seen.update(n_devices=n_devices, rank=rank, use_mpi=use_mpi)
        group = FakeProcessGroup(fake, n_devices, rank)
        if rank == 0:  # as cupyx: rank 0 runs the store (unused, though still started, with MPI)
            group._store = FakeStore()
            group.stop = group._store.stop
        seen["group"] = group
        return group

    distributed = types.ModuleType("cupyx.distributed")
    distributed.init_process_group = init_process_group
    cupyx = types.ModuleType("cupyx")
    cupyx.distributed = distributed
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.distributed", distributed)
    import tp_gpu.comm.mpi as mpi_module

    probes = []

    def import_cupy(probe=True):
        probes.append((probe, fake.current))
        return fake

    monkeypatch.setattr(nccl_module, "import_cupy", import_cupy)
    monkeypatch.setattr(nccl_module.atexit, "register", lambda f: seen.setdefault("atexit", []).append(f))
    singleton = types.SimpleNamespace(rank=0, size=1)
    monkeypatch.setattr(mpi_module, "MpiComm", lambda: singleton)
    for var in nccl_module._RANK_VARS + nccl_module._SIZE_VARS + nccl_module._LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    return fake, seen, mpi_module, probes


def test_nccl_comm_ranks_from_the_environment_beat_an_mpi_singleton(monkeypatch, fake_distributed):
    """Processes started with TP_GPU_RANK/TP_GPU_WORLD_SIZE (no mpirun) rendezvous over the TCP store."""
    fake, seen, mpi_module, _ = fake_distributed
    monkeypatch.setenv("TP_GPU_RANK", "3")
    monkeypatch.setenv("TP_GPU_WORLD_SIZE", "4")
    comm = NcclComm()
    assert (comm.rank, comm.size, comm.device) == (3, 4, 1)
    assert (seen["n_devices"], seen["rank"], seen["use_mpi"]) == (4, 3, False)

    monkeypatch.delenv("TP_GPU_RANK")
    monkeypatch.delenv("TP_GPU_WORLD_SIZE")
    comm = NcclComm()  # a real one-process job: MPI is as good as anything
    assert (comm.rank, comm.size) == (0, 1) and seen["use_mpi"] is True

    mpirun = types.SimpleNamespace(rank=2, size=3)
    monkeypatch.setattr(mpi_module, "MpiComm", lambda: mpirun)
    comm = NcclComm()
    assert (comm.rank, comm.size, comm.device) == (2, 3, 0)
    assert (seen["n_devices"], seen["rank"], seen["use_mpi"]) == (3, 2, True)


def test_nccl_comm_probes_cupy_on_its_own_gpu(monkeypatch, fake_distributed):
    fake, _, _, probes = fake_distributed
    monkeypatch.setenv("TP_GPU_RANK", "1")
    monkeypatch.setenv("TP_GPU_WORLD_SIZE", "2")
    NcclComm()
    assert probes == [(False, 0), (True, 1)]  # device count first, then the kernel check on GPU 1


def test_nccl_comm_stops_the_tcp_store_once_every_rank_has_joined(monkeypatch, fake_distributed):
    """cupy/cupy#7863: rank 0's store process keeps the interpreter from exiting unless stopped."""
    fake, seen, mpi_module, _ = fake_distributed
    monkeypatch.setattr(mpi_module, "MpiComm", _no_mpi)
    monkeypatch.setenv("TP_GPU_RANK", "0")
    monkeypatch.setenv("TP_GPU_WORLD_SIZE", "2")
    comm = NcclComm()
    group = seen["group"]
    assert seen["use_mpi"] is False
    assert group.calls == [("all_reduce", 0, "sum")]  # the first barrier: every rank is in NCCL
    assert not group._store._process.alive
    assert seen["atexit"] == [comm.close]
    comm.close()  # idempotent
    comm.barrier()
    assert group.calls == [("all_reduce", 0, "sum")] * 2


def test_nccl_comm_ends_a_store_that_does_not_stop(monkeypatch, fake_distributed):
    """After cupyx's own atexit hook, ``TCPStore.stop()`` returns at once: the process is terminated."""
    fake, seen, mpi_module, _ = fake_distributed
    monkeypatch.setattr(mpi_module, "MpiComm", _no_mpi)
    monkeypatch.setattr(FakeStore, "stop", lambda self: None)
    monkeypatch.setattr(nccl_module, "STORE_STOP_TIMEOUT", 0.01)
    monkeypatch.setenv("TP_GPU_WORLD_SIZE", "2")
    NcclComm()
    process = seen["group"]._store._process
    terminated = []
    process.terminate = lambda: terminated.append(True) or setattr(process, "alive", False)
    assert process.alive  # the fake's join does not end it
    nccl_module._stop_store(seen["group"])
    assert terminated == [True] and not process.alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TCP_STORE_SCRIPT = """
import sys, types
sys.path.insert(0, {tests!r})
import cupyx.distributed
from cupyx.distributed import _store
import tp_gpu.comm.mpi as mpi_module
import tp_gpu.comm.nccl as nccl_module
from tp_gpu.errors import BackendUnavailableError
from test_cupy_marshalling import FakeCupy, FakeProcessGroup

fake = FakeCupy(n_devices=1)
nccl_module.import_cupy = lambda probe=True: fake

def no_mpi():
    raise BackendUnavailableError("no MPI")

mpi_module.MpiComm = no_mpi

def init_process_group(n_devices, rank, *, use_mpi=False):
    store = _store.TCPStore(n_devices)  # cupyx's own store: a non-daemon child process
    store.run("127.0.0.1", {port})
    if {fail!r}:
        raise RuntimeError("NCCL init failed")
    group = FakeProcessGroup(fake, n_devices, rank)
    group._store, group.stop = store, store.stop
    return group

cupyx.distributed.init_process_group = init_process_group
try:
    comm = nccl_module.NcclComm()  # held to the end, as get_communicator() holds it
except RuntimeError as exc:
    print("raised:", exc)
    failure = exc  # held to the end too: its traceback holds the store
print("done", flush=True)
"""


@pytest.mark.parametrize("fail", [False, True], ids=["started", "init failed after the store started"])
def test_a_process_with_a_real_cupyx_tcp_store_exits(tmp_path, fail):
    """With cupyx's own TCPStore (CPU only): the process exits instead of hanging in the store's join."""
    skip_unless_cupy_imports()
    try:
        from cupyx.distributed import _store  # noqa: F401
    except Exception as exc:  # CuPy imports, but not its distributed part
        pytest.skip(f"cupyx.distributed does not import here ({type(exc).__name__}: {exc})")
    script = tmp_path / "store.py"
    code = _TCP_STORE_SCRIPT.format(tests=str(REPO / "tests"), port=_free_port(), fail=fail)
    script.write_text(textwrap.dedent(code))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
        "TP_GPU_WORLD_SIZE": "1",
        "TP_GPU_RANK": "0",
    }
    try:
        done = subprocess.run(
            [sys.executable, "-W", "ignore", str(script)], env=env, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the process hung at exit (cupy/cupy#7863): {exc.stdout!r} {exc.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "done"
    assert ("raised: NCCL init failed" in done.stdout) == fail
