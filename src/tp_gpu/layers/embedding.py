"""Vocabulary-parallel embedding (Megatron-LM ``VocabParallelEmbedding``)."""

from __future__ import annotations

from typing import Any, Hashable, List, Optional, Tuple

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import IndexOutOfRangeError, ShapeError
from ..initializers import embedding_uniform
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..regions import Blocks, copy_to_region, reduce_from_region
from .base import ParallelModule, as_array_like, check_seed

__all__ = ["ParallelEmbedding"]

#: Token ids are carried as int64 on every device.
ID_DTYPE = np.int64


class ParallelEmbedding(ParallelModule):
    """An embedding table ``E`` of shape ``(vocab_size, embed_dim)`` split by vocabulary rows.

    Worker ``i`` owns rows ``[first_i, last_i)`` as ``E_i``. For ids ``t`` it computes
    ``out_i = mask_i * E_i[clip(t - first_i)]`` with ``mask_i = first_i <= t < last_i``
    (mask, offset, take, zero the rest), and ``out = sum_i out_i`` on the
    output device. Exactly one worker owns each id, so the sum equals ``E[t]``
    bit for bit.

    Backward: ``dE_i[t - first_i] += dOut[t]`` for every owned id ``t``
    (repeated ids accumulate), on worker ``i``'s device. Each device scatters
    only the rows of the ids it owns, so the backward does ``n_ids`` row
    additions in all, not ``n_ids`` per device.

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

    def _check_ids(self, indices: Any) -> Blocks:
        """Validate dtype and range of ``indices``; return them as int64 on every device.

        The range check reads the ids' minimum and maximum back to the host:
        one device-to-host copy (on a GPU, one synchronisation) per call. An
        id out of range is reported as the value the caller passed: a uint64
        ``2**64 - 1`` as itself (not as the ``-1`` its int64 copy reads), a
        Python int too large for int64 (which NumPy reads as float64 or object)
        as out of range, not as a wrong dtype.
        """
        ids = as_array_like(indices, "ParallelEmbedding indices")
        if ids.size == 0 and isinstance(indices, (list, tuple)):
            ids = ids.astype(ID_DTYPE)  # [] reads as float64; an empty id list is still a valid id list

        def out_of_range(bad: int) -> IndexOutOfRangeError:
            beyond = " (beyond int64)" if not -(2**63) <= bad < 2**63 else ""
            return IndexOutOfRangeError(
                f"token id {bad}{beyond} out of range; expected 0 <= id < vocab_size={self.vocab_size}"
            )

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
            low, high = int(min(leaves)), int(max(leaves))
            if low < 0 or high >= self.vocab_size:
                raise out_of_range(low if low < 0 else high)
            ids = np.array([int(v) for v in leaves], dtype=ID_DTYPE).reshape(ids.shape)
        copies = copy_to_region.forward(self.group, ids, ID_DTYPE)
        if ids.size:
            first = self.devices[0]
            bounds = self.group.on_device(first, self._id_bounds, copies[first])
            low, high = (int(b) for b in collectives.to_host(self.backend, bounds))
            if low < 0 and np.dtype(ids.dtype).kind == "u":
                raise out_of_range(low + 2**64)  # uint64 ids >= 2**63 wrap to negative int64
            if low < 0 or high >= self.vocab_size:
                raise out_of_range(low if low < 0 else high)
        return copies

    def _id_bounds(self, ids: Any) -> Any:
        """``[min(ids), max(ids)]`` as one array, so that one copy reads both."""
        return self.backend.xp.stack((ids.min(), ids.max()))

    def forward(self, indices: Any) -> Any:
        """Rows of the table for ``indices`` of any integer array shape.

        Returns ``indices.shape + (embed_dim,)`` on the output device. Ids are
        checked (integer dtype, ``0 <= id < vocab_size``) before any lookup.
        """
        ids = self._check_ids(indices)  # {d: ids}
        devices = {d: d for d in self.layout.groups}
        lookups = self.group.on_devices(
            self._lookup, ids, self.weight.blocks, devices
        )  # {d: (rows, owned, local)}
        self._keep(
            {"lookups": lookups, "out_shape": tuple(next(iter(ids.values())).shape) + (self.embed_dim,)}
        )
        return reduce_from_region.forward(self.group, {d: rows for d, (rows, _, _) in lookups.items()})

    def _lookup(self, ids: Any, table: Any, device: Hashable) -> Tuple[Any, Any, Any]:
        """This device's rows for ``ids``: ``(rows, owned, local)``, with the rows of foreign ids zeroed."""
        xp = self.backend.xp
        owned, local = self.layout.owned_local(xp, ids, device)
        if table.shape[0] == 0:  # this device owns no row (more workers than the vocabulary)
            return xp.zeros(tuple(ids.shape) + (self.embed_dim,), dtype=table.dtype), owned, local
        rows = xp.take(table, local, axis=0)  # (vocab_d, dim)[ids.shape] -> (*ids.shape, dim)
        if owned is not None:
            self.backend.zero_rows(rows, ~owned)  # the rows other devices own (as Megatron, in place)
        return rows, owned, local

    def backward(self, grad_output: Any) -> None:
        """Accumulate ``dE`` from ``grad_output`` of shape ``indices.shape + (embed_dim,)``.

        Returns ``None``: ids have no gradient.
        """
        saved = self._take_saved()
        grad = self._check_grad_shape(grad_output, saved["out_shape"], "ParallelEmbedding")
        copies = reduce_from_region.backward(self.group, grad, self.dtype)  # {d: dOut}
        self.weight.accumulate_blocks(
            self.group.on_devices(self._table_grad, copies, saved["lookups"], self.weight.blocks)
        )
        return None

    def _table_grad(self, grad: Any, lookup: Tuple[Any, Any, Any], table: Any) -> Any:
        """``dE_d[local[k]] += dOut[k]`` for every id ``k`` this device owns: ``(vocab_d, dim)``."""
        _, owned, local = lookup
        rows = grad.reshape(-1, self.embed_dim)  # (n_ids, dim)
        mask = None if owned is None else owned.reshape(-1)
        return self.backend.scatter_add_rows(table.shape, local.reshape(-1), rows, mask)

    def full_weight(self) -> np.ndarray:
        """The logical table ``E = [E_1; ...; E_p]``, ``(vocab_size, embed_dim)``, as a host array."""
        return self.weight.full()

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, embed_dim={self.embed_dim}, n_workers={self.n_workers}, "
            f"backend={self.backend.name!r}, devices={self.devices}, dtype={self.dtype.name!r}"
        )
