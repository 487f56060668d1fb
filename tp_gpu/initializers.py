"""Seeded initialisers of *logical* (unsharded) weights.

The master weight is drawn on the host in float64 from the seed and the full
shape alone, then split. So the logical weight does not depend on
``n_workers``, the backend or the placement: a layer with any worker count
equals the dense layer built from ``full_weight()``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["xavier_uniform", "embedding_uniform", "EMBEDDING_INIT_RANGE"]

#: Embedding tables start as U(-EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE), as in the original.
EMBEDDING_INIT_RANGE = 0.02


def xavier_uniform(n_in: int, n_out: int, seed: int) -> np.ndarray:
    """A ``(n_in, n_out)`` float64 weight drawn from U(-a, a), ``a = sqrt(6 / (n_in + n_out))``.

    Xavier/Glorot uniform over the *full* fan-in and fan-out.
    """
    limit = np.sqrt(6.0 / (n_in + n_out))
    return np.random.default_rng(seed).uniform(-limit, limit, size=(n_in, n_out))


def embedding_uniform(vocab_size: int, embed_dim: int, seed: int) -> np.ndarray:
    """A ``(vocab_size, embed_dim)`` float64 table drawn from U(-0.02, 0.02)."""
    r = EMBEDDING_INIT_RANGE
    return np.random.default_rng(seed).uniform(-r, r, size=(vocab_size, embed_dim))
