"""Check tp_gpu on a CUDA GPU machine in one command, and keep every output.

Run from the checkout's root (CuPy, NumPy and, for the PyTorch columns, torch
installed; no internet needed)::

    python benchmarks/gpu_check.py            # every check, one after the other
    python benchmarks/gpu_check.py --fast     # a shorter benchmark (worker counts 1 and 4)
    python benchmarks/gpu_check.py --list     # what each check runs, and its time limit
    python benchmarks/gpu_check.py --only pytest-gpu selfcheck

Each check runs in its own process group under a time limit (a process that
hangs, at exit or anywhere, is killed and reported as FAIL), with its output
in ``<check>.log``. Everything goes to ``benchmarks/results/<gpu>-<date>/``
(``--out`` to change; a folder that exists gets the time appended; with no GPU,
a temporary folder, so a CPU-only run leaves nothing in the checkout): the logs,
the benchmark's JSON/Markdown/plots, ``environment.json``, ``linear-3d.json``,
``pytest-gpu.xml``, and ``summary.md`` / ``summary.json``.

Prints one line per check (PASS, FAIL or SKIP, seconds, what it found) and a
summary; exits 0 when no check failed, 1 otherwise. Without a usable GPU the
``environment`` check FAILs with the reason and every other check is SKIPped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_cases import CASES  # noqa: E402
from benchmarks.gpu_runner import (  # noqa: E402
    DONE_MARKER,
    SKIP_STATUS,
    Check,
    Result,
    Run,
    child_env,
    judge_bench,
    judge_exit,
    judge_pytest,
    judge_selfcheck,
    last_lines,
    run_command,
)

__all__ = [
    "CHECKS",
    "CASES",
    "DONE_MARKER",
    "SKIP_STATUS",
    "Check",
    "Result",
    "Run",
    "child_env",
    "judge_bench",
    "judge_exit",
    "judge_pytest",
    "judge_selfcheck",
    "last_lines",
    "run_command",
    "main",
]


def _case(name: str) -> Callable[[Path, argparse.Namespace], list[str]]:
    """The command of a case of this file, run in its own process."""
    here = str(Path(__file__).resolve())
    return lambda out, args: [sys.executable, here, "--case", name, "--out", str(out)]


def _bench(dtype: str) -> Callable[[Path, argparse.Namespace], list[str]]:
    """The layer benchmark's command for ``dtype``, writing into its own folder of the results."""

    def argv(out: Path, args: argparse.Namespace) -> list[str]:
        folder = out / f"bench-{dtype}"
        folder.mkdir(parents=True, exist_ok=True)
        script = str(REPO / "benchmarks" / "bench_layers.py")
        command = [
            sys.executable,
            script,
            "--backend",
            "cupy",
            "--quick",
            "--dtype",
            dtype,
            "--out",
            str(folder),
        ]
        return command + (["--workers", "1", "4"] if args.fast else [])

    return argv


CHECKS: list[Check] = [
    Check(
        "environment",
        "versions, the GPUs, and whether tp_gpu can use CuPy (a kernel and a GEMM run)",
        _case("environment"),
        120,
        judge_exit,
        needs_gpu=False,
    ),
    Check(
        "pytest-gpu",
        "python -m pytest -m gpu: every test on the CuPy backend (layers, peer copies, DLPack, torch)",
        lambda out, args: (
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs"]
            + ["-p", "no:randomly", "-p", "no:cacheprovider", f"--junitxml={out / 'pytest-gpu.xml'}"]
        ),
        480,
        judge_pytest,
    ),
    Check(
        "selfcheck",
        "python -m tp_gpu --backend cupy: every layer against a dense float64 reference",
        lambda out, args: [sys.executable, "-m", "tp_gpu", "--backend", "cupy"],
        240,
        judge_selfcheck,
    ),
    Check(
        "bench-float32",
        "benchmarks/bench_layers.py --backend cupy --quick --dtype float32",
        _bench("float32"),
        420,
        judge_bench,
    ),
    Check(
        "bench-float16",
        "benchmarks/bench_layers.py --backend cupy --quick --dtype float16",
        _bench("float16"),
        420,
        judge_bench,
    ),
    Check(
        "linear-3d",
        "column/row linear on (8, 256, 1024) inputs against the same rows as 2-D: equal results, "
        "and the time ratio (CuPy's batched-matmul path for 3-D)",
        _case("linear-3d"),
        180,
        judge_exit,
    ),
    Check(
        "nccl-in-process",
        "TP_GPU_NCCL=1: InProcessNccl's grouped reduce on every GPU, and a row layer",
        _case("nccl-in-process"),
        120,
        judge_exit,
        env={"TP_GPU_NCCL": "1"},
    ),
    Check(
        "nccl-comm",
        "comm='nccl', a world of 1 over cupyx's TCP store: a layer, collectives, and a clean exit",
        _case("nccl-comm"),
        120,
        judge_exit,
    ),
]


# --- the run ---------------------------------------------------------------------------------


_CUPY_GPU_NAMES = (
    "import cupy; r = cupy.cuda.runtime; "
    "n = [r.getDeviceProperties(d)['name'] for d in range(r.getDeviceCount())]; "
    "print('\\n'.join(x.decode() if isinstance(x, bytes) else str(x) for x in n))"
)


def gpu_label(timeout: float = 60) -> str:
    """The GPU model for the results folder: ``nvidia-h100-80gb-hbm3``, ``-x8`` for eight, ``no-gpu``.

    Asks ``nvidia-smi``, else CuPy (in a child process, so that this one never imports it).
    """
    names: list[str] = []
    for argv in (
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        [sys.executable, "-c", _CUPY_GPU_NAMES],
    ):
        try:
            query = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.SubprocessError):
            continue
        names = (
            [line.strip() for line in query.stdout.splitlines() if line.strip()]
            if query.returncode == 0
            else []
        )
        if names:
            break
    if not names:
        return "no-gpu"
    label = re.sub(r"[^a-z0-9]+", "-", names[0].lower()).strip("-")
    return label + (f"-x{len(names)}" if len(names) > 1 else "")


def results_folder(base: Path, label: str, now: datetime.datetime) -> Path:
    """``base/<label>-<date>``, or with the time appended where that already exists."""
    folder = base / f"{label}-{now:%Y-%m-%d}"
    if folder.exists() and any(folder.iterdir()):
        folder = base / f"{label}-{now:%Y-%m-%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def default_folder(label: str, now: datetime.datetime) -> Path:
    """Where results go without ``--out``: ``benchmarks/results/<gpu>-<date>/``, or, on a machine with no
    GPU, a temporary folder (nothing to commit, so nothing is left in the source tree)."""
    if label == "no-gpu":
        return Path(tempfile.mkdtemp(prefix=f"tp_gpu-gpu_check-no-gpu-{now:%Y-%m-%d}-"))
    return results_folder(RESULTS, label, now)


def run_checks(checks: Sequence[Check], out: Path, args: argparse.Namespace) -> list[Result]:
    """Run ``checks`` in order, printing a line for each; GPU checks SKIP once ``environment`` has failed."""
    results: list[Result] = []
    no_gpu = False
    width = max(len(c.name) for c in checks)
    for check in checks:
        if check.needs_gpu and no_gpu:
            result = Result(check.name, "SKIP", 0.0, "no usable GPU (see environment)")
        else:
            argv = check.argv(out, args)
            log = out / f"{check.name}.log"
            print(f"[ RUN  ] {check.name:{width}s}  {check.what}  (log: {log})", flush=True)
            run = run_command(argv, log, check.timeout * args.timeout_scale, child_env(check.env))
            status, detail = check.judge(run)
            if check.name == "environment" and status != "PASS":
                status, no_gpu = "FAIL", True
            result = Result(check.name, status, run.seconds, detail, str(log), list(argv))
        results.append(result)
        print(
            f"[ {result.status:4s} ] {result.name:{width}s}  {result.seconds:6.1f} s  {result.detail}",
            flush=True,
        )
    return results


def write_summary(out: Path, results: Sequence[Result], started: datetime.datetime) -> str:
    """summary.json and summary.md in ``out``; returns the one-line verdict."""
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    verdict = f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP"
    (out / "summary.json").write_text(
        json.dumps(
            {
                "started": started.isoformat(timespec="seconds"),
                "verdict": verdict,
                "checks": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"# gpu_check, {started:%Y-%m-%d %H:%M}",
        "",
        verdict,
        "",
        "| check | result | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return verdict


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    names = [c.name for c in CHECKS]
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Run tp_gpu's GPU checks (tests, self-check, benchmarks, NCCL), each under a time limit, "
        "print PASS/FAIL/SKIP per check and a summary, and keep every output under "
        "benchmarks/results/<gpu>-<date>/.",
    )
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="CHECK", help=f"run only these ({', '.join(names)})"
    )
    parser.add_argument(
        "--skip", nargs="+", choices=names, metavar="CHECK", default=[], help="leave these out"
    )
    parser.add_argument("--fast", action="store_true", help="benchmark worker counts 1 and 4 only")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<gpu>-<date>)")
    parser.add_argument(
        "--timeout-scale", type=float, default=1.0, help="multiply every time limit (default 1)"
    )
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # one case, in this process
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected checks; 0 when none failed."""
    args = parse_args(argv)
    if args.case is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        CASES[args.case](args.out)
        return 0
    checks = [c for c in CHECKS if (args.only is None or c.name in args.only) and c.name not in args.skip]
    if args.list:
        for c in CHECKS:
            print(f"{c.name:16s} {c.timeout:4.0f} s  {c.what}")
        return 0
    if "environment" not in args.skip and checks and checks[0].name != "environment":
        checks.insert(0, CHECKS[0])  # the environment decides whether the others can run
    started = datetime.datetime.now()
    out = args.out if args.out is not None else default_folder(gpu_label(), started)
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check: {len(checks)} checks, results in {out}", flush=True)
    results = run_checks(checks, out, args)
    verdict = write_summary(out, results, started)
    print(f"\n{verdict}; details in {out / 'summary.md'}")
    for r in results:
        if r.status == "FAIL":
            print(f"  FAIL {r.name}: {r.detail}\n       log: {r.log}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
