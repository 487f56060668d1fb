"""The GPT-step benchmark: every side checked and timed, and its profile adds up.

Speed is not tested here: the run is tiny (float64, 1 and 2 workers, 3 rounds) and checks what is
recorded: files, finite times, the first-step loss check, the profile's kinds summing to each
phase's time, and a kind for every tp_gpu Function class the step used.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives beside tp_gpu in the checkout
    sys.path.insert(0, str(ROOT))

torch = pytest.importorskip("torch")

from benchmarks import gpt_step, harness  # noqa: E402
from benchmarks.gpt_step_profile import KINDS, PHASES, UNMAPPED, breakdown  # noqa: E402

TINY = [
    "--quick", "--dtype", "float64", "--workers", "1", "2", "--repeat", "3", "--warmup", "1",
    "--max-time", "0.5", "--retries", "0", "--profile-runs", "1",
]  # fmt: skip
SIDES = ["tp p=1", "tp p=2", "torch"]


@pytest.fixture(autouse=True)
def no_machine_warm_up(monkeypatch):
    """No half second of busy loop, no 50 ms of warm-up per side: these tests time nothing."""
    monkeypatch.setattr(harness, "warm_up_machine", lambda: None)
    monkeypatch.setattr(harness, "MIN_WARMUP_S", 0.0)


def test_the_run_writes_every_side_checked_timed_and_profiled(tmp_path):
    assert gpt_step.main(TINY + ["--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpt-step-*.json")
    assert path.with_suffix(".md").exists()
    data = json.loads(path.read_text())
    (record,) = data["results"]
    assert list(record["sides"]) == SIDES
    for side in record["sides"].values():
        assert len(side["times_s"]) >= 3 and all(math.isfinite(t) and t > 0 for t in side["times_s"])
        assert set(side["phase_median_s"]) == set(PHASES)
    check = record["check"]
    assert check["rtol"] == 1e-10 and set(check["relative_errors"]) == {"tp p=1", "tp p=2"}
    assert all(e <= 1e-10 for e in check["relative_errors"].values())
    assert [t["ratio"] for t in data["targets"]] == ["tp p=1 / torch", "tp p=2 / tp p=1"]
    for name in SIDES:  # the stored profile keeps 4 digits: its kinds add up to that precision
        for entry in record["profile"][name]["phases"].values():
            assert sum(entry["kinds_s"].values()) == pytest.approx(entry["seconds"], rel=1e-3, abs=1e-6)
    md = path.with_suffix(".md").read_text()
    assert "## Speed targets" in md and "tp p=2 / tp p=1" in md and "instrumented total" in md
    assert gpt_step.main(["--render", str(path)]) == 0  # redrawn from the JSON alone


def test_the_profile_kinds_sum_to_each_phase_and_cover_every_class_seen():
    sides, _ = gpt_step.build_sides("float64", [1, 2], torch)
    gpt_step.check_sides(sides, "float64")
    for name, side in sides.items():
        profile = breakdown(side, torch if name == "torch" else None, runs=1)
        assert list(profile["phases"]) == list(PHASES)
        for phase, entry in profile["phases"].items():
            kinds = entry["kinds_s"]
            assert set(kinds) <= set(KINDS), (name, phase, kinds)
            assert abs(sum(kinds.values()) - entry["seconds"]) <= 1e-9, (name, phase)
        assert profile["kind_of"], name  # some ops were matched
        unmapped = sorted(c for c, kind in profile["kind_of"].items() if kind not in KINDS)
        assert unmapped == [], f"{name}: classes without a kind ({UNMAPPED}): {unmapped}"
        forward = profile["phases"]["forward"]["kinds_s"]
        assert forward["GEMMs"] > 0 and forward["attention"] > 0 and forward["norms"] > 0, name


def test_a_wrong_side_stops_the_run(monkeypatch):
    sides, _ = gpt_step.build_sides("float64", [1], torch)
    monkeypatch.setattr(sides["tp p=1"], "run", lambda: 1.0)
    with pytest.raises(gpt_step.StepMismatch, match="tp p=1"):
        gpt_step.check_sides(sides, "float64")
