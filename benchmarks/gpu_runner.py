"""gpu_check.py's machinery: run a command in its own process group under a time limit, and judge it."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Exit status of a case that could not run here (it says why on its last line).
SKIP_STATUS = 77

#: Printed by a case as its last act: seen in the log of a process killed after it, the process hung at exit.
DONE_MARKER = "gpu_check: case passed"

#: Why an NCCL case is skipped where CuPy has no NCCL.
NO_NCCL = (
    "cupy.cuda.nccl.available is False: install NCCL for this CuPy (pip install nvidia-nccl-cu12 or -cu13)"
)

#: Seconds between SIGTERM and SIGKILL for a process group that ran out of time.
KILL_GRACE = 5.0


@dataclass
class Result:
    """What one check found."""

    name: str
    status: str  # PASS, FAIL or SKIP
    seconds: float
    detail: str
    log: str = ""
    command: list[str] = field(default_factory=list)


@dataclass
class Run:
    """How a command ended: its status (None when killed for time), whether it was, and its output."""

    returncode: int | None
    timed_out: bool
    seconds: float
    output: str


@dataclass
class Check:
    """A command, its time limit, and how its outcome is judged."""

    name: str
    what: str
    argv: Callable[[Path, argparse.Namespace], list[str]]
    timeout: float
    judge: Callable[[Run], tuple[str, str]]
    env: dict[str, str] = field(default_factory=dict)
    needs_gpu: bool = True


# --- running commands ------------------------------------------------------------------------


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of every check: this one, the checkout first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(REPO / "src"), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(argv: Sequence[str], log: Path, timeout: float, env: dict[str, str]) -> Run:
    """Run ``argv`` in a new process group, output to ``log``; kill the whole group after ``timeout`` s.

    The group is also killed after a normal exit, so that no child it left
    behind (a server, a worker) outlives the check.
    """
    start = time.monotonic()
    with open(log, "w") as sink:
        sink.write(f"$ {' '.join(argv)}\n\n")
        sink.flush()
        try:
            process = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            sink.write(f"could not start: {exc}\n")
            return Run(127, False, time.monotonic() - start, f"could not start: {exc}\n")
        timed_out = False
        try:
            returncode: int | None = process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process.pid, signal.SIGTERM)
            try:
                process.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, signal.SIGKILL)
                process.wait()
            returncode = None
        _kill_group(process.pid, signal.SIGKILL)
        seconds = time.monotonic() - start
        ending = f"killed after {timeout:.0f} s" if timed_out else f"exit status {returncode}"
        sink.write(f"\n[gpu_check: {ending}, {seconds:.1f} s]\n")
    return Run(returncode, timed_out, seconds, log.read_text(errors="replace"))


def last_lines(text: str, n: int = 1) -> str:
    """The last ``n`` non-empty lines of ``text`` that gpu_check did not write, joined by ' | '."""
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("[gpu_check:")
    ]
    return " | ".join(lines[-n:])


# --- judging ---------------------------------------------------------------------------------


def judge_exit(run: Run) -> tuple[str, str]:
    """PASS on exit status 0; SKIP on 77 (with the case's last line); FAIL otherwise, saying how it ended."""
    if run.timed_out:
        if DONE_MARKER in run.output:
            return (
                "FAIL",
                "finished its work, then hung at exit and was killed (cupy/cupy#7863 for a TCP store)",
            )
        return "FAIL", f"timed out after {run.seconds:.0f} s; last output: {last_lines(run.output)}"
    if run.returncode == 0:
        return "PASS", last_lines(run.output)
    if run.returncode == SKIP_STATUS:
        return "SKIP", last_lines(run.output)
    return "FAIL", f"exit status {run.returncode}: {last_lines(run.output, 3)}"


_PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def judge_pytest(run: Run) -> tuple[str, str]:
    """PASS when pytest exits 0 and at least one test passed (every test skipped means CuPy was not used)."""
    status, detail = judge_exit(run)
    summary = [
        line for line in run.output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)
    ]
    counts = {kind.rstrip("s"): int(n) for n, kind in _PYTEST_COUNTS.findall(summary[-1])} if summary else {}
    if status == "PASS" and not counts.get("passed"):
        return (
            "FAIL",
            f"no test passed ({summary[-1].strip('= ') if summary else 'no summary'}): see the skip reasons",
        )
    if status == "SKIP":  # pytest has no status 77; keep it a failure
        status = "FAIL"
    if summary and not run.timed_out:
        return status, summary[-1].strip("= ")
    return status, detail


def judge_selfcheck(run: Run) -> tuple[str, str]:
    status, detail = judge_exit(run)
    verdict = [line for line in run.output.splitlines() if line.startswith("self-check:")]
    return status, (verdict[-1] if verdict and not run.timed_out else detail)


def judge_bench(run: Run) -> tuple[str, str]:
    status, detail = judge_exit(run)
    wrote = [line for line in run.output.splitlines() if line.startswith("wrote ")]
    return status, (wrote[-1] if status == "PASS" and wrote else detail)


# --- the checks ------------------------------------------------------------------------------
