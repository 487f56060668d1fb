"""Vocabulary-parallel embedding (Megatron-LM ``VocabParallelEmbedding``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from .. import collectives
from ..config import TensorParallelConfig, check_positive_int
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError
from ..init import embedding_uniform
from .base import ParallelModule, as_array_like, check_layout, check_seed, commit_state, stage_state

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
        Table shape; the worker count must divide ``vocab_size``.
    n_workers : int, optional
        Worker count when no ``config`` is given (default 2). With a ``config``
        it may be left out; if given it must equal ``config.n_workers``.
    seed : int
        Seeds the logical table, U(-0.02, 0.02) over the full shape.
    config : TensorParallelConfig, keyword-only, optional
        Backend, devices, dtype and output device.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        n_workers: Optional[int] = None,
        seed: int = 0,
        *,
        config: Optional[TensorParallelConfig] = None,
    ) -> None:
        if config is None:
            config = TensorParallelConfig(n_workers=2 if n_workers is None else n_workers)
        elif n_workers is not None and n_workers != getattr(config, "n_workers", n_workers):
            raise ConfigError(
                f"n_workers={n_workers!r} disagrees with config.n_workers={config.n_workers!r}; "
                "pass one or make them equal"
            )
        super().__init__(config)
        self._vocab_size = self._split_dim(vocab_size, "vocab_size")
        self._embed_dim = check_positive_int(embed_dim, "embed_dim")
        seed = check_seed(seed)
        self._init_placement(vocab_size=self._vocab_size, embed_dim=self._embed_dim, seed=seed)
        self._vocab_layout = self._even_layout(self._vocab_size)
        table = embedding_uniform(self._vocab_size, self._embed_dim, seed)
        self._table = self._add_parameter("weight", table, self._vocab_layout, axis=0)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @classmethod
    def from_dense(
        cls, weight: Any, bias: Any = None, config: Optional[TensorParallelConfig] = None, layout: str = "in_out"
    ) -> "ParallelEmbedding":
        """A layer holding the dense table ``weight``, ``(vocab_size, embed_dim)``, split by rows.

        The table has that shape in both layouts (PyTorch ``nn.Embedding``'s
        weight too), so ``layout`` is only checked. ``bias`` must be None (an
        embedding has none). ``config`` defaults to ``TensorParallelConfig()``
        (2 workers); the table is cast to its dtype. See :meth:`load_dense`.
        """
        weight = as_array_like(weight, f"{cls.__name__}.from_dense weight")
        check_layout(layout)
        if weight.ndim != 2:
            raise ShapeError(
                f"{cls.__name__}.from_dense weight must be 2-D (vocab_size, embed_dim), got shape {tuple(weight.shape)}"
            )
        vocab_size, embed_dim = weight.shape
        layer = cls(vocab_size, embed_dim, config=config)
        layer.load_dense(weight, bias, layout)
        return layer

    def _dense_state(self, weight: Any, bias: Any, layout: str) -> Dict[str, Any]:
        check_layout(layout)
        if bias is not None:
            raise ConfigError(f"ParallelEmbedding has no bias; got a bias of type {type(bias).__name__}, expected None")
        table = as_array_like(weight, "ParallelEmbedding weight")
        expected = (self._vocab_size, self._embed_dim)
        if tuple(table.shape) != expected:
            raise ShapeError(
                f"ParallelEmbedding weight must have shape {expected} (vocab_size, embed_dim), got {tuple(table.shape)}"
            )
        return {"weight": table}

    def load_dense(self, weight: Any, bias: Any = None, layout: str = "in_out") -> None:
        """Overwrite the table, in place, from the dense ``(vocab_size, embed_dim)`` ``weight``.

        ``weight`` may be a host array, a device array or any DLPack array
        (a ``torch.Tensor``, e.g. ``nn.Embedding.weight``); it is cast to the
        layer's dtype. ``layout`` is accepted for symmetry with the linear
        layers: an embedding table is ``(vocab_size, embed_dim)`` in both.
        ``bias`` must be None. Everything is checked before anything changes.
        """
        state = self._dense_state(weight, bias, layout)
        commit_state(stage_state(self.named_parameters(), state, "ParallelEmbedding.load_dense"))

    @property
    def table_shards(self) -> List[Any]:
        """Worker i's rows ``E_i``, ``(vocab_size / p, embed_dim)``, on its device."""
        return self._table.shards

    def _check_ids(self, indices: Any) -> Any:
        """Validate dtype and range of ``indices``; return them as int64 on worker 0's device."""
        ids = as_array_like(indices, "ParallelEmbedding indices")
        if ids.size == 0 and isinstance(indices, (list, tuple)):
            ids = ids.astype(ID_DTYPE)  # [] reads as float64; an empty id list is still a valid id list
        kind = np.dtype(ids.dtype).kind
        if kind not in "iu":
            raise ShapeError(f"ParallelEmbedding indices must be integers, got dtype {ids.dtype}")
        first_device = self._placement[0]
        ids = self.backend.asarray(ids, ID_DTYPE, first_device)
        if ids.size:
            with self.backend.device(first_device):
                bounds = self.backend.xp.stack((ids.min(), ids.max()))
            low, high = (int(b) for b in self.backend.to_host(bounds))  # one device-to-host copy, not two
            if low < 0 or high >= self._vocab_size:
                bad = low if low < 0 else high
                raise IndexOutOfRangeError(
                    f"token id {bad} out of range; expected 0 <= id < vocab_size={self._vocab_size}"
                )
        return ids

    def forward(self, indices: Any) -> Any:
        """Rows of the table for ``indices`` of any integer array shape.

        Returns ``indices.shape + (embed_dim,)`` on the output device. Ids are
        checked (integer dtype, ``0 <= id < vocab_size``) before any lookup.
        """
        ids = self._check_ids(indices)
        layout = self._vocab_layout
        copies = collectives.broadcast(self.backend, ids, self._placement, ID_DTYPE)
        xp = self.backend.xp
        partials, lookups = [], {}
        for device in layout.groups:  # one lookup per device, for all of its workers
            with self.backend.device(device):
                owned, local = layout.owned_local(xp, copies[device], device)
                rows = xp.take(self._table.blocks[device], local, axis=0)  # (vocab_d, dim)[ids.shape] -> (*ids.shape, dim)
                if owned is not None:  # zero, in place, the rows of ids that other devices own (as Megatron)
                    rows[~owned] = 0
            partials.append(rows)
            lookups[device] = (owned, local)
        self._saved = {"lookups": lookups, "out_shape": tuple(ids.shape) + (self._embed_dim,)} if self.training else None
        return collectives.reduce_sum(self.backend, partials, list(lookups), self.output_device, self.comm)

    def backward(self, grad_output: Any) -> None:
        """Accumulate ``dE`` from ``grad_output`` of shape ``indices.shape + (embed_dim,)``.

        Returns ``None``: ids have no gradient.
        """
        saved = self._take_saved("ParallelEmbedding")
        grad = self._check_grad_shape(grad_output, saved["out_shape"], "ParallelEmbedding")
        copies = collectives.broadcast(self.backend, grad, self._placement, self.dtype)
        xp = self.backend.xp
        for device, (owned, local) in saved["lookups"].items():
            with self.backend.device(device):
                rows = copies[device].reshape(-1, self._embed_dim)  # (n_ids, dim)
                local = local.reshape(-1)
                if owned is not None:  # keep only the ids this device owns: n_ids / p rows, not n_ids
                    keep = xp.flatnonzero(owned)
                    rows, local = xp.take(rows, keep, axis=0), xp.take(local, keep)
                table_grad = xp.zeros(self._table.blocks[device].shape, dtype=self.dtype)
                self.backend.scatter_add(table_grad, local, rows)  # (vocab_d, dim)[local] += (n_owned, dim)
                self._table.accumulate(device, table_grad)
        return None

    def full_weight(self) -> np.ndarray:
        """The logical table ``E = [E_1; ...; E_p]``, ``(vocab_size, embed_dim)``, as a host array."""
        return self._table.full()

    def __repr__(self) -> str:
        return (
            f"ParallelEmbedding(vocab_size={self._vocab_size}, embed_dim={self._embed_dim}, "
            f"n_workers={self.n_workers}, backend={self.backend.name!r}, devices={self.devices}, "
            f"dtype={self.dtype.name!r})"
        )
