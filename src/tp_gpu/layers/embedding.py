"""Vocabulary-parallel embedding (Megatron-LM ``VocabParallelEmbedding``)."""

from __future__ import annotations

from functools import partial
from typing import Any, List, Optional, Tuple

import numpy as np

from ..backends.base import host_array
from ..config import TensorParallelConfig, check_positive_int
from ..device_checks import DeferredCheck, defer, lives_on_device, reading_checks
from ..errors import IndexOutOfRangeError, ShapeError
from ..initializers import embedding_uniform
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..placements import Dense
from ..regions import copy_to_region, reduce_from_region, reduce_scatter_to_sequence_parallel_region
from ..tensor import Tensor
from .base import ParallelModule, as_array_like, check_seed
from .embedding_functions import EmbeddingLookup

__all__ = ["ParallelEmbedding"]

#: Token ids are carried as int64 on every device.
ID_DTYPE = np.int64


class ParallelEmbedding(ParallelModule):
    """An embedding table ``E`` of shape ``(vocab_size, embed_dim)`` split by vocabulary rows.

    Worker ``i`` owns rows ``[first_i, last_i)`` as ``E_i``. For ids ``t`` it computes
    ``out_i = mask_i * E_i[clip(t - first_i)]`` with ``mask_i = first_i <= t < last_i``
    (mask, offset, take, zero the rest: a ``Partial`` value), and
    ``out = sum_i out_i`` on the output device (:func:`~tp_gpu.regions.reduce_from_region`;
    with ``config.sequence_parallel`` reduce-scattered along the sequence
    instead). Exactly one worker owns each id, so the sum equals ``E[t]`` bit for bit.

    Backward (on the tape, :class:`~tp_gpu.layers.embedding_functions.EmbeddingLookup`):
    ``dE_i[t - first_i] += dOut[t]`` for every owned id ``t`` (repeated ids
    accumulate), on worker ``i``'s device. Each device scatters only the rows
    of the ids it owns, so the backward does ``n_ids`` row additions in all,
    not ``n_ids`` per device. A table shared with a :class:`~tp_gpu.TiedLMHead`
    gets the sum of both uses' gradients.

    Parameters
    ----------
    vocab_size, embed_dim : int
        Table shape; any ``vocab_size`` splits over any worker count (the
        first ``vocab_size % p`` workers get one more row).
    config : TensorParallelConfig, optional
        Workers, backend, devices, dtype and output device (default 2 workers).
    seed : int
        Seeds the logical table, U(-0.02, 0.02) over the full shape.
    pad_to_multiple_of : int, optional
        Pad the vocabulary so that every worker holds the same number of rows,
        a multiple of it (Megatron's ``make_vocab_size_divisible_by``). Padded
        rows are zero and never looked up; ``full_weight()``, state dicts and
        checkpoints hold the ``vocab_size`` logical rows only.
    """

    weight: ShardedParameter
    layout: BlockLayout

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        pad_to_multiple_of: Optional[int] = None,
    ) -> None:
        super().__init__(config)
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.seed = check_seed(seed)
        pad = (
            None
            if pad_to_multiple_of is None
            else check_positive_int(pad_to_multiple_of, "pad_to_multiple_of")
        )
        self.pad_to_multiple_of = pad
        self._join_group(vocab_size=self.vocab_size, embed_dim=self.embed_dim, seed=self.seed, pad=pad)
        self.layout = self.group.split(self.vocab_size, what="vocab_size", pad_to_multiple_of=pad)
        table = embedding_uniform(self.vocab_size, self.embed_dim, self.seed)
        self._add_parameter("weight", table, self.layout, axis=0)

    @classmethod
    def from_dense(
        cls, weight: Any, config: Optional[TensorParallelConfig] = None, **kwargs: Any
    ) -> ParallelEmbedding:
        """A layer holding the dense table ``weight``, ``(vocab_size, embed_dim)``, split by rows.

        PyTorch's ``nn.Embedding.weight`` has that shape too. ``config``
        defaults to ``TensorParallelConfig()`` (2 workers); the table is cast
        to its dtype. Keyword arguments go to the constructor
        (``pad_to_multiple_of``). See :meth:`load_dense`.
        """
        weight = as_array_like(weight, f"{cls.__name__}.from_dense weight")
        if weight.ndim != 2:
            raise ShapeError(
                f"{cls.__name__}.from_dense weight must be 2-D (vocab_size, embed_dim), got shape "
                f"{tuple(weight.shape)}"
            )
        vocab_size, embed_dim = weight.shape
        layer = cls(vocab_size, embed_dim, config, **kwargs)
        layer.load_dense(weight)
        return layer

    def load_dense(self, weight: Any) -> None:
        """Overwrite the table, in place, from the dense ``(vocab_size, embed_dim)`` ``weight``.

        ``weight`` may be a host array, a device array or any DLPack array
        (a ``torch.Tensor``, e.g. ``nn.Embedding.weight``); it is cast to the
        layer's dtype. Everything is checked before anything changes.
        """
        table = as_array_like(weight, "ParallelEmbedding weight")
        expected = (self.vocab_size, self.embed_dim)
        if tuple(table.shape) != expected:
            raise ShapeError(
                f"ParallelEmbedding weight must have shape {expected} (vocab_size, embed_dim), got "
                f"{tuple(table.shape)}"
            )
        self.load_state_dict({"weight": table})

    @property
    def weight_shards(self) -> List[Any]:
        """Worker i's rows ``E_i``, ``(n_i, embed_dim)``, on its device."""
        return self.weight.shards

    @property
    def partition(self) -> List[Tuple[int, int]]:
        """Each of this process's workers' half-open ``[first, last)`` of vocabulary rows."""
        return list(self.layout.ranges)

    def _check_ids(self, indices: Any) -> Tuple[Tensor, Optional[DeferredCheck]]:
        """``indices`` as int64 ids on every device, checked: dtype at once, range at once on the host.

        Host ids (NumPy, lists, Python ints) are range-checked on the host
        before anything is computed. Ids already on a device (CuPy, simulated)
        are counted there instead: no device-to-host copy now; the returned
        :class:`~tp_gpu.device_checks.DeferredCheck` is read at the next
        synchronisation point (see :meth:`forward`). An id out of range is
        reported as the value the caller passed: a uint64 ``2**64 - 1`` as
        itself (not as the ``-1`` its int64 copy reads), a Python int too large
        for int64 (which NumPy reads as float64 or object) as out of range, not
        as a wrong dtype.
        """
        raw = indices.blocks[indices.placement.device] if _is_dense(indices) else indices
        ids = as_array_like(raw, "ParallelEmbedding indices")
        if ids.size == 0 and isinstance(indices, (list, tuple)):
            ids = ids.astype(ID_DTYPE)  # [] reads as float64; an empty id list is still a valid id list
        unsigned = np.dtype(ids.dtype).kind == "u"
        if np.dtype(ids.dtype).kind not in "iu":
            # Python ints NumPy could not hold as int64 ([1, 2**63] reads as float64, [2**70] as object).
            leaves = None
            if isinstance(indices, (list, tuple)):
                leaves = np.array(indices, dtype=object).reshape(-1)
            elif isinstance(ids, np.ndarray) and ids.dtype == object:
                leaves = ids.reshape(-1)
            if leaves is None or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in leaves
            ):
                raise ShapeError(f"ParallelEmbedding indices must be integers, got dtype {ids.dtype}")
            self._raise_if_out_of_range(int(min(leaves)), int(max(leaves)))
            ids = np.array([int(v) for v in leaves], dtype=ID_DTYPE).reshape(ids.shape)
        on_device = lives_on_device(self.backend, ids)
        if not on_device and ids.size:
            host = host_array(ids)
            self._raise_if_out_of_range(int(host.min()), int(host.max()))  # Python ints: no wrap
        copies = copy_to_region(ids, self.group, ID_DTYPE)  # (*ids.shape) on every device
        check = None
        if on_device and ids.size:
            first = self.devices[0]
            stats = self.group.on_device(
                first, partial(_id_stats, self.backend.xp, self.vocab_size), copies.blocks[first]
            )
            check = defer(DeferredCheck(self.backend, stats, partial(self._judge, unsigned, ids.size)))
        return copies, check

    def _raise_if_out_of_range(self, low: int, high: int) -> None:
        if low < 0 or high >= self.vocab_size:
            raise self._out_of_range(low if low < 0 else high)

    def _out_of_range(self, bad: int, detail: str = "") -> IndexOutOfRangeError:
        beyond = " (beyond int64)" if not -(2**63) <= bad < 2**63 else ""
        return IndexOutOfRangeError(
            f"token id {bad}{beyond} out of range; expected 0 <= id < vocab_size={self.vocab_size}{detail}"
        )

    def _judge(self, unsigned: bool, n_ids: int, stats: np.ndarray) -> Optional[IndexOutOfRangeError]:
        """The error that the device's ``[n_bad, min, max]`` of the int64 ids shows, or None."""
        n_bad, low, high = (int(v) for v in stats)
        if not n_bad:
            return None
        bad = low if low < 0 else high
        if unsigned and bad < 0:
            bad += 2**64  # uint64 ids >= 2**63 wrap to negative int64: report what was passed
        detail = f" ({n_bad} of {n_ids} ids out of range; checked on the device, read at synchronisation)"
        return self._out_of_range(bad, detail)

    def forward(self, indices: Any) -> Tensor:
        """Rows of the table for ``indices`` of any integer array shape: ``indices.shape + (embed_dim,)``.

        Dense on the output device, or with ``config.sequence_parallel`` split
        along the sequence (axis -2 of the output), reduce-scattered. The
        dtype is checked first. Host ids (NumPy, lists) are range-checked
        (``0 <= id < vocab_size``) on the host before any lookup. Ids that
        live on a device (CuPy, simulated) are checked there without a
        device-to-host copy: an id out of range reads no row (its row is
        zero, its gradient dropped) and raises IndexOutOfRangeError, naming
        it, at the next synchronisation point: when this output (or a loss)
        is brought to the host, at the start of a backward from it, or at
        this lookup's backward (see :mod:`tp_gpu.device_checks`).
        """
        ids, check = self._check_ids(indices)  # (*ids.shape) on every device
        partial_rows = EmbeddingLookup.apply(ids, self.weight, check is None, check)  # Partial (*ids, dim)
        if self.config.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial_rows, self.group)  # (..., S_d, dim)
        else:
            out = reduce_from_region(partial_rows, self.group)  # (*ids.shape, dim) on the output device
        return out if check is None else reading_checks(out, (check,))

    def full_weight(self) -> np.ndarray:
        """The logical table ``E = [E_1; ...; E_p]``, ``(vocab_size, embed_dim)``, as a host array."""
        return self.weight.full()

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, embed_dim={self.embed_dim}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r}"
        )


def _is_dense(x: Any) -> bool:
    return isinstance(x, Tensor) and isinstance(x.placement, Dense)


def _id_stats(xp: Any, vocab_size: int, ids: Any) -> Any:
    """``[n_bad, min, max]`` of the int64 ``ids`` on their device, as one array (one copy reads it)."""
    flat = ids.reshape(-1)  # (N,), read only
    bad = (flat < 0) | (flat >= vocab_size)
    return xp.stack((bad.sum().astype(flat.dtype), flat.min(), flat.max()))
