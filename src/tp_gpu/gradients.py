"""Gradients as the tape passes them: where they live, the first one, and sums of two.

A value's gradient has the value's placement (:mod:`tp_gpu.placements`),
except that the gradient of a ``Replicated`` value is ``Partial`` (each
device's consumers contribute a part, ``dT = sum_d dT_d``) and that of a
``Partial`` value is ``Replicated`` (``T = sum_d T_d``, so ``dT_d = dT`` on
every device). ``root_gradient`` makes the gradient that starts ``backward``
(checked against the root's shape before anything runs), ``add_gradients``
sums two gradients of one value, ``filled_like`` makes a constant gradient.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Hashable, Optional, Tuple

import numpy as np

from . import collectives
from .backends.base import Backend, as_array
from .device_checks import check_real
from .errors import ShapeError, TensorParallelError
from .placements import HOST, Dense, Partial, Placement, Replicated, Split
from .tensor import Blocks, Tensor, new_tensor

__all__ = ["grad_placement", "filled_like", "add_gradients", "root_gradient", "like", "on_device"]


def grad_placement(placement: Placement) -> Placement:
    """The placement of the gradient of a value placed as ``placement``: its own, but ``Partial`` for
    ``Replicated`` and ``Replicated`` for ``Partial`` (each device's part gets the whole gradient)."""
    if isinstance(placement, Replicated):
        return Partial(placement.devices)
    if isinstance(placement, Partial):
        return Replicated(placement.devices)
    return placement


def like(t: Tensor, blocks: Blocks, placement: Optional[Placement] = None, shape: Any = None) -> Tensor:
    first = next(iter(blocks.values()))
    return new_tensor(
        blocks,
        t.placement if placement is None else placement,
        t.shape if shape is None else shape,
        first.dtype,
        t.backend,
        t.comm,
    )


def on_device(backend: Optional[Backend], device: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
    if backend is None:
        return fn(*args)
    with backend.device(device):
        return fn(*args)


def filled_like(x: Tensor, value: Any) -> Tensor:
    """A gradient of ``x`` (placed as :func:`grad_placement` says) with every logical element ``value``
    (a scalar array on any device); zero on a padded split's padding."""
    target = grad_placement(x.placement)
    backend = x.backend
    if isinstance(target, Dense):
        devices: list = [target.device]
    elif isinstance(target, Partial):
        devices = [target.devices[0]]
    elif isinstance(target, Split):
        devices = list(target.layout.groups)
    else:
        devices = list(target.devices)  # type: ignore[attr-defined]
    blocks = {}
    for d in devices:
        shape = _block_shape(x, d)
        if backend is None:
            blocks[d] = np.full(shape, value, dtype=x.dtype)
            continue
        v = collectives.to_device(backend, value, d, x.dtype)
        with backend.device(d):
            block = backend.xp.zeros(shape, x.dtype) + v
            if isinstance(target, Split) and target.layout.padded:
                mask = target.layout.logical_mask(backend.xp, d)
                assert mask is not None  # a padded layout masks its padding
                block *= mask.reshape((-1,) + (1,) * (x.ndim - target.axis - 1))
            blocks[d] = block
    return new_tensor(blocks, target, x.shape, x.dtype, backend, x.comm)


def _block_shape(x: Tensor, device: Hashable) -> Tuple[int, ...]:
    p = x.placement
    if isinstance(p, Split):
        shape = list(x.shape)
        shape[p.axis] = p.layout.block_lengths[device]
        return tuple(shape)
    return x.shape


def add_gradients(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` for two gradients of one value (new blocks: either may be referenced elsewhere)."""
    pa, pb = a.placement, b.placement
    if isinstance(pa, Partial) and isinstance(pb, Partial):
        devices = tuple(dict.fromkeys(pa.devices + pb.devices))
        out = {}
        for d in devices:
            if d in a.blocks and d in b.blocks:
                out[d] = on_device(a.backend, d, operator.add, a.blocks[d], b.blocks[d])
            else:
                out[d] = a.blocks[d] if d in a.blocks else b.blocks[d]
        return new_tensor(out, Partial(devices), a.shape, a.dtype, a.backend, a.comm)
    if pa != pb:
        a, b = _same_dense(a, b)
    return like(a, {d: on_device(a.backend, d, operator.add, v, b.blocks[d]) for d, v in a.blocks.items()})


def _same_dense(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Two Dense gradients of one value that landed on different devices: ``b`` moved to ``a``'s."""
    pa, pb = a.placement, b.placement
    if isinstance(pa, Dense) and isinstance(pb, Dense):
        backend = a.backend or b.backend
        if backend is not None:
            moved = collectives.to_device(backend, b.blocks[pb.device], pa.device, a.dtype)
            return a, new_tensor({pa.device: moved}, pa, b.shape, a.dtype, backend, a.comm)
    raise TensorParallelError(f"cannot add gradients placed as {pa!r} and {pb!r}")


def root_gradient(root: Tensor, grad: Any) -> Tensor:
    """The gradient that starts ``root.backward(grad)``: ones for a scalar, else ``grad`` checked to have
    ``root``'s shape (ShapeError otherwise, before anything runs) and placed like ``root``'s gradient."""
    if grad is None:
        if root.size != 1:
            raise ShapeError(
                f"backward() without a gradient needs a scalar (one element), got shape {root.shape}; "
                "pass grad, an array of that shape"
            )
        return filled_like(root, np.ones((), root.dtype))
    if isinstance(grad, Tensor):
        if grad.shape != root.shape:
            raise ShapeError(
                f"backward: grad has shape {grad.shape}; expected the tensor's shape {root.shape}"
            )
        if grad.placement == grad_placement(root.placement) and grad.dtype == root.dtype:
            return grad
        if isinstance(grad.placement, Split) and isinstance(root.placement, Split):
            blocks = grad.blocks_for(  # type: ignore[attr-defined]
                root.placement.layout, root.dtype, None, "backward grad", root.placement.axis
            )
            return new_tensor(blocks, root.placement, root.shape, root.dtype, root.backend, root.comm)
        grad = grad.numpy()
    check_real(grad)
    try:
        array = as_array(grad)
    except (ValueError, TypeError) as exc:
        raise ShapeError(
            f"backward: grad could not be read as an array ({exc}); got {type(grad).__name__}"
        ) from exc
    if tuple(array.shape) != root.shape:
        raise ShapeError(
            f"backward: grad has shape {tuple(array.shape)}; expected the tensor's shape {root.shape}"
        )
    return _placed_gradient(root, array)


def _placed_gradient(root: Tensor, array: Any) -> Tensor:
    """A dense gradient ``array`` placed like ``root``'s gradient (see :func:`grad_placement`)."""
    target = grad_placement(root.placement)
    backend, dtype = root.backend, root.dtype
    if backend is None:
        return new_tensor({HOST: np.asarray(array, dtype)}, target, root.shape, dtype, None, root.comm)
    if isinstance(target, Dense):
        blocks = {target.device: collectives.to_device(backend, array, target.device, dtype)}
    elif isinstance(target, Split):
        blocks = collectives.scatter_blocks(backend, array, target.axis, target.layout, dtype)
    elif isinstance(target, Partial):
        blocks = {target.devices[0]: collectives.to_device(backend, array, target.devices[0], dtype)}
        target = Partial((target.devices[0],))
    else:
        blocks = collectives.broadcast(backend, array, list(target.devices), dtype)  # type: ignore[attr-defined]
    return new_tensor(blocks, target, root.shape, dtype, backend, root.comm)
