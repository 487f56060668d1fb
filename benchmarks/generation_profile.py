"""Where a generation's time goes: one instrumented run of a side, split by kind, per phase.

Four kinds, the same on both sides:

=========  ====================================================  =====================================
kind       tp_gpu (``Function.apply``, outermost, inclusive)     transformers (module forward hooks)
=========  ====================================================  =====================================
GEMMs      ColumnLinear, RowLinear, ReplicatedLinearFunction,    ``nn.Linear``, GPT-2's ``Conv1D``
           TiedLogits (the projections, the MLP, the head)       (the projections, the MLP, the head)
attention  GroupedAttention, ApplyRotary, CoreAttention          ``*Attention`` modules less their
                                                                 GEMMs (scores, softmax, cache, rotary)
norms      LayerNormFunction, RMSNormFunction                    ``*Norm`` modules
other      the phase less the above: embedding, regions,         the same: embedding, residual adds,
           residual adds, activation, sampling, Python           activation, argmax, Python
=========  ====================================================  =====================================

tp_gpu's side is timed by replacing ``Function.apply`` for the run (the benchmark's own patch; nothing
in ``tp_gpu`` changes): a call made inside another Function's forward counts in the outer one (and is
counted in ``nested_calls``). transformers' by a pre- and a post-forward hook on each module of those
kinds, each module's time less that of the hooked modules inside it. The phases come from the side's
clock, whose laps also close the instrumented phase. The instruments cost time of their own (a few
microseconds a call), so the split is of the instrumented run, beside its own total. Of several
instrumented runs the fastest is kept (a shared machine slows some runs down).

transformers' decoding steps are also run under ``torch.profiler`` (CPU; the fastest of as many runs):
the operators with the most self time, per token, and the part of the phase spent in no operator
(Python, dispatch).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from tp_gpu.autograd import Function

from .phases import PhaseClock

KINDS = ("GEMMs", "attention", "norms", "other")
OURS_KIND = {
    "ColumnLinear": "GEMMs", "RowLinear": "GEMMs", "ReplicatedLinearFunction": "GEMMs", "TiedLogits": "GEMMs",
    "GroupedAttention": "attention", "ApplyRotary": "attention", "CoreAttention": "attention",
    "LayerNormFunction": "norms", "RMSNormFunction": "norms",
}  # fmt: skip
TOP_OPS = 12


def torch_kind(module: Any) -> str | None:
    """The kind of a transformers module that is hooked, or None (its time is its parent's, or other)."""
    name, where = type(module).__name__, type(module).__module__
    if name in ("Linear", "Conv1D"):
        return "GEMMs"
    if name.endswith("Attention"):
        return "attention"
    if "Norm" in name:
        return "norms"
    if where in ("transformers.activations", "torch.nn.modules.activation"):
        return "other"  # the activation, listed on its own
    return None


class ClassTimer:
    """Seconds and calls per class name, closed into a phase at each lap of the side's clock."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.nested: Counter[str] = Counter()
        self.phases: dict[str, dict[str, Any]] = {}

    def close(self, phase: str, lap_s: float) -> None:
        self.phases[phase] = {
            "seconds": lap_s, "by_class_s": dict(self.seconds), "calls": dict(self.calls),
            "nested_calls": dict(self.nested),
        }  # fmt: skip
        self.seconds.clear()
        self.calls.clear()
        self.nested.clear()


class LappingClock(PhaseClock):
    """A phase clock that also calls ``on_lap(name, seconds)`` at each lap."""

    def __init__(self, on_lap: Callable[[str, float], None]) -> None:
        super().__init__()
        self.on_lap = on_lap

    def lap(self, name: str) -> None:
        before = self.laps.get(name, 0.0)
        super().lap(name)
        self.on_lap(name, self.laps[name] - before)


def run_ours(side: Any, timer: ClassTimer) -> None:
    """``side.run()`` with every outermost ``Function.apply`` timed by its class."""
    original = Function.__dict__["apply"]
    apply = original.__func__
    depth = [0]

    def timed_apply(cls: type, *args: Any) -> Any:
        if depth[0]:
            timer.nested[cls.__name__] += 1
            return apply(cls, *args)
        depth[0] = 1
        start = time.perf_counter()
        try:
            return apply(cls, *args)
        finally:
            timer.seconds[cls.__name__] += time.perf_counter() - start
            timer.calls[cls.__name__] += 1
            depth[0] = 0

    Function.apply = classmethod(timed_apply)
    try:
        side.run()
    finally:
        Function.apply = original


def run_torch(side: Any, timer: ClassTimer) -> None:
    """``side.run()`` with each hooked module's forward timed, less the hooked modules inside it."""
    stack: list[list[float]] = []  # [start, seconds of hooked children]

    def pre(module: Any, args: Any) -> None:
        stack.append([time.perf_counter(), 0.0])

    def post(module: Any, args: Any, output: Any) -> None:
        start, children = stack.pop()
        elapsed = time.perf_counter() - start
        name = type(module).__name__
        timer.seconds[name] += elapsed - children
        timer.calls[name] += 1
        if stack:
            stack[-1][1] += elapsed

    handles = []
    for module in side.model.modules():
        if torch_kind(module) is not None:
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        side.run()
    finally:
        for handle in handles:
            handle.remove()


def kinds(phase: dict[str, Any], kind_of: Callable[[str], str]) -> dict[str, float]:
    """A phase's seconds per kind; ``other`` is the phase's time less the kinds timed."""
    out = dict.fromkeys(KINDS, 0.0)
    for name, seconds in phase["by_class_s"].items():
        out[kind_of(name)] += seconds
    out["other"] += phase["seconds"] - sum(out.values())
    return out


def profile_ops(side: Any, torch: Any) -> dict[str, Any]:
    """transformers' decoding steps under ``torch.profiler``: the top operators by self time (seconds
    over the phase), and the phase's seconds (the profiled run's)."""
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    laps: dict[str, float] = {}

    def on_lap(name: str, seconds: float) -> None:
        laps[name] = seconds
        if name == "prefill":
            profiler.start()
        elif name == "decode":
            profiler.stop()

    clock, side.clock = side.clock, LappingClock(on_lap)
    try:
        side.run()
    finally:
        side.clock = clock
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    top = [
        {"op": e.key, "calls": int(e.count), "self_s": e.self_cpu_time_total / 1e6} for e in events[:TOP_OPS]
    ]
    return {"decode_s": laps["decode"], "ops_self_s": self_total, "top": top}


def instrumented(side: Any, torch: Any | None) -> ClassTimer:
    """One run of ``side`` with its calls timed by class, phase by phase."""
    timer = ClassTimer()
    clock, side.clock = side.clock, LappingClock(timer.close)
    try:
        (run_ours if torch is None else run_torch)(side, timer)
    finally:
        side.clock = clock
    return timer


def breakdown(side: Any, torch: Any | None, runs: int = 1) -> dict[str, Any]:
    """The fastest of ``runs`` instrumented runs of ``side`` (tp_gpu's, or transformers' where ``torch``
    is given): per phase its seconds, each class's seconds and calls, and the seconds per kind; and
    transformers' top operators (the fastest of ``runs`` profiled runs too)."""
    timers = [instrumented(side, torch) for _ in range(runs)]
    timer = min(timers, key=lambda t: sum(p["seconds"] for p in t.phases.values()))
    kind_of: Callable[[str], str]
    if torch is None:
        kind_of = lambda name: OURS_KIND.get(name, "other")  # noqa: E731
    else:
        modules = {type(m).__name__: m for m in side.model.modules()}
        kind_of = lambda name: torch_kind(modules[name]) or "other"  # noqa: E731
    out: dict[str, Any] = {
        "runs": runs,
        "phases": {ph: dict(v, kinds_s=kinds(v, kind_of)) for ph, v in timer.phases.items()},
        "kind_of": {name: kind_of(name) for v in timer.phases.values() for name in v["by_class_s"]},
    }
    if torch is not None:
        out["decode_ops"] = min((profile_ops(side, torch) for _ in range(runs)), key=lambda o: o["decode_s"])
    return out
