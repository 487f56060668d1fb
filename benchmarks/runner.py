"""Running the cases: for each (layer, shape, dtype, mode), every worker count on the same data.

For each worker count the TP layer is built, TP, dense and torch are timed in the same shuffled
rounds, then one more run of TP and of dense is measured for memory and compared; a TP result
further from dense than rounding allows stops the run (:class:`ResultMismatch`).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tp_gpu import TensorParallelConfig

from . import harness, skeleton
from .cases import LayerSpec, Shape
from .comparison import Case, compare_rows, make_case
from .layer_report import make_record
from .report import Record

#: Forward + backward is skipped for outputs larger than this (it holds an output-sized gradient too).
BWD_MAX_OUTPUT_BYTES = 2 * 2**30


class ResultMismatch(RuntimeError):
    """TP and dense disagree by more than rounding: the layer is wrong, and its timing means nothing."""


class Progress:
    """A tqdm bar over the cases when tqdm imports, else one printed line per case."""

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="case")

    def tick(self, message: str) -> None:
        """One case done."""
        self.count += 1
        if self.bar is None:
            print(f"[{self.count}/{self.total}] {message}", flush=True)
        else:
            self.bar.set_description(message[:70])
            self.bar.update(1)

    def note(self, message: str) -> None:
        """A line that stays visible above the bar."""
        if self.bar is None:
            print(message, flush=True)
        else:
            self.bar.write(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Group:
    """One (layer kind, shape, dtype, mode): timed at every worker count on the same data."""

    spec: LayerSpec
    shape: Shape
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.spec.name} {self.spec.describe(self.shape)} {self.dtype} {self.mode}"

    def data(self) -> tuple:
        """``(x, dy)`` on the host: inputs (ids for the embedding) and, for forward + backward, dY."""
        rng = np.random.default_rng(0)
        x = self.spec.make_input(self.shape, self.dtype, rng)
        if self.mode != "fwd+bwd":
            return x, None
        dy_shape = (self.shape.batch, self.spec.out_features(self.shape))
        return x, rng.standard_normal(dy_shape, dtype=np.float32).astype(self.dtype)

    def describe_case(self, n_workers: int, devices: Sequence[Any]) -> dict[str, Any]:
        """The fields of a record that say what was run."""
        amount, unit = self.spec.work(self.shape, self.dtype, self.mode)
        return {
            "layer": self.spec.name, "shape": self.spec.describe(self.shape),
            "batch": self.shape.batch, "n_in": self.shape.n_in, "n_out": self.shape.n_out,
            "dtype": self.dtype, "mode": self.mode, "n_workers": n_workers,
            "devices": [str(d) for d in devices], "unit": unit, "work": amount,
            "output_bytes": self.spec.output_bytes(self.shape, self.dtype),
        }  # fmt: skip


def check(case: Case, group: Group, n_workers: int) -> dict[str, Any]:
    """One more TP and dense run, memory measured, TP (and torch) compared with dense."""
    backend = case.backend
    tp_peak, how, tp_out = harness.measure_peak(backend, case.tp)
    dense_peak, _, dense_out = harness.measure_peak(backend, case.dense, keep=case.keeps_dense())
    expected = case.expected(dense_out)
    terms = case.spec.terms(group.shape, group.mode)
    diff, allowed = compare_rows(case.result(tp_out), expected, backend, group.dtype, terms)
    del tp_out
    if not diff <= allowed:  # also NaN
        raise ResultMismatch(
            f"{group.label}, {n_workers} workers: TP and dense differ by up to {diff:.3g}, more than the "
            f"{allowed:.3g} rounding allows; the layer is wrong, so its timing is not reported"
        )
    torch_diff = None
    if case.torch is not None:
        torch_diff, _ = compare_rows(case.torch(), expected, backend, group.dtype, terms)
    return {
        "max_abs_diff_tp_dense": diff, "allowed_diff": allowed, "max_abs_diff_torch_dense": torch_diff,
        "tp_peak_bytes": tp_peak, "dense_peak_bytes": dense_peak, "memory_measure": how,
        "peak_rss_mib": harness.peak_rss_mib(),
    }  # fmt: skip


def drop_torch_if_broken(case: Case, progress: Progress, label: str) -> None:
    """Run torch once; where it raises (a dtype this torch build has no kernel for), time without it."""
    if case.torch is None:
        return
    try:
        case.torch()
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. no float16 kernel in this build
        progress.note(f"torch skipped for {label}: {type(exc).__name__}: {exc}")
        case.torch = None


def timer_for(backend: Any) -> harness.Once:
    """CUDA events over every device on cupy, else ``perf_counter`` around ``fn(); synchronize()``."""
    return (
        harness.cupy_timer(backend.devices)
        if backend.name == "cupy"
        else harness.cpu_timer(backend.synchronize)
    )


def run_group(group: Group, options: Any, torch: Any, progress: Progress) -> list[Record]:
    """Every worker count of ``options.workers`` for ``group``, dense and torch re-timed beside each."""
    spec, label = group.spec, group.label
    out_bytes = spec.output_bytes(group.shape, group.dtype)
    if group.mode == "fwd+bwd" and out_bytes > BWD_MAX_OUTPUT_BYTES:
        progress.note(
            f"skip: {label}: output of {out_bytes / 2**30:.1f} GiB; "
            f"forward + backward runs only below {BWD_MAX_OUTPUT_BYTES / 2**30:.0f} GiB"
        )
        for n in options.workers:
            progress.tick(f"{spec.name} workers={n}: skipped")
        return []
    data, backend = group.data(), None
    shared: dict[str, Any] = {}
    records: list[Record] = []
    for n in options.workers:  # any size splits over any worker count
        config = TensorParallelConfig(
            n_workers=n, backend=options.backend, devices=options.devices, dtype=group.dtype
        )
        case = make_case(spec, group.mode, spec.build(group.shape, config), data, shared, torch)
        drop_torch_if_broken(case, progress, label)
        timed = harness.time_with_retries(case.fns(), timer_for(case.backend), skeleton.timing(options))
        checks = check(case, group, n)
        devices = spec.parts(case.layer)[-1].devices
        records.append(make_record(group.describe_case(n, devices), timed, checks))
        progress.tick(f"{label} p={n}: TP/dense {records[-1]['ratio_tp_dense']:.2f}")
        backend = case.backend
        del case, timed
    del shared
    gc.collect()
    if backend is not None:
        harness.release_gpu_memory(backend)
    return records


def groups(options: Any, specs: dict[str, LayerSpec]) -> list[Group]:
    """Every (layer, shape, dtype, mode) selected, in that order."""
    return [
        Group(specs[kind], shape, dtype, mode)
        for kind in options.layers
        for shape in getattr(options, specs[kind].shape_option)
        for dtype in options.dtype
        for mode in options.mode
    ]
