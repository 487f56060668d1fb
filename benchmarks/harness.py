"""Timing and memory: interleaved shuffled rounds after warm-up, spread, retries, peak bytes, BLAS threads.

Nothing here knows about layers: it times and measures callables.

* CPU backends: ``time.perf_counter`` around ``fn(); backend.synchronize()``.
* CuPy: ``cupyx.profiler.benchmark(fn, n_repeat=1, devices=...)`` per run, CUDA events on every
  participating device, the slowest device deciding the run.

Either way the functions compared run in rounds, one run of each per round, in an order shuffled
every round, so that they see the same machine state and none always follows another.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .machine import openblas_function

#: A timed sequence stops after this many rounds, however fast each run is (keeps the JSON small).
MAX_RUNS = 100

#: Warm-up goes on for at least this many seconds (and at least ``warmup`` runs): on a small VM the
#: first BLAS call after an idle moment, or after another thread pool ran (torch's), can take 10x
#: longer while sleeping BLAS threads wake; warm-up keeps that out of the timed runs.
MIN_WARMUP_S = 0.05

#: Runs whose spread (interquartile range / median) exceeds this are disturbed: re-timed, and if the
#: best attempt still exceeds it, recorded as noisy rather than trusted. Sub-2 ms cases get 40 %.
SPREAD_LIMIT = 0.25
FAST_SPREAD_LIMIT = 0.40
FAST_S = 2e-3

Fn = Callable[[], Any]
Once = Callable[[Fn], float]  # runs a function once and returns its seconds


@dataclass(frozen=True)
class Timing:
    """How long and how often to time a comparison."""

    repeat: int = 20  # timed rounds at least (fewer when max_time runs out, never fewer than 3)
    warmup: int = 2  # untimed runs of each function first
    max_time: float = 10.0  # seconds after which a comparison stops (after 3 rounds)
    min_time: float = 0.3  # seconds a fast comparison keeps repeating
    retries: int = 2  # re-timings of a disturbed comparison
    seed: int = 0  # of the shuffled order of each round


@dataclass
class Timed:
    """The kept attempt's raw times per function, its spread and load, and every attempt."""

    times: dict[str, list[float]]
    spread: float
    load_1min: list[float]
    noisy: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)


def cpu_timer(sync: Callable[[], None]) -> Once:
    """Seconds of one ``fn(); sync()`` by ``time.perf_counter``."""

    def once(fn: Fn) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return once


def cupy_timer(devices: Sequence[Any]) -> Once:
    """Seconds of one ``fn()`` by CUDA events on every one of ``devices``, the slowest device deciding."""
    from cupyx.profiler import benchmark

    def once(fn: Fn) -> float:
        result = benchmark(fn, n_warmup=0, n_repeat=1, devices=tuple(devices))
        return float(np.max(result.gpu_times))  # (n_devices, 1)

    return once


def spread(times: Sequence[float]) -> float:
    """Relative spread of ``times``: interquartile range / median (range / median below 5 runs)."""
    median = statistics.median(times)
    if median <= 0:
        return 0.0
    if len(times) < 5:
        return (max(times) - min(times)) / median
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / median


def spread_limit(times: dict[str, list[float]]) -> float:
    """The largest spread trusted for these runs: :data:`FAST_SPREAD_LIMIT` below 2 ms, else 25 %."""
    fast = min(statistics.median(t) for t in times.values()) < FAST_S
    return FAST_SPREAD_LIMIT if fast else SPREAD_LIMIT


def warm_up(fns: dict[str, Fn], once: Once, timing: Timing) -> None:
    """``timing.warmup`` untimed runs of each function, more until ``MIN_WARMUP_S`` seconds are spent,
    fewer once they have taken ``max_time / 4``."""
    for fn in fns.values():
        spent, runs = 0.0, 0
        while runs < MAX_RUNS and (runs < timing.warmup or spent < MIN_WARMUP_S):
            if runs and spent > timing.max_time / 4:
                break
            spent += once(fn)
            runs += 1


def time_interleaved(
    fns: dict[str, Fn], once: Once, timing: Timing, rng: random.Random
) -> dict[str, list[float]]:
    """Seconds of each timed run of each of ``fns``: rounds of one run each, in a shuffled order.

    After :func:`warm_up`, rounds go on until every function has ``repeat`` runs and ``min_time``
    seconds have passed, or, after at least 3 rounds, ``max_time`` seconds have, or ``MAX_RUNS``
    rounds. The cycle garbage collector is off meanwhile, as in ``timeit``.
    """
    warm_up(fns, once, timing)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    started = time.perf_counter()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rounds in range(1, MAX_RUNS + 1):
            rng.shuffle(names)
            for name in names:
                times[name].append(once(fns[name]))
            elapsed = time.perf_counter() - started
            if (rounds >= 3 and elapsed >= timing.max_time) or (
                rounds >= timing.repeat and elapsed >= timing.min_time
            ):
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_with_retries(fns: dict[str, Fn], once: Once, timing: Timing) -> Timed:
    """Time ``fns`` interleaved; re-time up to ``timing.retries`` times while disturbed.

    Disturbed: the runs of a function spread more than :func:`spread_limit`, or the 1-minute load
    average exceeds cores + 1 (this benchmark's BLAS threads count as load). The attempt with the
    smallest spread is kept; ``noisy`` says that even it spreads too much to trust.
    """
    rng = random.Random(timing.seed)
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + max(0, timing.retries)):
        load_before = os.getloadavg()[0]
        times = time_interleaved(fns, once, timing, rng)
        load_after = os.getloadavg()[0]
        worst = max(spread(t) for t in times.values())
        attempts.append({"times_s": times, "spread": worst, "load_1min": [load_before, load_after]})
        busy = max(load_before, load_after) > (os.cpu_count() or 1) + 1.0
        if worst <= spread_limit(times) and not busy:
            break
    best = min(attempts, key=lambda a: a["spread"])
    for a in attempts:
        a["kept"] = a is best
    noisy = best["spread"] > spread_limit(best["times_s"])
    return Timed(best["times_s"], best["spread"], best["load_1min"], noisy, attempts)


# --------------------------------------------------------------------------- memory


def _cupy_peak(backend: Any, fn: Fn) -> tuple[int | None, str, Any]:
    """Peak bytes CuPy's pools hand out while ``fn()`` runs and its result is held (a MemoryHook);
    falls back to the change of ``used_bytes()`` (what stays allocated) if the hook fails."""
    cupy = backend.xp
    try:
        from cupy.cuda import memory_hook

        class PeakHook(memory_hook.MemoryHook):  # type: ignore[misc]
            name = "tp_gpu_bench_peak"

            def __init__(self) -> None:
                self.current = 0
                self.peak = 0

            def malloc_postprocess(self, **kwargs: Any) -> None:
                self.current += int(kwargs.get("mem_size", 0))
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kwargs: Any) -> None:
                self.current -= int(kwargs.get("mem_size", 0))

        hook = PeakHook()
        with hook:
            out = fn()
            backend.synchronize()
        return hook.peak, "cupy memory-pool peak (MemoryHook)", out
    except (ImportError, AttributeError, TypeError, RuntimeError):  # another interface: count what stays
        pool = cupy.get_default_memory_pool()

        def used() -> int:
            total = 0
            for d in backend.devices:
                with cupy.cuda.Device(d):
                    total += pool.used_bytes()
            return total

        before = used()
        out = fn()
        backend.synchronize()
        return used() - before, "cupy memory-pool used_bytes delta", out


def measure_peak(backend: Any, fn: Fn, keep: bool = True) -> tuple[int | None, str, Any]:
    """``(bytes, how, result)``: the peak memory allocated while ``fn()`` runs, its result held, above
    what was allocated at the start; the result is None unless ``keep``.

    NumPy (and the simulated backend's arrays) report their data buffers to ``tracemalloc``, so on CPU
    backends this is the most array memory alive at once during the call; on CuPy, pool allocations.
    """
    gc.collect(0)
    if backend.name == "cupy":
        peak, how, out = _cupy_peak(backend, fn)
        return peak, how, out if keep else None
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not tracing:
            tracemalloc.stop()
    return peak - base, "tracemalloc peak", out if keep else None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def release_gpu_memory(backend: Any) -> None:
    """Return the cached blocks of CuPy's memory pool on every device (a no-op elsewhere)."""
    if backend.name == "cupy":
        pool = backend.xp.get_default_memory_pool()
        for d in backend.devices:
            with backend.xp.cuda.Device(d):  # the pool acts on the current device
                pool.free_all_blocks()


# --------------------------------------------------------------------------- the machine while running


def warm_up_machine(seconds: float = 0.5) -> None:
    """Keep the CPU and BLAS busy for ``seconds`` before timing anything: the first tens of
    milliseconds of a process run several times slower (BLAS threads starting, clocks ramping up)."""
    a = np.random.default_rng(0).standard_normal((512, 512))
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a  # (512, 512) @ (512, 512)


def set_blas_threads(n: int) -> bool:
    """Set NumPy's OpenBLAS thread count to ``n`` through its C API; False where it cannot be found."""
    setter = openblas_function("set_num_threads")
    if setter is None:
        return False
    import ctypes

    setter(ctypes.c_int(n))
    return True


def pin_threads(threads: int | None, torch: Any, on_gpu: bool) -> str | None:
    """Pin NumPy's BLAS to ``threads`` (None: leave it), tp_gpu's own host kernels (the embedding
    backward's scatter, ``$TP_GPU_NUM_THREADS``) too, and CPU torch to as many threads as that BLAS.

    Returns a note when BLAS cannot be pinned.
    """
    note = None
    if threads is not None:
        os.environ["TP_GPU_NUM_THREADS"] = str(threads)
    if threads is not None and not set_blas_threads(threads):
        note = (
            f"note: could not set NumPy's BLAS threads to {threads} (not OpenBLAS?); "
            "set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before starting instead"
        )
    if torch is not None and not on_gpu:
        getter = openblas_function("get_num_threads")
        blas_threads = int(getter()) if getter is not None else None
        torch.set_num_threads(threads or blas_threads or os.cpu_count() or 1)
    return note
