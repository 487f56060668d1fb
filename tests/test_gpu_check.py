"""benchmarks/gpu_check.py on a machine without a GPU: its runner, time limits, judges and commands.

What only a GPU shows (the checks passing) is left to running the script on one.
"""

from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _python(code: str) -> list:
    return [sys.executable, "-c", code]


def test_a_passing_command_and_its_log(tmp_path):
    run = gpu_check.run_command(_python("print('hello')"), tmp_path / "a.log", 30, gpu_check.child_env({}))
    assert (run.returncode, run.timed_out) == (0, False)
    assert gpu_check.judge_exit(run) == ("PASS", "hello")
    assert "hello" in (tmp_path / "a.log").read_text() and "exit status 0" in run.output


def test_skip_and_failure_statuses(tmp_path):
    skip = gpu_check.run_command(
        _python("import sys; print('SKIP: no NCCL'); sys.exit(77)"), tmp_path / "s.log", 30, {}
    )
    assert gpu_check.judge_exit(skip) == ("SKIP", "SKIP: no NCCL")
    fail = gpu_check.run_command(_python("raise ValueError('boom')"), tmp_path / "f.log", 30, {})
    status, detail = gpu_check.judge_exit(fail)
    assert status == "FAIL" and "exit status 1" in detail and "ValueError: boom" in detail


def test_a_command_that_runs_too_long_is_killed_with_its_children(tmp_path):
    """The whole process group goes: a child the command started (a TCP store, say) too."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('working', flush=True)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    run = gpu_check.run_command(_python(code), tmp_path / "t.log", 2, {})
    assert run.timed_out and run.returncode is None and time.monotonic() - start < 30
    status, detail = gpu_check.judge_exit(run)
    assert status == "FAIL" and "timed out" in detail and "working" in detail
    child = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the command's child outlived the time limit")


def test_a_hang_after_the_work_is_reported_as_a_hang_at_exit(tmp_path):
    code = f"import time; print({gpu_check.DONE_MARKER!r}, flush=True); time.sleep(60)"
    run = gpu_check.run_command(_python(code), tmp_path / "h.log", 2, {})
    status, detail = gpu_check.judge_exit(run)
    assert status == "FAIL" and "hung at exit" in detail


def _run(output: str, returncode=0, timed_out=False):
    return gpu_check.Run(returncode, timed_out, 1.0, output)


def test_pytest_judge():
    assert gpu_check.judge_pytest(_run("...\n412 passed, 3 skipped in 80.1s\n")) == (
        "PASS",
        "412 passed, 3 skipped in 80.1s",
    )
    status, detail = gpu_check.judge_pytest(_run("sss\n======= 760 skipped in 3.2s =======\n"))
    assert status == "FAIL" and "no test passed" in detail
    status, detail = gpu_check.judge_pytest(_run("= 1 failed, 411 passed in 80s =\n", returncode=1))
    assert (status, detail) == ("FAIL", "1 failed, 411 passed in 80s")


def test_selfcheck_and_bench_judges():
    assert gpu_check.judge_selfcheck(_run("x\nself-check: all 54 checks PASS\nhint\n")) == (
        "PASS",
        "self-check: all 54 checks PASS",
    )
    assert gpu_check.judge_bench(_run("table\nwrote a.json, a.md\n")) == ("PASS", "wrote a.json, a.md")


def test_without_a_gpu_the_default_folder_is_temporary(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    now = datetime.datetime(2026, 12, 6, 14, 30, 0)
    folder = gpu_check.default_folder("no-gpu", now)
    try:
        assert folder.is_dir() and not folder.is_relative_to(REPO) and "no-gpu-2026-12-06" in folder.name
        assert not (tmp_path / "results").exists()
        assert gpu_check.default_folder("nvidia-h100-80gb-hbm3", now) == tmp_path / "results" / (
            "nvidia-h100-80gb-hbm3-2026-12-06"
        )
    finally:
        folder.rmdir()


def test_results_folder_never_overwrites(tmp_path):
    now = datetime.datetime(2026, 11, 26, 14, 5, 9)
    first = gpu_check.results_folder(tmp_path, "nvidia-h100-80gb-hbm3", now)
    assert first.name == "nvidia-h100-80gb-hbm3-2026-11-26"
    (first / "summary.md").write_text("earlier run")
    assert gpu_check.results_folder(tmp_path, "nvidia-h100-80gb-hbm3", now).name == (
        "nvidia-h100-80gb-hbm3-2026-11-26-140509"
    )


def test_gpu_label_from_nvidia_smi(monkeypatch):
    def fake_run(argv, **kwargs):
        if argv[0] == "nvidia-smi":
            return subprocess.CompletedProcess(argv, 0, "NVIDIA H100 80GB HBM3\nNVIDIA H100 80GB HBM3\n", "")
        raise AssertionError("CuPy is asked only when nvidia-smi cannot say")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.gpu_label() == "nvidia-h100-80gb-hbm3-x2"


def test_gpu_label_without_a_gpu(monkeypatch):
    def fake_run(argv, **kwargs):
        if argv[0] == "nvidia-smi":
            raise FileNotFoundError("nvidia-smi")
        return subprocess.CompletedProcess(argv, 1, "", "cudaErrorNoDevice")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    assert gpu_check.gpu_label() == "no-gpu"


def test_without_a_gpu_the_environment_fails_and_the_rest_is_skipped(tmp_path):
    from tp_gpu.backends import cupy_available

    if cupy_available():
        pytest.skip("a usable GPU is here: this checks the script where there is none")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    statuses = {c["name"]: c["status"] for c in summary["checks"]}
    assert statuses.pop("environment") == "FAIL"
    assert set(statuses) == {c.name for c in gpu_check.CHECKS} - {"environment"}
    assert set(statuses.values()) == {"SKIP"}
    assert "[ FAIL ] environment" in done.stdout and "gpu_check: 0 PASS, 1 FAIL, 7 SKIP" in done.stdout
    assert json.loads((tmp_path / "environment.json").read_text())["cupy_unavailable_reason"]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "environment.log").exists()


def test_only_keeps_the_environment_first(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        gpu_check,
        "run_checks",
        lambda checks, out, args: seen.extend(c.name for c in checks) or [],
    )
    assert gpu_check.main(["--only", "nccl-comm", "--out", str(tmp_path)]) == 0
    assert seen == ["environment", "nccl-comm"]


def _args(**kwargs) -> argparse.Namespace:
    return argparse.Namespace(**{"fast": False, **kwargs})


def test_the_pytest_command_collects_the_gpu_tests(tmp_path):
    """The options given to pytest are valid here, and select the GPU tests."""
    pytest_check = next(c for c in gpu_check.CHECKS if c.name == "pytest-gpu")
    argv = pytest_check.argv(tmp_path, _args()) + ["--collect-only", "tests/test_cupy.py"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, cwd=REPO, env=gpu_check.child_env({})
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_in_process_nccl_reduction" in done.stdout


def test_the_benchmark_and_selfcheck_commands_parse(tmp_path):
    """The benchmark and self-check accept the options gpu_check gives them."""
    bench = next(c for c in gpu_check.CHECKS if c.name == "bench-float16")
    for fast in (False, True):
        argv = bench.argv(tmp_path, _args(fast=fast))
        assert argv[1].endswith("bench_layers.py")
        try:
            from benchmarks.cli import parse_args
        except ImportError:  # the benchmark's command line lives in bench_layers.py itself
            parse_args = None
        if parse_args is not None:
            args = parse_args(argv[2:])
            assert (args.backend, args.dtype, args.quick) == ("cupy", ["float16"], True)
    from tp_gpu.__main__ import parse_args as selfcheck_args

    selfcheck = next(c for c in gpu_check.CHECKS if c.name == "selfcheck")
    assert selfcheck_args(selfcheck.argv(Path("."), _args())[3:]).backend == "cupy"
