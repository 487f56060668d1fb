"""The training-step benchmark (every phase recorded, a wrong TP step stops it) and the kernels it
made fast (Adam and SGD in cache-sized pieces, the sparse embedding backward, the loss's
memory). Speed itself is not tested here; tiny shapes, a few rounds."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives beside tp_gpu in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import harness, step_case, step_micro, step_report, training_step  # noqa: E402
from tp_gpu import (  # noqa: E402
    SGD,
    Adam,
    ColumnParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    optim,
)
from tp_gpu.backends import get_backend  # noqa: E402
from tp_gpu.layers.loss_functions import CrossEntropy  # noqa: E402

WORKERS = (1, 2, 4)
TINY = [
    "--shape", "12x16x6x8", "--workers", *map(str, WORKERS), "--dtype", "float64", "--threads", "1",
    "--adam-sets", "tiny", "--embed-ids", "8", "30", "--embed-table", "16x6",
    "--repeat", "3", "--warmup", "1", "--max-time", "0.05", "--retries", "0",
]  # fmt: skip


@pytest.fixture(autouse=True)
def quick_harness(monkeypatch):
    """No busy loop before timing, no 50 ms of warm-up per function, and a tiny Adam set."""
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "1")  # --threads sets it; restored after each test
    monkeypatch.setattr(harness, "warm_up_machine", lambda: None)
    monkeypatch.setattr(harness, "MIN_WARMUP_S", 0.0)
    tiny = ("a 5->7->5 MLP", lambda c: [step_micro.ParallelMLP(5, 7, 5, c)])
    monkeypatch.setitem(step_micro.ADAM_SETS, "tiny", tiny)


@pytest.fixture(scope="module")
def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture
def run(tmp_path, monkeypatch, torch_or_none):
    """The tiny run (with torch where it imports); returns its JSON data and folder."""
    extra = [] if torch_or_none is not None else ["--no-torch"]
    with monkeypatch.context() as patch:
        patch.setattr(step_report.REPORT, "plots", lambda records, stem: [])  # drawn by the --render test
        assert training_step.main(TINY + extra + ["--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text()), path


def test_every_side_and_phase_is_recorded(run, torch_or_none):
    data, _ = run
    (step,) = [r for r in data["results"] if r["case"] == "training step"]
    expected = ["dense"] + (["torch"] if torch_or_none is not None else []) + [f"tp p={n}" for n in WORKERS]
    expected.append(step_case.KEPT)  # the loss in its default mode, at the fewest workers
    assert list(step["sides"]) == expected
    for name, side in step["sides"].items():
        assert len(side["times_s"]) >= 3, name
        assert list(side["phases_s"]) == list(step_case.PHASES), name
        for phase, times in side["phases_s"].items():
            assert len(times) == len(side["times_s"]) and all(t >= 0 for t in times), (name, phase)
        # The phases add up to the step (the clock's laps run back to back inside the timed call).
        for k, total in enumerate(side["times_s"]):
            parts = sum(times[k] for times in side["phases_s"].values())
            assert parts <= total * 1.001 + 1e-6 and parts >= 0.5 * total, (name, k)
    errors = step["check"]["errors"]
    tps = [f"tp p={n}" for n in WORKERS] + [step_case.KEPT]
    assert all(errors[name]["error"] <= step["check"]["allowed_relative_error"] for name in tps)


def test_targets_and_micro_benchmarks_are_recorded(run, torch_or_none):
    data, path = run
    kinds = [r["case"] for r in data["results"]]
    assert kinds == ["training step", "adam", "embedding backward", "embedding backward"]
    targets = {t["target"].split(" <=")[0] for t in data["targets"]}
    assert {"step", "loss bwd", "Adam"} <= targets
    assert ("embedding bwd" in targets) == (torch_or_none is not None)
    adam = data["results"][1]
    assert {"tp_gpu Adam", "numpy in place"} <= set(adam["sides"])
    embedding = data["results"][2]
    assert {"tp_gpu kernel", "tp_gpu layer", "np.add.at", "sort + reduceat", "bincount per column"} <= set(
        embedding["sides"]
    )
    md = path.with_suffix(".md").read_text()
    assert "## Speed targets" in md and "### Training step" in md and "| tp p=4 |" in md


def test_render_redraws_from_the_json(run):
    pytest.importorskip("matplotlib")
    data, path = run
    path.with_suffix(".md").unlink()
    assert training_step.main(["--render", str(path)]) == 0
    assert "### Adam" in path.with_suffix(".md").read_text()
    assert path.with_name(path.stem + "-phases.png").stat().st_size > 1000


def test_a_wrong_tp_step_stops_the_run_before_timing(tmp_path, monkeypatch):
    real = CrossEntropy.backward

    def wrong_backward(ctx, grad_loss):
        dz, *rest = real(ctx, grad_loss)
        return (dz * 1.01, *rest)

    def no_timing(*args, **kwargs):
        raise AssertionError("a wrong step must not be timed")

    monkeypatch.setattr(CrossEntropy, "backward", staticmethod(wrong_backward))
    monkeypatch.setattr(harness, "time_with_retries", no_timing)
    with pytest.raises(step_case.StepMismatch, match="tp p=1: grads:"):
        training_step.main(TINY + ["--no-torch", "--parts", "step", "--out", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_sides_share_the_weight_arrays():
    shape = step_case.StepShape(6, 10, 4, 8)
    sides, weights = step_case.build_sides(shape, "float32", [1, 2], torch=None)
    for name in ("tp p=1", "tp p=2"):
        for key, p in sides[name].params.items():
            assert p.blocks["cpu"] is weights[key], (name, key)
    assert all(sides["dense"].w[k] is weights[k] for k in weights)


# --------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_update_in_pieces_equals_whole_arrays(monkeypatch, dtype):
    rng = np.random.default_rng(0)
    w, g = (rng.standard_normal(1000).astype(dtype) for _ in range(2))
    whole = [w.copy(), g, np.zeros_like(w), np.zeros_like(w)]
    pieces = [w.copy(), g, np.zeros_like(w), np.zeros_like(w)]
    for step in (1, 2, 3):
        monkeypatch.setattr(optim, "HOST_PIECE_BYTES", 10**9)
        optim.adam_update(*whole, step, 1e-3, (0.9, 0.999), 1e-8, np)
        monkeypatch.setattr(optim, "HOST_PIECE_BYTES", 64 * np.dtype(dtype).itemsize + 8)  # ragged pieces
        optim.adam_update(*pieces, step, 1e-3, (0.9, 0.999), 1e-8, np)
    for a, b in zip(whole, pieces):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [lambda ps: Adam(ps, lr=0.01), lambda ps: SGD(ps, lr=0.1, momentum=0.9)])
def test_optimizers_in_pieces_match_whole_arrays(monkeypatch, make):
    """The optimizers over real parameters, updated in tiny pieces, equal the whole-array updates."""
    results = []
    for piece_bytes in (10**9, 40):
        monkeypatch.setattr(optim, "HOST_PIECE_BYTES", piece_bytes)
        layer = ColumnParallelLinear(
            7, 12, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), seed=1
        )
        opt = make(layer.parameters())
        x = np.random.default_rng(0).standard_normal((5, 7))
        for _ in range(3):
            opt.zero_grad()
            layer(x).backward(np.ones((5, 12)))
            opt.step()
        results.append(layer.full_weight())
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("n", [300, 3000])  # below and above SMALL_SCATTER_ELEMENTS / 5 (np.add.at, SciPy)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_host_scatter_add_rows_sums_like_add_at(n, masked, dtype):
    rng = np.random.default_rng(1)
    index = rng.integers(-3, 40, size=n)  # many repeats; out-of-range ids stand for other devices'
    mask = (index >= 0) & (index < 30) if masked else None
    if not masked:
        index = np.clip(index, 0, 29)
    rows = rng.standard_normal((n, 5)).astype(dtype)
    got = get_backend("numpy").scatter_add_rows((30, 5), index, rows, mask)
    keep = slice(None) if mask is None else mask
    expected = np.zeros((30, 5), dtype)
    np.add.at(expected, index[keep], rows[keep])
    assert got.shape == (30, 5) and got.dtype == dtype and got.flags.c_contiguous
    if dtype == np.float16:  # the sorting path (SciPy has no float16 products): sums of ~100 float16 terms
        exact = np.zeros((30, 5))
        np.add.at(exact, index[keep], rows[keep].astype(np.float64))
        np.testing.assert_allclose(got, exact, atol=0.25)
    else:  # in the order of k, as np.add.at: bit for bit
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("threads", [2, 3, 8])
@pytest.mark.parametrize("masked", [False, True])
def test_threaded_host_scatter_is_the_single_threaded_one(monkeypatch, threads, masked):
    """Split over threads by id ranges (skewed ids: most land in a few rows), the sums are the same,
    bit for bit, as on one thread and as ``np.add.at``."""
    from tp_gpu.backends import base

    rng = np.random.default_rng(4)
    index = np.minimum(rng.zipf(1.3, size=5000) - 1, 59)  # 0 most often, a long tail up to 59
    mask = rng.random(5000) < 0.7 if masked else None
    rows = rng.standard_normal((5000, 4)).astype(np.float32)
    backend = get_backend("numpy")
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "1")
    single = backend.scatter_add_rows((60, 4), index, rows, mask)
    monkeypatch.setenv("TP_GPU_NUM_THREADS", str(threads))
    monkeypatch.setattr(base, "SCATTER_ELEMENTS_PER_THREAD", 100)
    threaded = backend.scatter_add_rows((60, 4), index, rows, mask)
    keep = slice(None) if mask is None else mask
    expected = np.zeros((60, 4), np.float32)
    np.add.at(expected, index[keep], rows[keep])
    np.testing.assert_array_equal(single, expected)
    np.testing.assert_array_equal(threaded, expected)


def test_host_threads_reads_the_environment(monkeypatch):
    from tp_gpu.backends.base import host_threads

    monkeypatch.delenv("TP_GPU_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert host_threads() == 3
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "5")
    assert host_threads() == 5
    monkeypatch.setenv("TP_GPU_NUM_THREADS", "zero")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert host_threads() >= 1


def test_host_scatter_add_rows_edge_cases():
    backend = get_backend("numpy")
    assert backend.scatter_add_rows((0, 3), np.zeros(0, np.int64), np.zeros((0, 3))).shape == (0, 3)
    none = backend.scatter_add_rows((4, 3), np.array([1, 2]), np.ones((2, 3)), np.array([False, False]))
    np.testing.assert_array_equal(none, np.zeros((4, 3)))


@pytest.mark.parametrize("n_workers", [1, 4])
def test_loss_allocates_no_more_than_one_logits_buffer(n_workers):
    """Forward: one shifted copy of the float32 logits (none in float64); backward: in place on it."""
    config = TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype="float32")
    rng = np.random.default_rng(0)
    rows, vocab = 256, 4000
    layout = ColumnParallelLinear(3, vocab, config).layout  # the head's split of the vocabulary
    logits_host = rng.standard_normal((rows, vocab), dtype=np.float32)
    logits = ShardedTensor.from_blocks(
        {"cpu": logits_host}, -1, layout, get_backend("numpy")
    ).requires_grad_()
    targets = rng.integers(0, vocab, size=rows)
    loss_fn = VocabParallelCrossEntropy()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss = loss_fn(logits, targets)
        forward_peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        loss.backward()
        backward_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert forward_peak <= 1.1 * logits_host.nbytes
    assert backward_peak <= 0.1 * logits_host.nbytes
    assert logits.grad is not None and logits.grad.dtype == np.float32
