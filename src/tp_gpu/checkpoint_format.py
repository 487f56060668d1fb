"""The format side of checkpoints: tensor and metadata checksums, header checks, fit checks, reading.

See :mod:`tp_gpu.checkpoint` for the layout of a file. Everything here reads;
:mod:`tp_gpu.checkpoint_io` writes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import training_state
from .checkpoint_io import PathLike, check_path, file_error, open_checked
from .errors import SHOWN_PROBLEMS, CheckpointError, TensorParallelError, error_with_problems, short_list
from .parameter import ShardedParameter

#: ``format`` metadata value of every tp_gpu checkpoint.
FORMAT = "tp_gpu"

#: Version of the checkpoint layout written here; files of a newer one are refused.
FORMAT_VERSION = 1


def _safetensors():
    """``(safetensors.safe_open, safetensors.numpy)``, imported on first use."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise TensorParallelError(
            f"checkpoints need the safetensors package, which failed to import ({exc}); pip install "
            f"safetensors"
        ) from exc
    return safetensors.safe_open, safetensors.numpy


def _little_endian(a: np.ndarray) -> np.ndarray:
    """``a`` contiguous and little-endian, as safetensors stores it (no copy on little-endian hosts)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(_little_endian(a).reshape(-1).view(np.uint8).tobytes()).hexdigest()


#: Metadata key of the SHA-256 over every other metadata entry.
_METADATA_CHECKSUM = "metadata_sha256"


def _metadata_sha256(metadata: Mapping[str, str]) -> str:
    rest = {k: v for k, v in metadata.items() if k != _METADATA_CHECKSUM}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _corrupt(path: str, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path!r} is truncated, corrupted or not a tp_gpu checkpoint: {why}")


def _header(f, path: str) -> Tuple[Dict[str, str], Dict[str, Dict[str, Any]]]:
    """The metadata and the per-tensor descriptions of an open file, checked for consistency."""
    metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path!r} is a safetensors file but not a tp_gpu checkpoint (metadata "
            f"format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}). To load other weights, read them into arrays and use "
            "load_dense(weight, bias, layout='out_in' for PyTorch) or load_state_dict"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise _corrupt(path, f"format_version {metadata.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format version {version}, written by tp_gpu "
            f"{metadata.get('tp_gpu_version')}; "
            f"this tp_gpu reads versions up to {FORMAT_VERSION}: upgrade tp_gpu"
        )
    if metadata.get(_METADATA_CHECKSUM) != _metadata_sha256(metadata):
        raise _corrupt(path, "the metadata fails its SHA-256 check: it was changed after saving")
    try:
        described = json.loads(metadata["tensors"])
        described = {
            str(name): {
                "shape": tuple(int(n) for n in d["shape"]),
                "dtype": np.dtype(d["dtype"]),
                "sha256": str(d["sha256"]),
            }
            for name, d in described.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(path, f"the 'tensors' metadata is unreadable ({type(exc).__name__}: {exc})") from None
    stored = sorted(f.keys())
    if stored != sorted(described):
        raise _corrupt(
            path, f"the file holds tensors {stored} but its metadata describes {sorted(described)}"
        )
    return metadata, described


def _prefix_hint(described: Mapping[str, Any], names: List[str]) -> str:
    """A hint, when the checkpoint holds the module's tensors under a prefix, to load them with a dict.

    A file saved from ``{"embed": emb, "mlp": mlp}`` holds ``mlp.fc1.weight``, ...; the MLP alone
    expects ``fc1.weight``: it loads as ``{"mlp": mlp}``.
    """
    wanted = set(names)
    prefixes = set()
    for stored in described:
        parts = stored.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[k:]) in wanted:
                prefixes.add(tuple(parts[:k]))
    if not prefixes:
        return ""
    shown = sorted(prefixes)

    def as_dict(prefix: Tuple[str, ...]) -> str:
        return "".join(f"{{{key!r}: " for key in prefix) + "module" + "}" * len(prefix)

    return (
        f". The checkpoint holds them under the prefix{'es' * (len(shown) > 1)} "
        + ", ".join(repr(".".join(p) + ".") for p in shown)
        + f": load_checkpoint(path, {as_dict(shown[0])}, strict=False) loads those into the module"
    )


def name_list(names: List[str]) -> str:
    """``names`` as a short text: ``N: ['a', 'b', ...] and N-5 more`` (the list itself when short)."""
    text = short_list(names)
    return text if len(names) <= SHOWN_PROBLEMS else f"{len(names)}: {text}"


def _dtype_problem(name: str, found: np.dtype, expected: np.dtype, dtype_cast: bool) -> Optional[str]:
    """Why a stored dtype ``found`` cannot load into a parameter of dtype ``expected``, or None.

    Without ``dtype_cast`` the dtypes must be equal; with it, any float loads into any float (as
    ``torch.nn.Module.load_state_dict`` copies), but an integer never into a float or back.
    """
    if found == expected:
        return None
    if dtype_cast and found.kind == "f" and expected.kind == "f":
        return None
    if dtype_cast:
        return (
            f"tensor {name!r}: expected a float dtype like {expected.name}, found {found.name} "
            f"(dtype_cast converts float to float only)"
        )
    return f"tensor {name!r}: expected dtype {expected.name}, found {found.name}"


def check_fits(
    path: str,
    described: Dict[str, Dict[str, Any]],
    named: List[Tuple[str, ShardedParameter]],
    strict: bool = True,
    dtype_cast: bool = False,
) -> Tuple[List[str], List[str]]:
    """``(missing, unexpected)`` names; raise CheckpointError listing every tensor that does not fit.

    A tensor the module and the file share must have the module's shape and dtype (any float
    dtype with ``dtype_cast``). With ``strict`` every name must be in both; without, the names
    they do not share are returned, but at least one must be shared. The error's message gives
    the count and the first problems; its ``problems`` attribute lists them all.
    """
    problems = []
    expected = dict(named)
    described = {n: d for n, d in described.items() if not training_state.is_training_tensor(n)}
    missing = [name for name in expected if name not in described]
    unexpected = [name for name in described if name not in expected]
    if strict:
        problems += [f"tensor {name!r} is missing from the checkpoint" for name in missing]
        problems += [f"tensor {name!r} is in the checkpoint but not in the module" for name in unexpected]
    elif len(missing) == len(expected):
        raise CheckpointError(
            f"checkpoint {path!r} holds none of the module's tensors (it holds "
            f"{name_list(sorted(described))}; the module expects {name_list(list(expected))})"
            + _prefix_hint(described, list(expected))
        )
    for name, param in expected.items():
        found = described.get(name)
        if found is None:
            continue
        if found["shape"] != param.shape:
            problems.append(f"tensor {name!r}: expected shape {param.shape}, found {found['shape']}")
        dtype_problem = _dtype_problem(name, found["dtype"], np.dtype(param.dtype), dtype_cast)
        if dtype_problem:
            problems.append(dtype_problem)
    if problems:
        hint = _prefix_hint(described, missing) if strict and missing else ""
        if not dtype_cast and all("expected dtype" in p for p in problems):
            hint += "; load_checkpoint(..., dtype_cast=True) converts float tensors to the module's dtype"
        raise error_with_problems(
            CheckpointError,
            f"checkpoint {path!r} does not fit the module",
            problems,
            f". The module expects {name_list([n for n, _ in named])}" + hint,
        )
    return missing, unexpected


def read(
    path: PathLike, named=None, strict: bool = True, dtype_cast: bool = False
) -> Tuple[Dict[str, np.ndarray], Dict[str, str], List[str], List[str]]:
    """Read and verify the tensors of ``path``: ``(tensors, metadata, missing, unexpected)``.

    Given ``named``, the file is checked against it first (see :func:`check_fits`) and only the
    tensors the module has are read; without, every tensor is read.
    """
    safe_open, _ = _safetensors()
    path = check_path(path)
    missing: List[str] = []
    unexpected: List[str] = []
    try:
        with open_checked(safe_open, path) as f:
            metadata, described = _header(f, path)
            if named is not None:
                missing, unexpected = check_fits(path, described, named, strict, dtype_cast)
            skipped = set(unexpected)
            tensors = {name: f.get_tensor(name) for name in described if name not in skipped}
    except CheckpointError:
        raise  # a bad file, or one that does not fit
    except OSError as exc:  # a missing or unreadable file, a directory, ...
        raise file_error(path, "read", exc) from exc
    except Exception as exc:  # safetensors' SafetensorError on a truncated or malformed file, ...
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    for name, array in tensors.items():
        want = described[name]
        if tuple(array.shape) != want["shape"] or array.dtype != want["dtype"]:
            raise _corrupt(
                path,
                f"tensor {name!r} is stored as {tuple(array.shape)} {array.dtype.name} "
                f"but its metadata says {want['shape']} {want['dtype'].name}",
            )
        if _sha256(array) != want["sha256"]:
            raise _corrupt(
                path, f"tensor {name!r} fails its SHA-256 check: its data was changed after saving"
            )
    return tensors, metadata, missing, unexpected
