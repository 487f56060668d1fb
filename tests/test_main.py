"""``python -m tp_gpu``: its self-check passes, can fail, and its exit codes mean what the docstring says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tp_gpu import RowParallelLinear
from tp_gpu.__main__ import main

LAYERS = ("column", "row", "column->row", "embedding")


def check_lines(out: str):
    return re.findall(r"^(PASS|FAIL)  (\S+) .* workers=(\d+)", out, flags=re.M)


@pytest.mark.parametrize("dtype", ["float64", "float32"])  # float16 GEMMs on NumPy take ~40 s here
def test_numpy_self_check_passes_for_every_layer_and_worker_count(capsys, dtype):
    workers = [1, 2, 3, 5, 8]
    assert main(["--backend", "numpy", "--dtype", dtype, "--repeat", "1", "--workers", *map(str, workers)]) == 0
    out = capsys.readouterr().out
    lines = check_lines(out)
    assert sorted((layer, int(n)) for _, layer, n in lines) == sorted((layer, n) for layer in LAYERS for n in workers)
    assert {verdict for verdict, _, _ in lines} == {"PASS"}
    assert out.rstrip().endswith("self-check: all PASS")
    for n in workers:  # a timing row per layer and worker count, ending in a ratio
        assert len(re.findall(rf"^\S.* {n}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, flags=re.M)) == len(LAYERS)


def test_simulated_placement_with_more_workers_than_devices(capsys):
    assert main(["--backend", "simulated", "--devices", "3", "--workers", "2", "8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 worker(s): devices [0, 1], output on 0" in out
    assert "8 worker(s): devices [0, 1, 2, 0, 1, 2, 0, 1], output on 0" in out
    assert "self-check: all PASS" in out


def test_a_wrong_layer_fails_the_self_check(capsys, monkeypatch):
    forward = RowParallelLinear.forward

    def off_by_a_little(self, x):
        y = forward(self, x)
        return y + np.float32(1e-3)

    monkeypatch.setattr(RowParallelLinear, "forward", off_by_a_little)
    assert main(["--backend", "numpy", "--workers", "1", "2", "--repeat", "1"]) == 1
    out = capsys.readouterr().out
    failed = {(layer, n) for verdict, layer, n in check_lines(out) if verdict == "FAIL"}
    assert failed == {(layer, n) for layer in ("row", "column->row") for n in ("1", "2")}
    assert "self-check: FAILED" in out


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--workers", "0"])
    assert exc.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_value(capsys):
    assert main(["--backend", "numpy", "--devices", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigError") and "devices=3" in err


def test_closed_stdout_ends_quietly():
    """``python -m tp_gpu | head -1``: no BrokenPipeError traceback."""
    env = {**os.environ, "TP_GPU_BACKEND": "numpy"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tp_gpu", "--repeat", "1"],
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
