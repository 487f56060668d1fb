"""Reading the weights of a Hugging Face decoder folder (GPT-2, Llama, Qwen2), one tensor at a time.

Everything is checked from the safetensors headers before any weight is read:

* the folder holds ``model.safetensors`` or a ``model.safetensors.index.json`` whose every shard exists;
* each file is a safetensors file (8-byte little-endian header length, a JSON header of
  ``name -> {dtype, shape, data_offsets}``, then the data) whose tensors all lie inside it;
* :meth:`DecoderCheckpoint.check`: every tensor a model of the config has is there, under its
  canonical name (:func:`decoder_tensor_shapes`), of its shape and a float dtype, and nothing else is.

Stored names are the canonical ones behind the base-model prefix, which is detected: ``model.`` or
none for Llama/Qwen2, ``transformer.`` (as ``save_pretrained`` writes it) or none (as the original
openai-community/gpt2 files are) for GPT-2; ``lm_head.weight`` is always at the top level. Buffers
some checkpoints keep are ignored: GPT-2's causal-mask ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias``
and rotary ``rotary_emb.inv_freq``.

:meth:`DecoderCheckpoint.get` reads one tensor from the memory-mapped file: F16 / F32 / F64 as stored,
BF16 widened to float32 (its 16 bits are the high half of a float32: ``(u16 << 16).view(float32)``),
which safetensors' NumPy reader cannot return.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import CheckpointError, error_with_problems, short_list
from .decoder_config import DecoderConfig
from .hf_loader import FLOAT_DTYPES, check_model_dir, read_json

__all__ = [
    "DECODER_FLOAT_DTYPES",
    "DecoderCheckpoint",
    "decoder_tensor_shapes",
    "read_decoder_config",
]

#: safetensors dtypes read as float (BF16 widened to float32).
DECODER_FLOAT_DTYPES = FLOAT_DTYPES + ("BF16",)

#: Bytes per element of each safetensors dtype (to check that a tensor's bytes fit its shape).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2,
             "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # fmt: skip

#: Base-model prefixes, most likely first, and the tensor whose presence tells which one a file uses.
_PREFIXES = {"gpt2": ("transformer.", ""), "llama": ("model.", ""), "qwen2": ("model.", "")}
_MARKER = {"gpt2": "wte.weight", "llama": "embed_tokens.weight", "qwen2": "embed_tokens.weight"}

#: Non-weight buffers some checkpoints hold (canonical names): ignored.
_BUFFERS = {
    "gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
    "llama": re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
    "qwen2": re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
}

_HEADER_LIMIT = 100_000_000  # bytes; safetensors' own limit on a header


def decoder_tensor_shapes(config: DecoderConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a decoder of ``config`` has: canonical name -> stored shape.

    GPT-2's Conv1D stores ``(in, out)`` (``y = x W + b``); Llama/Qwen2's nn.Linear stores ``(out, in)``
    (``y = x W^T + b``). ``lm_head.weight`` ``(V, H)`` is listed only when untied.
    """
    v, h, i = config.vocab_size, config.hidden_size, config.intermediate_size
    if config.model_type == "gpt2":
        shapes: Dict[str, Tuple[int, ...]] = {
            "wte.weight": (v, h),
            "wpe.weight": (config.max_position_embeddings, h),
        }
        per_layer = {"ln_1": (h,), "attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "ln_2": (h,),
                     "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}  # fmt: skip
        for n in range(config.num_hidden_layers):
            for name, shape in per_layer.items():
                shapes[f"h.{n}.{name}.weight"] = shape
                shapes[f"h.{n}.{name}.bias"] = (shape[-1],)
        shapes.update({"ln_f.weight": (h,), "ln_f.bias": (h,)})
    else:
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        linears = {  # name -> ((out, in), has bias)
            "self_attn.q_proj": ((q, h), config.qkv_bias),
            "self_attn.k_proj": ((kv, h), config.qkv_bias),
            "self_attn.v_proj": ((kv, h), config.qkv_bias),
            "self_attn.o_proj": ((h, q), config.o_bias),
            "mlp.gate_proj": ((i, h), config.mlp_bias),
            "mlp.up_proj": ((i, h), config.mlp_bias),
            "mlp.down_proj": ((h, i), config.mlp_bias),
        }
        shapes = {"embed_tokens.weight": (v, h)}
        for n in range(config.num_hidden_layers):
            shapes[f"layers.{n}.input_layernorm.weight"] = (h,)
            shapes[f"layers.{n}.post_attention_layernorm.weight"] = (h,)
            for name, (shape, bias) in linears.items():
                shapes[f"layers.{n}.{name}.weight"] = shape
                if bias:
                    shapes[f"layers.{n}.{name}.bias"] = (shape[0],)
        shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def read_decoder_config(model_dir: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` of ``model_dir/config.json``; CheckpointError naming a missing one."""
    path = check_model_dir(model_dir, "read_decoder_config")
    config_json = os.path.join(path, "config.json")
    if not os.path.isfile(config_json):
        found = sorted(os.listdir(path))[:12]
        raise CheckpointError(
            f"{path} is not a Hugging Face model folder: config.json is missing; found {found}"
        )
    return DecoderConfig.from_json(config_json)


@dataclass(frozen=True)
class _Entry:
    """Where one tensor lies: its file, its stored name, dtype, shape and absolute byte range."""

    path: str
    stored: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int


def _read_header(path: str) -> Dict[str, _Entry]:
    """The tensors of the safetensors file ``path`` (header only); CheckpointError naming the file
    if it is not one, or is truncated (a tensor's bytes past its end or not matching its shape)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > min(size - 8, _HEADER_LIMIT):
                raise CheckpointError(
                    f"{path} is not a safetensors file or is truncated: its header claims {n} bytes "
                    f"and the file has {size}"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: its header cannot be read ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end - begin)) and isinstance(
                dtype, str
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
        nbytes = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
        if 8 + n + end > size or (dtype in _ITEMSIZE and end - begin != nbytes):
            raise CheckpointError(
                f"{path} is truncated or corrupted: tensor {name!r} ({dtype}, shape {shape}) should hold "
                f"{nbytes} bytes at [{begin}, {end}) after the header, and the file's data has {size - 8 - n}"
            )
        entries[name] = _Entry(path, name, dtype, shape, 8 + n + begin, 8 + n + end)
    return entries


def _checkpoint_files(model_dir: str) -> Tuple[str, List[str], Dict[str, str]]:
    """``(file errors name, safetensors files, weight_map)``: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json`` (each must exist)."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return single, [single], {}
    if not os.path.isfile(index):
        found = sorted(os.listdir(model_dir))
        hint = "; convert pytorch_model.bin to safetensors first" if "pytorch_model.bin" in found else ""
        raise CheckpointError(
            f"{model_dir} has no model.safetensors (nor a sharded model.safetensors.index.json){hint}; "
            f"found {found[:12]}"
        )
    raw = read_json(index, "sharded checkpoint index")
    weight_map = raw.get("weight_map") if isinstance(raw, Mapping) else None
    if not isinstance(weight_map, Mapping) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(
            f"{index}: expected an object with a 'weight_map' of tensor name -> shard file, got {raw!r:.200}"
        )
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(model_dir, f))})
    if missing:
        example = next(name for name, f in weight_map.items() if f == missing[0])
        raise CheckpointError(
            f"{index}: weight_map names shard files missing from {model_dir}: {short_list(missing)} "
            f"(e.g. tensor {example!r} is in {missing[0]!r})"
        )
    files = sorted({os.path.normpath(os.path.join(model_dir, f)) for f in weight_map.values()})
    return index, files, dict(weight_map)


def _safe_open(path: str) -> Any:
    """``safetensors.safe_open(path)`` (memory mapped, NumPy); CheckpointError naming a file it refuses."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def _dtype_problem(entry: _Entry) -> str:
    expected = list(DECODER_FLOAT_DTYPES)
    return f"{entry.path}: {entry.stored!r} has dtype {entry.dtype}; expected one of {expected}"


class DecoderCheckpoint:
    """The tensors of a decoder checkpoint under their canonical names, read one at a time.

    ``with DecoderCheckpoint(model_dir, config) as ckpt: ckpt.check(); w = ckpt.get("wte.weight")``.
    Constructing it reads the headers only (files, prefix); :meth:`check` compares them with
    :func:`decoder_tensor_shapes`; :meth:`get` (inside ``with``) copies one tensor to the host.
    """

    def __init__(self, model_dir: Any, config: DecoderConfig) -> None:
        self.model_dir = check_model_dir(model_dir, "DecoderCheckpoint")
        self.config = config
        self.source, self.files, weight_map = _checkpoint_files(self.model_dir)
        stored: Dict[str, _Entry] = {}
        for path in self.files:
            entries = _read_header(path)
            with _safe_open(path):  # and safetensors' own checks (offsets without gaps or overlaps, ...)
                pass
            for name, entry in entries.items():
                if name in stored:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {stored[name].path}")
                stored[name] = entry
        for name, shard in weight_map.items():
            if name not in stored or stored[name].path != os.path.normpath(
                os.path.join(self.model_dir, shard)
            ):
                raise CheckpointError(
                    f"{self.source}: weight_map puts tensor {name!r} in {shard!r}, which lacks it"
                )
        self.prefix = self._detect_prefix(stored)
        self._entries: Dict[str, _Entry] = {}  # canonical name -> entry
        self._unexpected: List[str] = []  # stored names neither expected nor ignored
        expected = decoder_tensor_shapes(config)
        buffers = _BUFFERS[config.model_type]
        for name, entry in stored.items():
            canonical = self._canonical(name)
            if canonical in expected:
                self._entries[canonical] = entry
            elif canonical is None or not (canonical == "lm_head.weight" or buffers.fullmatch(canonical)):
                self._unexpected.append(name)  # (a tied model's lm_head and the buffers are ignored)
        self._expected = expected
        self._stack: Optional[contextlib.ExitStack] = None
        self._handles: Dict[str, Any] = {}

    def _detect_prefix(self, stored: Mapping[str, _Entry]) -> str:
        model_type = self.config.model_type
        for prefix in _PREFIXES[model_type]:
            if prefix + _MARKER[model_type] in stored:
                return prefix
        tried = [p + _MARKER[model_type] for p in _PREFIXES[model_type]]
        raise CheckpointError(
            f"{self.source} is not a {model_type} checkpoint: none of {tried} is in it; "
            f"got tensors {short_list(sorted(stored))}"
        )

    def __enter__(self) -> DecoderCheckpoint:
        self._stack = contextlib.ExitStack()
        try:
            for path in self.files:
                self._handles[path] = self._stack.enter_context(_safe_open(path))
        except CheckpointError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._handles = None, {}

    def names(self) -> Iterator[str]:
        """The canonical names of the model's tensors that the checkpoint holds."""
        return iter(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        """The stored shape of tensor ``name`` (from the header)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype of tensor ``name`` (``"F32"``, ``"BF16"``, ...)."""
        return self._entry(name).dtype

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.source}: no tensor {name!r} for this {self.config.model_type} "
                f"(canonical names, without the prefix {self.prefix!r}; see decoder_tensor_shapes)"
            )
        return entry

    def check(self) -> None:
        """CheckpointError unless every tensor of the config is present, of its shape and a float dtype,
        and no unknown one is; names the file, the tensor, what was found and what was expected."""
        missing = [name for name in self._expected if name not in self._entries]
        if missing:
            raise error_with_problems(
                CheckpointError,
                f"{self.source}: {len(missing)} tensors of a {self.config.model_type} with "
                f"{self.config.num_hidden_layers} layers are missing",
                [f"{name!r} (stored as {self._stored_name(name)!r})" for name in missing],
            )
        if self._unexpected:
            raise CheckpointError(
                f"{self.source}: unexpected tensors for this {self.config.model_type} config "
                f"(prefix {self.prefix!r}): {short_list(sorted(self._unexpected))}"
            )
        problems = []
        for name, shape in self._expected.items():
            entry = self._entries[name]
            if entry.shape != shape:
                problems.append(f"{entry.path}: {entry.stored!r} has shape {entry.shape}; expected {shape}")
            if entry.dtype not in DECODER_FLOAT_DTYPES:
                problems.append(_dtype_problem(entry))
        if problems:
            raise error_with_problems(
                CheckpointError, f"{self.source}: tensors do not fit the config", problems
            )

    def _stored_name(self, name: str) -> str:
        return name if name == "lm_head.weight" else self.prefix + name

    def _canonical(self, stored: str) -> Optional[str]:
        """``stored`` without the base-model prefix (``lm_head.weight`` is outside it); None if foreign."""
        if stored == "lm_head.weight":
            return stored
        name = stored[len(self.prefix) :]
        return name if stored.startswith(self.prefix) and name != "lm_head.weight" else None

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` (canonical) as a new host array: F16/F32/F64 as stored, BF16 as float32."""
        entry = self._entry(name)
        if self._stack is None:
            raise CheckpointError(
                f"{self.source}: read tensors inside `with DecoderCheckpoint(...) as ckpt:`"
            )
        if entry.dtype not in DECODER_FLOAT_DTYPES:
            raise CheckpointError(_dtype_problem(entry))
        if entry.dtype != "BF16":
            return self._handles[entry.path].get_tensor(entry.stored)
        if entry.begin == entry.end:
            return np.zeros(entry.shape, np.float32)
        bits = np.memmap(entry.path, dtype="<u2", mode="r", offset=entry.begin, shape=entry.shape)
        return (bits.astype(np.uint32) << 16).view(np.float32)  # (*shape,) float32, a new array
