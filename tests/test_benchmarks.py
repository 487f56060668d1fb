"""The benchmark package: what it records is consistent, wrong layers stop it, --update and --render.

Speed is not tested here (benchmarks measure it); these tests run tiny shapes on
the simulated backend, with 3 devices and 1, 2 and 4 workers, so that both more
devices than workers and more workers than devices are placed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives beside tp_gpu in the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import (  # noqa: E402
    bench_encode,
    bench_layers,
    cases,
    comparison,
    harness,
    layer_report,
    plots,
    runner,
    scaling_model,
    skeleton,
    tape_overhead,
)
from tp_gpu import TensorParallelConfig  # noqa: E402
from tp_gpu.layers.embedding_functions import EmbeddingLookup  # noqa: E402
from tp_gpu.testing import tolerance  # noqa: E402

DEVICES = 3
WORKERS = (1, 2, 4)
TINY = [
    "--backend", "simulated", "--devices", str(DEVICES), "--workers", *map(str, WORKERS),
    "--shapes", "5x8x12", "--embed-shapes", "10x16x6", "--dtype", "float64",
    "--no-torch", "--repeat", "3", "--warmup", "1", "--max-time", "0.05", "--min-time", "0", "--retries", "0",
]  # fmt: skip


def quick_harness(patch: pytest.MonkeyPatch) -> None:
    """No half second of busy loop per run, and no 50 ms of warm-up per function (the tests time nothing)."""
    patch.setattr(harness, "warm_up_machine", lambda: None)
    patch.setattr(harness, "MIN_WARMUP_S", 0.0)


@pytest.fixture(autouse=True)
def no_machine_warm_up(monkeypatch):
    quick_harness(monkeypatch)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One run of every layer and mode; returns (json path, its data)."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        quick_harness(patch)
        # Drawn once, by the plotting test.
        patch.setattr(layer_report.REPORT, "plots", lambda records, stem: [])
        assert bench_layers.main(TINY + ["--out", str(out)]) == 0
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_sweep_records_every_case_with_consistent_numbers(sweep):
    path, data = sweep
    records = data["results"]
    got = sorted((r["layer"], r["mode"], r["n_workers"]) for r in records)
    assert got == sorted((k, m, n) for k in cases.LAYERS for m in cases.MODES for n in WORKERS)
    assert data["machine"]["complete"] is True
    for r in records:
        where = f"{r['layer']} {r['mode']} p={r['n_workers']}"
        # Round-robin placement: worker i on device i mod 3.
        assert r["devices"] == [str(i % DEVICES) for i in range(r["n_workers"])], where
        assert len(r["tp_times_s"]) >= 3 and len(r["dense_times_s"]) == len(r["tp_times_s"]), where
        # The reported numbers come from the raw times (the JSON keeps 4 significant digits).
        assert r["tp_median_s"] == pytest.approx(statistics.median(r["tp_times_s"]), rel=1e-3), where
        assert r["dense_median_s"] == pytest.approx(statistics.median(r["dense_times_s"]), rel=1e-3), where
        assert r["ratio_tp_dense"] == pytest.approx(r["tp_median_s"] / r["dense_median_s"], rel=2e-3), where
        assert r["tp_rate"] == pytest.approx(r["work"] / r["tp_median_s"], rel=2e-3), where
        assert r["spread"] == pytest.approx(
            max(harness.spread(r[f"{k}_times_s"]) for k in ("tp", "dense")), rel=2e-2, abs=1e-3
        ), where
        assert r["torch_times_s"] is None and r["ratio_tp_torch"] is None, where  # --no-torch
        # TP matched the dense float64 computation of its own logical weights.
        assert 0 <= r["max_abs_diff_tp_dense"] <= r["allowed_diff"] <= 1e-10, where
    markdown = path.with_suffix(".md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and " | float64 | " in line]
    assert len(rows) == len(records)
    assert "BLAS core type" in markdown and "shuffled order" in markdown and "blas_env" in data["machine"]
    assert set(data["machine"]["blas_env"]) >= {
        "OPENBLAS_CORETYPE",
        "OPENBLAS_NUM_THREADS",
        "OMP_NUM_THREADS",
    }


def test_torch_is_timed_in_the_same_rounds_and_agrees_with_dense(tmp_path):
    pytest.importorskip("torch")
    args = TINY[TINY.index("--shapes") :]
    args.remove("--no-torch")
    args += ["--backend", "numpy", "--workers", "1", "--layers", "mlp", "embedding", "--mode", "fwd+bwd"]
    args += ["--out", str(tmp_path)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layer_report.REPORT, "plots", lambda records, stem: [])
        assert bench_layers.main(args) == 0
    (path,) = tmp_path.glob("*.json")
    for r in json.loads(path.read_text())["results"]:
        where = f"{r['layer']} {r['mode']} p={r['n_workers']}"
        assert len(r["torch_times_s"]) == len(r["tp_times_s"]) == len(r["dense_times_s"]), where
        assert r["ratio_tp_torch"] == pytest.approx(r["tp_median_s"] / r["torch_median_s"], rel=2e-3), where
        assert r["max_abs_diff_torch_dense"] <= r["allowed_diff"], where


def test_work_counts_the_flops_and_bytes_each_case_does():
    shape = cases.Shape(5, 8, 12)
    specs = cases.SPECS
    assert specs["column"].work(shape, "float32", "fwd") == (2 * 5 * 8 * 12 / 1e9, "GFLOP/s")
    assert specs["mlp"].work(shape, "float32", "fwd+bwd") == (3 * 2 * (2 * 5 * 8 * 12) / 1e9, "GFLOP/s")
    assert specs["embedding"].work(shape, "float64", "fwd") == (5 * 12 * 8 / 1e9, "GB/s")


@pytest.mark.parametrize(
    "layer, mode", [("column", "fwd"), ("row", "fwd+bwd"), ("mlp", "fwd"), ("embedding", "fwd+bwd")]
)
def test_a_layer_that_disagrees_with_dense_stops_the_run(tmp_path, monkeypatch, layer, mode):
    if layer == "embedding":  # its table gradient does not depend on the table: break its tape backward
        real_backward = EmbeddingLookup.backward
        monkeypatch.setattr(
            EmbeddingLookup, "backward", staticmethod(lambda ctx, dy: real_backward(ctx, dy * (1 + 1e-6)))
        )
    else:  # dense gets weights 1e-6 away from the layer's own
        real = comparison.dense_weights
        monkeypatch.setattr(comparison, "dense_weights", lambda *a: [w + 1e-6 for w in real(*a)])
    expected = rf"{layer} .* {re.escape(mode)}, 1 workers: TP and dense differ by up to"
    with pytest.raises(runner.ResultMismatch, match=expected):
        bench_layers.main(
            TINY + ["--layers", layer, "--mode", mode, "--workers", "1", "--out", str(tmp_path)]
        )
    assert not list(tmp_path.glob("*.json"))  # nothing timed, nothing written


def test_tolerance_comes_from_the_library_table_and_grows_with_the_terms_summed():
    big = cases.Shape(1_000_000, 50_000, 1024)
    embedding, row = cases.SPECS["embedding"], cases.SPECS["row"]
    assert tolerance("float32", embedding.terms(big, "fwd")) == pytest.approx(1e-5)
    assert tolerance("float32", embedding.terms(big, "fwd+bwd")) == pytest.approx(1e-5 * 1000)
    assert tolerance("float64", row.terms(cases.Shape(8, 4096, 1024), "fwd")) == pytest.approx(1e-12 * 64)


@pytest.mark.parametrize(
    "backend, devices, workers, own",
    [("numpy", None, 4, True), ("simulated", 3, 1, True), ("simulated", 3, 2, False)],
)
def test_dense_computes_with_the_layers_own_arrays_where_it_holds_them_whole(backend, devices, workers, own):
    spec, shape = cases.SPECS["column"], cases.Shape(4, 6, 8)
    config = TensorParallelConfig(n_workers=workers, backend=backend, devices=devices, dtype="float64")
    layer, shared = spec.build(shape, config), {}
    weights = comparison.dense_weights(spec, layer, shared)
    for got, logical in zip(weights, spec.logical_params(layer)):
        np.testing.assert_array_equal(np.asarray(got), logical)
    blocks = dict(layer.named_parameters())["weight"].blocks.values()
    assert any(np.shares_memory(np.asarray(weights[0]), np.asarray(b)) for b in blocks) == own
    if not own:  # one copy for every worker count of the group
        assert comparison.dense_weights(spec, spec.build(shape, config), shared) is weights


def test_dense_adds_the_bias_in_place():
    spec = cases.SPECS["column"]
    layer = spec.build(
        cases.Shape(64, 32, 256), TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64")
    )
    case = comparison.make_case(spec, "fwd", layer, (np.ones((64, 32)), None), {}, None)
    peak, _, out = harness.measure_peak(case.backend, case.dense)
    assert out.nbytes <= peak < 2 * out.nbytes  # x @ W + b would hold a second output-sized temporary


def test_timing_shuffles_the_order_within_each_round():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    timing = harness.Timing(repeat=30, warmup=1, max_time=10, min_time=0)
    harness.time_interleaved(fns, lambda fn: fn() or 1e-3, timing, random.Random(0))
    rounds = [tuple(order[i : i + 3]) for i in range(len(order) - 90, len(order), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # one run of each per round
    assert len(set(rounds)) > 1  # in more than one order


def test_a_case_whose_runs_spread_too_much_is_flagged_noisy_not_met():
    records = [
        {"layer": "column", "mode": "fwd", "dtype": "float32", "batch": 8, "n_in": 1024, "n_out": 1024,
         "n_workers": n, "ratio_tp_dense": 1.1, "noisy": n == 2, "extra_peak_over_output": None}
        for n in (1, 2)
    ]  # fmt: skip
    (row,) = layer_report.target_rows(records)
    assert row["status"] == "noisy" and row["noisy_workers"] == [2]
    assert "noisy: re-run" in layer_report.targets_markdown([row], [1, 2])[-1]
    seconds = iter([1.0, 1.0, 1.0, 5.0, 1.0, 9.0] * 50)
    timed = harness.time_with_retries(
        {"a": lambda: None}, lambda fn: next(seconds), harness.Timing(5, 1, 10, 0, 0)
    )
    assert timed.noisy and timed.spread > harness.SPREAD_LIMIT


def test_update_replaces_only_the_cases_re_timed(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(layer_report.REPORT, "plots", lambda records, stem: [])
    path, before = sweep
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    shutil.copy(path.with_suffix(".md"), copy.with_suffix(".md"))
    args = TINY + ["--layers", "row", "--mode", "fwd", "--workers", "2", "--update", str(copy)]
    assert bench_layers.main(args + ["--out", str(tmp_path / "unused")]) == 0
    after = json.loads(copy.read_text())
    assert len(after["results"]) == len(before["results"])
    key = ("row", 5, 8, 12, "float64", "fwd", 2)
    for old, new in zip(before["results"], after["results"]):
        if layer_report.case_key(old) == key:
            assert "rerun" in new and new["tp_times_s"] != old["tp_times_s"]
        else:
            assert new == old
    (rerun,) = after["machine"]["reruns"]
    assert rerun["replaced"] == ["row 5 8 12 float64 fwd 2"] and rerun["added"] == []
    assert copy.with_suffix(".md").read_text().count("| fwd *re-run* |") == 1
    assert not (tmp_path / "unused").exists()  # an update writes nothing else


def test_render_rewrites_the_same_markdown_from_the_json(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(layer_report.REPORT, "plots", lambda records, stem: [])
    path, _ = sweep
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    assert bench_layers.main(["--render", str(copy)]) == 0
    assert copy.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()


def test_one_plotting_function_draws_both_plots(sweep, tmp_path):
    pytest.importorskip("matplotlib")
    _, data = sweep
    records = [r for r in data["results"] if r["layer"] == "row"]  # one layer: a small figure
    paths = plots.write_plots(records, tmp_path / "run")
    assert [p.name for p in paths] == ["run-ratio.png", "run-rate.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_an_existing_result_is_not_overwritten_without_force(sweep, capsys):
    path, _ = sweep
    before = path.read_text()
    assert bench_layers.main(TINY + ["--layers", "row", "--mode", "fwd", "--out", str(path.parent)]) == 2
    assert "--force" in capsys.readouterr().err and path.read_text() == before
    assert bench_layers.PROGRAM.parse([]).out == skeleton.LOCAL_RESULTS
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(skeleton.LOCAL_RESULTS / "x.json")], check=False
    )
    assert ignored.returncode == 0  # the default folder is not committed


def test_the_package_and_the_script_start():
    for command in (
        ["-m", "benchmarks", "--help"],
        ["benchmarks/bench_layers.py", "--help"],
        ["-m", "benchmarks.training_step", "--help"],
        ["benchmarks/bench_encode.py", "--help"],
        ["-m", "benchmarks.tape_overhead", "--help"],
    ):
        done = subprocess.run(
            [sys.executable, *command], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and "--render" in done.stdout, done.stderr


def test_the_encode_benchmark_times_its_contenders_on_the_skeleton(tmp_path, monkeypatch):
    """Fake encoders (the model is not needed): checked, timed in shared rounds, targets, --render."""

    def encoder(scale):
        return lambda sentences: np.full((len(sentences), 4), scale)

    fakes = {bench_encode.ST: encoder(1.0), "tp_gpu p=1": encoder(1.0), "tp_gpu p=4": encoder(1.0 + 1e-6)}
    monkeypatch.setattr(bench_encode, "contenders", lambda model_dir, workers: fakes)
    monkeypatch.setattr(bench_encode, "token_lengths", lambda model_dir: [5, 88])
    monkeypatch.setattr(bench_encode.REPORT, "plots", lambda records, stem: [])
    argv = ["--threads", "1", "--workers", "1", "4", "--repeats", "3", "--retries", "0", "--min-time", "0"]
    assert bench_encode.main(argv + ["--model-dir", str(tmp_path), "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-encode-t1-*.json")
    data = json.loads(path.read_text())
    (record,) = data["results"]
    assert list(record["sides"]) == list(fakes)
    assert all(len(side["times_s"]) == 3 for side in record["sides"].values())
    assert record["agreement"]["tp_gpu p=4"] == pytest.approx(1e-6)
    assert [t["target"] for t in data["targets"]] == [
        "p=1 time <= 0.9x sentence-transformers",
        "p=4 time <= 1.3x p=1",
    ]
    markdown = path.with_suffix(".md").read_text()
    assert "## Speed targets" in markdown and "| tp_gpu p=4 |" in markdown
    path.with_suffix(".md").unlink()
    assert bench_encode.main(["--render", str(path)]) == 0
    assert path.with_suffix(".md").read_text() == markdown
    fakes["tp_gpu p=4"] = encoder(1.1)  # a contender that disagrees stops the run
    with pytest.raises(SystemExit, match="tp_gpu p=4 disagrees"):
        bench_encode.main(argv + ["--model-dir", str(tmp_path), "--out", str(tmp_path / "wrong")])
    assert not (tmp_path / "wrong").exists()


def test_the_tape_overhead_benchmark_writes_every_side_and_derived_cost(tmp_path):
    """--quick into tmp_path: each side of both cases and each derived cost in the JSON and the Markdown,
    every side's time positive (its speed is not tested); --render redraws the same Markdown."""
    assert tape_overhead.main(["--quick", "--ops", "20", "--retries", "0", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("tape-overhead-*-quick.json")
    data = json.loads(path.read_text())
    markdown = path.with_suffix(".md").read_text()
    sides = {"chain": ["numpy", "no_grad", "recorded", "recorded+backward"],
             "column": ["no_grad", "recorded", "recorded+backward"]}  # fmt: skip
    assert [r["case"] for r in data["results"]] == list(sides) and data["machine"]["complete"] is True
    for r in data["results"]:
        assert list(r["sides"]) == list(r["us_per_unit"]) == sides[r["case"]]
        for name, side in r["sides"].items():
            assert len(side["times_s"]) >= 5 and all(t > 0 for t in side["times_s"])
            assert side["median_s"] > 0 and r["us_per_unit"][name] > 0
            assert f"| {r['case']} | {name} | {r['us_per_unit'][name]:.2f} / {r['unit']} |" in markdown
        assert set(r["derived_us"]) == {"recording", "backward"}
        for name, value in r["derived_us"].items():
            assert np.isfinite(value) and f"| {r['case']} | {name} per " in markdown
    path.with_suffix(".md").unlink()
    assert tape_overhead.main(["--render", str(path)]) == 0
    assert path.with_suffix(".md").read_text() == markdown


# --------------------------------------------------------------------------- scaling model


def test_scaling_model_moves_the_bytes_of_ring_collectives():
    B, n, s, bw = 256, 4096, 2, 450e9
    y = B * n * s
    comm = scaling_model.comm
    assert comm("column", 1, B, n, n, s, bw, "ring") == 0.0
    assert comm("column", 4, B, n, n, s, bw, "ring") == pytest.approx(scaling_model.ALPHA + 3 / 4 * y / bw)
    assert comm("row", 8, B, n, n, s, bw, "ring") == pytest.approx(scaling_model.ALPHA + 2 * 7 / 8 * y / bw)
    # tp_gpu's single process: p - 1 whole partials reduced onto the output GPU, the input split from it.
    tp_gpu_row = comm("row", 8, B, n, n, s, bw, "tp_gpu")
    assert tp_gpu_row == pytest.approx(2 * scaling_model.ALPHA + (7 / 8 * y + 7 * y) / bw)


def test_scaling_model_one_gpu_time_is_the_roofline():
    flops = scaling_model.H100_SXM["bf16"]["flops"]
    t = scaling_model.t_compute_1("column", 8, 4096, 4096, flops, 2)
    weight_bound = (
        2 * (4096 * 4096 + 2 * 8 * 4096) / scaling_model.H100_HBM
    )  # batch 8: reading the weight dominates
    assert t == pytest.approx(weight_bound) and t > 2 * 8 * 4096 * 4096 / flops


def test_scaling_model_takes_one_gpu_times_from_a_benchmark_json(sweep, capsys):
    path, data = sweep
    measured = scaling_model.measured_dense(path)
    fwd = [r for r in data["results"] if r["layer"] == "row" and r["mode"] == "fwd"]
    assert measured[("row", 5, 8, 12, "float64")] == pytest.approx(
        statistics.median(r["dense_median_s"] for r in fwd)
    )
    assert scaling_model.main(["--summary", "--precision", "bf16"]) == 0
    table = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "layer" not in line
    ]
    assert len(table) == len(scaling_model.LAYERS) * len(scaling_model.LINKS)
