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

The loss is a :class:`~tp_gpu.Tensor` on the tape: ``loss = loss_fn(logits,
targets); loss.backward()`` gives the logits (and whatever produced them)
their gradient.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import numpy as np

from .. import collectives
from ..backends.base import host_array
from ..collectives import Blocks
from ..device_checks import DeferredCheck, defer, lives_on_device
from ..errors import ConfigError, IndexOutOfRangeError, ShapeError
from ..module import Module
from ..placements import Dense, Split
from ..tensor import Tensor
from .base import as_array_like
from .loss_functions import CrossEntropy, CrossEntropyOptions, LogitsWorkspace

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
    of its logits for backward, written in one pass from them (none when
    nothing is recorded: logits that need no gradient, or ``tp_gpu.no_grad()``),
    and the caller's logits are never modified. When recorded, that array is the device's
    buffer in :attr:`workspace`, kept between calls and reused while its
    shape, dtype and device stay the same and no live loss or held ``dZ``
    still uses it (then a fresh one is allocated for that call), so a step
    allocates no logits-sized array; the module holds it between steps,
    ``loss_fn.workspace.clear()`` releases it, and ``loss_fn.workspace = None``
    allocates a fresh one every call instead. The steps and the backward
    live in :mod:`tp_gpu.layers.loss_functions`.
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
        #: The kept-logits path's logits-sized buffer per device, reused from one call to the next
        #: (None: a fresh array every call).
        self.workspace: LogitsWorkspace | None = LogitsWorkspace()

    def extra_repr(self) -> str:
        weighted = ", weight=..." if self.class_weight is not None else ""
        return (
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"reduction={self.reduction!r}{weighted}" + (", inplace=True" if self.inplace else "")
        )

    # ------------------------------------------------------------------ inputs

    def _check_logits(self, logits: Any) -> None:
        placement = getattr(logits, "placement", None)
        if not isinstance(logits, Tensor) or not isinstance(placement, Split):
            got = type(logits).__name__ if placement is None else f"a tensor placed {placement!r}"
            raise ShapeError(
                f"VocabParallelCrossEntropy expects logits as a ShardedTensor split on the vocab axis, "
                f"got {got}"
            )
        if logits.ndim < 1 or placement.axis != logits.ndim - 1:
            raise ShapeError(
                f"logits must be split on the last (vocab) axis {logits.ndim - 1}, got axis {placement.axis}"
            )
        if self.class_weight is not None and self.class_weight.shape != (logits.shape[-1],):
            raise ShapeError(
                f"class weight has shape {self.class_weight.shape}; expected ({logits.shape[-1]},), one per "
                "vocabulary entry of the logits"
            )
        if self.inplace:
            for device, block in logits.blocks.items():
                if not getattr(getattr(block, "flags", None), "writeable", True):
                    raise ConfigError(
                        f"VocabParallelCrossEntropy(inplace=True) writes exp(Z - max) and then dZ into the "
                        f"logits, but the logits' block on device {device!r} is read-only (writeable=False); "
                        "expected writable logits: pass a writable copy, or use inplace=False"
                    )

    def _check_targets(self, logits: Tensor, targets: Any) -> tuple[Blocks, DeferredCheck | None]:
        """Targets as int64 on every device of the logits, checked against their shape and vocabulary.

        Host targets are range-checked on the host, before anything is computed. Targets that live
        on a device are checked there: the returned check is read at the next synchronisation point.
        """
        if isinstance(targets, Tensor) and isinstance(targets.placement, Dense):
            targets = targets.blocks[targets.placement.device]
        targets = as_array_like(targets, "targets")
        if np.dtype(targets.dtype).kind not in "iu":
            raise ShapeError(f"targets must be integers, got dtype {targets.dtype}")
        if tuple(targets.shape) != logits.shape[:-1]:
            raise ShapeError(
                f"targets must have shape {logits.shape[:-1]} (the logits' without vocab), got "
                f"{tuple(targets.shape)}"
            )
        backend, vocab = logits.backend, logits.shape[-1]
        assert backend is not None
        unsigned = np.dtype(targets.dtype).kind == "u"
        judge = partial(self._judge, vocab, unsigned)
        on_device = lives_on_device(backend, targets)
        if not on_device:
            host = np.asarray(host_array(targets)).astype(np.int64)  # uint64 >= 2**63 wraps: see unsigned
            error = judge(self._first_bad(np, host, vocab, unsigned))
            if error is not None:
                raise error
        copies = collectives.broadcast(backend, targets, list(logits.blocks), np.int64)
        check = None
        if on_device:
            first = next(iter(copies))
            bad = collectives.on_devices(
                backend, lambda t: self._first_bad(backend.xp, t, vocab, unsigned), copies, keys=[first]
            )
            check = defer(DeferredCheck(backend, bad[first], judge))
        return copies, check

    def _judge(self, vocab: int, unsigned: bool, found: np.ndarray) -> IndexOutOfRangeError | None:
        """The error that ``[n bad, first bad value]`` of the int64 targets shows, or None."""
        if not found[0]:
            return None
        value = int(found[1])
        if unsigned and value < 0:
            value += 2**64  # a uint64 target >= 2**63 reads as a negative int64: report what was passed
        return IndexOutOfRangeError(
            f"target {value} out of range; expected 0 <= target < vocab={vocab} "
            f"or ignore_index={self.ignore_index}"
        )

    def _first_bad(self, xp: Any, targets: Any, vocab: int, unsigned: bool = False) -> Any:
        """``[n bad, first bad value]`` of the int64 ``targets`` as one array.

        With ``unsigned`` (the caller's targets were unsigned), a negative value is a uint64 target
        ``>= 2**63`` that wrapped: always out of range, never ``ignore_index``.
        """
        targets = targets.reshape(-1)  # (N,), read only
        bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= vocab))
        if unsigned:
            bad |= targets < 0
        if bad.size == 0:
            return xp.zeros(2, dtype=np.int64)
        first = xp.argmax(bad)  # a 0-d array: taken on the device, never read back to index
        return xp.stack((bad.sum().astype(np.int64), xp.take(targets, first)))

    # ------------------------------------------------------------------ forward

    def forward(self, logits: Tensor, targets: Any) -> Tensor:
        """The loss of ``logits`` ``(..., V)`` split on the vocabulary for integer ``targets`` ``(...)``.

        A ``Dense`` tensor on the logits' first device (worker 0's): 0-d for
        ``"mean"`` and ``"sum"`` (``float(loss)`` reads it), ``targets.shape``
        for ``"none"``. ``loss.backward(grad)`` (``grad`` of the loss's shape;
        omitted for a 0-d loss) gives the logits their gradient ``dZ``, split
        like them, in their dtype; ignored rows get zero (also when every row
        is ignored). Nothing is read back to the host.

        Everything is checked first. Host targets (NumPy, lists) are
        range-checked on the host before anything is computed. Targets that
        live on a device (CuPy, simulated) are checked there, without a
        device-to-host copy: a bad target contributes no ``z_t`` and reads
        nothing out of bounds, and IndexOutOfRangeError, naming it, is raised
        at the next synchronisation point: when the loss is brought to the
        host (``float(loss)``), at the start of ``loss.backward()``, or at
        this loss's backward (see :mod:`tp_gpu.device_checks`).
        """
        self._check_logits(logits)
        target_copies, check = self._check_targets(logits, targets)
        options = CrossEntropyOptions(
            self.ignore_index, self.label_smoothing, self.reduction, self.inplace, self.class_weight
        )
        return CrossEntropy.apply(logits, target_copies, options, check, self.workspace)


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
