"""sentence-transformers' similarity functions on host NumPy embeddings.

For rows ``a_i`` of ``a`` ``(n, D)`` and ``b_j`` of ``b`` ``(m, D)``, the
``(n, m)`` matrix of::

    cosine     a_i . b_j / (max(||a_i||, 1e-12) max(||b_j||, 1e-12))
    dot        a_i . b_j
    euclidean  -||a_i - b_j||_2
    manhattan  -||a_i - b_j||_1

as ``sentence_transformers.util.{cos_sim, dot_score, euclidean_sim,
manhattan_sim}``. A single vector ``(D,)`` counts as one row.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np

from ..errors import ConfigError, ShapeError

__all__ = ["SIMILARITY", "similarity"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # (n, D) / (n, 1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return _unit(a) @ _unit(b).T  # (n, D) @ (D, m) -> (n, m)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b.T  # (n, D) @ (D, m) -> (n, m)


def _euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return -np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))  # (n, m, D) -> (n, m)


def _manhattan(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return -np.abs(a[:, None, :] - b[None, :, :]).sum(axis=2)  # (n, m, D) -> (n, m)


SIMILARITY: Dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cosine": _cosine,
    "dot": _dot,
    "euclidean": _euclidean,
    "manhattan": _manhattan,
}


def _rows(x: Any, name: str) -> np.ndarray:
    """``x`` (an array, or a list of vectors) as a float array ``(n, D)``; ShapeError otherwise."""
    arr = np.asarray(np.stack(x) if isinstance(x, list) and x else x)
    if arr.ndim == 1:
        arr = arr[None, :]  # (D,) -> (1, D)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise ShapeError(
            f"{name} must be numbers of shape (n, D) or (D,), got shape {arr.shape} of {arr.dtype}"
        )
    return arr if arr.dtype.kind == "f" else arr.astype(np.float64)


def similarity(a: Any, b: Any, fn_name: str) -> np.ndarray:
    """The ``(n, m)`` similarities of the rows of ``a`` and ``b`` by ``fn_name`` (module docstring)."""
    if fn_name not in SIMILARITY:
        raise ConfigError(f"similarity_fn_name must be one of {list(SIMILARITY)}, got {fn_name!r}")
    x, y = _rows(a, "embeddings1"), _rows(b, "embeddings2")
    if x.shape[1] != y.shape[1]:
        raise ShapeError(f"embeddings2 has {y.shape[1]} columns; expected {x.shape[1]}, as embeddings1")
    return SIMILARITY[fn_name](x, y)
