"""Background checkpoint saves under mpirun with 2 ranks (tests/mpi_programs/background_save.py).

Each rank trains while its write is held in flight, waits, and loads the checkpoint at another
worker count: it must hold the weights of the call and resume the same steps, and no
communicator call may run outside the main thread. A write that fails on one rank must make the
next save raise on both ranks, without writing, and leave the previous checkpoint loadable. Both
formats: the single file (rank 0 writes) and the sharded folder (every rank writes).
Needs ``mpirun`` and mpi4py (skipped with the reason otherwise), as tests/test_mpi.py.
"""

from __future__ import annotations

import pytest
from test_mpi import _mpi_missing, mpirun

pytestmark = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))

FORMATS = {"file": ([], "model.safetensors"), "sharded": (["--sharded"], "model")}


@pytest.mark.parametrize("kind", FORMATS)
def test_background_save_while_training_on_two_ranks(tmp_path, kind):
    flags, name = FORMATS[kind]
    result = mpirun(2, "background_save.py", str(tmp_path), *flags, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for rank in range(2):
        for line in (
            "in flight during 3 steps: True",
            "wait returned, on disk after",
            "loaded equals the weights at the call: True",
            "resumed steps equal: True",
            "communicator calls outside the main thread: 0",
        ):
            assert f"rank {rank}: {line}" in result.stdout, output
    # wait(timeout) while rank 0 alone still writes: a timeout on both ranks, though rank 1 is done
    assert "rank 0: wait(timeout) raised TimeoutError; done here: False" in result.stdout, output
    assert "rank 1: wait(timeout) raised TimeoutError; done here: True" in result.stdout, output
    if kind == "file":
        assert "rank 0: tensors in the file: 14" in result.stdout, output  # 7 weights, 7 momenta
    assert (tmp_path / name).exists()


# A single file is written by rank 0 alone, so only its failure is a failure of the file.
@pytest.mark.parametrize("kind, failing", [("file", 0), ("sharded", 0), ("sharded", 1)])
def test_a_failure_on_one_rank_raises_on_both_at_the_next_save(tmp_path, kind, failing):
    flags, name = FORMATS[kind]
    result = mpirun(2, "background_save.py", str(tmp_path), *flags, "--fail-rank", str(failing), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    other = 1 - failing
    assert f"rank {failing}: next save raised CheckpointFileError: cannot write" in result.stdout, output
    assert "No space left on device" in result.stdout, output
    if kind == "file":
        assert (
            f"rank {other}: next save raised CheckpointError: the background save of checkpoint "
            f"'{tmp_path / name}' failed on 1 of 2 ranks (rank {failing} first)" in result.stdout
        ), output
    else:  # rank 0 commits the folder: it learns rank 1's failure from rank 1's marker itself
        assert f"rank {other}: next save raised CheckpointError:" in result.stdout, output
        assert (
            f"rank {failing}" in result.stdout.split(f"rank {other}: next save raised", 1)[1].split("\n")[0]
        )
    for rank in range(2):
        for line in (
            "in flight during 3 steps: True",
            "next save's target exists: False",
            "loaded equals the previous save: True",
            "communicator calls outside the main thread: 0",
        ):
            assert f"rank {rank}: {line}" in result.stdout, output
        assert f"rank {rank}: wait raised" in result.stdout, output
