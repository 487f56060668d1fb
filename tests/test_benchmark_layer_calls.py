"""The batch-1 layer-call benchmark (benchmarks/layer_calls.py): what it writes, and that its check
stops a side that disagrees. Nothing here tests a speed."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness, layer_calls  # noqa: E402

pytest.importorskip("torch")

TINY = ["--quick", "--hidden", "16", "--calls", "2", "--repeat", "3", "--warmup", "1", "--max-time", "0.01",
        "--retries", "0"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_machine_warm_up(monkeypatch):
    """No half second of busy loop per run, and no 50 ms of warm-up per function."""
    monkeypatch.setattr(harness, "warm_up_machine", lambda: None)
    monkeypatch.setattr(harness, "MIN_WARMUP_S", 0.0)


def test_every_case_mode_and_dtype_is_written_with_finite_times_and_ratios(tmp_path):
    """Each (case, mode, dtype) with its sides (no p=4 LayerNorm: it does not split), finite µs per call
    and tp / torch ratios, a target row per tp side, the table in the Markdown; --render redraws it."""
    assert layer_calls.main(TINY + ["--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("layer-calls-*-quick.json")
    data = json.loads(path.read_text())
    markdown = path.with_suffix(".md").read_text()
    keys = [(r["case"], r["mode"], r["dtype"]) for r in data["results"]]
    assert keys == [
        (c, m, d) for d in ("float32", "float64") for c in layer_calls.CASES for m in layer_calls.MODES
    ]
    assert data["machine"]["complete"] is True and "threadpools" in data["machine"]
    for r in data["results"]:
        tp = ["tp p=1"] if r["case"] == "layernorm" else ["tp p=1", "tp p=4"]
        assert list(r["sides"]) == tp + ["torch", "numpy"] == list(r["us_per_call"])
        assert all(len(s["times_s"]) >= 3 for s in r["sides"].values())
        assert all(math.isfinite(v) and v > 0 for v in r["us_per_call"].values())
        assert set(r["ratios"]) == set(tp) and all(math.isfinite(v) and v > 0 for v in r["ratios"].values())
        assert all(math.isfinite(e) for e in r["errors"].values())
        assert f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['us_per_call']['tp p=1']:.1f} |" in markdown
    assert len(data["targets"]) == sum(len(r["ratios"]) for r in data["results"])
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", "noisy"}
    assert "tp p=4 / torch" in markdown and "threadpoolctl" in markdown
    path.with_suffix(".md").unlink()
    assert layer_calls.main(["--render", str(path)]) == 0
    assert path.with_suffix(".md").read_text() == markdown


@pytest.mark.parametrize("mode", layer_calls.MODES)
@pytest.mark.parametrize("case", layer_calls.CASES)
def test_the_sides_agree_with_the_float64_reference(case, mode):
    """tp_gpu at p = 1 and 4, torch and the NumPy floor all give the reference (output or dX) in float64:
    three implementations of each layer agree before anything is timed."""
    torch = layer_calls.machine.import_torch()
    sides, reference, terms = layer_calls.case_sides(torch, case, mode, "float64", 16, [1, 4])
    errors = layer_calls.check(sides, reference, "float64", terms, case)
    assert set(errors) == set(sides) and max(errors.values()) < 1e-10


@pytest.mark.parametrize("wrong_side", ["tp", "torch"])
def test_a_side_that_disagrees_stops_the_run_before_timing(tmp_path, monkeypatch, wrong_side):
    """A tp_gpu side (or torch's) off by 1 % in its output: the run stops naming it, and writes nothing."""
    name = "tp_call" if wrong_side == "tp" else "torch_call"
    real = getattr(layer_calls, name)

    def off(*args):
        side = real(*args)
        return lambda: layer_calls.host(side()) * 1.01

    monkeypatch.setattr(layer_calls, name, off)
    timed = []
    monkeypatch.setattr(harness, "time_with_retries", lambda *a: timed.append(a))
    expected = "'tp p=1'" if wrong_side == "tp" else "'torch'"
    argv = TINY + ["--cases", "column", "--dtype", "float32", "--out", str(tmp_path)]
    with pytest.raises(layer_calls.SideDisagrees, match=f"column forward float32: side {expected} disagrees"):
        layer_calls.main(argv)
    assert timed == [] and not list(tmp_path.glob("*.json"))


def test_the_floor_is_the_math_it_states():
    """The NumPy LayerNorm's and attention's backward against central differences of their forward."""
    rng = np.random.default_rng(1)
    for case, hidden in (("layernorm", 8), ("attention", 8)):
        p = layer_calls.logical_params(case, hidden, rng)
        x = rng.standard_normal(layer_calls.shapes(case, hidden)[0])
        floor = layer_calls.FLOOR[case]
        dy = rng.standard_normal(floor(x, p).shape)
        dx = floor(x, p, dy)[0]
        numeric = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[i] = 1e-6
            numeric[i] = np.sum((floor(x + step, p) - floor(x - step, p)) * dy) / 2e-6
        np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-7, err_msg=case)


def test_the_linear_floor_takes_the_outer_product_for_one_row():
    """``dW = x^T dy`` (batch 1: the outer product, as a broadcast multiply), ``dX = dy W^T``."""
    rng = np.random.default_rng(2)
    p = layer_calls.logical_params("column", 8, rng)
    for rows in (1, 3):
        x, dy = rng.standard_normal((rows, 8)), rng.standard_normal((rows, 32))
        dx, dw, db = layer_calls.linear_np(x, p, dy)
        np.testing.assert_allclose(dw, np.einsum("ni,no->io", x, dy), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, np.einsum("no,io->ni", dy, p["w"]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(db, dy.sum(0), rtol=1e-12, atol=1e-12)
