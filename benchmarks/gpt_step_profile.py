"""Where a GPT training step's time goes: one instrumented step of a side, split by op kind, per phase.

The phases are the step's own (:data:`PHASES`: zero_grad, forward, loss, backward, clip, optimizer),
lapped by the side's clock. Within forward, loss and backward the time is split by op kind:

===========  =========================================  ===============================================
kind         tp_gpu (Function classes)                  torch (profiler events, outermost match)
===========  =========================================  ===============================================
GEMMs        ColumnLinear, RowLinear, TiedLogits, ...   ``aten::mm/addmm/matmul/bmm/linear``, Mm...Backward
attention    CoreAttention, GroupedAttention, ...       ``scaled_dot_product_attention`` and its backward
norms        LayerNormFunction, RMSNormFunction         ``layer_norm`` and its backward
activations  ApplyActivation, SwiGLU                    ``gelu`` and its backward
loss         CrossEntropy                               ``cross_entropy``, ``log_softmax``, ``nll_loss``
embedding    EmbeddingLookup, PlaceHostArray            ``aten::index``/``embedding``, ``wpe``'s slice,
                                                        and their backward
dropout      DropoutFunction                            (the twin's mask is ``mul``/``div``: elementwise)
elementwise  Elementwise, Total                         ``add``/``mul``/``div``/``sub``/``sum`` (bias
                                                        and residual adds, the bias gradients)
regions      CopyToRegion, ReduceFromRegion, ...        (none: torch has no tensor-parallel regions)
other        the phase less the kinds: the tape's own   the phase less the kinds: dispatch, autograd
             bookkeeping (nodes, gradient sums) and     bookkeeping (AccumulateGrad, views), the twin's
             the Python between the calls               NumPy dropout mask, Python
===========  =========================================  ===============================================

zero_grad, clip and optimizer are kinds of their own: the whole phase (:data:`PHASE_KINDS`).

tp_gpu's side is timed by replacing ``Function.apply`` and the engine's ``_node_backward`` for the
run (the benchmark's own patch; nothing in ``tp_gpu`` changes): forward by the class of the
outermost ``apply``, backward by the class of each node; a call made inside another one counts in
the outer one (``nested_calls``). torch's side runs under ``torch.profiler`` (CPU) with a
``record_function`` scope per phase; an event whose name matches a kind counts with its inclusive
time, and the events inside it are not looked at. Both instruments cost time of their own, so the
split is of the instrumented run, beside its own total; of several runs the fastest is kept.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import tp_gpu.autograd as autograd

from .generation_profile import ClassTimer, LappingClock
from .phases import PhaseClock

PHASES = ("zero_grad", "forward", "loss", "backward", "clip", "optimizer")
#: Phases that are a kind of their own, whatever runs in them.
PHASE_KINDS = {"zero_grad": "zero_grad", "clip": "clipping", "optimizer": "optimizer"}
OP_KINDS = (
    "GEMMs", "attention", "norms", "activations", "loss", "embedding", "dropout", "elementwise", "regions",
)  # fmt: skip
KINDS = (*OP_KINDS, "zero_grad", "clipping", "optimizer", "other")
UNMAPPED = "unmapped"

TP_KIND = {
    "ColumnLinear": "GEMMs", "RowLinear": "GEMMs", "TiedLogits": "GEMMs", "ReplicatedLinearFunction": "GEMMs",
    "CoreAttention": "attention", "GroupedAttention": "attention", "ApplyRotary": "attention",
    "LayerNormFunction": "norms", "RMSNormFunction": "norms",
    "ApplyActivation": "activations", "SwiGLU": "activations",
    "CrossEntropy": "loss",
    "EmbeddingLookup": "embedding", "PlaceHostArray": "embedding",
    "DropoutFunction": "dropout",
    "Elementwise": "elementwise", "Total": "elementwise",
    "Reshape": "elementwise", "Transpose": "elementwise", "GetItem": "elementwise",
    "Concatenate": "elementwise",
    "CopyToRegion": "regions", "ReduceFromRegion": "regions", "ScatterToRegion": "regions",
    "GatherFromRegion": "regions", "Relayout": "regions", "GatherFromSequenceParallelRegion": "regions",
    "ReduceScatterToSequenceParallelRegion": "regions",
}  # fmt: skip

#: torch event names (lower case) -> kind: the first rule whose any fragment is in the name decides.
TORCH_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("", ("autograd::engine::evaluate_function",)),  # the engine's wrapper: look inside it
    ("-", ("accumulategrad",)),  # autograd's bookkeeping: other, not looked inside
    ("attention", ("scaled_dot_product", "scaleddotproduct")),
    ("norms", ("layer_norm", "layernorm")),
    ("activations", ("gelu",)),
    ("loss", ("cross_entropy", "log_softmax", "logsoftmax", "nll_loss", "nllloss")),
    ("embedding", ("embedding", "aten::index", "indexbackward", "aten::slice", "slicebackward")),
    ("GEMMs", ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::linear", "mmbackward")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::sum")),
)


def tp_kind(name: str) -> str:
    """The kind of a tp_gpu Function class, or :data:`UNMAPPED`."""
    return TP_KIND.get(name, UNMAPPED)


def torch_kind(name: str) -> str | None:
    """The kind of a torch profiler event: a kind, ``"-"`` (other, not looked inside), or ``""`` /
    None (look inside it)."""
    low = name.lower()
    for kind, fragments in TORCH_RULES:
        if any(f in low for f in fragments):
            return kind
    return None


def phase_kinds(phase: str, seconds: float, by_kind: dict[str, float]) -> dict[str, float]:
    """Seconds per kind of one phase; ``other`` is the phase less the kinds (a phase of its own kind
    is that kind whole)."""
    out = dict.fromkeys(KINDS, 0.0)
    if phase in PHASE_KINDS:
        out[PHASE_KINDS[phase]] = seconds
        return out
    for kind, s in by_kind.items():
        out[kind] = out.get(kind, 0.0) + s
    out["other"] = seconds - sum(s for k, s in out.items() if k != "other")
    return out


# --------------------------------------------------------------------------- tp_gpu's side


@contextlib.contextmanager
def patched_tape(timer: ClassTimer) -> Iterator[None]:
    """``Function.apply`` (outermost calls) and ``_node_backward`` (each node) timed by class."""
    original_apply = autograd.Function.__dict__["apply"]
    apply = original_apply.__func__
    original_node = autograd._node_backward
    depth = [0]

    def timed(name: str, call: Callable[[], Any]) -> Any:
        if depth[0]:
            timer.nested[name] += 1
            return call()
        depth[0] = 1
        start = time.perf_counter()
        try:
            return call()
        finally:
            timer.seconds[name] += time.perf_counter() - start
            timer.calls[name] += 1
            depth[0] = 0

    def timed_apply(cls: type, *args: Any) -> Any:
        return timed(cls.__name__, lambda: apply(cls, *args))

    def timed_node(node: Any, outputs: Any) -> Any:
        return timed(node.function.__name__, lambda: original_node(node, outputs))

    autograd.Function.apply = classmethod(timed_apply)
    autograd._node_backward = timed_node
    try:
        yield
    finally:
        autograd.Function.apply = original_apply
        autograd._node_backward = original_node


def tp_breakdown(side: Any) -> dict[str, Any]:
    """One instrumented step of a tp_gpu side: per phase its seconds, each class's seconds and calls,
    and the seconds per kind."""
    timer = ClassTimer()
    clock, side.clock = side.clock, LappingClock(timer.close)
    try:
        with patched_tape(timer):
            side.run()
    finally:
        side.clock = clock
    phases = {}
    for ph in PHASES:
        entry = timer.phases[ph]
        by_kind: dict[str, float] = {}
        for name, s in entry["by_class_s"].items():
            by_kind[tp_kind(name)] = by_kind.get(tp_kind(name), 0.0) + s
        phases[ph] = dict(entry, kinds_s=phase_kinds(ph, entry["seconds"], by_kind))
    seen = {name for entry in phases.values() for name in entry["by_class_s"]}
    return {"phases": phases, "kind_of": {name: tp_kind(name) for name in sorted(seen)}}


# --------------------------------------------------------------------------- torch's side


def _torch_kinds(event: Any, out: dict[str, float], names: dict[str, str]) -> None:
    """Add ``event``'s (or, where it matches no kind, its children's) inclusive seconds to ``out``."""
    kind = torch_kind(event.name)
    if kind == "-":
        return
    if kind:
        out[kind] = out.get(kind, 0.0) + event.cpu_time_total / 1e6
        names[event.name] = kind
        return
    for child in event.cpu_children:
        _torch_kinds(child, out, names)


def torch_breakdown(side: Any, torch: Any) -> dict[str, Any]:
    """One step of the torch side under ``torch.profiler``, a ``record_function`` scope per phase:
    per phase its seconds (the side's clock), the seconds of each matched op and per kind."""
    clock, side.clock = side.clock, PhaseClock()
    side.scope = lambda name: torch.profiler.record_function(f"phase:{name}")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            side.run()
        laps = dict(side.clock.laps)
    finally:
        side.clock, side.scope = clock, None
    roots = {e.name.removeprefix("phase:"): e for e in prof.events() if e.name.startswith("phase:")}
    phases, kind_of = {}, {}
    for ph in PHASES:
        by_kind: dict[str, float] = {}
        names: dict[str, str] = {}
        for child in roots[ph].cpu_children if ph not in PHASE_KINDS else ():
            _torch_kinds(child, by_kind, names)
        kind_of.update(names)
        kinds = phase_kinds(ph, laps[ph], by_kind)
        phases[ph] = {"seconds": laps[ph], "by_kind_s": by_kind, "kinds_s": kinds}
    return {"phases": phases, "kind_of": dict(sorted(kind_of.items()))}


def breakdown(side: Any, torch: Any | None, runs: int) -> dict[str, Any]:
    """The fastest of ``runs`` instrumented steps of ``side`` (tp_gpu's, or torch's where ``torch`` is
    given), the cycle collector off as in the timed runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        found = [tp_breakdown(side) if torch is None else torch_breakdown(side, torch) for _ in range(runs)]
    finally:
        if enabled:
            gc.enable()
    best = min(found, key=lambda b: sum(p["seconds"] for p in b["phases"].values()))
    return dict(best, runs=runs)


def kind_totals(profile: dict[str, Any]) -> dict[str, float]:
    """Seconds per kind over the whole instrumented step."""
    out = dict.fromkeys(KINDS, 0.0)
    for entry in profile["phases"].values():
        for kind, s in entry["kinds_s"].items():
            out[kind] = out.get(kind, 0.0) + s
    return out
