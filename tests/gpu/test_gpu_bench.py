"""The layer benchmark on CuPy (``benchmarks/bench_layers.py --quick``) in float32 and float16: it checks
every timed result against the dense one and stops on a difference; its JSON, Markdown and plots go to
``bench-<dtype>/`` of the results folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(480)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_layer_benchmark(dtype, results_dir, fast, record_property):
    out = results_dir / f"bench-{dtype}"
    argv = [sys.executable, str(REPO / "benchmarks" / "bench_layers.py"), "--backend", "cupy", "--quick"]
    argv += ["--dtype", dtype, "--out", str(out)] + (["--workers", "1", "4"] if fast else [])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=450, cwd=REPO)
    wrote = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    record_property("detail", wrote[-1] if wrote else f"exit status {done.returncode}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert wrote and list(out.glob("*.json")), done.stdout[-2000:]
