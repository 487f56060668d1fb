"""sentence-transformers' ``Dense``: ``y = f(x W^T + b)`` on the pooled vector, read from its folder.

A Dense module's folder (``2_Dense/``, ...) holds ``config.json``
(``in_features``, ``out_features``, ``bias``, ``activation_function``, and
since v5 ``module_input_name``, ``module_output_name`` and ``use_residual``)
and the weights ``linear.weight`` ``(out, in)`` and ``linear.bias`` ``(out,)``
in ``model.safetensors`` or, in folders of older versions,
``pytorch_model.bin`` (read without PyTorch by :mod:`.torch_bin`). With
``use_residual`` the input is added back: ``y = f(x W^T + b) + x`` when
``in == out``, else ``+ x R^T`` with ``residual.weight`` ``(out, in)``.

The Dense layers act on one small ``(b, in)`` matrix per batch, after the
pooling, so they run unsplit on the output device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..layers.activations import get_activation
from .hf_loader import FLOAT_DTYPES, read_json
from .torch_bin import read_torch_bin

__all__ = ["DENSE_ACTIVATIONS", "DenseConfig", "read_dense_config", "read_dense_weights", "dense_forward"]


def _tanh(xp: Any, x: Any) -> Any:
    return xp.tanh(x)


def _sigmoid(xp: Any, x: Any) -> Any:
    """``1 / (1 + exp(-x))``."""
    return 1.0 / (1.0 + xp.exp(-x))


def _silu(xp: Any, x: Any) -> Any:
    """``x * sigmoid(x)``."""
    return x * _sigmoid(xp, x)


#: ``torch.nn`` activation classes, by class name, as ``f(xp, x)``. GELU is the exact erf form:
#: a saved ``GELU(approximate='tanh')`` is written by its class name alone, and sentence-transformers
#: rebuilds it as ``GELU()``.
DENSE_ACTIVATIONS: Dict[str, Callable[[Any, Any], Any]] = {
    "Identity": get_activation(None).forward,
    "Tanh": _tanh,
    "ReLU": get_activation("relu").forward,
    "GELU": get_activation("gelu").forward,
    "Sigmoid": _sigmoid,
    "SiLU": _silu,
}


@dataclass(frozen=True)
class DenseConfig:
    """One Dense module: its folder and its ``config.json``."""

    path: str  # the module's folder
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a key of DENSE_ACTIVATIONS
    residual: bool = False  # use_residual: add x (or x R^T) to the output


def _positive(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _flag(raw: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _activation(raw: Mapping[str, Any], where: str) -> str:
    """The class name of ``activation_function`` (default Tanh, as sentence-transformers'), if supported."""
    name = raw.get("activation_function", "torch.nn.modules.activation.Tanh")
    short = name.rsplit(".", 1)[-1] if isinstance(name, str) else None
    if not isinstance(name, str) or not name.startswith("torch.") or short not in DENSE_ACTIVATIONS:
        supported = [f"torch.nn.{n}" for n in DENSE_ACTIVATIONS]
        raise ConfigError(f"{where}: unsupported activation_function {name!r}; expected one of {supported}")
    return short


def read_dense_config(path: str) -> DenseConfig:
    """The Dense module of folder ``path``; ConfigError naming ``config.json`` and the value."""
    where = os.path.join(path, "config.json")
    raw = read_json(where, "sentence-transformers Dense config")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in ("module_input_name", "module_output_name"):
        value = raw.get(key, "sentence_embedding")
        if value not in ("sentence_embedding", None):
            raise ConfigError(f"{where}: {key} must be 'sentence_embedding', got {value!r}")
    return DenseConfig(
        path=path,
        in_features=_positive(raw, "in_features", where),
        out_features=_positive(raw, "out_features", where),
        bias=_flag(raw, "bias", True, where),
        activation=_activation(raw, where),
        residual=_flag(raw, "use_residual", False, where),
    )


def _expected_shapes(config: DenseConfig) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {"linear.weight": (config.out_features, config.in_features)}
    if config.bias:
        shapes["linear.bias"] = (config.out_features,)
    if config.residual and config.in_features != config.out_features:
        shapes["residual.weight"] = (config.out_features, config.in_features)
    return shapes


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            dtypes = {name: str(f.get_slice(name).get_dtype()) for name in f.keys()}
            bad = {name: d for name, d in dtypes.items() if d not in FLOAT_DTYPES}
            if bad:
                raise CheckpointError(
                    f"{path}: tensors {bad} are not float; expected one of {list(FLOAT_DTYPES)}"
                )
            return {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def read_dense_weights(config: DenseConfig) -> Dict[str, np.ndarray]:
    """``linear.weight`` (and ``linear.bias``, ``residual.weight``) of ``config``'s folder, checked.

    CheckpointError, naming the file, for a missing file, tensor or shape.
    """
    single = os.path.join(config.path, "model.safetensors")
    legacy = os.path.join(config.path, "pytorch_model.bin")
    if os.path.isfile(single):
        path, tensors = single, _read_safetensors(single)
    elif os.path.isfile(legacy):
        path, tensors = legacy, read_torch_bin(legacy)
    else:
        found = sorted(os.listdir(config.path))
        raise CheckpointError(f"{config.path}: no model.safetensors nor pytorch_model.bin; found {found}")
    expected = _expected_shapes(config)
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing; found {sorted(tensors)}")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}; expected {shape} "
                f"(in_features={config.in_features}, out_features={config.out_features})"
            )
    return {name: tensors[name] for name in expected}


def dense_forward(xp: Any, x: Any, config: DenseConfig, weights: Mapping[str, Any]) -> Any:
    """``f(x W^T + b)`` (``+ x`` or ``+ x R^T`` with a residual) of ``x`` ``(b, in)``: ``(b, out)``.

    ``weights`` are on ``x``'s device, ``W`` stored transposed ``(in, out)``.
    """
    y = x @ weights["linear.weight"]  # (b, in) @ (in, out) -> (b, out)
    bias: Optional[Any] = weights.get("linear.bias")
    if bias is not None:
        y = y + bias  # (b, out) + (out,)
    y = DENSE_ACTIVATIONS[config.activation](xp, y)
    if config.residual:
        r = weights.get("residual.weight")
        y = y + (x if r is None else x @ r)  # (b, in) @ (in, out) -> (b, out)
    return y
