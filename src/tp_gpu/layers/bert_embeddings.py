"""BERT's input embeddings: word, position and token-type lookups summed, then LayerNorm."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ..config import TensorParallelConfig, check_positive_int
from ..errors import ShapeError
from ..tensor import Tensor
from .base import ParallelModule, as_array_like, check_seed
from .embedding import ID_DTYPE, ParallelEmbedding
from .norm import LayerNorm, check_eps

__all__ = ["BertEmbeddings"]


class BertEmbeddings(ParallelModule):
    """``y = LayerNorm(W[input_ids] + P[position_ids] + T[token_type_ids])`` (Devlin et al., 2019).

    ``W`` ``(vocab_size, hidden)``, ``P`` ``(max_position, hidden)`` and ``T``
    ``(type_vocab_size, hidden)`` are :class:`ParallelEmbedding` s split by
    rows over the workers (any size on any worker count: 30,522 rows are
    uneven on 4, 5, 7 and 8 workers); each lookup is reduced onto the output
    device, where the sum and the LayerNorm run. ``position_ids`` default to
    ``0 .. S-1`` and ``token_type_ids`` to zeros, as in Hugging Face.

    Backward (the tape's): ``dz`` the norm's input gradient; each table gets
    ``dz`` scattered onto the rows it looked up (summed over the batch for ids
    shared by every row of the batch). Ids have no gradient.

    Hugging Face names (``embeddings.`` stripped) are this module's own:
    ``word_embeddings.weight``, ``position_embeddings.weight``,
    ``token_type_embeddings.weight``; ``LayerNorm.weight/bias`` is ``norm.weight/bias``.

    Parameters
    ----------
    vocab_size, hidden, max_position, type_vocab_size : int
        Table sizes (BERT-base: 30522, 768, 512, 2).
    config : TensorParallelConfig, optional
        Shared by every submodule.
    seed : int
        The tables are seeded with ``seed``, ``seed + 1`` and ``seed + 2``.
    eps : float
        Of the LayerNorm (BERT's 1e-12).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        max_position: int,
        type_vocab_size: int,
        config: Optional[TensorParallelConfig] = None,
        *,
        seed: int = 0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(config)
        self.vocab_size = check_positive_int(vocab_size, "vocab_size")
        self.hidden = check_positive_int(hidden, "hidden")
        self.max_position = check_positive_int(max_position, "max_position")
        self.type_vocab_size = check_positive_int(type_vocab_size, "type_vocab_size")
        seed = check_seed(seed)
        eps = check_eps(eps)
        self._join_group(
            vocab_size=self.vocab_size, hidden=self.hidden, max_position=self.max_position,
            type_vocab_size=self.type_vocab_size, seed=seed, eps=eps,
        )  # fmt: skip
        config, hidden = self.config, self.hidden
        self.word_embeddings = ParallelEmbedding(self.vocab_size, hidden, config, seed=seed)
        self.position_embeddings = ParallelEmbedding(self.max_position, hidden, config, seed=seed + 1)
        self.token_type_embeddings = ParallelEmbedding(self.type_vocab_size, hidden, config, seed=seed + 2)
        self.norm = LayerNorm(hidden, config, eps=eps)

    def _ids(self, ids: Any, what: str, batch: int, seq: int) -> Any:
        """``position_ids`` / ``token_type_ids`` checked: integers of ``(B, S)``, ``(1, S)`` or ``(S,)``."""
        ids = as_array_like(ids, what)
        if np.dtype(ids.dtype).kind not in "iu" or tuple(ids.shape) not in ((batch, seq), (1, seq), (seq,)):
            raise ShapeError(
                f"{what} must be integers of shape ({batch}, {seq}) (batch, seq), (1, {seq}) or ({seq},); "
                f"got shape {tuple(ids.shape)} of dtype {ids.dtype}"
            )
        return ids

    def check_ids(
        self, input_ids: Any, token_type_ids: Any = None, position_ids: Any = None
    ) -> Tuple[Any, ...]:
        """``(input_ids, token_type_ids, position_ids)`` checked (ShapeError), with the defaults filled in."""
        ids = as_array_like(input_ids, "input_ids")
        if np.dtype(ids.dtype).kind not in "iu" or ids.ndim != 2 or ids.shape[1] == 0:
            raise ShapeError(
                f"input_ids must be integers of shape (batch, seq) with seq >= 1, "
                f"got shape {tuple(ids.shape)} of dtype {ids.dtype}"
            )
        batch, seq = ids.shape
        if position_ids is None:
            if seq > self.max_position:
                raise ShapeError(
                    f"input_ids have {seq} positions, more than max_position={self.max_position}; "
                    f"expected seq <= {self.max_position}"
                )
            position_ids = np.arange(seq, dtype=ID_DTYPE)[None, :]  # (1, S)
        if token_type_ids is None:
            token_type_ids = np.zeros((1, seq), dtype=ID_DTYPE)  # (1, S)
        types = self._ids(token_type_ids, "token_type_ids", batch, seq)
        return ids, types, self._ids(position_ids, "position_ids", batch, seq)

    def forward(self, input_ids: Any, token_type_ids: Any = None, position_ids: Any = None) -> Tensor:
        """``(B, S, hidden)`` on the output device for ``input_ids`` ``(B, S)``.

        ``token_type_ids`` and ``position_ids`` may be ``(B, S)``, ``(1, S)``
        or ``(S,)`` (shared by the batch); ids out of their table's range raise
        IndexOutOfRangeError.
        """
        ids, types, positions = self.check_ids(input_ids, token_type_ids, position_ids)
        words = self.word_embeddings(ids)  # (B, S, H)
        where = self.position_embeddings(positions)  # (B|1, S, H) or (S, H), broadcast by +
        kinds = self.token_type_embeddings(types)  # (B|1, S, H) or (S, H)
        return self.norm(words + where + kinds)

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, hidden={self.hidden}, max_position={self.max_position}, "
            f"type_vocab_size={self.type_vocab_size}"
        )
