"""The tape function of the vocabulary-parallel embedding: a masked lookup per device.

``EmbeddingLookup``: ids whole on every device (``Replicated``) and the table
``E`` split by vocabulary rows (``Split(0)``, device ``d`` holding ``E_d``,
rows ``[first_d, last_d)``) give the ``Partial`` rows
``out_d = mask_d * E_d[clip(t - first_d)]`` with ``mask_d = first_d <= t < last_d``.
Exactly one device owns each id, so ``sum_d out_d = E[t]`` bit for bit (the
region after the lookup adds them).

Backward, from ``dOut`` whole on every device (``Replicated``):
``dE_d[t - first_d] += dOut[t]`` for every id ``t`` device ``d`` owns (repeated
ids accumulate). Each device scatters only the rows of the ids it owns, so the
backward does ``n_ids`` row additions in all, not ``n_ids`` per device. Ids
have no gradient.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Optional, Tuple

from ..autograd import Context, Function
from ..device_checks import DeferredCheck, raise_pending
from ..parameter import ShardedParameter
from ..partition import BlockLayout
from ..placements import Partial, Split
from ..tensor import Tensor, new_tensor

__all__ = ["EmbeddingLookup"]

#: Per device: ``(owned, local)``, where this device owns each id (None: every id) and its row there.
Lookups = Dict[Hashable, Tuple[Any, Any]]


class _LookupContext(Context):
    __slots__ = ("weight", "lookups", "check")
    weight: ShardedParameter
    lookups: Lookups  # per device: (owned, local) of each id
    check: Optional[DeferredCheck]  # the pending range check of ids that live on a device


def owned_rows(xp: Any, layout: BlockLayout, ids: Any, device: Hashable, bounded: bool) -> Tuple[Any, Any]:
    """``(owned, local)`` of ``device``'s block for ``ids``. Unless the ids are known to be
    ``bounded`` (checked on the host), a block that is the whole vocabulary still masks ids outside
    it, so that an id whose check is pending reads nothing out of bounds."""
    owned, local = layout.owned_local(xp, ids, device)
    if owned is None and not bounded:
        owned = (ids >= 0) & (ids < layout.total)
        local = xp.where(owned, ids, 0)
    return owned, local


class EmbeddingLookup(Function):
    """``out_d = mask_d * E_d[t - first_d]`` for Replicated ids ``t``: a ``Partial`` ``(*t.shape, dim)``."""

    ctx_class = _LookupContext

    @staticmethod
    def forward(
        ctx: _LookupContext,
        ids: Tensor,
        weight: ShardedParameter,
        bounded: bool,
        check: Optional[DeferredCheck],
    ) -> Tensor:
        backend, layout = weight.backend, weight.layout
        assert backend is not None and layout is not None
        xp, dim = backend.xp, weight.shape[1]
        rows, lookups = {}, {}
        for d, table in weight.blocks.items():
            with backend.device(d):
                t = ids.blocks[d]
                owned, local = owned_rows(xp, layout, t, d, bounded)
                if table.shape[0] == 0:  # this device owns no row (more workers than the vocabulary)
                    rows[d] = xp.zeros(tuple(t.shape) + (dim,), dtype=table.dtype)
                else:
                    rows[d] = xp.take(table, local, axis=0)  # (vocab_d, dim)[ids.shape] -> (*ids.shape, dim)
                    if owned is not None:
                        backend.zero_rows(rows[d], ~owned)  # the rows other devices own (as Megatron)
                lookups[d] = (owned, local)
        if ctx.needs_input_grad:
            ctx.weight, ctx.lookups, ctx.check = weight, lookups, check
        shape = ids.shape + (dim,)
        return new_tensor(rows, Partial(tuple(rows)), shape, weight.dtype, backend, weight.comm)

    @staticmethod
    def backward(ctx: _LookupContext, grad: Tensor) -> Tuple[None, Optional[Tensor], None, None]:
        raise_pending()  # ids checked on a device: an id out of range raises here, before dE
        if ctx.check is not None:
            ctx.check.verify()  # also when another thread read the pending checks
        weight = ctx.weight
        backend = weight.backend
        assert backend is not None
        dim = weight.shape[1]
        blocks = {}
        for d, table in weight.blocks.items():
            owned, local = ctx.lookups[d]
            with backend.device(d):
                rows = grad.blocks[d].reshape(-1, dim)  # (n_ids, dim)
                mask = None if owned is None else owned.reshape(-1)
                blocks[d] = backend.scatter_add_rows(table.shape, local.reshape(-1), rows, mask)
        placement = weight.placement
        assert isinstance(placement, Split)
        dw = new_tensor(blocks, placement, weight.shape, weight.dtype, backend, weight.comm)
        return None, dw, None, None
