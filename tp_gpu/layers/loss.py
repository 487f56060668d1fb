"""Vocab-parallel cross-entropy (Megatron-LM ``vocab_parallel_cross_entropy``).

The logits ``Z`` of shape ``(..., V)`` stay split on the vocabulary axis as
``Z = [Z_1, ..., Z_p]``; they are never gathered. With ``m = max_j Z_j``
(a max reduction), ``S = sum_j exp(Z_j - m)`` (a sum reduction of the per-shard
exp-sums) and ``z_t = Z_t - m`` the shifted target logit (a sum reduction where
only the owning worker contributes), the loss of one row is

    nll = log S - z_t
    loss = (1 - eps) * nll + eps * (log S - mean_j (Z_j - m))

with label smoothing ``eps`` spread over the whole vocabulary, and its
gradient is ``dZ_j = softmax(Z)_j - (1 - eps) [j == t] - eps / V``, computed
on each worker for its own shard.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any, Dict, Hashable, Tuple, Union

import numpy as np

from .. import collectives
from ..collectives import Blocks
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError, TensorParallelError
from ..module import Module
from ..sharded import ShardedTensor
from .base import as_array_like

__all__ = ["VocabParallelCrossEntropy"]

REDUCTIONS = ("mean", "sum", "none")


class VocabParallelCrossEntropy(Module):
    """Cross-entropy over logits split on the vocabulary axis, without gathering them.

    Parameters
    ----------
    ignore_index : int
        Rows whose target equals it contribute no loss and no gradient, and do
        not count toward the mean.
    label_smoothing : float in [0, 1)
        Weight ``eps`` of the uniform distribution over the global vocabulary.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` over non-ignored rows (NaN when every row is ignored, as in
        PyTorch), ``"sum"``, or ``"none"`` for the per-row losses.

    Notes
    -----
    Arithmetic runs in float32 for float16 logits, else in the logits' dtype;
    each device keeps one accumulator-dtype copy of its logits for backward
    (none in eval mode). The caller's logits are never modified.
    """

    def __init__(self, *, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ConfigError(f"ignore_index must be an integer, got {ignore_index!r}")
        smoothing_ok = isinstance(label_smoothing, numbers.Real) and not isinstance(label_smoothing, bool)
        if not smoothing_ok or not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"

    def _check_targets(self, logits: ShardedTensor, targets: Any) -> Blocks:
        """Targets as int64 on every device of the logits, checked against their shape and vocabulary."""
        if not isinstance(logits, ShardedTensor):
            raise ShapeError(
                f"VocabParallelCrossEntropy expects logits as a ShardedTensor split on the vocab axis, "
                f"got {type(logits).__name__}"
            )
        if logits.ndim < 1 or logits.axis != logits.ndim - 1:
            raise ShapeError(f"logits must be split on the last (vocab) axis {logits.ndim - 1}, got axis {logits.axis}")
        targets = as_array_like(targets, "targets")
        if np.dtype(targets.dtype).kind not in "iu":
            raise ShapeError(f"targets must be integers, got dtype {targets.dtype}")
        if tuple(targets.shape) != logits.shape[:-1]:
            raise ShapeError(
                f"targets must have shape {logits.shape[:-1]} (the logits' without vocab), got {tuple(targets.shape)}"
            )
        backend, vocab = logits.backend, logits.shape[-1]
        copies = collectives.broadcast(backend, targets, list(logits.device_blocks()), np.int64)
        first = next(iter(copies))
        bad = collectives.on_devices(backend, lambda t: self._first_bad(backend.xp, t, vocab), copies, keys=[first])
        found = collectives.to_host(backend, bad[first])  # one device-to-host copy per call
        if found[0]:
            raise IndexOutOfRangeError(
                f"target {int(found[1])} out of range; expected 0 <= target < vocab={vocab} "
                f"or ignore_index={self.ignore_index}"
            )
        return copies

    def _first_bad(self, xp: Any, targets: Any, vocab: int) -> Any:
        """``[any bad, first bad value]`` of ``targets`` as one array."""
        bad = ((targets != self.ignore_index) & ((targets < 0) | (targets >= vocab))).reshape(-1)
        if bad.size == 0:
            return xp.zeros(2, dtype=np.int64)
        first = xp.argmax(bad)
        return xp.stack((bad[first].astype(np.int64), targets.reshape(-1)[first]))

    def forward(self, logits: ShardedTensor, targets: Any) -> Union[float, Any]:
        """The loss: a host float, or per-row losses ``targets.shape`` on worker 0's device for ``"none"``."""
        target_copies = self._check_targets(logits, targets)
        backend, comm, layout = logits.backend, logits.comm, logits.layout
        acc = np.promote_types(logits.dtype, np.float32)
        blocks = logits.device_blocks()
        devices = {d: d for d in blocks}
        shifted = collectives.on_devices(backend, lambda z: _row_max_and_copy(backend.xp, z, acc), blocks)
        row_max = collectives.all_reduce_max(backend, {d: m for d, (_, m) in shifted.items()}, comm)
        step = partial(self._shard_terms, backend.xp, layout, acc)
        terms = collectives.on_devices(backend, step, {d: z for d, (z, _) in shifted.items()}, row_max, target_copies, devices)
        sums = collectives.all_reduce_sum(backend, {d: t["sum"] for d, t in terms.items()}, comm)
        out = next(iter(blocks))
        target_logit = collectives.reduce_sum(backend, {d: t["picked"] for d, t in terms.items()}, out, comm)
        mean_z = None
        if self.label_smoothing:
            mean_z = collectives.reduce_sum(backend, {d: t["zsum"] for d, t in terms.items()}, out, comm)
        loss, valid = collectives.on_devices(
            backend, lambda s, t, x: self._row_losses(backend.xp, s, t, x, mean_z, logits.shape[-1], acc),
            {out: sums[out]}, {out: target_logit}, {out: target_copies[out]},
        )[out]
        count = int(collectives.to_host(backend, collectives.on_devices(backend, _count, {out: valid})[out]))
        self._keep({"logits": logits, "terms": terms, "sums": sums, "valid": valid, "count": count, "acc": acc})
        return self._reduce(backend, loss, out, count)

    def _shard_terms(self, xp: Any, layout: Any, acc: Any, z: Any, m: Any, t: Any, device: Hashable) -> Dict[str, Any]:
        """On one device: ``z -= m`` and the row sums of ``exp(z)`` (``z`` becomes ``exp(z - m)``, in place),
        the shifted target logit where this device owns the target, and the row sums of ``z - m``."""
        owned, local = layout.owned_local(xp, t, device)
        if owned is None:  # this device holds the whole vocabulary: only ignored rows are not owned
            owned = (t >= 0) & (t < layout.total)
            local = xp.where(owned, t, 0)
        z -= m[..., None]  # Z_d - m
        if z.shape[-1]:
            picked = xp.take_along_axis(z, local[..., None], axis=-1)[..., 0]
            picked = xp.where(owned, picked, acc.type(0))
        else:
            picked = xp.zeros(z.shape[:-1], dtype=acc)
        zsum = z.sum(axis=-1) if self.label_smoothing else None
        xp.exp(z, out=z)
        return {"exps": z, "sum": z.sum(axis=-1), "picked": picked, "zsum": zsum, "owned": owned, "local": local}

    def _row_losses(self, xp: Any, sums: Any, target_logit: Any, targets: Any, mean_z: Any, vocab: int, acc: Any):
        """``(loss, valid)`` per row: ``log S - z_t``, smoothed, zero where ignored."""
        log_sum = xp.log(sums)
        loss = log_sum - target_logit  # -log softmax(Z)_t
        eps = self.label_smoothing
        if eps:
            loss = (1.0 - eps) * loss + eps * (log_sum - mean_z / vocab)
        valid = targets != self.ignore_index
        return xp.where(valid, loss, acc.type(0)), valid

    def _reduce(self, backend: Any, loss: Any, out: Hashable, count: int) -> Union[float, Any]:
        if self.reduction == "none":
            return loss
        total = float(collectives.to_host(backend, collectives.on_devices(backend, _total, {out: loss})[out]))
        if self.reduction == "sum":
            return total
        return total / count if count else float("nan")

    def _row_scale(self, backend: Any, grad_loss: Any, saved: Dict[str, Any], out: Hashable, rows: Tuple[int, ...]) -> Any:
        """The gradient of each row's loss, zero for ignored rows, on ``out``."""
        acc = saved["acc"]
        if self.reduction == "none":
            grad = as_array_like(grad_loss, "grad_loss")
            if np.dtype(grad.dtype).kind not in "iuf":
                raise ShapeError(f"grad_loss must be real numbers, got {grad_loss!r} of dtype {grad.dtype}")
            if tuple(grad.shape) not in ((), rows):
                raise ShapeError(f"grad_loss must be a number or have shape {rows}, got {tuple(grad.shape)}")
            grad = collectives.broadcast(backend, grad, [out], acc)[out]
        else:
            if isinstance(grad_loss, bool) or not isinstance(grad_loss, numbers.Real):
                raise ShapeError(f"grad_loss must be a number for reduction={self.reduction!r}, got {grad_loss!r}")
            grad = float(grad_loss) / max(saved["count"], 1) if self.reduction == "mean" else float(grad_loss)
        return collectives.on_devices(backend, lambda v: backend.xp.where(v, grad, acc.type(0)), {out: saved["valid"]})[out]

    def backward(self, grad_loss: Any = 1.0) -> ShardedTensor:
        """``dZ`` as a ShardedTensor split like the logits, in the logits' dtype.

        ``grad_loss`` is the gradient of the reduced loss (a number), or for
        ``reduction="none"`` a number or an array of the per-row shape.
        Ignored rows get zero gradient (also when every row is ignored).
        """
        if self._saved is None:
            raise TensorParallelError(
                "VocabParallelCrossEntropy.backward called before forward (or twice after one forward)"
            )
        saved = self._saved
        logits: ShardedTensor = saved["logits"]
        backend = logits.backend
        out = next(iter(saved["terms"]))
        row_scale = self._row_scale(backend, grad_loss, saved, out, logits.shape[:-1])
        self._take_saved()
        scales = collectives.broadcast(backend, row_scale, list(saved["terms"]), saved["acc"])
        step = partial(self._shard_grad, backend.xp, logits.shape[-1], logits.dtype)
        grads = collectives.on_devices(backend, step, saved["terms"], saved["sums"], scales)
        return ShardedTensor.from_blocks(grads, logits.axis, logits.layout, backend, logits.comm)

    def _shard_grad(self, xp: Any, vocab: int, dtype: Any, terms: Dict[str, Any], s: Any, scale: Any) -> Any:
        """``dZ_d = (softmax(Z)_d - (1 - eps) onehot(t)_d - eps / V) * scale``, in place on the saved exps."""
        g = terms["exps"]
        g /= s[..., None]  # softmax over the global vocabulary
        eps = self.label_smoothing
        if g.shape[-1]:
            flat = g.reshape(-1, g.shape[-1])  # (rows, V_d), a view
            hit = terms["owned"].reshape(-1).astype(g.dtype)
            hit *= 1.0 - eps
            flat[xp.arange(flat.shape[0]), terms["local"].reshape(-1)] -= hit  # subtract at each row's target only
        if eps:
            g -= eps / vocab
        g *= scale[..., None]
        return g.astype(dtype, copy=False)


def _row_max_and_copy(xp: Any, z: Any, acc: Any) -> Tuple[Any, Any]:
    """``(copy of z in acc, row max)``; the max of an empty block is -inf."""
    copy = z.astype(acc)  # a copy: the caller's logits stay untouched
    if z.shape[-1] == 0:
        return copy, xp.full(z.shape[:-1], -np.inf, dtype=acc)
    return copy, copy.max(axis=-1)


def _count(valid: Any) -> Any:
    return valid.sum()


def _total(loss: Any) -> Any:
    return loss.sum()
