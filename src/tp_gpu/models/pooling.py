"""sentence-transformers' ``Pooling``: token embeddings ``(b, S, H)`` -> one vector per sentence.

With ``x_j`` the last hidden state of token ``j`` (``j = 1 .. S``), ``m_j`` the
pooling mask (1 on a token, 0 on padding and, with ``include_prompt=False``,
on the prompt's tokens) and ``p`` the padding on the left (``argmax_j m_j`` of
the attention mask, 0 with right padding), each mode computes::

    cls                   x_f,  f = first j with m_j = 1 (the first token if none)
    max                   max_j over m_j = 1 of x_j          (-inf where no token is left)
    mean                  (sum_j m_j x_j) / max(sum_j m_j, 1e-9)
    mean_sqrt_len_tokens  (sum_j m_j x_j) / sqrt(max(sum_j m_j, 1e-9))
    weightedmean          (sum_j w_j x_j) / max(sum_j w_j, 1e-9),  w_j = m_j (j - p)
    lasttoken             m_l x_l,  l = last j with m_j = 1 (the first token, zeroed, if none)

exactly as ``sentence_transformers.models.Pooling._forward_padded`` (v6.3)
computes them; several modes give their vectors side by side, in the order
the folder lists them (old folders: ``cls, max, mean, mean_sqrt_len_tokens,
weightedmean, lasttoken``, the order of their ``pooling_mode_*`` flags).
The mask, indices and weights come from the host attention mask (cheap
``(b, S)`` integers), and cross to the device once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..layers.norm import compute_dtype
from .hf_loader import read_json

__all__ = ["POOLING_MODES", "LEGACY_POOLING_FLAGS", "PoolingConfig", "read_pooling_config", "pool"]

#: Every mode of sentence-transformers' ``Pooling``, in its concatenation order for old folders.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")

#: The ``pooling_mode_*`` flags of folders written before sentence-transformers 6, by mode.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class PoolingConfig:
    """What ``1_Pooling/config.json`` says."""

    embedding_dimension: int  # H, the width of the token embeddings
    modes: Tuple[str, ...]  # one or more of POOLING_MODES, concatenated in this order
    include_prompt: bool = True  # False: the prompt's tokens are left out of the pooling

    @property
    def output_dimension(self) -> int:
        """``len(modes) * H``: the length of the pooled vector."""
        return len(self.modes) * self.embedding_dimension


def _modes_of(raw: Mapping[str, Any], path: str) -> Tuple[str, ...]:
    """The modes of a v6 ``pooling_mode`` (a name or a list) or of the old boolean flags."""
    if "pooling_mode" in raw:  # v6; old flags beside it are ignored, as sentence-transformers ignores them
        value = raw["pooling_mode"]
        modes = (value,) if isinstance(value, str) else value
        if not isinstance(modes, (list, tuple)) or not modes or not all(isinstance(m, str) for m in modes):
            raise ConfigError(
                f"{path}: pooling_mode must be a mode name or a non-empty list of them, got {value!r}"
            )
        unknown = [m for m in modes if m not in POOLING_MODES]
        if unknown:
            raise ConfigError(
                f"{path}: unknown pooling mode {unknown[0]!r}; expected one of {list(POOLING_MODES)}"
            )
        return tuple(modes)
    flags = {key: value for key, value in raw.items() if key.startswith("pooling_mode")}
    unknown = [key for key in flags if key not in LEGACY_POOLING_FLAGS]
    if unknown:
        raise ConfigError(
            f"{path}: unknown pooling flag {unknown[0]!r}; expected 'pooling_mode' or one of "
            f"{list(LEGACY_POOLING_FLAGS)}"
        )
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, got {value!r}")
    modes = tuple(mode for key, mode in LEGACY_POOLING_FLAGS.items() if flags.get(key))
    return modes or ("mean",)  # no flag set: sentence-transformers' default


def read_pooling_config(path: str) -> PoolingConfig:
    """The pooling settings of ``path`` (a ``config.json``), in either format; ConfigError naming it.

    Accepted keys: ``embedding_dimension`` (v6) or ``word_embedding_dimension``
    (older), ``pooling_mode`` (v6) or the ``pooling_mode_*_tokens`` flags, and
    ``include_prompt``.
    """
    raw = read_json(path, "sentence-transformers pooling config")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    key = "embedding_dimension" if "embedding_dimension" in raw else "word_embedding_dimension"
    dim = raw.get(key)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{path}: {key} must be a positive integer, got {dim!r}")
    include = raw.get("include_prompt", True)
    if not isinstance(include, bool):
        raise ConfigError(f"{path}: include_prompt must be true or false, got {include!r}")
    return PoolingConfig(embedding_dimension=dim, modes=_modes_of(raw, path), include_prompt=include)


# ---------------------------------------------------------------------------------------- on the host


def _pooling_mask(mask: np.ndarray, prompt_length: Optional[int]) -> np.ndarray:
    """The attention mask ``(b, S)`` with the prompt's tokens (and left padding) set to 0.

    As ``Pooling._exclude_prompt_from_mask``: without left padding the first
    ``prompt_length`` columns; with it, every column before ``pad + prompt_length``.
    """
    if not prompt_length:
        return mask
    out = mask.copy()
    pad = mask.argmax(axis=1)  # (b,) first token of each row
    if pad.sum() == 0:
        out[:, :prompt_length] = 0
    else:
        out[np.arange(mask.shape[1])[None, :] < (pad + prompt_length)[:, None]] = 0  # (b, S)
    return out


def _host_inputs(
    mask: np.ndarray, config: PoolingConfig, prompt_length: Optional[int]
) -> Dict[str, np.ndarray]:
    """What the modes need from the attention mask ``(b, S)``: masks, weights and token indices."""
    m = _pooling_mask(mask, None if config.include_prompt else prompt_length)  # (b, S)
    b, s = m.shape
    rows = np.arange(b)
    needed: Dict[str, np.ndarray] = {}
    for mode in config.modes:
        if mode in ("max", "mean", "mean_sqrt_len_tokens"):
            needed["mask"] = m
        elif mode == "weightedmean":
            positions = np.arange(1, s + 1)[None, :] - mask.argmax(axis=1)[:, None]  # (b, S): j - p
            needed["weights"] = m * positions
        elif mode == "cls":
            needed["cls_index"] = rows * s + m.argmax(axis=1)  # (b,) flat index into (b*S)
        else:  # lasttoken
            flipped = m[:, ::-1]  # (b, S)
            last = np.where(flipped.max(axis=1) == 0, 0, s - 1 - flipped.argmax(axis=1))  # (b,)
            needed["last_index"] = rows * s + last
            needed["last_mask"] = m[rows, last]  # (b,) 0 where no token is left
    return needed


# ------------------------------------------------------------------------------------- on the device


def pool(
    xp: Any,
    hidden: Any,
    mask: np.ndarray,
    config: PoolingConfig,
    prompt_length: Optional[int],
    to_device: Callable[[Sequence[np.ndarray], Sequence[Any]], List[Any]],
) -> Any:
    """The pooled vectors ``(b, len(modes) * H)`` of ``hidden`` ``(b, S, H)`` (on its device).

    ``mask`` is the host attention mask ``(b, S)``; ``to_device(arrays,
    dtypes)`` puts host arrays on ``hidden``'s device (one call per batch).
    Computed in float32 for float16 models, else in the model's dtype, and
    returned in that dtype. Run it under ``hidden``'s device.
    """
    dtype = compute_dtype(hidden.dtype)
    h = hidden.astype(dtype, copy=False)
    b, s, width = h.shape
    host = _host_inputs(mask, config, prompt_length)
    names = sorted(host)
    kinds = [np.int64 if name.endswith("_index") else dtype for name in names]
    on_device = dict(zip(names, to_device([host[n] for n in names], kinds)))
    flat = h.reshape(b * s, width)  # (b*S, H)
    summed = count = None
    out = []
    for mode in config.modes:
        if mode == "cls":
            out.append(flat[on_device["cls_index"]])  # (b, H)
        elif mode == "lasttoken":
            out.append(flat[on_device["last_index"]] * on_device["last_mask"][:, None])  # (b, H)
        elif mode == "max":
            keep = on_device["mask"][:, :, None] > 0  # (b, S, 1)
            out.append(xp.where(keep, h, dtype.type(-np.inf)).max(axis=1))  # (b, H)
        elif mode == "weightedmean":
            w = on_device["weights"]  # (b, S)
            total = (h * w[:, :, None]).sum(axis=1)  # (b, S, H) -> (b, H)
            out.append(total / xp.maximum(w.sum(axis=1, keepdims=True), dtype.type(1e-9)))  # (b, H) / (b, 1)
        else:  # mean, mean_sqrt_len_tokens: one masked sum for both
            if summed is None:
                m = on_device["mask"]  # (b, S)
                summed = (h * m[:, :, None]).sum(axis=1)  # (b, S, H) -> (b, H)
                count = xp.maximum(m.sum(axis=1, keepdims=True), dtype.type(1e-9))  # (b, 1)
            out.append(summed / (count if mode == "mean" else xp.sqrt(count)))  # (b, H)
    return out[0] if len(out) == 1 else xp.concatenate(out, axis=1)  # (b, len(modes) * H)
