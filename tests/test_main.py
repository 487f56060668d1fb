"""``python -m tp_gpu``: its report, a self-check that passes and can fail, and its exit codes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import skip_unless_cupy

import tp_gpu
from tp_gpu import RowParallelLinear, VocabParallelCrossEntropy, testing
from tp_gpu.__main__ import benchmark_hint, cupy_lines, main
from tp_gpu.layers.embedding_functions import EmbeddingLookup

LAYERS = ("column", "row", "mlp", "embedding", "loss")
STAGES = ("forward", "backward")


def check_lines(out: str) -> list[tuple[str, str, str, int]]:
    """``(verdict, layer, stage, workers)`` of every self-check line."""
    found = re.findall(r"^(PASS|FAIL)  (\S+)\s+(forward|backward)\s+workers=(\d+)", out, flags=re.MULTILINE)
    return [(verdict, layer, stage, int(n)) for verdict, layer, stage, n in found]


def failures(out: str) -> set[tuple[str, str, int]]:
    return {(layer, stage, n) for verdict, layer, stage, n in check_lines(out) if verdict == "FAIL"}


def every_check(workers) -> list[tuple[str, str, int]]:
    return sorted((layer, stage, n) for layer in LAYERS for stage in STAGES for n in workers)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_numpy_self_check_passes_for_every_layer_and_worker_count(capsys, dtype):
    workers = list(range(1, 9))
    assert main(["--backend", "numpy", "--dtype", dtype, "--workers", *map(str, workers)]) == 0
    out = capsys.readouterr().out
    lines = check_lines(out)
    assert sorted((layer, stage, n) for _, layer, stage, n in lines) == every_check(workers)
    assert {verdict for verdict, *_ in lines} == {"PASS"}
    assert f"self-check: all {len(lines)} checks PASS" in out
    assert out.rstrip().splitlines()[-1] == benchmark_hint()  # points to the benchmark ...
    assert " ms" not in out and "TP/dense" not in out  # ... instead of printing a timing table


def test_simulated_placement_with_more_workers_than_devices(capsys):
    workers = [1, 2, 3, 8]
    assert main(["--backend", "simulated", "--devices", "3", "--workers", *map(str, workers)]) == 0
    out = capsys.readouterr().out
    assert "devices  [0, 1, 2]" in out
    assert "  1 worker(s): devices [0], output on 0" in out
    assert "  2 worker(s): devices [0, 1], output on 0" in out
    assert "  8 worker(s): devices [0, 1, 2, 0, 1, 2, 0, 1], output on 0" in out
    lines = check_lines(out)
    assert sorted((layer, stage, n) for _, layer, stage, n in lines) == every_check(workers)
    assert not failures(out)


def test_environment_names_versions_and_the_backend_chosen(capsys, monkeypatch):
    monkeypatch.delenv("TP_GPU_BACKEND", raising=False)
    assert main(["--backend", "simulated", "--devices", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"tp_gpu   {tp_gpu.__version__}\n" in out
    assert f"NumPy    {np.__version__}\n" in out
    assert f"Python   {sys.version.split()[0]} ({sys.executable})" in out
    assert "backend  simulated, chosen by --backend\n" in out


def test_backend_from_the_environment_variable(capsys, monkeypatch):
    monkeypatch.setenv("TP_GPU_BACKEND", "simulated")
    assert main(["--workers", "1"]) == 0
    assert "backend  simulated, chosen by $TP_GPU_BACKEND=simulated\n" in capsys.readouterr().out


def test_auto_falls_back_to_numpy_saying_why_cupy_cannot_run(capsys, monkeypatch):
    from tp_gpu.backends import cupy_backend

    monkeypatch.delenv("TP_GPU_BACKEND", raising=False)
    monkeypatch.setattr(cupy_backend, "cupy_unavailable_reason", lambda: "no GPU in this test")
    assert main(["--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "backend  numpy, auto: CuPy cannot run here, so NumPy on the host (no GPU in this test)\n" in out
    assert "devices  ['cpu']" in out


@pytest.mark.gpu
def test_cupy_reports_its_version_and_gpus(capsys):
    skip_unless_cupy()
    assert main(["--backend", "cupy", "--workers", "1", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CuPy     \d+\.\d+", out, flags=re.MULTILINE)
    assert re.search(r"^GPU 0    \S", out, flags=re.MULTILINE)
    assert not failures(out) and len(check_lines(out)) == len(every_check([1, 2]))


def test_cupy_lines_name_the_version_and_each_gpu():
    """The CuPy report, on a stand-in for a CuPy backend, so that it runs without a GPU too."""
    runtime = SimpleNamespace(getDeviceProperties=lambda d: {"name": f"Fake GPU {d}".encode()})
    xp = SimpleNamespace(__version__="13.6.0", cuda=SimpleNamespace(runtime=runtime))
    backend = SimpleNamespace(name="cupy", devices=(0, 1), xp=xp)
    assert cupy_lines(backend) == ["CuPy     13.6.0", "GPU 0    Fake GPU 0", "GPU 1    Fake GPU 1"]
    assert cupy_lines(SimpleNamespace(name="numpy")) == []


def test_a_row_layer_off_by_1e_3_fails_exactly_the_checks_it_affects(capsys, monkeypatch):
    forward = RowParallelLinear.forward

    def off_by_a_little(self, x):
        return forward(self, x) + 1e-3

    monkeypatch.setattr(RowParallelLinear, "forward", off_by_a_little)
    assert main(["--backend", "numpy", "--workers", "1", "2"]) == 1
    out = capsys.readouterr().out
    # The row layer's forward, alone and as the MLP's second layer; their backward reads saved inputs.
    expected = {(layer, "forward", n) for layer in ("row", "mlp") for n in (1, 2)}
    assert failures(out) == expected
    assert re.search(
        r"^FAIL  row\s+forward\s+workers=1\s+Y error 1\.0e-03 > allowed", out, flags=re.MULTILINE
    )
    assert len(check_lines(out)) == len(every_check([1, 2])) - len(expected)  # no backward after a FAIL
    assert f"self-check: {len(expected)} of {len(check_lines(out))} checks FAILED" in out


def test_a_wrong_gradient_fails_the_backward_check(capsys, monkeypatch):
    backward = EmbeddingLookup.backward  # the embedding's Function on the tape: its dE off by 1 %
    monkeypatch.setattr(
        EmbeddingLookup, "backward", staticmethod(lambda ctx, grad: backward(ctx, grad * 1.01))
    )
    assert main(["--backend", "simulated", "--devices", "3", "--workers", "4"]) == 1
    assert failures(capsys.readouterr().out) == {("embedding", "backward", 4)}


def test_a_layer_that_raises_fails_its_check_and_the_others_still_run(capsys, monkeypatch):
    def broken(self, logits, targets):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(VocabParallelCrossEntropy, "forward", broken)
    monkeypatch.setattr(VocabParallelCrossEntropy, "__call__", broken)
    assert main(["--backend", "numpy", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert failures(out) == {("loss", "forward", 2)}
    assert re.search(
        r"^FAIL  loss\s+forward\s+workers=2\s+ValueError: broken on purpose$", out, flags=re.MULTILINE
    )
    assert len(check_lines(out)) == len(every_check([2])) - 1


def test_the_self_check_uses_the_one_tolerance_table(capsys, monkeypatch):
    monkeypatch.setitem(testing.TOLERANCE, "float32", 1e-30)
    assert main(["--backend", "numpy", "--workers", "2"]) == 1
    failed = failures(capsys.readouterr().out)
    assert ("column", "forward", 2) in failed
    assert ("embedding", "forward", 2) not in failed  # a lookup is exact


@pytest.mark.parametrize(
    "argv",
    [
        ["--workers", "0"],
        ["--devices", "0"],
        ["--workers"],
        ["--dtype", "int8"],
        ["--backend", "tpu"],
        ["--bogus"],
    ],
)
def test_bad_option_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: python -m tp_gpu" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_value(capsys):
    assert main(["--backend", "numpy", "--devices", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError") and "devices=3" in err


def test_bad_environment_variable_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("TP_GPU_BACKEND", "tpu")
    assert main([]) == 2
    assert "TP_GPU_BACKEND='tpu'" in capsys.readouterr().err


def test_closed_stdout_ends_quietly():
    """``python -m tp_gpu | head -1``: no BrokenPipeError traceback, exit status 1."""
    env = {**os.environ, "TP_GPU_BACKEND": "numpy"}
    workers = ["1"] * 200  # some 200 kB of report, more than a pipe holds, so a write must fail
    proc = subprocess.Popen(
        [sys.executable, "-m", "tp_gpu", "--workers", *workers],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
    )
    assert proc.stdout.readline().startswith(b"== Environment")
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in stderr, stderr


def test_the_hint_names_the_checkouts_quick_benchmark_by_absolute_path():
    """The hint's command runs from any folder: it names this interpreter and the script's full path."""
    words = shlex.split(benchmark_hint().split(": ", 1)[1])
    assert words[0] == sys.executable and words[2:] == ["--quick"]
    script = Path(words[1])
    assert script.is_absolute() and script.is_file() and script.name == "bench_layers.py"


def test_the_hint_without_a_checkout_says_where_the_benchmarks_are(tmp_path):
    hint = benchmark_hint(tmp_path / "site-packages" / "tp_gpu")
    assert "source checkout" in hint and "bench_layers.py --quick" in hint


def test_help_is_plain_text_with_the_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "tp_gpu", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "``" not in out and ":func:" not in out and ":mod:" not in out  # no reStructuredText
    for default in ("(default: 1 2 4)", "default: float32", "(default: 0)"):
        assert default in out
