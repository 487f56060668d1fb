"""The tape functions of the linear layers: per-device GEMMs between placed tensors.

``ColumnLinear``: ``X`` whole on every device (``Replicated``) times the
column blocks ``A_d`` of a weight split along its outputs gives
``Y_d = X A_d + b_d``, a ``Split(-1)`` output. Backward: ``dA_d = X^T dY_d``,
``db_d = sum(dY_d)``, and the ``Partial`` input gradient ``dX_d = dY_d A_d^T``
(the region before the layer sums it).

``RowLinear``: ``X`` split along its features (``Split(-1)``) times the row
blocks ``A_d`` gives the ``Partial`` products ``Y_d = X_d A_d``, whose sum is
``X A``; the whole bias ``b`` is added once, into the first device's part,
so ``sum_d Y_d = X A + b`` (on every process, only the first adds it).
Backward, from ``dY`` whole on every device (``Replicated``):
``dA_d = X_d^T dY``, ``dX_d = dY A_d^T`` (``Split(-1)``) and ``db = sum(dY)``.

``ReplicatedLinearFunction``: ``X`` and a weight ``A`` both whole on every device
(``Replicated``) give ``Y_d = X A + b`` on each, a ``Replicated`` ``Y``: for a
small projection every device needs whole (attention's keys and values when
there are fewer key-value heads than workers). Backward, from the ``Partial``
parts ``dY_d`` of its gradient: ``dA_d = X^T dY_d``, ``db_d = sum(dY_d)`` and
``dX_d = dY_d A^T``, all ``Partial`` (their sums are the gradients).
"""

from __future__ import annotations

from typing import Optional, Tuple

from .. import collectives
from ..autograd import Context, Function
from ..parameter import ShardedParameter
from ..placements import Partial, Replicated, Split
from ..reused_buffers import ReusedBuffers, gemm_output
from ..tensor import Tensor, new_tensor
from .gemm import (
    accumulate_weight_grad,
    bias_grad,
    can_accumulate_weight_grad,
    matmul,
    matmul_bias,
    matmul_transposed,
    weight_grad,
)

__all__ = ["ColumnLinear", "ReplicatedLinearFunction", "RowLinear"]


class _LinearContext(Context):
    __slots__ = ("weight", "bias")

    weight: ShardedParameter
    bias: Optional[ShardedParameter]


def _accumulated_in_place(weight: ShardedParameter, inputs: dict, grads: dict) -> bool:
    """Add ``X_d^T dY_d`` (``inputs[d]``, ``grads[d]``) to each device's block of ``weight``'s gradient in
    place, one BLAS call each (:func:`~tp_gpu.layers.gemm.accumulate_weight_grad`), and return True;
    or change nothing and return False, unless every device's block can take it.

    A split weight's gradient blocks are what its backward returns, added as they lie, so adding them
    here is the same sum without the ``dA`` temporary (Megatron's gradient-accumulation fusion); a
    first backward after ``zero_grad`` (no block yet) returns its ``dA`` as usual.
    """
    if not isinstance(weight, ShardedParameter) or not isinstance(weight.placement, Split):
        return False
    with weight.grad_lock:
        targets = weight.grad_blocks
        if not all(
            targets.get(d) is not None and can_accumulate_weight_grad(targets[d], inputs[d], g)
            for d, g in grads.items()
        ):
            return False
        for d, g in grads.items():
            accumulate_weight_grad(targets[d], inputs[d], g)  # A_d.grad += X_d^T dY_d
    return True


def _grad_of(param: ShardedParameter, blocks: dict) -> Tensor:
    """A gradient placed like ``param``."""
    return new_tensor(blocks, param.placement, param.shape, param.dtype, param.backend, param.comm)


class ColumnLinear(Function):
    """``Y_d = X A_d + b_d`` for a Replicated ``X`` and column blocks ``A_d``: a ``Split(-1)`` ``Y``."""

    ctx_class = _LinearContext

    @staticmethod
    def forward(
        ctx: _LinearContext,
        x: Tensor,
        weight: ShardedParameter,
        bias: Optional[ShardedParameter],
        outputs: Optional[ReusedBuffers] = None,
    ) -> Tensor:
        backend = weight.backend
        blocks = _products(x, weight, bias, outputs)  # device d: (..., n_d)
        if ctx.needs_input_grad:
            ctx.save_for_backward(x)
            ctx.weight, ctx.bias = weight, bias
        placement = weight.placement
        assert isinstance(placement, Split)
        shape = x.shape[:-1] + (weight.shape[1],)
        return new_tensor(
            blocks, Split(x.ndim - 1, placement.layout), shape, weight.dtype, backend, weight.comm
        )

    @staticmethod
    def backward(ctx: _LinearContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        backend = weight.backend
        dw, db, dx = _product_grads(x, weight, bias, grad, ctx.needs_input_grad)
        grad_x = new_tensor(dx, Partial(tuple(dx)), x.shape, grad.dtype, backend, grad.comm) if dx else None
        grad_w = _grad_of(weight, dw) if dw else None
        grad_b = _grad_of(bias, db) if db and bias is not None else None
        return grad_x, grad_w, grad_b, None  # dX, dA, db; outputs


class RowLinear(Function):
    """``Y_d = X_d A_d`` (plus ``b`` once) for a ``Split(-1)`` ``X``, row blocks ``A_d``: a Partial ``Y``."""

    ctx_class = _LinearContext

    @staticmethod
    def forward(
        ctx: _LinearContext,
        x: Tensor,
        weight: ShardedParameter,
        bias: Optional[ShardedParameter],
        outputs: Optional[ReusedBuffers] = None,
    ) -> Tensor:
        backend = weight.backend
        assert backend is not None
        partials = {}
        for d, w in weight.blocks.items():
            with backend.device(d):
                out = gemm_output(outputs, backend, d, x.blocks[d], w)
                partials[d] = matmul(x.blocks[d], w, out)  # (..., n_in_d) @ (n_in_d, n_out) -> (..., n_out)
        if bias is not None and weight.comm.rank == 0:
            first = bias.block_devices[0] if bias.block_devices[0] in partials else next(iter(partials))
            b = collectives.to_device(backend, bias.blocks[bias.block_devices[0]], first, bias.dtype)
            with backend.device(first):
                partials[first] += b  # (..., n_out) + (n_out,), into the new product
        if ctx.needs_input_grad:
            ctx.save_for_backward(x)
            ctx.weight, ctx.bias = weight, bias
        shape = x.shape[:-1] + (weight.shape[1],)
        return new_tensor(partials, Partial(tuple(partials)), shape, weight.dtype, backend, weight.comm)

    @staticmethod
    def backward(ctx: _LinearContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        backend = weight.backend
        assert backend is not None
        needs = ctx.needs_input_grad
        dw, dx = {}, {}
        fused = needs[1] and _accumulated_in_place(
            weight, x.blocks, {d: grad.blocks[d] for d in weight.blocks}
        )
        for d, w in weight.blocks.items():
            g = grad.blocks[d]  # dY, whole
            with backend.device(d):
                if needs[1] and not fused:
                    dw[d] = weight_grad(x.blocks[d], g)  # (..., n_in_d)^T (..., n_out) -> (n_in_d, n_out)
                if needs[0]:
                    dx[d] = matmul_transposed(g, w)  # (..., n_out) @ (n_out, n_in_d) -> (..., n_in_d)
        grad_b = None
        if bias is not None and needs[2]:
            device = bias.block_devices[0]
            g = grad.blocks[device] if device in grad.blocks else next(iter(grad.blocks.values()))
            with backend.device(backend.device_of(g)):
                db = bias_grad(g)  # (..., n_out) -> (n_out,)
            grad_b = _grad_of(bias, {device: collectives.to_device(backend, db, device, bias.dtype)})
        grad_x = new_tensor(dx, x.placement, x.shape, grad.dtype, backend, grad.comm) if dx else None
        return grad_x, (_grad_of(weight, dw) if dw else None), grad_b, None  # dX, dA, db; outputs


class ReplicatedLinearFunction(Function):
    """``Y_d = X A + b`` on every device for a Replicated ``X``, ``A`` and ``b``: a Replicated ``Y``."""

    ctx_class = _LinearContext

    @staticmethod
    def forward(
        ctx: _LinearContext, x: Tensor, weight: ShardedParameter, bias: Optional[ShardedParameter]
    ) -> Tensor:
        blocks = _products(x, weight, bias)  # device d: (..., n_out), the same on every device
        if ctx.needs_input_grad:
            ctx.save_for_backward(x)
            ctx.weight, ctx.bias = weight, bias
        shape = x.shape[:-1] + (weight.shape[1],)
        return new_tensor(blocks, Replicated(tuple(blocks)), shape, weight.dtype, weight.backend, weight.comm)

    @staticmethod
    def backward(ctx: _LinearContext, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        assert isinstance(grad.placement, Partial)  # dY_d: parts of dY, whose sums are the gradients
        dw, db, dx = _product_grads(x, weight, bias, grad, ctx.needs_input_grad)

        def part(blocks: dict, like: Tensor) -> Optional[Tensor]:
            placement = Partial(tuple(blocks))
            return (
                new_tensor(blocks, placement, like.shape, grad.dtype, weight.backend, grad.comm)
                if blocks
                else None
            )

        return part(dx, x), part(dw, weight), (part(db, bias) if bias is not None else None)


def _products(
    x: Tensor,
    weight: ShardedParameter,
    bias: Optional[ShardedParameter],
    outputs: Optional[ReusedBuffers] = None,
) -> dict:
    """``{d: X_d A_d + b_d}`` over the devices of ``weight``'s blocks (``b_d`` left out without a bias),
    each large host product written into a buffer kept in ``outputs`` while nothing holds it."""
    backend = weight.backend
    blocks = {}
    for d, w in weight.blocks.items():
        with backend.device(d):
            out = gemm_output(outputs, backend, d, x.blocks[d], w)
            if bias is None:
                blocks[d] = matmul(x.blocks[d], w, out)  # (..., n_in) @ (n_in, n_d) -> (..., n_d)
            else:
                blocks[d] = matmul_bias(x.blocks[d], w, bias.blocks[d], out)  # ... + (n_d,)
    return blocks


def _product_grads(
    x: Tensor,
    weight: ShardedParameter,
    bias: Optional[ShardedParameter],
    grad: Tensor,
    needs: Tuple[bool, ...],
) -> Tuple[dict, dict, dict]:
    """``({d: dA_d}, {d: db_d}, {d: dX_d})`` of :func:`_products` from ``{d: dY_d}``, each only where needed:
    ``dA_d = X_d^T dY_d``, ``db_d = sum(dY_d)``, ``dX_d = dY_d A_d^T``."""
    backend = weight.backend
    dw, db, dx = {}, {}, {}
    fused = needs[1] and _accumulated_in_place(weight, x.blocks, grad.blocks)
    for d, g in grad.blocks.items():
        with backend.device(d):
            if needs[1] and not fused:
                dw[d] = weight_grad(x.blocks[d], g)  # (..., n_in)^T (..., n_d) -> (n_in, n_d)
            if bias is not None and needs[2]:
                db[d] = bias_grad(g)  # (..., n_d) -> (n_d,)
            if needs[0]:
                dx[d] = matmul_transposed(g, weight.blocks[d])  # (..., n_d) @ (n_d, n_in) -> (..., n_in)
    return dw, db, dx
