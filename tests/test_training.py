"""The tiny language model of examples/train_tiny_lm.py trains exactly like its dense twin."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
from dense_tiny_lm import train_dense

from tp_gpu import TensorParallelConfig

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"
SIZES = dict(vocab=24, dim=8, hidden=16, batch=4, seq_len=6)
STEPS, LR, SEED = 30, 1e-2, 3


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def dense_losses(example):
    config = TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64")
    weights = example.TinyLM(SIZES["vocab"], SIZES["dim"], SIZES["hidden"], config, seed=SEED).dense_weights()
    batches = [
        example.make_batch(SIZES["vocab"], SIZES["batch"], SIZES["seq_len"], SEED, s) for s in range(STEPS)
    ]
    return train_dense(weights, batches, LR)


@pytest.mark.parametrize("n_workers", [1, 2, 4])
@pytest.mark.parametrize("backend, devices", [("numpy", None), ("simulated", 3)], ids=["numpy", "sim3"])
def test_losses_match_dense_twin_every_step(example, dense_losses, n_workers, backend, devices):
    losses = example.train(
        n_workers=n_workers,
        steps=STEPS,
        lr=LR,
        seed=SEED,
        backend=backend,
        devices=devices,
        dtype="float64",
        **SIZES,
    )
    np.testing.assert_allclose(losses, dense_losses, rtol=1e-6)


def test_loss_falls_well_below_start(example):
    losses = example.train(n_workers=4, steps=150, lr=LR, seed=SEED, backend="simulated", devices=3, **SIZES)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.1 * losses[0], (losses[0], losses[-10:])


def test_example_main_exits_zero(example, capsys):
    assert example.main(["--steps", "120", "--workers", "2", "--backend", "numpy"]) == 0
    assert "mean of the last 10 steps" in capsys.readouterr().out
