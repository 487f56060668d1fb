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
from typing import Any, List, Optional, Union

import numpy as np

from .. import collectives
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError, TensorParallelError
from ..sharded import ShardedTensor
from .base import as_array_like

__all__ = ["VocabParallelCrossEntropy"]

REDUCTIONS = ("mean", "sum", "none")


class VocabParallelCrossEntropy:
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
    Arithmetic runs in float32 for float16 logits, else in the logits' dtype.
    The caller's logits are never modified.
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ConfigError(f"ignore_index must be an integer, got {ignore_index!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self._saved: Optional[dict] = None

    def _check_targets(self, logits: ShardedTensor, targets: Any) -> Any:
        """Targets as int64 on worker 0's device, checked against the logits' shape and vocabulary."""
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
            raise ShapeError(f"targets must have shape {logits.shape[:-1]} (the logits' without vocab), got {tuple(targets.shape)}")
        backend, device = logits.backend, logits.devices[0]
        targets = backend.asarray(targets, np.int64, device)
        vocab = logits.shape[-1]
        with backend.device(device):
            bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= vocab))
            if bool(bad.any()):
                value = int(backend.to_host(targets)[backend.to_host(bad)][0])
                raise IndexOutOfRangeError(
                    f"target {value} out of range; expected 0 <= target < vocab={vocab} or ignore_index={self.ignore_index}"
                )
        return targets

    def forward(self, logits: ShardedTensor, targets: Any) -> Union[float, Any]:
        """The loss: a host float, or per-row losses ``targets.shape`` on worker 0's device for ``"none"``."""
        targets = self._check_targets(logits, targets)
        backend, placement = logits.backend, logits.devices
        xp = backend.xp
        vocab = logits.shape[-1]
        acc = np.promote_types(logits.dtype, np.float32)
        starts = [first for first, _ in logits.layout.ranges]  # global vocab index of each shard
        target_copies = collectives.broadcast(backend, targets, placement, np.int64)

        shifted: List[Any] = []
        for shard, device in zip(logits.shards, placement):
            with backend.device(device):
                shifted.append(shard.astype(acc))  # a copy: the caller's logits stay untouched
        local_max = []
        for z, device in zip(shifted, placement):
            with backend.device(device):
                local_max.append(z.max(axis=-1))
        comm = logits.comm
        row_max = collectives.all_reduce_max(backend, local_max, placement, comm)

        exps, local_sums, local_targets, local_zsums, owned_offsets = [], [], [], [], []
        for z, m, first, device in zip(shifted, row_max, starts, placement):
            with backend.device(device):
                z -= m[..., None]  # Z_i - m
                e = xp.exp(z)
                t = target_copies[device]
                owned = (t >= first) & (t < first + z.shape[-1])
                offset = xp.where(owned, t - first, 0)
                picked = xp.take_along_axis(z, offset[..., None], axis=-1)[..., 0]
                exps.append(e)
                local_sums.append(e.sum(axis=-1))
                local_targets.append(xp.where(owned, picked, acc.type(0)))
                local_zsums.append(z.sum(axis=-1))
                owned_offsets.append((owned, offset))
        sums = collectives.all_reduce_sum(backend, local_sums, placement, comm)
        out = placement[0]
        target_logit = collectives.reduce_sum(backend, local_targets, placement, out, comm)
        with backend.device(out):
            log_sum = xp.log(sums[0])
            loss = log_sum - target_logit  # -log softmax(Z)_t
            eps = self.label_smoothing
            if eps:
                mean_z = collectives.reduce_sum(backend, local_zsums, placement, out, comm) / vocab
                loss = (1.0 - eps) * loss + eps * (log_sum - mean_z)
            valid = targets != self.ignore_index
            loss = xp.where(valid, loss, acc.type(0))
            count = int(valid.sum())
        self._saved = {
            "logits": logits,
            "exps": exps,
            "sums": sums,
            "owned_offsets": owned_offsets,
            "valid": valid,
            "count": count,
            "acc": acc,
        }
        if self.reduction == "none":
            return loss
        total = float(backend.to_host(loss.sum()))
        if self.reduction == "sum":
            return total
        return total / count if count else float("nan")

    __call__ = forward

    def backward(self, grad_loss: Any = 1.0) -> ShardedTensor:
        """``dZ`` as a ShardedTensor split like the logits, in the logits' dtype.

        ``grad_loss`` is the gradient of the reduced loss (a number), or for
        ``reduction="none"`` a number or an array of the per-row shape.
        Ignored rows get zero gradient (also when every row is ignored).
        """
        if self._saved is None:
            raise TensorParallelError("VocabParallelCrossEntropy.backward called before forward")
        saved = self._saved
        logits: ShardedTensor = saved["logits"]
        backend, placement = logits.backend, logits.devices
        xp = backend.xp
        acc = saved["acc"]
        rows = logits.shape[:-1]
        out = placement[0]
        with backend.device(out):
            if self.reduction == "none":
                grad = as_array_like(grad_loss, "grad_loss")
                if np.dtype(grad.dtype).kind not in "iuf":
                    raise ShapeError(f"grad_loss must be real numbers, got {grad_loss!r} of dtype {grad.dtype}")
                if tuple(grad.shape) not in ((), rows):
                    raise ShapeError(f"grad_loss must be a number or have shape {rows}, got {tuple(grad.shape)}")
                grad = backend.asarray(grad, acc, out)
            else:
                if isinstance(grad_loss, bool) or not isinstance(grad_loss, numbers.Real):
                    raise ShapeError(f"grad_loss must be a number for reduction={self.reduction!r}, got {grad_loss!r}")
                grad = float(grad_loss) / max(saved["count"], 1) if self.reduction == "mean" else float(grad_loss)
            row_scale = xp.where(saved["valid"], grad, acc.type(0))  # zero for ignored rows
        scales = collectives.broadcast(backend, row_scale, placement, acc)
        eps, vocab = self.label_smoothing, logits.shape[-1]
        shards = []
        for e, s, (owned, offset), device in zip(saved["exps"], saved["sums"], saved["owned_offsets"], placement):
            with backend.device(device):
                g = e / s[..., None]  # softmax over the global vocabulary
                hit = (xp.arange(e.shape[-1]) == offset[..., None]) & owned[..., None]
                g -= (1.0 - eps) * hit
                if eps:
                    g -= eps / vocab
                g *= scales[device][..., None]
                shards.append(g.astype(logits.dtype))
        return ShardedTensor(shards, logits.axis, placement, backend, logits.comm)
