"""NCCL's native reduce-scatter under sequence parallelism across processes, against a fake NCCL.

:meth:`NcclComm.reduce_scatter` hands ``ncclReduceScatter`` (through
``cupyx.distributed``'s ``reduce_scatter(in_array, out_array, count, op)``)
``s`` equal runs of ``count`` elements, padding uneven pieces to the longest.
No GPU is needed: a fake CuPy (NumPy arrays that know ``.get()``) and a fake
process group stand in, one per simulated rank, each rank in its own thread.
The group checks what the real one requires (contiguous buffers, an NCCL
dtype, ``in.size == s * count``, ``out.size == count``), records every call
and computes the reduction with NumPy over every rank's buffer, in rank order.
Results are compared, exactly, with the all-reduce + slice the communicator
used before (the same fake, the same summation order) and with NumPy. The
bytes each rank sends are counted with the ring model NCCL uses for large
messages: ``(s - 1) count`` elements for a reduce-scatter, ``2 (s - 1) n / s``
for an all-reduce of ``n``. What only a GPU shows (NCCL itself, timing) is not
tested here.
"""

from __future__ import annotations

import threading
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, NamedTuple

import numpy as np
import pytest

from tp_gpu import ShapeError, collectives
from tp_gpu.backends.numpy_backend import CPU, NumpyBackend
from tp_gpu.comm import nccl as nccl_module
from tp_gpu.comm.base import Communicator
from tp_gpu.comm.nccl import NcclComm, reduce_scatter_rows
from tp_gpu.partition import BlockLayout

#: dtype characters cupyx.distributed maps to an NCCL type (complex travels as twice the floats).
NCCL_DTYPES = set("bBiIlLqQefdFD")


class FakeCupyArray(np.ndarray):
    """A NumPy array standing for a CuPy one on this rank's GPU. Callers pass host NumPy arrays, which
    :meth:`NcclComm._run` stages with ``cupy.asarray`` and brings back with ``.get()``, so every buffer
    NCCL sees is one of these."""

    def get(self) -> np.ndarray:
        return np.array(self)  # a plain ndarray copy, as cupy's device-to-host copy


def _wrap(values: np.ndarray) -> FakeCupyArray:
    return values.view(FakeCupyArray)


class _Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def fake_cupy() -> types.SimpleNamespace:
    """The parts of ``cupy`` that :class:`NcclComm`'s collectives use; ``empty`` is filled with 7s, so
    that an element the collective forgets to write shows."""
    return types.SimpleNamespace(
        asarray=lambda x, dtype=None: _wrap(np.array(x, dtype=dtype)),
        empty=lambda shape, dtype: _wrap(np.full(shape, 7, dtype=dtype)),
        zeros=lambda shape, dtype: _wrap(np.zeros(shape, dtype=dtype)),
        ascontiguousarray=lambda a: _wrap(np.ascontiguousarray(a)),
        concatenate=lambda arrays, axis: _wrap(np.concatenate(arrays, axis=axis)),
        cuda=types.SimpleNamespace(Device=_Device),
    )


class Call(NamedTuple):
    name: str  # "reduce_scatter" or "all_reduce"
    rank: int
    in_shape: tuple
    dtype: np.dtype
    count: int  # elements per rank (reduce-scatter) or in all (all-reduce), of the array's dtype
    op: str
    sent: float  # bytes this rank sends on a ring
    received: int  # bytes of the result buffer this rank ends with


class FakeWorld:
    """The ranks of one simulated job: a barrier, every rank's buffer of the current call, the calls."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=10)
        self.slots: List[Any] = [None] * size
        self.calls: List[Call] = []
        self.lock = threading.Lock()

    def exchange(self, rank: int, flat: np.ndarray) -> List[np.ndarray]:
        """Every rank's ``flat``, in rank order, once every rank has passed its own."""
        self.slots[rank] = np.array(flat)
        self.barrier.wait()
        every = list(self.slots)
        self.barrier.wait()  # no rank overwrites its slot before every rank has read them all
        return every

    def record(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)

    def names(self) -> set:
        return {call.name for call in self.calls}


def _combine(op: str, every: List[np.ndarray]) -> np.ndarray:
    out = every[0].copy()
    for piece in every[1:]:
        if op == "sum":
            out += piece
        else:
            np.maximum(out, piece, out=out)
    return out


class FakeProcessGroup:
    """``cupyx.distributed``'s NCCL process group for one rank of a :class:`FakeWorld`."""

    def __init__(self, world: FakeWorld, rank: int) -> None:
        self.world, self.rank = world, rank

    def _check(self, in_array: Any, out_array: Any, op: str) -> None:
        assert isinstance(in_array, FakeCupyArray) and isinstance(out_array, FakeCupyArray)
        assert in_array.flags.c_contiguous and out_array.flags.c_contiguous, "NCCL reads raw pointers"
        assert in_array.dtype == out_array.dtype and in_array.dtype.char in NCCL_DTYPES
        assert op in ("sum", "max")

    def reduce_scatter(self, in_array, out_array, count, op="sum", stream=None):
        self._check(in_array, out_array, op)
        size = self.world.size
        assert in_array.size == size * count and out_array.size == count, "ncclReduceScatter: s equal runs"
        itemsize = in_array.dtype.itemsize
        self.world.record(
            Call(
                "reduce_scatter",
                self.rank,
                in_array.shape,
                in_array.dtype,
                count,
                op,
                (size - 1) * count * itemsize,
                out_array.nbytes,
            )
        )
        total = _combine(op, self.world.exchange(self.rank, in_array.reshape(-1)))
        out_array.reshape(-1)[...] = total[self.rank * count : (self.rank + 1) * count]

    def all_reduce(self, in_array, out_array, op="sum", stream=None):
        self._check(in_array, out_array, op)
        size = self.world.size
        assert in_array.size == out_array.size
        self.world.record(
            Call(
                "all_reduce",
                self.rank,
                in_array.shape,
                in_array.dtype,
                in_array.size,
                op,
                2 * (size - 1) / size * in_array.nbytes,
                out_array.nbytes,
            )
        )
        total = _combine(op, self.world.exchange(self.rank, in_array.reshape(-1)))
        out_array.reshape(-1)[...] = total


def fake_comms(world: FakeWorld) -> List[NcclComm]:
    """One :class:`NcclComm` per rank of ``world``, built around the fakes (no GPU, no rendezvous)."""
    comms = []
    for rank in range(world.size):
        comm = object.__new__(NcclComm)
        comm._cupy, comm.device, comm.rank, comm.size = fake_cupy(), 0, rank, world.size
        comm._nccl = FakeProcessGroup(world, rank)
        comms.append(comm)
    return comms


def on_every_rank(comms: List[NcclComm], work: Callable[[NcclComm], Any]) -> List[Any]:
    """``work(comm)`` for every rank at once, in threads; the results in rank order."""
    with ThreadPoolExecutor(len(comms)) as pool:
        return list(pool.map(work, comms))


def all_reduce_then_slice(comm: NcclComm, array, axis, sizes):
    """The path used before: the base communicator's all-reduce + this rank's piece."""
    return Communicator.reduce_scatter(comm, None, array, axis, sizes)


def run_both(size: int, arrays: List[np.ndarray], axis: int, sizes: List[int]):
    """``(native results, all-reduce + slice results, native world, all-reduce world)``."""
    native, before = FakeWorld(size), FakeWorld(size)
    got = on_every_rank(fake_comms(native), lambda c: c.reduce_scatter(None, arrays[c.rank], axis, sizes))
    want = on_every_rank(fake_comms(before), lambda c: all_reduce_then_slice(c, arrays[c.rank], axis, sizes))
    return got, want, native, before


def _along(axis: int, index: slice) -> tuple:
    return (slice(None),) * axis + (index,)


CASES = [
    pytest.param(2, (8, 3), 0, [4, 4], np.float64, id="s2-equal-axis0"),
    pytest.param(4, (2, 12, 5), 1, [3, 3, 3, 3], np.float32, id="s4-equal-seq-axis"),
    pytest.param(3, (2, 7, 4), -2, [3, 2, 2], np.float64, id="s3-uneven-seq-axis"),
    pytest.param(4, (3, 10), -1, [3, 3, 2, 2], np.float32, id="s4-uneven-last-axis"),
    pytest.param(3, (5, 2), 0, [2, 2, 1], np.complex128, id="s3-uneven-complex"),
    pytest.param(2, (9, 2), 0, [5, 4], np.int64, id="s2-uneven-int64"),
]


@pytest.mark.parametrize("size, shape, axis, sizes, dtype", CASES)
def test_native_reduce_scatter_equals_all_reduce_then_slice(size, shape, axis, sizes, dtype, rng):
    arrays = [(rng.standard_normal(shape) * 10).astype(dtype) for _ in range(size)]
    if np.dtype(dtype).kind == "c":
        arrays = [a + 1j * (rng.standard_normal(shape)) for a in arrays]
    got, want, native, before = run_both(size, arrays, axis, sizes)
    total = _combine("sum", arrays)
    first = 0
    for rank in range(size):
        piece = total[_along(axis % len(shape), slice(first, first + sizes[rank]))]
        first += sizes[rank]
        assert isinstance(got[rank], np.ndarray) and not isinstance(
            got[rank], FakeCupyArray
        )  # host in, host out
        assert got[rank].dtype == dtype and got[rank].shape == piece.shape
        np.testing.assert_array_equal(got[rank], want[rank])  # same summation order: equal bits
        np.testing.assert_array_equal(got[rank], piece)
    assert before.names() == {"all_reduce"}
    assert native.names() == {"reduce_scatter"}, "the native collective, never the all-reduce"
    rows = max(sizes)
    m = int(np.prod(shape)) // shape[axis]
    assert sorted(c.rank for c in native.calls) == list(range(size))  # one call per rank
    for call in native.calls:
        assert (call.op, call.dtype, call.count) == ("sum", np.dtype(dtype), rows * m)
        if len(set(sizes)) == 1:
            assert call.in_shape[0] == sum(sizes)  # the array itself, axis first: no padding
        else:
            assert call.in_shape[:2] == (size, rows)  # every piece padded to the longest


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_bytes_sent_per_rank_halve_and_each_rank_keeps_one_piece(size, rng):
    """Equal pieces: a rank sends ``(s - 1) / s`` of the array instead of ``2 (s - 1) / s``, and its
    result buffer is ``1 / s`` of the array instead of all of it."""
    shape = (2, 4 * size, 6)  # (B, S, H) float64, S split over the ranks
    arrays = [rng.standard_normal(shape) for _ in range(size)]
    nbytes = arrays[0].nbytes
    _, _, native, before = run_both(size, arrays, 1, [4] * size)
    for call in before.calls:
        assert call.sent == 2 * (size - 1) / size * nbytes and call.received == nbytes
    for call in native.calls:
        assert call.sent == (size - 1) * nbytes // size and call.received == nbytes // size
        assert call.sent * 2 == next(c.sent for c in before.calls if c.rank == call.rank)


def test_uneven_pieces_pay_only_their_padding(rng):
    """Pieces of 3, 3, 2 and 2 rows are sent as 4 runs of 3: 2 rows of zeros in all."""
    size, sizes, m = 4, [3, 3, 2, 2], 5
    arrays = [rng.standard_normal((10, m)) for _ in range(size)]
    _, _, native, before = run_both(size, arrays, 0, sizes)
    row = m * 8
    for call in native.calls:
        assert call.sent == (size - 1) * 3 * row  # (s - 1) padded pieces
        assert call.received == 3 * row
    all_reduce_sent = before.calls[0].sent
    assert all_reduce_sent == 2 * (size - 1) / size * 10 * row
    assert native.calls[0].sent / all_reduce_sent == pytest.approx(12 / 20)  # s L / (2 T)


def test_pieces_too_uneven_for_padding_fall_back_to_the_all_reduce(rng):
    """One row over four ranks: 4 padded rows would cost more than the all-reduce's 2."""
    sizes = [1, 0, 0, 0]
    assert reduce_scatter_rows(sizes) is None
    arrays = [rng.standard_normal((1, 3)) for _ in range(4)]
    got, want, native, _ = run_both(4, arrays, 0, sizes)
    assert native.names() == {"all_reduce"}
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(got[0], _combine("sum", arrays))
    assert [g.shape for g in got] == [(1, 3), (0, 3), (0, 3), (0, 3)]


@pytest.mark.parametrize(
    "sizes, rows",
    [([4, 4], 4), ([3, 2, 2], 3), ([3, 3, 2, 2], 3), ([2, 1, 1, 1], 2), ([1, 1, 0], 1), ([1, 0, 0, 0], None)],
)
def test_reduce_scatter_rows_pads_while_s_times_longest_is_under_twice_the_total(sizes, rows):
    assert reduce_scatter_rows(sizes) == rows


def test_sequence_parallel_reduce_scatter_blocks_goes_through_the_native_collective(rng):
    """The call site: ``collectives.reduce_scatter_blocks`` over 3 processes (sequence of 8)."""
    size, seq = 3, 8
    backend = NumpyBackend()
    partials = [rng.standard_normal((2, seq, 4)) for _ in range(size)]  # (B, S, H), one per process
    world = FakeWorld(size)

    def work(comm: NcclComm):
        layout = BlockLayout.split(seq, [CPU], comm.rank, size, what="sequence length")
        blocks = collectives.reduce_scatter_blocks(
            backend, {CPU: partials[comm.rank].copy()}, -2, layout, comm
        )
        return layout, blocks

    results = on_every_rank(fake_comms(world), work)
    total = _combine("sum", partials)
    for layout, blocks in results:
        np.testing.assert_array_equal(blocks[CPU], total[:, layout.start : layout.start + layout.size])
    assert world.names() == {"reduce_scatter"}
    assert {call.count for call in world.calls} == {3 * 2 * 4}  # spans 3, 3, 2: padded to 3 rows of B * H


@pytest.mark.parametrize("sizes", [[4, 4], [3, 3, 3], [2, 2, 2]], ids=["too few", "too long", "too short"])
def test_pieces_that_do_not_match_the_ranks_or_the_axis_raise_shape_error(sizes):
    comm = fake_comms(FakeWorld(3))[0]
    with pytest.raises(ShapeError, match=r"reduce_scatter got pieces .* expected 3 pieces summing to 8"):
        comm.reduce_scatter(None, np.zeros((8, 2)), 0, sizes)


def test_other_nccl_collectives_are_unchanged(rng):
    """The all-reduce still goes through NCCL's all-reduce (the fake sums every rank's array)."""
    arrays = [rng.standard_normal((3, 2)) for _ in range(2)]
    world = FakeWorld(2)
    got = on_every_rank(fake_comms(world), lambda c: c.all_reduce(None, arrays[c.rank], "sum"))
    for g in got:
        np.testing.assert_array_equal(g, arrays[0] + arrays[1])
    assert world.names() == {"all_reduce"}
    assert nccl_module.NcclComm.reduce_scatter is not Communicator.reduce_scatter
