"""Reading a Hugging Face BERT folder: ``config.json``, ``model.safetensors``, tensor names and shapes.

Everything here is checked before any weight is loaded:

* the folder exists and holds ``config.json`` and ``model.safetensors`` (or a
  sharded ``model.safetensors.index.json``);
* ``config.json`` says ``"model_type": "bert"`` and has every size the model needs;
* the checkpoint holds every tensor a BERT of that config has, under its
  Hugging Face name (``embeddings.word_embeddings.weight``,
  ``encoder.layer.{i}.attention.self.query.weight``, ...), with or without the
  ``bert.`` prefix of the task models (``BertForMaskedLM``, ...), each of the
  expected shape and a float dtype.

Tensors are then read one at a time with ``safetensors.safe_open`` (memory
mapped), so loading holds at most one full tensor on the host at a time,
never a full copy of the model, let alone one per worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import CheckpointError, ConfigError

__all__ = [
    "BertConfig",
    "CheckpointReader",
    "HF_ACTIVATIONS",
    "IGNORED_TENSORS",
    "bert_tensor_shapes",
    "check_model_dir",
    "read_json",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Hugging Face ``hidden_act`` -> tp_gpu activation name (``"gelu"`` is the exact erf form in both).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

#: Tensors a BERT checkpoint may hold that the encoder does not use: the position-id buffer
#: and the pooler (``tanh(W h_CLS + b)``, used by next-sentence prediction only).
IGNORED_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")

#: safetensors dtypes read as float (cast to the model's dtype on loading).
FLOAT_DTYPES = ("F16", "F32", "F64")

_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def read_json(path: PathLike, what: str) -> Any:
    """The parsed JSON file at ``path``; CheckpointError naming the file if it is missing or invalid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what}: {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({exc})") from exc


#: ``owner/name``, as a Hugging Face Hub model id is written.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _hub_hint(given: Any) -> str:
    """For a string shaped as a Hub id (``owner/name``), how to get that folder; else ``""``."""
    if not isinstance(given, str) or not _HUB_ID.fullmatch(given):
        return ""
    local = given.rsplit("/", 1)[1]
    return (
        f"; {given!r} looks like a Hugging Face Hub id, and tp_gpu reads only local folders: download it "
        f"first with `huggingface-cli download {given} --local-dir {local}` (or `hf download {given} "
        f"--local-dir {local}`) and pass that folder ({local!r})"
    )


def check_model_dir(model_dir: Any, what: str = "BertModel.from_pretrained") -> str:
    """``model_dir`` as a path string, if it is an existing folder; else CheckpointError naming it.

    A missing ``owner/name`` (a Hub id, not a path here) gets the command that downloads it.
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise CheckpointError(
            f"{what}: model_dir must be a path (str or os.PathLike), got {type(model_dir).__name__}"
        )
    given = os.fspath(model_dir)
    path = os.path.abspath(given)
    if not os.path.exists(path):
        raise CheckpointError(f"{what}: model folder {path} does not exist{_hub_hint(given)}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{what}: {path} is not a folder; expected a Hugging Face model folder")
    return path


def _positive_int(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class BertConfig:
    """The sizes of a BERT encoder, as Hugging Face's ``config.json`` gives them.

    all-MiniLM-L6-v2 is ``BertConfig(vocab_size=30522, hidden_size=384,
    num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    max_position_embeddings=512, type_vocab_size=2)``: 22.7M parameters.
    """

    vocab_size: int  # rows of the word-embedding table
    hidden_size: int  # H, the width of every residual-stream activation
    num_hidden_layers: int  # transformer layers
    num_attention_heads: int  # heads; H / heads is the head size
    intermediate_size: int  # the MLP's inner width
    max_position_embeddings: int  # longest sequence the position table covers
    type_vocab_size: int  # segment (token type) ids: 2 for BERT
    hidden_act: str = "gelu"  # tp_gpu activation name (mapped from Hugging Face's by HF_ACTIVATIONS)
    layer_norm_eps: float = 1e-12  # eps of every LayerNorm
    pad_token_id: int = 0  # id of [PAD]

    @property
    def head_dim(self) -> int:
        """Columns of one attention head: ``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: Any, where: str = "config.json") -> BertConfig:
        """Validate a ``config.json`` mapping: a BERT, every size present and consistent; else ConfigError."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type != "bert":
            raise ConfigError(f"{where}: model_type must be 'bert', got {model_type!r}")
        missing = [key for key in _REQUIRED_KEYS if key not in raw]
        if missing:
            raise ConfigError(f"{where}: missing keys {missing}; a BERT config needs {list(_REQUIRED_KEYS)}")
        sizes = {key: _positive_int(raw, key, where) for key in _REQUIRED_KEYS}
        if sizes["hidden_size"] % sizes["num_attention_heads"]:
            raise ConfigError(
                f"{where}: hidden_size ({sizes['hidden_size']}) must be a multiple of "
                f"num_attention_heads ({sizes['num_attention_heads']})"
            )
        _check_unsupported(raw, where)
        act = raw.get("hidden_act", "gelu")
        if act not in HF_ACTIVATIONS:
            raise ConfigError(f"{where}: hidden_act must be one of {list(HF_ACTIVATIONS)}, got {act!r}")
        eps = raw.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"{where}: layer_norm_eps must be a positive number, got {eps!r}")
        pad = raw.get("pad_token_id", 0)
        pad = 0 if pad is None else pad
        return cls(**sizes, hidden_act=HF_ACTIVATIONS[act], layer_norm_eps=float(eps), pad_token_id=int(pad))

    @classmethod
    def from_json(cls, path: PathLike) -> BertConfig:
        """The config in the JSON file ``path`` (see :meth:`from_dict`)."""
        return cls.from_dict(read_json(path, "BERT config"), os.fspath(path))


def _check_unsupported(raw: Mapping[str, Any], where: str) -> None:
    """ConfigError for BERT variants this encoder does not compute (relative positions, decoders)."""
    position = raw.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ConfigError(f"{where}: position_embedding_type must be 'absolute', got {position!r}")
    for flag in ("is_decoder", "add_cross_attention"):
        if raw.get(flag, False):
            raise ConfigError(f"{where}: {flag} must be false (an encoder), got {raw[flag]!r}")


def bert_tensor_shapes(config: BertConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a BERT encoder of ``config`` has: Hugging Face name -> shape.

    Linear weights are in PyTorch's ``(out, in)`` layout, as the checkpoint stores them.
    """
    h, i = config.hidden_size, config.intermediate_size
    shapes: Dict[str, Tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, h),
        "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    per_layer = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (i, h),
        "output.dense": (h, i),
    }
    for n in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{n}."
        for name, (n_out, n_in) in per_layer.items():
            shapes[f"{prefix}{name}.weight"] = (n_out, n_in)
            shapes[f"{prefix}{name}.bias"] = (n_out,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{prefix}{norm}.weight"] = (h,)
            shapes[f"{prefix}{norm}.bias"] = (h,)
    return shapes


def _canonical(name: str) -> str:
    """Old checkpoints name LayerNorm's weight and bias ``gamma`` and ``beta``."""
    if ".LayerNorm." in name:
        name = name.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(
            ".LayerNorm.beta", ".LayerNorm.bias"
        )
    return name


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint, under their canonical BERT names, read one at a time.

    Use as a context manager: ``with CheckpointReader(model_dir) as reader:
    reader.check(config); w = reader.get("embeddings.word_embeddings.weight")``.
    ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``
    are opened with ``safe_open`` (memory mapped); :meth:`get` copies one tensor
    to the host.
    """

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.files = self._find_files(model_dir)
        self._stack = contextlib.ExitStack()
        self._handles: Dict[str, Any] = {}
        self._names: Dict[str, Tuple[str, str]] = {}  # canonical name -> (file, stored name)
        self.prefix = ""

    @staticmethod
    def _find_files(model_dir: str) -> List[str]:
        single = os.path.join(model_dir, "model.safetensors")
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            weight_map = read_json(index, "sharded checkpoint index").get("weight_map", {})
            return [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
        found = sorted(os.listdir(model_dir))
        hint = "; convert pytorch_model.bin to safetensors first" if "pytorch_model.bin" in found else ""
        raise CheckpointError(
            f"{model_dir} has no model.safetensors (nor a sharded model.safetensors.index.json){hint}; "
            f"found {found[:12]}"
        )

    def __enter__(self) -> CheckpointReader:
        from safetensors import safe_open

        try:
            for path in self.files:
                handle = self._stack.enter_context(safe_open(path, framework="numpy"))
                self._handles[path] = handle
                for stored in handle.keys():
                    self._names[_canonical(stored)] = (path, stored)
        except CheckpointError:
            self._stack.close()
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            self._stack.close()
            raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc
        self.prefix = self._detect_prefix()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _detect_prefix(self) -> str:
        for prefix in ("", "bert."):
            if f"{prefix}embeddings.word_embeddings.weight" in self._names:
                return prefix
        sample = sorted(self._names)[:6]
        raise CheckpointError(
            f"{self.files[0]} is not a BERT checkpoint: no 'embeddings.word_embeddings.weight' "
            f"(nor 'bert.embeddings.word_embeddings.weight'); got tensors {sample}"
        )

    def names(self) -> Iterator[str]:
        """The BERT tensor names, without the prefix (task heads outside the prefix are left out)."""
        n = len(self.prefix)
        return (name[n:] for name in self._names if name.startswith(self.prefix))

    def shape(self, name: str) -> Tuple[int, ...]:
        """The stored shape of tensor ``name`` (read from the header, no data)."""
        path, stored = self._names[self.prefix + name]
        return tuple(self._handles[path].get_slice(stored).get_shape())

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype of tensor ``name`` (``"F32"``, ``"BF16"``, ...)."""
        path, stored = self._names[self.prefix + name]
        return str(self._handles[path].get_slice(stored).get_dtype())

    def check(self, config: BertConfig) -> None:
        """CheckpointError unless every tensor of ``config`` is present, of its shape and a float dtype,
        and no unknown tensor is: names the file, the tensor, what was found and what was expected."""
        expected = bert_tensor_shapes(config)
        present = set(self.names())
        missing = [name for name in expected if name not in present]
        if missing:
            raise CheckpointError(
                f"{self.files[0]}: {len(missing)} tensors missing for {config.num_hidden_layers} layers, "
                f"e.g. {missing[:4]} (prefix {self.prefix!r})"
            )
        unknown = sorted(present - set(expected) - set(IGNORED_TENSORS))
        if unknown:
            raise CheckpointError(f"{self.files[0]}: unexpected tensors for a BERT encoder: {unknown[:6]}")
        for name, shape in expected.items():
            found = self.shape(name)
            if found != shape:
                raise CheckpointError(
                    f"{self.files[0]}: tensor {self.prefix + name!r} has shape {found}; expected {shape}"
                )
            if self.dtype(name) not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self.files[0]}: tensor {self.prefix + name!r} has dtype {self.dtype(name)}; "
                    f"expected one of {list(FLOAT_DTYPES)}"
                )

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new host NumPy array (one tensor read from the mapped file)."""
        path, stored = self._names[self.prefix + name]
        return self._handles[path].get_tensor(stored)


def resolve_config(model_dir: str, config_json: Optional[PathLike] = None) -> BertConfig:
    """The :class:`BertConfig` of ``model_dir/config.json`` (or of ``config_json``)."""
    path = os.fspath(config_json) if config_json is not None else os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        found = sorted(os.listdir(model_dir)) if os.path.isdir(model_dir) else []
        raise CheckpointError(
            f"{model_dir} is not a Hugging Face model folder: config.json is missing; found {found[:12]}"
        )
    return BertConfig.from_json(path)
