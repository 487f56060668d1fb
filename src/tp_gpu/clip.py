"""Global-norm gradient clipping over every shard on every device and process, as PyTorch clips.

``clip_grad_norm`` computes ``total = (sum_blocks sum |g|^q)^(1/q)`` (``max |g|`` for ``q = inf``)
over every gradient block, then scales each gradient by ``min(1, max_norm / (total + 1e-6))``.

The host waits for the devices once per call: each block's ``sum |g|^q`` stays on its device, each
device adds its own, the devices' sums meet on the first device and one pair of numbers (split
parameters, whole parameters) is copied to the host (:func:`tp_gpu.device_totals.total_to_host`),
as ``torch.nn.utils.clip_grad_norm_`` and Megatron's ``clip_grad_norm_fp32`` synchronise once.
Only the split parameters' part is then all-reduced over the processes; a parameter kept whole is
the same on every process and counts once.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Dict, Iterable, List, Union

import numpy as np

from . import collectives
from .backends.base import Backend
from .device_totals import total_to_host
from .errors import ConfigError
from .parameter import ShardedParameter
from .placements import Replicated

__all__ = ["clip_grad_norm"]


def clip_grad_norm(
    parameters: Union[ShardedParameter, Iterable[ShardedParameter]],
    max_norm: Union[float, str],
    norm_type: Union[float, str] = 2.0,
) -> float:
    """Scale every gradient in place so that their global norm is at most ``max_norm``; return that norm.

    As ``torch.nn.utils.clip_grad_norm_``: the total norm is the ``norm_type``
    norm of all gradients together (``inf``: the largest absolute value), over
    every shard on every device and process; the gradients are multiplied by
    ``min(1, max_norm / (total + 1e-6))``. A non-finite norm is returned as it
    is, and the gradients are scaled by the resulting NaN, as torch does.
    Parameters without a gradient are skipped. A parameter kept whole (the
    row-parallel bias) is the same on every process and counts once. The host
    waits for the devices once (one device-to-host copy per backend), whatever
    the number of parameters and devices.

    ``parameters`` is one :class:`ShardedParameter` or an iterable of them,
    ``max_norm`` a number in ``[0, inf]`` and ``norm_type`` one in ``(0, inf]``
    (or ``"inf"``); anything else raises ConfigError before any gradient changes
    (torch lets a NaN ``max_norm`` make every gradient NaN and a negative one
    flip their signs).
    """
    params = [p for p in _clip_parameters(parameters) if any(g is not None for g in p.grad_blocks.values())]
    limit = _clip_number(max_norm, "max_norm", 0.0, allow_zero=True)
    order = _clip_number(norm_type, "norm_type", 0.0, allow_zero=False)
    if not params:
        return 0.0
    total = _global_norm(params, order)
    coefficient = limit / (total + 1e-6)
    if coefficient < 1.0 or math.isnan(coefficient):
        for p in params:
            keys = [d for d, g in p.grad_blocks.items() if g is not None]
            collectives.on_devices(p.backend, partial(_scale_in_place, coefficient), p.grad_blocks, keys=keys)
    return total


def _clip_parameters(parameters: Any) -> List[ShardedParameter]:
    """``parameters`` (one ShardedParameter or an iterable of them) as a list, or ConfigError."""
    if isinstance(parameters, ShardedParameter):
        return [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise ConfigError(
            f"clip_grad_norm takes a ShardedParameter or an iterable of them (model.parameters()), "
            f"got {type(parameters).__name__}"
        ) from None
    for i, p in enumerate(params):
        if not isinstance(p, ShardedParameter):
            raise ConfigError(
                f"clip_grad_norm parameters must be ShardedParameter objects (model.parameters()), "
                f"got {type(p).__name__} at position {i}"
            )
    return params


def _clip_number(value: Any, name: str, low: float, allow_zero: bool) -> float:
    """``value`` as a float in ``[low, inf]`` (``(low, inf]`` unless ``allow_zero``); ``"inf"`` is inf."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = value >= low if allow_zero else value > low
    if not ok:
        bound = f"[{low:g}, inf]" if allow_zero else f"({low:g}, inf]"
        raise ConfigError(f"clip_grad_norm {name} must be a number in {bound} or 'inf', got {value!r}")
    return float(value)


def _scale_in_place(factor: float, grad: Any) -> None:
    grad *= factor


def _block_norm(xp: Any, norm_type: float, whole: bool, grad: Any) -> Any:
    """``[part, 0]`` (split parameter) or ``[0, part]`` (whole one), float64 on ``grad``'s device, where
    ``part`` is ``max |g|`` (``inf``) or ``sum |g|^norm_type`` of the block, accumulated in at least
    float32. The zero is neutral for both the sum and the max of non-negative parts."""
    flat = grad.reshape(-1)
    if flat.dtype.itemsize < 4:
        flat = flat.astype(np.float32)
    if math.isinf(norm_type):
        part = xp.abs(flat).max() if flat.size else xp.zeros((), dtype=flat.dtype)
    elif norm_type == 2.0:
        part = flat @ flat  # (n,) @ (n,) -> (): no temporary
    else:
        part = (xp.abs(flat) ** norm_type).sum()
    zero = xp.zeros((), dtype=np.float64)
    part = part.astype(np.float64)
    return xp.stack([zero, part] if whole else [part, zero])  # (2,): split part, whole part


def _global_norm(params: List[ShardedParameter], norm_type: float) -> float:
    """The ``norm_type`` norm over every gradient block of ``params``, on every process.

    Per backend, one device-to-host copy of ``[split part, whole part]``; the split part is then
    all-reduced over the processes (``sum``, or ``max`` for ``inf``).
    """
    infinite = math.isinf(norm_type)
    op = "max" if infinite else "sum"
    by_backend: Dict[int, List[ShardedParameter]] = {}
    for p in params:
        by_backend.setdefault(id(p.backend), []).append(p)
    parts: List[np.ndarray] = []
    for group in by_backend.values():
        backend: Backend = group[0].backend
        partials = []
        for p in group:
            keys = [d for d, g in p.grad_blocks.items() if g is not None]
            if isinstance(p.placement, Replicated):
                keys = keys[:1]  # the copies hold one gradient: count it once
            norm = partial(_block_norm, backend.xp, norm_type, p.layout is None)
            partials.append(collectives.on_devices(backend, norm, p.grad_blocks, keys=keys))
        parts.append(np.asarray(total_to_host(backend, partials, op), dtype=np.float64))
    combined = np.max(parts, axis=0) if infinite else np.sum(parts, axis=0)  # (2,); NaN kept by both
    split_part, whole_part = float(combined[0]), float(combined[1])
    comm = params[0].comm
    if comm.size > 1:
        split_part = float(collectives.all_reduce_host_scalar(comm, split_part, op))
    if infinite:
        return _nan_max(split_part, whole_part)
    return (split_part + whole_part) ** (1.0 / norm_type)


def _nan_max(*values: float) -> float:
    """The largest of ``values``, NaN if any is NaN (Python's ``max`` drops a NaN that is not first)."""
    return float(np.max(values))
