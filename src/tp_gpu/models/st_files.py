"""Reading a sentence-transformers folder: ``modules.json``, pooling, settings and tokenizer.

A sentence-transformers model is a pipeline of modules listed in
``modules.json``: a ``Transformer`` (a Hugging Face model folder, usually the
model folder itself), a ``Pooling`` (its settings in ``1_Pooling/config.json``)
and, optionally, ``Normalize``. The ``tokenizers`` library (the optional extra
``models``) is imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from ..errors import CheckpointError, ConfigError, TensorParallelError
from .hf_loader import read_json

__all__ = [
    "SentenceConfig",
    "MissingDependencyError",
    "POOLING_MODES",
    "read_sentence_config",
    "load_tokenizer",
]

#: Pooling modes of ``1_Pooling/config.json`` computed here, by their sentence-transformers flag.
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}

#: sentence-transformers module classes, by the last part of their dotted ``type`` in ``modules.json``.
_MODULE_TYPES = {"Transformer": "transformer", "Pooling": "pooling", "Normalize": "normalize"}


class MissingDependencyError(TensorParallelError, ImportError):
    """An optional library (``tokenizers``, ``tqdm``) is not installed; the message says how to get it."""


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about its pipeline."""

    transformer_dir: str  # the Hugging Face folder of the Transformer module
    pooling: str  # "mean", "cls" or "max"
    normalize: bool  # whether the pipeline ends in a Normalize module
    max_seq_length: Optional[int]  # tokens kept per sentence (None: the tokenizer's own limit)
    do_lower_case: bool  # lower-case the text before tokenising


def _module_kinds(model_dir: str) -> List[Mapping[str, Any]]:
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{model_dir} is not a sentence-transformers folder: modules.json is missing "
            "(for a plain Hugging Face BERT folder use BertModel.from_pretrained)"
        )
    modules = read_json(path, "sentence-transformers modules")
    if not isinstance(modules, list) or not all(isinstance(m, Mapping) for m in modules):
        raise ConfigError(f"{path}: expected a JSON list of modules, got {type(modules).__name__}")
    kinds = [_MODULE_TYPES.get(str(m.get("type", "")).rsplit(".", 1)[-1]) for m in modules]
    expected = ["transformer", "pooling"]
    if kinds[:2] != expected or kinds[2:] not in ([], ["normalize"]):
        found = [m.get("type") for m in modules]
        raise ConfigError(f"{path}: modules must be Transformer, Pooling[, Normalize]; got {found}")
    return modules


def _pooling_mode(path: str) -> str:
    raw = read_json(path, "sentence-transformers pooling config")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    on = [flag for flag, value in raw.items() if flag.startswith("pooling_mode") and value is True]
    if len(on) != 1 or on[0] not in POOLING_MODES:
        raise ConfigError(f"{path}: exactly one pooling mode of {list(POOLING_MODES)} must be true, got {on}")
    return POOLING_MODES[on[0]]


def read_sentence_config(model_dir: str) -> SentenceConfig:
    """The pipeline of the sentence-transformers folder ``model_dir``; raises if it is not one."""
    modules = _module_kinds(model_dir)
    transformer_dir = os.path.join(model_dir, str(modules[0].get("path", "")))
    pooling = _pooling_mode(os.path.join(model_dir, str(modules[1].get("path", "1_Pooling")), "config.json"))
    settings: Mapping[str, Any] = {}
    for name in ("sentence_bert_config.json", "sentence_roberta_config.json"):
        path = os.path.join(transformer_dir, name)
        if os.path.isfile(path):
            settings = read_json(path, "sentence-transformers settings")
            break
    length = settings.get("max_seq_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise ConfigError(f"{transformer_dir}: max_seq_length must be a positive integer, got {length!r}")
    return SentenceConfig(
        transformer_dir=os.path.normpath(transformer_dir),
        pooling=pooling,
        normalize=len(modules) == 3,
        max_seq_length=length,
        do_lower_case=bool(settings.get("do_lower_case", False)),
    )


def load_tokenizer(model_dir: str, max_length: int, pad_id: int) -> Any:
    """The model's own ``tokenizer.json``, set as sentence-transformers sets it.

    Truncation to ``max_length`` tokens (longest-first, no stride) and padding
    to the longest sentence of each batch replace the file's own settings
    (all-MiniLM-L6-v2's file says 128 tokens and fixed padding).
    """
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise MissingDependencyError(
            "SentenceEncoder needs the 'tokenizers' library: pip install 'tp_gpu[models]'"
        ) from exc
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: tokenizer.json is missing (a fast-tokenizer file is required)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a plain Exception on a bad file
        raise CheckpointError(f"{path} is not a valid tokenizer file: {exc}") from exc
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token") or tokenizer.id_to_token(pad_id) or "[PAD]"
    tokenizer.enable_truncation(max_length=max_length, stride=0, strategy="longest_first")
    tokenizer.enable_padding(
        direction="right", pad_id=padding.get("pad_id", pad_id), pad_type_id=0, pad_token=pad_token
    )
    return tokenizer
