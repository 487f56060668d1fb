"""benchmarks/gpu_check.py on a machine without a GPU: its results folder, its report of what ran and why
not, its time limits and its exit status. Small test files of its own stand in for the GPU tests where a
test must pass, fail or hang; the GPU tests themselves (tests/gpu) run only where there is a GPU.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tp_gpu.backends import cupy_available
from tp_gpu.backends.cupy_backend import cupy_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _statuses(out: Path) -> dict[str, tuple[str, str]]:
    """test name (without its module) -> (status, detail), from summary.json."""
    tests = json.loads((out / "summary.json").read_text())["tests"]
    return {t["test"].split("::")[-1]: (t["status"], t["detail"]) for t in tests}


def test_without_a_gpu_it_writes_its_folder_and_says_why_nothing_ran(tmp_path):
    """The command the GPU machine runs (PYTHONPATH=src), on tests/gpu: exit 77, every test SKIP with
    tp_gpu's reason, and the reason in environment.json too."""
    if cupy_available():
        pytest.skip("a usable GPU is here: this checks the script where there is none")
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH="src")
    argv = [sys.executable, str(SCRIPT), "--out", str(out), "--", "tests/gpu"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert done.returncode == gpu_check.NOTHING_RAN == 77, done.stdout + done.stderr
    reason = cupy_unavailable_reason()
    environment = json.loads((out / "environment.json").read_text())
    assert environment["cupy_unavailable_reason"] == reason and environment["gpus"] == []
    assert environment["date"].startswith(f"{datetime.date.today():%Y-%m-%d}")
    assert environment["numpy"] and environment["pytest"] and environment["tp_gpu"]
    statuses = _statuses(out)
    for test in (
        "test_self_check_on_cupy",
        "test_3d_input_equals_its_rows_in_2d[ColumnParallelLinear-float16-0.02]",
        "test_backward_through_the_tape[RowParallelLinear-3]",
        "test_in_process_nccl_on_every_gpu",
        "test_nccl_world_of_one_exits_cleanly",
        "test_layer_benchmark[float32]",
    ):
        assert test in statuses
    assert set(statuses.values()) == {("SKIP", f"CuPy backend unavailable: {reason}")}
    n = len(statuses)
    verdict = f"gpu_check: 0 PASS, 0 FAIL, {n} SKIP; nothing ran"
    assert f"SKIP {n} tests: CuPy backend unavailable: {reason}\n{verdict}; see " in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["verdict"], summary["exit_status"]) == (verdict, 77)
    assert verdict in (out / "summary.md").read_text() and (out / "junit.xml").exists()
    assert "skipped" in (out / "pytest.log").read_text()


CASES = """
import time

import pytest

pytestmark = pytest.mark.gpu


def test_passes(record_property):
    record_property("detail", "3-D/2-D time x1.02")


def test_skips():
    pytest.skip("no GPU here")


def test_fails():
    assert 1 == 2, "one is not two"


def test_hangs():
    time.sleep(60)


@pytest.mark.timeout(30)
def test_takes_its_own_longer_limit():
    time.sleep(0.8)
"""

NOT_GPU = "def test_not_marked_gpu():\n    pass\n"


def _case_folder(tmp_path):
    """A folder of its own for the cases, whose name no ``-k`` expression below matches (a test
    folder's name is a keyword too), given to pytest as its rootdir: test ids read
    ``test_cases::...`` wherever the checkout and the temporary folder are."""
    folder = tmp_path / "cases"
    folder.mkdir()
    return folder


def test_pass_fail_skip_and_the_time_limit_per_test(tmp_path, capsys):
    folder = _case_folder(tmp_path)
    (folder / "test_cases.py").write_text(CASES)
    (folder / "test_plain.py").write_text(NOT_GPU)
    out = tmp_path / "results"
    args = ["--out", str(out), "--timeout", "0.5", "--", "--rootdir", str(folder), str(folder)]
    assert gpu_check.main(args) == 1
    statuses = _statuses(out)
    assert "test_not_marked_gpu" not in statuses  # only tests marked gpu run
    assert statuses.pop("test_passes") == ("PASS", "3-D/2-D time x1.02")
    assert statuses.pop("test_takes_its_own_longer_limit")[0] == "PASS"
    assert statuses.pop("test_skips") == ("SKIP", "no GPU here")
    assert statuses.pop("test_fails") == ("FAIL", "AssertionError: one is not two")
    status, detail = statuses.pop("test_hangs")
    assert status == "FAIL" and "Timeout (>0.5s)" in detail and not statuses
    printed = capsys.readouterr().out
    assert "FAIL test_cases::test_fails: AssertionError: one is not two" in printed
    assert "SKIP 1 test: no GPU here\ngpu_check: 2 PASS, 2 FAIL, 1 SKIP; see " in printed
    assert "| test_cases::test_hangs | FAIL |" in (out / "summary.md").read_text()


def test_passes_and_skips_exit_0(tmp_path, capsys):
    folder = _case_folder(tmp_path)
    cases = folder / "test_cases.py"
    cases.write_text(CASES)
    out = tmp_path / "results"
    args = ["--out", str(out), "--", "--rootdir", str(folder), str(cases), "-k", "passes or skips"]
    assert gpu_check.main(args) == 0
    assert (
        capsys.readouterr().out.rstrip().endswith(f"gpu_check: 1 PASS, 0 FAIL, 1 SKIP; see {out}/summary.md")
    )
    assert json.loads((out / "summary.json").read_text())["exit_status"] == 0


def test_a_hang_at_exit_is_killed_with_everything_it_started(tmp_path, capsys):
    """The run under --total: a process that hangs after its work (as behind a TCP store, cupy/cupy#7863)
    is killed with its whole process group, its output kept, and the run reported as killed."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import atexit, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('tests done', flush=True)\n"
        "atexit.register(time.sleep, 60)\n"
    )
    start = time.monotonic()
    assert gpu_check.run_pytest([sys.executable, "-c", code], tmp_path / "log", 1, dict(os.environ)) is None
    assert time.monotonic() - start < 20 and (tmp_path / "log").read_text() == "tests done\n"
    assert "tests done" in capsys.readouterr().out
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("a process the run started outlived it")
    assert gpu_check.run_pytest([sys.executable, "-c", "exit(3)"], tmp_path / "log", 30, {}) == 3


def test_list_collects_the_gpu_tests_marked_by_their_conftest(capfd):
    assert gpu_check.main(["--list", "--", "tests/gpu"]) == 0
    listed = capfd.readouterr().out
    assert "tests/gpu/test_gpu_nccl.py::test_nccl_world_of_one_exits_cleanly" in listed
    assert "deselected" not in listed  # every test there is marked gpu


def test_the_pytest_command_and_pytest_ending_badly(tmp_path, monkeypatch):
    """Per-test limit only where pytest-timeout is installed; the tests are told where the results go;
    pytest's own failures (5: no test selected) fail the check."""
    seen = []

    def fake_run(argv, log, total, env):
        seen.append((argv, env))
        return 5 if len(seen) == 1 else None

    info = {"gpus": [], "pytest-timeout": None, "cupy_unavailable_reason": "no GPU in this test"}
    monkeypatch.setattr(gpu_check, "environment", lambda now: info)
    monkeypatch.setattr(gpu_check, "run_pytest", fake_run)
    out = tmp_path / "results"
    assert gpu_check.main(["--out", str(out), "--fast", "--", "-k", "nothing"]) == 1
    ((argv, env),) = seen
    assert argv[1:5] == ["-m", "pytest", "-m", "gpu"] and argv[-2:] == ["-k", "nothing"]
    assert f"--junitxml={out / 'junit.xml'}" in argv and not any(a.startswith("--timeout") for a in argv)
    assert (env["TP_GPU_CHECK_RESULTS"], env["TP_GPU_CHECK_FAST"]) == (str(out), "1")
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(REPO / "src"), str(REPO)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "gpu_check: 0 PASS, 0 FAIL, 0 SKIP; pytest exit status 5"
    assert summary["environment"] == info
    assert gpu_check.main(["--out", str(out), "--total", "60"]) == 1
    assert json.loads((out / "summary.json").read_text())["verdict"].endswith("SKIP; pytest killed")


def test_results_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    now = datetime.datetime(2026, 11, 26, 14, 5, 9)
    h100 = ["NVIDIA H100 80GB HBM3"]
    assert gpu_check.results_folder(h100, now) == tmp_path / "nvidia-h100-80gb-hbm3-2026-11-26"
    first = gpu_check.results_folder(h100 * 8, now)
    assert first == tmp_path / "nvidia-h100-80gb-hbm3-x8-2026-11-26"
    first.mkdir()
    assert gpu_check.results_folder(h100 * 8, now) == first  # empty: used
    (first / "summary.md").write_text("an earlier run")
    assert gpu_check.results_folder(h100 * 8, now).name == "nvidia-h100-80gb-hbm3-x8-2026-11-26-140509"
    no_gpu = gpu_check.results_folder([], now)  # temporary: a run without a GPU leaves nothing here
    try:
        assert no_gpu.is_dir() and not no_gpu.is_relative_to(REPO) and "no-gpu-2026-11-26" in no_gpu.name
    finally:
        no_gpu.rmdir()
