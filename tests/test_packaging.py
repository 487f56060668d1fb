"""The installed package is the one imported, wherever a script runs from (the src layout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tp_gpu

REPO = Path(__file__).resolve().parents[1]
PROBE = "import tp_gpu; from tp_gpu import ColumnParallelLinear; print(tp_gpu.__file__)"


def run_from(folder: Path) -> subprocess.CompletedProcess:
    """``python -c PROBE`` started in ``folder`` (which Python puts first on ``sys.path``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_package_lives_under_src():
    assert Path(tp_gpu.__file__).resolve().parent == REPO / "src" / "tp_gpu"
    assert not (REPO / "tp_gpu").exists()  # no folder at the root to shadow the package


def test_a_script_in_the_folder_above_a_clone_named_tp_gpu_imports_the_package(tmp_path):
    """A clone named ``tp_gpu`` beside the script is a folder without ``__init__.py``: with a flat
    layout it became a namespace package and hid the installed one ("cannot import name
    'ColumnParallelLinear' from 'tp_gpu' (unknown location)")."""
    (tmp_path / "tp_gpu").symlink_to(REPO, target_is_directory=True)  # the clone, seen from above
    result = run_from(tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == Path(tp_gpu.__file__).resolve()


def test_a_script_in_the_clone_itself_imports_the_package():
    result = run_from(REPO)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == Path(tp_gpu.__file__).resolve()
