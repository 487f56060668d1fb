"""Reading a sentence-transformers folder, as versions 2.x to 6.x write it.

A sentence-transformers model is a pipeline of modules listed in
``modules.json``: a ``Transformer`` (a Hugging Face model folder, usually the
model folder itself), a ``Pooling`` (``1_Pooling/config.json``, see
:mod:`.pooling`), zero or more ``Dense`` (see :mod:`.dense`) and optionally a
``Normalize``. Module types are matched by class name under the
``sentence_transformers`` package (``sentence_transformers.models.Pooling`` in
2.x, ``sentence_transformers.sentence_transformer.modules.pooling.Pooling`` in 6.x).

Where each version keeps the sequence limit, and how it is resolved here
(as ``sentence_transformers.models.Transformer.__init__`` resolves it):

1. ``processor_kwargs`` (``tokenizer_args`` before v6) ``model_max_length`` in
   ``sentence_bert_config.json``;
2. else ``max_seq_length`` in ``sentence_bert_config.json`` (versions < 6);
3. else ``model_max_length`` of ``tokenizer_config.json`` (where v6 keeps it),
   capped by ``max_position_embeddings`` (a missing one: the positions alone).

sentence-transformers does not cap 1 and 2; here they are capped by the
positions too, which changes nothing where sentence-transformers can run (a
longer input would index past its position table).

The ``tokenizers`` library (the optional extra ``models``) is imported only
when a tokenizer is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, cast

from ..errors import CheckpointError, ConfigError, TensorParallelError
from .dense import DenseConfig, read_dense_config
from .hf_loader import read_json
from .pooling import POOLING_MODES, PoolingConfig, read_pooling_config

__all__ = [
    "SentenceConfig",
    "MissingDependencyError",
    "POOLING_MODES",
    "SIMILARITY_FUNCTIONS",
    "read_sentence_config",
    "sequence_limit",
    "load_tokenizer",
]

#: sentence-transformers module classes read here, by class name.
MODULE_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")

#: ``similarity_fn_name`` values of ``config_sentence_transformers.json``.
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")

#: Settings of ``sentence_bert_config.json`` that change the numbers but are not computed here.
_UNSUPPORTED_SETTINGS = ("processing_kwargs", "query_expansion", "query_length", "document_length")


class MissingDependencyError(TensorParallelError, ImportError):
    """An optional library (``tokenizers``, ``tqdm``) is not installed; the message says how to get it."""


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about its pipeline."""

    transformer_dir: str  # the Hugging Face folder of the Transformer module
    pooling: PoolingConfig  # modes, width, include_prompt
    normalize: bool  # whether the pipeline ends in a Normalize module
    max_seq_length: Optional[int]  # the folder's explicit limit (steps 1-2 above), None: the tokenizer's
    tokenizer_max_length: Optional[int]  # tokenizer_config.json's model_max_length (step 3)
    do_lower_case: bool  # lower-case the text before tokenising
    dense: Tuple[DenseConfig, ...] = ()  # Dense modules after the pooling, in order
    prompts: Mapping[str, str] = field(default_factory=dict)  # prompt name -> text put before a sentence
    default_prompt_name: Optional[str] = None  # the prompt used when encode names none
    similarity_fn_name: str = "cosine"  # SIMILARITY_FUNCTIONS
    truncate_dim: Optional[int] = None  # keep the first truncate_dim numbers of each embedding
    padding_side: str = "right"  # tokenizer_config.json's padding_side
    truncation_side: str = "right"  # tokenizer_config.json's truncation_side


def _module_list(model_dir: str) -> Tuple[str, List[Tuple[str, str]]]:
    """``(modules.json path, [(class name, module folder), ...])``; ConfigError for a foreign module."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{model_dir} is not a sentence-transformers folder: modules.json is missing "
            "(for a plain Hugging Face BERT folder use BertModel.from_pretrained)"
        )
    modules = read_json(path, "sentence-transformers modules")
    if not isinstance(modules, list) or not all(isinstance(m, Mapping) for m in modules):
        raise ConfigError(f"{path}: expected a JSON list of modules, got {type(modules).__name__}")
    out = []
    for i, module in enumerate(modules):
        kind, where = module.get("type"), module.get("path", "")
        name = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else None
        if (
            not isinstance(kind, str)
            or not kind.startswith("sentence_transformers.")
            or name not in MODULE_TYPES
        ):
            raise ConfigError(
                f"{path}: module {i} has unsupported type {kind!r}; expected sentence-transformers' "
                f"{', '.join(MODULE_TYPES)}"
            )
        if not isinstance(where, str):
            raise ConfigError(f"{path}: module {i} has path {where!r}; expected a string")
        out.append((name, os.path.normpath(os.path.join(model_dir, where))))
    names = [name for name, _ in out]
    dense = len(names) - 2 - (names[-1:] == ["Normalize"])
    if names[:2] != ["Transformer", "Pooling"] or names[2 : 2 + dense] != ["Dense"] * dense:
        raise ConfigError(f"{path}: modules must be Transformer, Pooling, Dense*, Normalize?; got {names}")
    return path, out


def _optional_json(path: str, what: str) -> Mapping[str, Any]:
    """The JSON object at ``path``, ``{}`` where the file does not exist; ConfigError if not an object."""
    if not os.path.isfile(path):
        return {}
    raw = read_json(path, what)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _length(value: Any, key: str, where: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _transformer_settings(transformer_dir: str) -> Tuple[Dict[str, Any], str]:
    """``sentence_bert_config.json`` (or an older name) of the Transformer folder, checked."""
    where = os.path.join(transformer_dir, "sentence_bert_config.json")
    settings: Mapping[str, Any] = {}
    for name in (
        "sentence_bert_config.json",
        "sentence_roberta_config.json",
        "sentence_distilbert_config.json",
    ):
        candidate = os.path.join(transformer_dir, name)
        if os.path.isfile(candidate):
            where, settings = candidate, _optional_json(candidate, "sentence-transformers settings")
            break
    for key in _UNSUPPORTED_SETTINGS:
        if settings.get(key):
            raise ConfigError(f"{where}: {key}={settings[key]!r} is not supported; expected it unset")
    task = settings.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ConfigError(f"{where}: transformer_task must be 'feature-extraction', got {task!r}")
    if not isinstance(settings.get("do_lower_case", False), bool):
        raise ConfigError(f"{where}: do_lower_case must be true or false, got {settings['do_lower_case']!r}")
    return dict(settings), where


def _explicit_limit(settings: Mapping[str, Any], where: str) -> Optional[int]:
    """Steps 1 and 2 of the module docstring: the folder's own limit, if it gives one."""
    for key in ("processor_kwargs", "tokenizer_args"):
        kwargs = settings.get(key) or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{where}: {key} must be a JSON object, got {kwargs!r}")
        if kwargs.get("model_max_length") is not None:
            return _length(kwargs["model_max_length"], f"{key}.model_max_length", where)
    return _length(settings.get("max_seq_length"), "max_seq_length", where)


def _tokenizer_settings(transformer_dir: str) -> Tuple[Optional[int], str, str]:
    """``(model_max_length, padding_side, truncation_side)`` of ``tokenizer_config.json``."""
    where = os.path.join(transformer_dir, "tokenizer_config.json")
    raw = _optional_json(where, "tokenizer config")
    sides = []
    for key in ("padding_side", "truncation_side"):
        side = raw.get(key, "right")
        if side not in ("left", "right"):
            raise ConfigError(f"{where}: {key} must be 'left' or 'right', got {side!r}")
        sides.append(side)
    return _length(raw.get("model_max_length"), "model_max_length", where), sides[0], sides[1]


def _model_settings(model_dir: str) -> Dict[str, Any]:
    """Prompts, default prompt, similarity function and truncate_dim of config_sentence_transformers.json."""
    where = os.path.join(model_dir, "config_sentence_transformers.json")
    raw = _optional_json(where, "sentence-transformers model config")
    prompts = raw.get("prompts") or {}
    if not isinstance(prompts, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ConfigError(f"{where}: prompts must map names to strings, got {prompts!r:.200}")
    default = raw.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(
            f"{where}: default_prompt_name {default!r} is not one of the prompts {list(prompts)}"
        )
    similarity = raw.get("similarity_fn_name") or "cosine"
    if similarity not in SIMILARITY_FUNCTIONS:
        raise ConfigError(
            f"{where}: similarity_fn_name must be one of {list(SIMILARITY_FUNCTIONS)}, got {similarity!r}"
        )
    return {
        "prompts": dict(prompts),
        "default_prompt_name": default,
        "similarity_fn_name": similarity,
        "truncate_dim": _length(raw.get("truncate_dim"), "truncate_dim", where),
    }


def read_sentence_config(model_dir: str) -> SentenceConfig:
    """The pipeline of the sentence-transformers folder ``model_dir``; raises if it is not one.

    Every file is read and checked here, before any weight is loaded:
    CheckpointError for a missing file, ConfigError naming the file and the
    value for an unsupported module, pooling mode, activation or setting.
    """
    modules_path, modules = _module_list(model_dir)
    transformer_dir = modules[0][1]
    settings, where = _transformer_settings(transformer_dir)
    pooling = read_pooling_config(os.path.join(modules[1][1], "config.json"))
    dense = tuple(read_dense_config(path) for name, path in modules if name == "Dense")
    width = pooling.output_dimension
    for d in dense:
        if d.in_features != width:
            raise ConfigError(
                f"{os.path.join(d.path, 'config.json')}: in_features is {d.in_features}; expected {width}, "
                "the output of the module before it"
            )
        width = d.out_features
    tokenizer_length, padding_side, truncation_side = _tokenizer_settings(transformer_dir)
    return SentenceConfig(
        transformer_dir=transformer_dir,
        pooling=pooling,
        normalize=modules[-1][0] == "Normalize",
        max_seq_length=_explicit_limit(settings, where),
        tokenizer_max_length=tokenizer_length,
        do_lower_case=bool(settings.get("do_lower_case", False)),
        dense=dense,
        padding_side=padding_side,
        truncation_side=truncation_side,
        **_model_settings(model_dir),
    )


def sequence_limit(settings: SentenceConfig, max_position_embeddings: int) -> int:
    """Tokens kept per sentence: the folder's limit (module docstring), at most the position table."""
    limit = settings.max_seq_length if settings.max_seq_length is not None else settings.tokenizer_max_length
    return max_position_embeddings if limit is None else min(limit, max_position_embeddings)


def load_tokenizer(settings: SentenceConfig, max_length: int, pad_id: int) -> Any:
    """The model's own ``tokenizer.json``, set as sentence-transformers sets it.

    Truncation to ``max_length`` tokens (longest-first, no stride) and padding
    to the longest sentence of each batch replace the file's own settings
    (all-MiniLM-L6-v2's file says 128 tokens and fixed padding), on the sides
    ``tokenizer_config.json`` names (right by default). With ``do_lower_case``
    a ``Lowercase`` normaliser goes first, unless the normaliser already has
    one, as sentence-transformers 6 does (2.x lower-cased with ``str.lower``;
    the two differ only on a final capital sigma).
    """
    try:
        from tokenizers import Tokenizer, normalizers
    except ImportError as exc:
        raise MissingDependencyError(
            "SentenceEncoder needs the 'tokenizers' library: pip install 'tp_gpu[models]'"
        ) from exc
    path = os.path.join(settings.transformer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{settings.transformer_dir}: tokenizer.json is missing (a fast-tokenizer file is required)"
        )
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a plain Exception on a bad file
        raise CheckpointError(f"{path} is not a valid tokenizer file: {exc}") from exc
    if settings.do_lower_case:
        current: Any = tokenizer.normalizer
        steps = list(cast(Iterable[Any], current)) if isinstance(current, normalizers.Sequence) else [current]
        if not any(isinstance(n, normalizers.Lowercase) for n in steps):
            tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()] + [n for n in steps if n])
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token") or tokenizer.id_to_token(pad_id) or "[PAD]"
    tokenizer.enable_truncation(
        max_length=max_length, stride=0, strategy="longest_first", direction=settings.truncation_side
    )
    tokenizer.enable_padding(
        direction=settings.padding_side,
        pad_id=padding.get("pad_id", pad_id),
        pad_type_id=0,
        pad_token=pad_token,
    )
    return tokenizer
