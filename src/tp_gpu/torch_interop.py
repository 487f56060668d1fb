"""Build tensor-parallel layers from PyTorch modules: :func:`from_torch`.

``from_torch`` reads everything that ``from_dense`` would need spelt out from
the module itself: the weight layout (``nn.Linear`` keeps ``(n_out, n_in)``),
the dtype, the device (CPU tensors go to the NumPy backend, CUDA tensors to the
CuPy backend without a round trip through the host), the activation of an MLP,
and training or eval mode. So a square ``nn.Linear`` cannot be loaded
transposed by mistake.

PyTorch is never imported here: a module passed in has already imported it,
and it is recognised through ``sys.modules``. ``import tp_gpu`` stays free of it.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Type, Union

from .config import TensorParallelConfig
from .errors import ConfigError
from .layers import ColumnParallelLinear, ParallelEmbedding, ParallelMLP, RowParallelLinear
from .module import Module

__all__ = ["from_torch", "TORCH_DTYPES", "LINEAR_KINDS"]

#: The torch dtypes tp_gpu computes in, by the name ``str(tensor.dtype)`` gives.
TORCH_DTYPES: Dict[str, str] = {
    "torch.float64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
}

#: ``kind`` of an ``nn.Linear``: which tensor-parallel layer it becomes.
LINEAR_KINDS: Dict[str, Union[Type[ColumnParallelLinear], Type[RowParallelLinear]]] = {
    "column": ColumnParallelLinear,
    "row": RowParallelLinear,
}

#: What ``from_torch`` accepts, for error messages.
_SUPPORTED = "nn.Linear, nn.Embedding, or nn.Sequential(nn.Linear, activation, nn.Linear)"


def _torch() -> Any:
    """The already imported ``torch`` module, or None when nothing has imported it."""
    return sys.modules.get("torch")


def _activation_name(torch: Any, act: Any) -> Optional[str]:
    """The tp_gpu activation of the torch activation module ``act``; ConfigError if there is none."""
    nn = torch.nn
    if isinstance(act, nn.GELU):
        approximate = getattr(act, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Identity):
        return None
    raise ConfigError(
        f"from_torch: the MLP's activation is {act!r}; supported: nn.GELU() (-> 'gelu'), "
        "nn.GELU(approximate='tanh') (-> 'gelu_tanh'), nn.ReLU() (-> 'relu'), nn.Identity() (-> None)"
    )


def _placement(module: Any, tensors: List[Any]) -> Dict[str, Any]:
    """``TensorParallelConfig`` fields read from ``tensors``: dtype and backend, which must agree."""
    dtypes = sorted({str(t.dtype) for t in tensors})
    devices = sorted({t.device.type for t in tensors})
    what = type(module).__name__
    if len(dtypes) > 1 or len(devices) > 1:
        raise ConfigError(
            f"from_torch: the parameters of this {what} mix dtypes {dtypes} / devices {devices}; "
            "convert it to one first (module.to(dtype, device))"
        )
    dtype, device = dtypes[0], devices[0]
    if dtype not in TORCH_DTYPES:
        raise ConfigError(
            f"from_torch: {what} has dtype {dtype}; tp_gpu computes in "
            f"{sorted(TORCH_DTYPES)} (convert with module.float() or module.double())"
        )
    if device not in ("cpu", "cuda"):
        why = "its tensors have no data" if device == "meta" else "tp_gpu reads CPU and CUDA tensors"
        raise ConfigError(f"from_torch: {what} is on device {device!r}: {why}")
    return {"dtype": TORCH_DTYPES[dtype], "backend": "cupy" if device == "cuda" else "numpy"}


def _config(module: Any, tensors: List[Any], config: Optional[TensorParallelConfig]) -> TensorParallelConfig:
    """``config``, or one with the dtype and backend of ``tensors`` (checked either way)."""
    fields = _placement(module, tensors)
    if config is None:
        return TensorParallelConfig(**fields)
    if not isinstance(config, TensorParallelConfig):
        raise ConfigError(f"config must be a TensorParallelConfig or None, got {type(config).__name__}")
    return config


def _with_mode(layer: Module, module: Any) -> Module:
    """``layer`` in ``module``'s training or eval mode."""
    return layer.train(bool(module.training))


def from_torch(
    module: Any, config: Optional[TensorParallelConfig] = None, *, kind: Optional[str] = None, **kwargs: Any
) -> Module:
    """The tensor-parallel layer equivalent to the PyTorch ``module``, holding its weights.

    ===========================================  ==============================================
    ``module``                                   becomes
    ===========================================  ==============================================
    ``nn.Linear``                                :class:`ColumnParallelLinear` (``kind="column"``,
                                                 the default) or :class:`RowParallelLinear`
                                                 (``kind="row"``); ``bias=False``: a layer
                                                 built with ``bias=False`` (no bias parameter)
    ``nn.Embedding``                             :class:`ParallelEmbedding`
    ``nn.Sequential(Linear, act, Linear)``       :class:`ParallelMLP`; ``act`` ``nn.GELU()`` ->
                                                 ``"gelu"``, ``nn.GELU("tanh")`` -> ``"gelu_tanh"``,
                                                 ``nn.ReLU()`` -> ``"relu"``, ``nn.Identity()`` -> None;
                                                 both linears ``bias=False``: ``bias=False``
    ===========================================  ==============================================

    Parameters
    ----------
    module : torch.nn.Module
        Read, never changed. Its weight layout is known (``nn.Linear.weight``
        is ``(n_out, n_in)``), so it cannot be loaded transposed.
    config : TensorParallelConfig, optional
        ``None`` builds ``TensorParallelConfig(dtype=<the module's>,
        backend="numpy" for a CPU module, "cupy" for a CUDA one)``, with the
        other fields at their defaults (2 workers). A config given is used as it
        is (the weights are cast to its dtype); to keep the module's dtype with
        4 workers, say ``TensorParallelConfig(n_workers=4, dtype="float32")``.
    kind : {"column", "row"}, optional
        For an ``nn.Linear`` only: which way to split it.
    **kwargs
        For an ``nn.Linear`` or ``nn.Embedding``: constructor arguments of the
        layer (``pad_to_multiple_of``, ``unit``, ``input_is_parallel``).

    The layer is in the module's training or eval mode. ``float64``,
    ``float32`` and ``float16`` modules are supported (not ``bfloat16``), on
    the CPU or a CUDA device. An ``nn.Embedding``'s ``padding_idx`` row is
    loaded like any other; note that training here does update it, where
    PyTorch does not. ``max_norm`` (renormalised lookups) is refused.

    Raises
    ------
    ConfigError
        ``module`` is not one of the above, or has an unsupported dtype,
        device, activation or option; ``kind`` is bad.
    """
    torch = _torch()
    if torch is None or not isinstance(module, torch.nn.Module):
        raise ConfigError(f"from_torch expects a torch.nn.Module ({_SUPPORTED}), got {type(module).__name__}")
    nn = torch.nn
    if kind is not None and not isinstance(module, nn.Linear):
        raise ConfigError(
            f"from_torch: kind= applies to an nn.Linear only, got kind={kind!r} for {type(module).__name__}"
        )
    if isinstance(module, nn.Linear):
        if kind not in (None, *LINEAR_KINDS):
            raise ConfigError(f"from_torch: kind must be one of {list(LINEAR_KINDS)}, got {kind!r}")
        cls = LINEAR_KINDS["column" if kind is None else kind]
        tensors = [module.weight] + ([] if module.bias is None else [module.bias])
        cfg = _config(module, tensors, config)
        bias = False if module.bias is None else module.bias  # False: no bias parameter at all
        layer = cls.from_dense(module.weight, bias, cfg, layout="out_in", **kwargs)
        return _with_mode(layer, module)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ConfigError(
                f"from_torch: nn.Embedding(max_norm={module.max_norm}) renormalises rows at lookup, which "
                "ParallelEmbedding does not do"
            )
        cfg = _config(module, [module.weight], config)
        return _with_mode(ParallelEmbedding.from_dense(module.weight, cfg, **kwargs), module)
    if isinstance(module, nn.Sequential):
        parts = list(module)
        if len(parts) != 3 or not isinstance(parts[0], nn.Linear) or not isinstance(parts[2], nn.Linear):
            found = ", ".join(type(p).__name__ for p in parts)
            raise ConfigError(
                f"from_torch: an nn.Sequential must be (nn.Linear, activation, nn.Linear) to become a "
                f"ParallelMLP, got ({found})"
            )
        if kwargs:
            raise ConfigError(f"from_torch: an MLP takes no layer arguments, got {sorted(kwargs)}")
        fc1, act, fc2 = parts
        activation = _activation_name(torch, act)
        tensors = [t for lin in (fc1, fc2) for t in (lin.weight, lin.bias) if t is not None]
        cfg = _config(module, tensors, config)
        if (fc1.bias is None) != (fc2.bias is None):
            has = ["no bias" if lin.bias is None else "a bias" for lin in (fc1, fc2)]
            raise ConfigError(
                f"from_torch: the MLP's first nn.Linear has {has[0]} and its second {has[1]}; expected "
                "both with a bias or both without (a ParallelMLP has biases in both linears or neither)"
            )
        biases = [False if lin.bias is None else lin.bias for lin in (fc1, fc2)]
        mlp = ParallelMLP.from_dense(
            fc1.weight, biases[0], fc2.weight, biases[1], cfg, layout="out_in", activation=activation
        )
        return _with_mode(mlp, module)
    raise ConfigError(f"from_torch: cannot convert {type(module).__name__}; supported: {_SUPPORTED}")
