"""Vocab-parallel cross-entropy (Megatron-LM ``vocab_parallel_cross_entropy``), with class weights.

The logits ``Z`` of shape ``(..., V)`` stay split on the vocabulary axis as
``Z = [Z_1, ..., Z_p]``; they are never gathered. Each step needs only
reductions of per-row numbers:

1. ``m = max_j Z_j`` (a max reduction); ``z = Z - m``;
2. ``S = sum_j exp(z_j)`` (a sum reduction of the per-shard exp-sums);
3. ``z_t`` and ``w_t``, the target's shifted logit and class weight (sum
   reductions to which only the owning shard contributes);
4. with label smoothing, ``sum_j w_j z_j`` (a sum reduction).

With class weights ``w`` (ones by default), ``W = sum_j w_j`` and label
smoothing ``eps``, the loss of one row is, as in ``torch.nn.functional.cross_entropy``,

    loss = (1 - eps) w_t (log S - z_t) + (eps / V) (W log S - sum_j w_j z_j)

``reduction="mean"`` divides the summed losses by the summed ``w_t`` of the
rows not ignored (their count without weights). The gradient, computed on each
worker for its own shard, is

    dZ_j = softmax(Z)_j ((1 - eps) w_t + eps W / V) - (1 - eps) w_t [j == t] - eps w_j / V

Padded vocabulary columns (a head built with ``pad_to_multiple_of``) are
masked: they get no probability, no weight and no gradient.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable
from functools import partial
from typing import Any

import numpy as np

from .. import collectives
from ..backends.base import host_array
from ..collectives import Blocks
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError, TensorParallelError
from ..module import Module
from ..sharded import ShardedTensor
from .base import as_array_like
from .gemm import as_rows

__all__ = ["VocabParallelCrossEntropy"]

REDUCTIONS = ("mean", "sum", "none")


class VocabParallelCrossEntropy(Module):
    """Cross-entropy over logits split on the vocabulary axis, without gathering them.

    Parameters
    ----------
    weight : array of shape (V,), optional
        A weight per class (``torch.nn.functional.cross_entropy``'s ``weight``),
        split like the logits when they arrive.
    ignore_index : int
        Rows whose target equals it contribute no loss and no gradient, and do
        not count toward the mean.
    label_smoothing : float in [0, 1)
        Weight ``eps`` of the uniform distribution over the global vocabulary.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` over non-ignored rows, weighted by ``w_t`` (NaN when every row
        is ignored, as in PyTorch), ``"sum"``, or ``"none"`` for the per-row losses.
    inplace : bool
        Compute in the logits' own memory (float32 and float64 logits): forward
        overwrites them with ``exp(Z - max)`` and backward returns ``dZ`` there,
        as Megatron-LM's ``vocab_parallel_cross_entropy`` does. This saves one
        logits-sized allocation per step (on the host, where a fresh one is
        paid in page faults, 0.75 s of a 6 s step at 4096 x 50,000 float32 on
        a small VM). Default False: the caller's logits are never modified.

    Notes
    -----
    Arithmetic runs in float32 for float16 logits, else in the logits' dtype;
    unless ``inplace``, each device keeps one accumulator-dtype array the size
    of its logits for backward, written in one pass from them (none in eval
    mode), and the caller's logits are never modified.
    """

    def __init__(
        self,
        *,
        weight: Any = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(inplace, (bool, np.bool_)):
            raise ConfigError(f"inplace must be True or False, got {inplace!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ConfigError(f"ignore_index must be an integer, got {ignore_index!r}")
        smoothing_ok = isinstance(label_smoothing, numbers.Real) and not isinstance(label_smoothing, bool)
        if not smoothing_ok or not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.class_weight: np.ndarray | None = None if weight is None else _check_weight(weight)
        self.ignore_index: int = int(ignore_index)
        self.label_smoothing: float = float(label_smoothing)
        self.reduction: str = reduction
        self.inplace: bool = bool(inplace)

    def extra_repr(self) -> str:
        weighted = ", weight=..." if self.class_weight is not None else ""
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}{weighted}" + (", inplace=True" if self.inplace else "")
        )

    # ------------------------------------------------------------------ inputs

    def _check_logits(self, logits: Any) -> None:
        if not isinstance(logits, ShardedTensor):
            raise ShapeError(
                f"VocabParallelCrossEntropy expects logits as a ShardedTensor split on the vocab axis, "
                f"got {type(logits).__name__}"
            )
        if logits.ndim < 1 or logits.axis != logits.ndim - 1:
            raise ShapeError(
                f"logits must be split on the last (vocab) axis {logits.ndim - 1}, got axis {logits.axis}"
            )
        if self.class_weight is not None and self.class_weight.shape != (logits.shape[-1],):
            raise ShapeError(
                f"class weight has shape {self.class_weight.shape}; expected ({logits.shape[-1]},), one per "
                "vocabulary entry of the logits"
            )
        if self.inplace:
            for device, block in logits.device_blocks().items():
                if not getattr(getattr(block, "flags", None), "writeable", True):
                    raise ConfigError(
                        f"VocabParallelCrossEntropy(inplace=True) writes exp(Z - max) and then dZ into the "
                        f"logits, but the logits' block on device {device!r} is read-only (writeable=False); "
                        "expected writable logits: pass a writable copy, or use inplace=False"
                    )

    def _check_targets(self, logits: ShardedTensor, targets: Any) -> Blocks:
        """Targets as int64 on every device of the logits, checked against their shape and vocabulary."""
        targets = as_array_like(targets, "targets")
        if np.dtype(targets.dtype).kind not in "iu":
            raise ShapeError(f"targets must be integers, got dtype {targets.dtype}")
        if tuple(targets.shape) != logits.shape[:-1]:
            raise ShapeError(
                f"targets must have shape {logits.shape[:-1]} (the logits' without vocab), got "
                f"{tuple(targets.shape)}"
            )
        backend, vocab = logits.backend, logits.shape[-1]
        unsigned = np.dtype(targets.dtype).kind == "u"
        copies = collectives.broadcast(backend, targets, list(logits.device_blocks()), np.int64)
        first = next(iter(copies))
        bad = collectives.on_devices(
            backend, lambda t: self._first_bad(backend.xp, t, vocab, unsigned), copies, keys=[first]
        )
        found = collectives.to_host(backend, bad[first])  # one device-to-host copy per call
        if found[0]:
            value = int(found[1])
            if unsigned and value < 0:
                value += 2**64  # a uint64 target >= 2**63 reads as a negative int64: report what was passed
            raise IndexOutOfRangeError(
                f"target {value} out of range; expected 0 <= target < vocab={vocab} "
                f"or ignore_index={self.ignore_index}"
            )
        return copies

    def _first_bad(self, xp: Any, targets: Any, vocab: int, unsigned: bool = False) -> Any:
        """``[any bad, first bad value]`` of the int64 ``targets`` as one array.

        With ``unsigned`` (the caller's targets were unsigned), a negative value is a uint64 target
        ``>= 2**63`` that wrapped: always out of range, never ``ignore_index``.
        """
        targets = targets.reshape(-1)  # (N,), read only
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= vocab))
        if unsigned:
            bad |= targets < 0
        if bad.size == 0:
            return xp.zeros(2, dtype=np.int64)
        first = xp.argmax(bad)
        return xp.stack((bad[first].astype(np.int64), targets[first]))

    def _shards(self, logits: ShardedTensor, targets: Blocks, acc: Any) -> Blocks:
        """Per device: the logits' block as ``acc`` (padding at -inf), its class weights, targets, layout."""
        backend, layout = logits.backend, logits.layout
        weights = None
        if self.class_weight is not None:
            weights = collectives.scatter_blocks(backend, self.class_weight, 0, layout, acc)
        blocks = logits.device_blocks()
        prepare = partial(_prepare_shard, backend.xp, layout, acc, self.inplace)
        return collectives.on_devices(
            backend,
            prepare,
            blocks,
            targets,
            {d: d for d in blocks},
            {d: None if weights is None else weights[d] for d in blocks},
        )

    # ------------------------------------------------------------------ forward

    def forward(self, logits: ShardedTensor, targets: Any) -> float | Any:
        """The loss: a host float, or per-row losses ``targets.shape`` on worker 0's device for ``"none"``."""
        self._check_logits(logits)
        target_copies = self._check_targets(logits, targets)
        backend, comm, xp = logits.backend, logits.comm, logits.backend.xp
        acc = np.promote_types(logits.dtype, np.float32)
        shards = self._shards(logits, target_copies, acc)
        row_max = collectives.all_reduce_max(backend, {d: s["max"] for d, s in shards.items()}, comm)
        terms = collectives.on_devices(backend, partial(self._shard_terms, xp), shards, row_max)
        out = next(iter(shards))
        sums = collectives.all_reduce_sum(backend, {d: t["sum"] for d, t in terms.items()}, comm)
        reduced = {
            key: collectives.reduce_sum(backend, {d: t[key] for d, t in terms.items()}, out, comm)
            for key in ("z_t", "w_t", "wz")
            if terms[out][key] is not None
        }
        rows = collectives.on_devices(
            backend,
            partial(self._row_losses, xp, logits.shape[-1], acc, reduced),
            {out: sums[out]},
            {out: target_copies[out]},
        )[out]
        loss, denominator = self._reduce(backend, rows, out)
        self._keep(
            {
                "logits": logits,
                "terms": terms,
                "sums": sums,
                "rows": rows,
                "acc": acc,
                "denominator": denominator,
            }
        )
        return loss

    def _shard_terms(self, xp: Any, shard: dict[str, Any], m: Any) -> dict[str, Any]:
        """On one device: ``z = Z_d - m`` (in place where ``z`` may be written, else one pass into the
        device's one logits-sized array), then ``z`` becomes ``exp(z)`` in place; the row sums of it, and
        the target's ``z_t`` and ``w_t`` where this device owns the target, and ``sum_j w_j z_j``."""
        shard = dict(shard)
        z, w, owned, local = shard.pop("z"), shard["w"], shard["owned"], shard["local"]
        if shard["writable"]:
            z -= m[..., None]  # a masked copy, or the logits themselves (inplace)
        else:
            z = xp.subtract(z, m[..., None], dtype=m.dtype)  # the caller's logits, shifted into a new array
        if z.shape[-1]:
            z_t = xp.where(owned, xp.take_along_axis(z, local[..., None], axis=-1)[..., 0], 0)
            w_t = None if w is None else xp.where(owned, xp.take(w, local), 0)
        else:
            z_t = xp.zeros(z.shape[:-1], dtype=z.dtype)
            w_t = None if w is None else xp.zeros(z.shape[:-1], dtype=z.dtype)
        wz = None
        if self.label_smoothing:
            finite = z if shard["mask"] is None else xp.where(shard["mask"], z, 0)
            wz = (
                finite.sum(axis=-1) if w is None else matmul_vector(finite, w)
            )  # (..., V_d) @ (V_d,) -> (...)
        xp.exp(z, out=z)
        return {**shard, "exps": z, "sum": z.sum(axis=-1), "z_t": z_t, "w_t": w_t, "wz": wz}

    def _row_losses(self, xp: Any, vocab: int, acc: Any, reduced: dict[str, Any], sums: Any, targets: Any):
        """Per row on the output device: ``loss``, ``valid``, ``w_t`` (ones without weights)."""
        log_sum = xp.log(sums)
        valid = targets != self.ignore_index
        w_t = reduced.get("w_t", xp.ones(sums.shape, dtype=acc))
        w_t = xp.where(valid, w_t, 0)
        eps = self.label_smoothing
        loss = (1.0 - eps) * w_t * (log_sum - reduced["z_t"])  # -w_t log softmax(Z)_t
        if eps:
            total_weight = vocab if self.class_weight is None else float(self.class_weight.sum())
            loss += (eps / vocab) * (total_weight * log_sum - reduced["wz"])
        return {"loss": xp.where(valid, loss, 0), "valid": valid, "w_t": w_t, "denominator": w_t.sum()}

    def _reduce(self, backend: Any, rows: dict[str, Any], out: Hashable) -> tuple[float | Any, float]:
        """``(reduced loss, mean's denominator)``, read back with one device-to-host copy."""
        if self.reduction == "none":
            return rows["loss"], 1.0
        pair = collectives.on_devices(
            backend, lambda r: backend.xp.stack((r["loss"].sum(), r["denominator"])), {out: rows}
        )
        total, denominator = (float(v) for v in collectives.to_host(backend, pair[out]))
        if self.reduction == "sum":
            return total, 1.0
        return (total / denominator if denominator else float("nan")), denominator

    # ------------------------------------------------------------------ backward

    def _row_scale(
        self, backend: Any, grad_loss: Any, saved: dict[str, Any], out: Hashable, rows: tuple[int, ...]
    ) -> Any:
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
                raise ShapeError(
                    f"grad_loss must be a number for reduction={self.reduction!r}, got {grad_loss!r}"
                )
            grad = float(grad_loss)
            if self.reduction == "mean":
                grad = grad / saved["denominator"] if saved["denominator"] else 0.0
        xp = backend.xp
        return collectives.on_devices(
            backend, lambda r: xp.where(r["valid"], grad, acc.type(0)), {out: saved["rows"]}
        )[out]

    def backward(self, grad_loss: Any = 1.0) -> ShardedTensor:
        """``dZ`` as a ShardedTensor split like the logits, in the logits' dtype.

        ``grad_loss`` is the gradient of the reduced loss (a number), or for
        ``reduction="none"`` a number or an array of the per-row shape.
        Ignored rows get zero gradient (also when every row is ignored).
        A second backward after one forward raises.
        """
        if self._saved is None:
            raise TensorParallelError(
                "VocabParallelCrossEntropy.backward called before forward (or twice after one forward)"
            )
        saved = self._saved
        logits: ShardedTensor = saved["logits"]
        backend = logits.backend
        out = next(iter(saved["terms"]))
        scale = self._row_scale(backend, grad_loss, saved, out, logits.shape[:-1])
        self._take_saved()
        devices = list(saved["terms"])
        scales = collectives.broadcast(backend, scale, devices, saved["acc"])
        w_ts = collectives.broadcast(backend, saved["rows"]["w_t"], devices, saved["acc"])
        step = partial(self._shard_grad, backend.xp, logits.shape[-1], logits.dtype)
        grads = collectives.on_devices(backend, step, saved["terms"], saved["sums"], scales, w_ts)
        return ShardedTensor.from_blocks(grads, logits.axis, logits.layout, backend, logits.comm)

    def _shard_grad(
        self, xp: Any, vocab: int, dtype: Any, terms: dict[str, Any], s: Any, scale: Any, w_t: Any
    ) -> Any:
        """``dZ_d``, in place on the saved exps (see the module docstring for the formula): one pass
        that scales each row by its factor, the targets' entries, and (with label smoothing) two more."""
        eps = self.label_smoothing
        g = terms["exps"]
        total_weight = vocab if self.class_weight is None else float(self.class_weight.sum())
        factor = ((1.0 - eps) * w_t + eps * total_weight / vocab) / s  # softmax over the global vocabulary
        hit = (1.0 - eps) * w_t
        if not eps:  # the row's scale folds into the same pass
            factor *= scale
            hit *= scale
        g *= factor.astype(g.dtype, copy=False)[..., None]
        if g.shape[-1]:
            subtract_at_targets(xp, g, terms["local"], hit * terms["owned"])  # only at each row's target
        if eps:
            spread = terms["w"] if terms["w"] is not None else terms["mask"]
            g -= (eps / vocab) * (1.0 if spread is None else spread)
            g *= scale[..., None]
        return g.astype(dtype, copy=False)


def _check_weight(weight: Any) -> np.ndarray:
    w = as_array_like(weight, "class weight")
    if np.dtype(w.dtype).kind not in "iuf" or w.ndim != 1:
        raise ShapeError(
            f"class weight must be a 1-D array of real numbers, got shape {tuple(w.shape)} dtype {w.dtype}"
        )
    host = np.asarray(host_array(w), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(host))
    if bad.size:
        raise ShapeError(
            f"class weight must be finite; got {host[bad[0]]} at index {int(bad[0])} "
            f"({bad.size} non-finite of {host.size})"
        )
    return host


def _prepare_shard(
    xp: Any, layout: Any, acc: Any, inplace: bool, block: Any, t: Any, device: Hashable, w: Any
) -> dict[str, Any]:
    """One device's state: ``z`` (its logits, or with padding a copy in ``acc``; padded columns at
    -inf) and whether it is ``writable`` (a copy, or the logits with ``inplace``), its class weights
    ``w``, padding ``mask``, the row ``max`` (in ``acc``) and, for each row, whether it ``owned`` the
    target and where (``local``). Without ``inplace`` the caller's logits are only read."""
    mask = layout.logical_mask(xp, device)
    z, writable = block, inplace and block.dtype == acc
    if mask is not None:
        if not writable:
            z, writable = block.astype(acc), True  # the forward shifts it in place
        xp.copyto(z, -np.inf, where=~mask)  # padded columns: no probability
    owned, local = layout.owned_local(xp, t, device)
    if owned is None:  # this device holds the whole vocabulary: only ignored rows are not owned
        owned = (t >= 0) & (t < layout.total)
        local = xp.where(owned, t, 0)
    if z.shape[-1]:
        row_max = z.max(axis=-1).astype(acc, copy=False)
    else:
        row_max = xp.full(z.shape[:-1], -np.inf, dtype=acc)
    state = {"z": z, "writable": writable, "w": w, "mask": mask, "owned": owned, "local": local}
    return {**state, "max": row_max}


def subtract_at_targets(xp: Any, g: Any, local: Any, hit: Any) -> None:
    """``g[r, local[r]] -= hit[r]`` for every row ``r`` of ``g`` ``(..., V_d)``, written into ``g`` itself.

    ``local`` and ``hit`` have ``g``'s leading shape ``(...)``. The rows are indexed with an open
    mesh over the leading axes (``ix_``), not through a 2-D reshape: reshaping a strided ``g``
    (logits built from ``moveaxis`` views, or written in place with ``inplace=True``) makes a
    copy, and the subtraction would land in that copy. Each row is hit once, so ``-=`` is exact.
    """
    rows = xp.ix_(*(xp.arange(n) for n in g.shape[:-1]))  # broadcasts to (...): one index per row
    g[rows + (local,)] -= hit.astype(g.dtype, copy=False)  # (...) entries, one per row


def matmul_vector(x: Any, v: Any) -> Any:
    """``x @ v`` over the last axis: (..., n) @ (n,) -> (...)."""
    return (as_rows(x) @ v).reshape(x.shape[:-1])  # (N, n) @ (n,) -> (N,)
