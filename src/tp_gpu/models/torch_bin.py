"""Reading a small PyTorch ``state_dict`` file (``pytorch_model.bin``) without PyTorch.

Since PyTorch 1.6, ``torch.save`` writes a zip archive: ``<name>/data.pkl``
pickles the dict, each tensor as ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)`` whose storage is a persistent id ``("storage",
torch.FloatStorage, key, location, numel)``, and ``<name>/data/<key>`` holds
that storage's raw little-endian bytes. A restricted unpickler rebuilds each
tensor as a NumPy array (``as_strided`` over the storage, copied) and refuses
every other global, so reading a file never runs code from it. The older
non-zip format (PyTorch < 1.6) is refused with a CheckpointError saying how to
convert it.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any, Dict, Tuple

import numpy as np

from ..errors import CheckpointError

__all__ = ["read_torch_bin", "STORAGE_DTYPES"]

#: ``torch.<Name>Storage`` -> NumPy dtype (bfloat16 has none, and is refused).
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A ``torch.<Name>Storage`` class reference from the pickle: only its dtype matters."""

    def __init__(self, name: str) -> None:
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(
    storage: np.ndarray, offset: int, size: Tuple[int, ...], stride: Tuple[int, ...], *_: Any
) -> np.ndarray:
    """The tensor ``storage[offset:]`` viewed with ``size`` and ``stride`` (in elements), as a new array."""
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
    if (
        len(size) != len(stride)
        or min((offset, *size, *stride), default=0) < 0
        or last >= storage.size  # as_strided reads whatever memory the numbers name: check them first
    ):
        raise CheckpointError(
            f"a tensor of size {size}, stride {stride} at offset {offset} does not fit its storage of "
            f"{storage.size} elements; the file is damaged"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )  # (size...) over the flat storage
    return np.array(view)


class _Unpickler(pickle.Unpickler):
    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(archive.open(f"{prefix}data.pkl"))
        self.archive, self.prefix, self.path = archive, prefix, path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _Storage(name)
        raise CheckpointError(
            f"{self.path}: holds {module}.{name}, which tp_gpu does not read without PyTorch "
            f"(it reads tensors of {sorted(STORAGE_DTYPES)}); save the module with safetensors instead"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unexpected storage reference {pid!r:.80}")
        _, storage, key, _location, numel = pid
        raw = self.archive.read(f"{self.prefix}data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"), count=numel)


def read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    """The tensors of the ``torch.save``\\ d state dict at ``path``, as host NumPy arrays.

    CheckpointError, naming the file, for a file that is not a zip-format
    ``torch.save`` of a dict of float or integer tensors.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a zip-format torch.save file (written by PyTorch < 1.6, or not PyTorch's); "
            "convert it to model.safetensors with PyTorch and safetensors"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {pickles}")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = f"{prefix}byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
                raise CheckpointError(f"{path}: big-endian tensors; expected little-endian")
            state = _Unpickler(archive, prefix, path).load()
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot read the torch.save archive ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return dict(state)
