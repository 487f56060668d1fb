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
(``--out`` to change; a folder that exists gets the time appended): the logs,
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
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

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
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
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


# --- the cases run in their own processes (--case NAME) ---------------------------------------


def _skip(reason: str) -> None:
    print(f"SKIP: {reason}", flush=True)
    sys.exit(SKIP_STATUS)


def _usable_cupy():
    """CuPy, or exit with SKIP saying why tp_gpu cannot use it."""
    from tp_gpu.backends.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    if reason is not None:
        _skip(reason)
    import cupy

    return cupy


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def case_environment(out: Path) -> None:
    """Write environment.json; exit 77 (SKIP, which the runner turns into FAIL) when CuPy cannot be used."""
    import platform

    import numpy as np

    info: dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.is_available()
    except Exception as exc:
        info["torch"] = f"unavailable ({type(exc).__name__}: {exc})"
    from tp_gpu.backends.cupy_backend import cupy_unavailable_reason

    reason = cupy_unavailable_reason()
    info["cupy_unavailable_reason"] = reason
    if reason is None:
        import cupy
        from cupy.cuda import nccl

        runtime = cupy.cuda.runtime
        info.update(
            cupy=cupy.__version__,
            cuda_runtime=runtime.runtimeGetVersion(),
            cuda_driver=runtime.driverGetVersion(),
            nccl_available=bool(nccl.available),
            gpus=[_text(runtime.getDeviceProperties(d)["name"]) for d in range(runtime.getDeviceCount())],
        )
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    if reason is not None:
        print(f"tp_gpu cannot use CuPy here: {reason}", flush=True)
        sys.exit(SKIP_STATUS)
    print(
        f"{', '.join(info['gpus'])}; CuPy {info['cupy']}, CUDA runtime {info['cuda_runtime']}, "
        f"NCCL {'available' if info['nccl_available'] else 'NOT available'}; torch {info['torch']}"
    )


def case_linear_3d(out: Path) -> None:
    """3-D against 2-D inputs of the same rows: equal outputs, and the time of each (GPU median)."""
    cupy = _usable_cupy()
    import numpy as np
    from cupyx.profiler import benchmark

    from tp_gpu import ColumnParallelLinear, RowParallelLinear, TensorParallelConfig

    rng, rows, failures = np.random.default_rng(0), [], []
    for dtype, tol in (("float32", 1e-4), ("float16", 2e-2)):
        for cls in (ColumnParallelLinear, RowParallelLinear):
            layer = cls(1024, 1024, TensorParallelConfig(n_workers=2, backend="cupy", dtype=dtype), seed=0)
            with cupy.cuda.Device(layer.devices[0]):
                x3 = cupy.asarray(rng.standard_normal((8, 256, 1024)), dtype=dtype)
                x2 = x3.reshape(-1, 1024)
            y3, y2 = cupy.asnumpy(layer(x3)).astype(np.float64), cupy.asnumpy(layer(x2)).astype(np.float64)
            error = float(np.abs(y3.reshape(y2.shape) - y2).max() / max(1.0, np.abs(y2).max()))
            times = {}
            for label, x in (("2-D", x2), ("3-D", x3)):
                result = benchmark(
                    layer, (x,), n_repeat=50, n_warmup=5, max_duration=2.0, devices=tuple(layer.devices)
                )
                times[label] = float(np.median(np.max(result.gpu_times, axis=0)))
            row = {
                "layer": cls.__name__,
                "dtype": dtype,
                "error": error,
                "seconds_2d": times["2-D"],
                "seconds_3d": times["3-D"],
                "ratio_3d_over_2d": times["3-D"] / times["2-D"],
            }
            rows.append(row)
            print(
                f"{cls.__name__:20s} {dtype}: 2-D {1e3 * times['2-D']:.3f} ms, "
                f"3-D {1e3 * times['3-D']:.3f} ms (x{row['ratio_3d_over_2d']:.2f}), "
                f"max relative difference {error:.1e}"
            )
            if not error <= tol:
                failures.append(f"{cls.__name__} {dtype}: 3-D and 2-D differ by {error:.1e} (> {tol})")
    (out / "linear-3d.json").write_text(json.dumps(rows, indent=2) + "\n")
    if failures:
        print("; ".join(failures))
        sys.exit(1)
    print(DONE_MARKER)
    print(
        "3-D/2-D time: "
        + ", ".join(f"{r['layer'][:3]} {r['dtype']} x{r['ratio_3d_over_2d']:.2f}" for r in rows)
    )


def case_nccl_in_process(out: Path) -> None:
    """InProcessNccl over every GPU (one rank on one GPU), then a row layer with TP_GPU_NCCL=1."""
    cupy = _usable_cupy()
    import numpy as np
    from cupy.cuda import nccl

    from tp_gpu import RowParallelLinear, TensorParallelConfig
    from tp_gpu.comm.nccl_local import InProcessNccl

    if not nccl.available:
        _skip(NO_NCCL)
    devices = list(range(cupy.cuda.runtime.getDeviceCount()))
    comm = InProcessNccl(cupy, devices)
    parts = {}
    for d in devices:
        with cupy.cuda.Device(d):
            parts[d] = cupy.full((64, 32), float(d + 1), dtype=cupy.float32)
    for ufunc, expected in (("add", sum(d + 1 for d in devices)), ("maximum", len(devices))):
        assert comm.can_reduce(parts, devices[0], ufunc)
        got = cupy.asnumpy(comm.reduce(parts, devices[0], ufunc))
        assert np.array_equal(got, np.full((64, 32), expected, dtype=np.float32)), (ufunc, got)
    n = max(2, len(devices))
    layer = RowParallelLinear(16 * n, 8, TensorParallelConfig(n_workers=n, backend="cupy"), seed=1)
    x = np.random.default_rng(0).standard_normal((4, 16 * n))
    error = float(np.abs(cupy.asnumpy(layer(x)) - (x @ layer.full_weight() + layer.full_bias())).max())
    assert error < 1e-12, error
    print(DONE_MARKER)
    how = (
        "NCCL across GPUs" if len(devices) > 1 else "peer copies (one GPU: NCCL has nothing to reduce across)"
    )
    print(
        f"InProcessNccl reduce (add, maximum) on GPUs {devices} exact; "
        f"row layer with TP_GPU_NCCL=1 exact, via {how}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_nccl_comm(out: Path) -> None:
    """comm='nccl' with one process, rendezvous over cupyx's TCP store (MPI hidden), then exit."""
    os.environ.update(
        TP_GPU_RANK="0",
        TP_GPU_WORLD_SIZE="1",
        CUPYX_DISTRIBUTED_HOST="127.0.0.1",
        CUPYX_DISTRIBUTED_PORT=str(_free_port()),
    )
    cupy = _usable_cupy()
    import multiprocessing

    import numpy as np
    from cupy.cuda import nccl

    from tp_gpu import ColumnParallelLinear, TensorParallelConfig
    from tp_gpu.comm import get_communicator, mpi
    from tp_gpu.errors import BackendUnavailableError

    if not nccl.available:
        _skip(NO_NCCL)

    def no_mpi():
        raise BackendUnavailableError("hidden by gpu_check: rendezvous over the TCP store")

    mpi.MpiComm = no_mpi
    comm = get_communicator("nccl")
    stores = [p for p in multiprocessing.active_children() if type(p).__name__ == "ExceptionAwareProcess"]
    assert not stores, f"the TCP store still runs after start-up: {stores}"
    layer = ColumnParallelLinear(
        64, 32, TensorParallelConfig(n_workers=2, backend="cupy", comm="nccl"), seed=0
    )
    x = np.random.default_rng(0).standard_normal((4, 64))
    error = float(np.abs(cupy.asnumpy(layer(x)) - (x @ layer.full_weight() + layer.full_bias())).max())
    assert error < 1e-12, error
    with cupy.cuda.Device(comm.device):
        total = comm.all_reduce(layer.backend, cupy.arange(5.0), "sum")
    assert np.array_equal(cupy.asnumpy(total), np.arange(5.0))
    assert comm.all_gather_object({"rank": comm.rank}) == [{"rank": 0}]
    comm.barrier()
    print(DONE_MARKER)
    print(
        f"NcclComm rank {comm.rank}/{comm.size} on GPU {comm.device}: layer exact, all_reduce, "
        "all_gather_object, barrier; TCP store stopped (exit must follow at once)"
    )


CASES = {
    "environment": case_environment,
    "linear-3d": case_linear_3d,
    "nccl-in-process": case_nccl_in_process,
    "nccl-comm": case_nccl_comm,
}


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
    out = args.out if args.out is not None else results_folder(RESULTS, gpu_label(), started)
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
