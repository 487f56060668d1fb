"""The benchmark scripts: what they record is consistent, wrong layers stop them, --update and --render.

Speed is not tested here (benchmarks measure it); these tests run tiny shapes on
the simulated backend, with 3 devices and 1, 2 and 4 workers, so that both more
devices than workers and more workers than devices are placed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = load("bench_layers")
scaling = load("scaling_model")

DEVICES = 3
WORKERS = (1, 2, 4)
TINY = [
    "--backend", "simulated", "--devices", str(DEVICES), "--workers", *map(str, WORKERS),
    "--shapes", "5x8x12", "--embed-shapes", "10x16x6", "--dtype", "float64",
    "--no-torch", "--repeat", "3", "--warmup", "1", "--max-time", "0.05", "--min-time", "0", "--retries", "0",
]


@pytest.fixture(autouse=True)
def no_machine_warm_up(monkeypatch):
    monkeypatch.setattr(bench, "warm_up_machine", lambda: None)  # half a second of busy loop per run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One run of every layer and mode; returns (json path, its data)."""
    out = tmp_path_factory.mktemp("bench")
    saved = bench.warm_up_machine
    bench.warm_up_machine = lambda: None
    try:
        assert bench.main(TINY + ["--out", str(out)]) == 0
    finally:
        bench.warm_up_machine = saved
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_sweep_records_every_case_with_consistent_numbers(sweep):
    path, data = sweep
    records = data["results"]
    got = sorted((r["layer"], r["mode"], r["n_workers"]) for r in records)
    assert got == sorted((k, m, n) for k in bench.LAYERS for m in bench.MODES for n in WORKERS)
    assert data["machine"]["complete"] is True
    for r in records:
        where = f"{r['layer']} {r['mode']} p={r['n_workers']}"
        # Round-robin placement: worker i on device i mod 3.
        assert r["devices"] == [str(i % DEVICES) for i in range(r["n_workers"])], where
        assert len(r["tp_times_s"]) >= 3 and len(r["dense_times_s"]) >= 3, where
        # The reported numbers come from the raw times (the JSON keeps 4 significant digits).
        assert r["tp_median_s"] == pytest.approx(statistics.median(r["tp_times_s"]), rel=1e-3), where
        assert r["dense_median_s"] == pytest.approx(statistics.median(r["dense_times_s"]), rel=1e-3), where
        assert r["ratio_tp_dense"] == pytest.approx(r["tp_median_s"] / r["dense_median_s"], rel=2e-3), where
        assert r["tp_rate"] == pytest.approx(r["work"] / r["tp_median_s"], rel=2e-3), where
        # TP matched the dense float64 computation of its own logical weights.
        assert 0 <= r["max_abs_diff_tp_dense"] <= 1e-12, where
    markdown = path.with_suffix(".md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and " | float64 | " in line]
    assert len(rows) == len(records)


def test_work_counts_the_flops_and_bytes_each_case_does():
    shape = bench.Shape(5, 8, 12)
    assert bench.work("column", shape, "float32", "fwd") == (2 * 5 * 8 * 12 / 1e9, "GFLOP/s")
    assert bench.work("mlp", shape, "float32", "fwd+bwd") == (3 * 2 * (2 * 5 * 8 * 12) / 1e9, "GFLOP/s")
    assert bench.work("embedding", shape, "float64", "fwd") == (5 * 12 * 8 / 1e9, "GB/s")


@pytest.mark.parametrize("layer, mode", [("column", "fwd"), ("row", "fwd+bwd"), ("mlp", "fwd"), ("embedding", "fwd+bwd")])
def test_a_layer_that_disagrees_with_dense_stops_the_run(tmp_path, monkeypatch, layer, mode):
    if layer == "embedding":  # its table gradient does not depend on the table: break the layer's backward
        real_backward = bench.ParallelEmbedding.backward
        monkeypatch.setattr(bench.ParallelEmbedding, "backward", lambda self, dy: real_backward(self, dy * (1 + 1e-6)))
    else:  # dense gets weights 1e-6 away from the layer's own
        real = bench.dense_params
        monkeypatch.setattr(bench, "dense_params", lambda kind, tp: [(w + 1e-6, b) for w, b in real(kind, tp)])
    expected = rf"{layer} .* {re.escape(mode)}, 1 workers: TP and dense differ by up to"
    with pytest.raises(bench.ResultMismatch, match=expected):
        bench.main(TINY + ["--layers", layer, "--mode", mode, "--workers", "1", "--out", str(tmp_path)])


def test_tolerance_grows_with_the_terms_summed():
    shape = bench.Shape(1_000_000, 50_000, 1024)
    assert bench.tolerance("embedding", shape, "float32", "fwd") == pytest.approx(1e-5)
    assert bench.tolerance("embedding", shape, "float32", "fwd+bwd") == pytest.approx(1e-5 * 1000)
    assert bench.tolerance("row", bench.Shape(8, 4096, 1024), "float64", "fwd") == pytest.approx(1e-12 * 64)


def test_update_replaces_only_the_cases_re_timed(sweep, tmp_path):
    path, before = sweep
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".md"), copy.with_suffix(".md"))
    args = TINY + ["--layers", "row", "--mode", "fwd", "--workers", "2", "--update", str(copy), "--out", str(tmp_path / "unused")]
    assert bench.main(args) == 0
    after = json.loads(copy.read_text())
    assert len(after["results"]) == len(before["results"])
    key = ("row", 5, 8, 12, "float64", "fwd", 2)
    for old, new in zip(before["results"], after["results"]):
        if bench.case_key(old) == key:
            assert "rerun" in new and new["tp_times_s"] != old["tp_times_s"]
        else:
            assert new == old
    (rerun,) = after["machine"]["reruns"]
    assert rerun["replaced"] == ["row 5 8 12 float64 fwd 2"] and rerun["added"] == []
    assert copy.with_suffix(".md").read_text().count("| fwd *re-run* |") == 1
    assert not (tmp_path / "unused").exists()  # an update writes nothing else


def test_render_rewrites_the_same_markdown_from_the_json(sweep, tmp_path):
    path, _ = sweep
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    assert bench.main(["--render", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()


# --------------------------------------------------------------------------- scaling model


def test_scaling_model_moves_the_bytes_of_ring_collectives():
    B, n, s, bw = 256, 4096, 2, 450e9
    y = B * n * s
    assert scaling.comm("column", 1, B, n, n, s, bw, "ring") == 0.0
    assert scaling.comm("column", 4, B, n, n, s, bw, "ring") == pytest.approx(scaling.ALPHA + 3 / 4 * y / bw)
    assert scaling.comm("row", 8, B, n, n, s, bw, "ring") == pytest.approx(scaling.ALPHA + 2 * 7 / 8 * y / bw)
    # tp_gpu's single process: p - 1 whole partials reduced onto the output GPU, the input split from it.
    assert scaling.comm("row", 8, B, n, n, s, bw, "tp_gpu") == pytest.approx(2 * scaling.ALPHA + (7 / 8 * y + 7 * y) / bw)


def test_scaling_model_one_gpu_time_is_the_roofline():
    flops = scaling.H100_SXM["bf16"]["flops"]
    t = scaling.t_compute_1("column", 8, 4096, 4096, flops, 2)
    weight_bound = 2 * (4096 * 4096 + 2 * 8 * 4096) / scaling.H100_HBM  # batch 8: reading the weight dominates
    assert t == pytest.approx(weight_bound) and t > 2 * 8 * 4096 * 4096 / flops


def test_scaling_model_takes_one_gpu_times_from_a_benchmark_json(sweep, capsys):
    path, data = sweep
    measured = scaling.measured_dense(path)
    fwd = [r for r in data["results"] if r["layer"] == "row" and r["mode"] == "fwd"]
    assert measured[("row", 5, 8, 12, "float64")] == pytest.approx(statistics.median(r["dense_median_s"] for r in fwd))
    assert scaling.main(["--summary", "--precision", "bf16"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "layer" not in line]
    assert len(table) == len(scaling.LAYERS) * len(scaling.LINKS)
