"""Check tp_gpu on a CUDA GPU machine in one command: ``python benchmarks/gpu_check.py``.

Runs ``python -m pytest -m gpu`` (tests/gpu: the self-check, 3-D inputs, a backward, NCCL in and across
processes, the layer benchmark; and the CuPy cases of the whole suite), each test under ``--timeout`` s
(pytest-timeout; long tests carry their own limit), the run under ``--total`` s. Arguments after ``--`` go
to pytest (``-- tests/gpu -k nccl``). Writes environment.json, junit.xml, pytest.log, summary.json and
summary.md (PASS, FAIL or SKIP per test), and what the tests record (linear-3d.json, bench-<dtype>/), to
``benchmarks/results/<gpu>-<date>/`` (``--out`` to change; with no GPU, a temporary folder).
Exit status: 0 when tests passed and none failed; 1 when one failed or pytest did not end well; 77 when
none ran (every test skipped: no usable GPU, and why in environment.json and the summary).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
NOTHING_RAN = 77
sys.path.insert(0, str(REPO / "src"))  # this checkout's tp_gpu, installed or not


def environment(now: datetime.datetime) -> dict:
    """Date, versions, and the GPUs, or why tp_gpu cannot use CuPy here."""
    info: dict = {"date": now.isoformat(timespec="seconds"), "python": platform.python_version()}
    installed = {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}
    info.update({name: installed.get(name) for name in ("numpy", "pytest", "pytest-timeout", "torch")})
    info.update(platform=platform.platform(), gpus=[])
    try:
        from tp_gpu import __version__
        from tp_gpu.backends.cupy_backend import cupy_unavailable_reason
    except Exception as exc:  # a broken checkout: the run goes on, and its tests say more
        return {**info, "tp_gpu": None, "cupy_unavailable_reason": f"tp_gpu does not import ({exc!r})"}
    info["tp_gpu"] = __version__
    info["cupy_unavailable_reason"] = reason = cupy_unavailable_reason()
    if reason is None:
        import cupy
        from cupy.cuda import nccl

        rt = cupy.cuda.runtime
        names = [rt.getDeviceProperties(d)["name"] for d in range(rt.getDeviceCount())]
        info.update(cupy=cupy.__version__, cuda_runtime=rt.runtimeGetVersion(), nccl=bool(nccl.available))
        info.update(cuda_driver=rt.driverGetVersion(), gpus=[getattr(n, "decode", str)() for n in names])
    return info


def results_folder(gpus: list[str], now: datetime.datetime) -> Path:
    """``benchmarks/results/nvidia-h100-80gb-hbm3-x8-<date>``, the time added where that is taken; no GPU:
    a temporary folder, so that a run without one leaves nothing in the checkout."""
    if not gpus:
        return Path(tempfile.mkdtemp(prefix=f"tp_gpu-gpu_check-no-gpu-{now:%Y-%m-%d}-"))
    label = re.sub(r"[^a-z0-9]+", "-", gpus[0].lower()).strip("-") + f"-x{len(gpus)}" * (len(gpus) > 1)
    folder = RESULTS / f"{label}-{now:%Y-%m-%d}"
    return RESULTS / f"{label}-{now:%Y-%m-%d-%H%M%S}" if folder.exists() and any(folder.iterdir()) else folder


def run_pytest(argv: list[str], log: Path, total: float, env: dict) -> int | None:
    """``argv``'s status, its output shown and kept in ``log``; None when killed after ``total`` s (a hang, at
    exit too). Its process group goes at the end anyway: nothing it started outlives it."""
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # fmt: skip
    timer = threading.Timer(total, os.killpg, (child.pid, signal.SIGKILL))
    timer.start()
    with open(log, "w") as sink:
        for line in child.stdout:
            print(line, end="", flush=True)
            sink.write(line)
    code, killed = child.wait(), not timer.is_alive()
    timer.cancel()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    return None if killed else code


def outcomes(junit: Path) -> list[dict]:
    """One row per test of the JUnit report: test, status (PASS, FAIL, SKIP), seconds, detail's first line."""
    rows = []
    for case in ET.parse(junit).iter("testcase") if junit.exists() else []:
        end = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        status = {"failure": "FAIL", "error": "FAIL", "skipped": "SKIP"}.get(getattr(end, "tag", ""), "PASS")
        said = (end.get("message") or "") if end is not None else ""
        said = said or {p.get("name"): p.get("value") for p in case.iter("property")}.get("detail", "")
        said = said.strip().split("\n")[0].replace("|", "/")
        test, seconds = f"{case.get('classname')}::{case.get('name')}", float(case.get("time") or 0)
        rows.append(dict(test=test, status=status, seconds=seconds, detail=said))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__)
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<gpu>-<date>)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per test (default 120)")
    parser.add_argument("--total", type=float, default=3600, help="seconds for the run (default 3600)")
    parser.add_argument("--fast", action="store_true", help="benchmark worker counts 1 and 4 only")
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args(argv)
    pytest = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:randomly"]
    paths = [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]  # the checkout's first
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), TP_GPU_CHECK_FAST="1" if args.fast else "0")
    if args.list:
        return subprocess.call(pytest + ["--collect-only", "-q", *args.pytest_args], cwd=REPO, env=env)
    now = datetime.datetime.now()
    info = environment(now)
    out = args.out or results_folder(info["gpus"], now)
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"gpu_check: {', '.join(info['gpus']) or 'no usable GPU'}; results in {out}", flush=True)
    pytest += ["-o", "junit_family=xunit1", f"--junitxml={out / 'junit.xml'}"]
    pytest += [f"--timeout={args.timeout:g}"] if info["pytest-timeout"] else []  # else only --total holds
    env["TP_GPU_CHECK_RESULTS"] = str(out)
    code = run_pytest(pytest + args.pytest_args, out / "pytest.log", args.total, env)
    rows = outcomes(out / "junit.xml")
    n = Counter(r["status"] for r in rows)
    status = 1 if n["FAIL"] or code not in (0, 1) else 0 if n["PASS"] else NOTHING_RAN
    ending = "" if code in (0, 1) else f"; pytest {'killed' if code is None else f'exit status {code}'}"
    verdict = f"gpu_check: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP{ending}"
    verdict += "; nothing ran" * (status == NOTHING_RAN)
    summary = {"verdict": verdict, "exit_status": status, "environment": info, "tests": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"# gpu_check, {now:%Y-%m-%d %H:%M}", "", verdict, ""]
    md += ["| test | result | s | detail |", "|-|-|-|-|"]
    md += ["| {test} | {status} | {seconds:.1f} | {detail} |".format(**r) for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    fails = [f"FAIL {r['test']}: {r['detail']}" for r in rows if r["status"] == "FAIL"]
    skips = Counter(r["detail"] for r in rows if r["status"] == "SKIP").most_common()
    skips = [f"SKIP {k} test{'s' * (k != 1)}: {why}" for why, k in skips]
    print("", *fails, *skips, f"{verdict}; see {out / 'summary.md'}", sep="\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
