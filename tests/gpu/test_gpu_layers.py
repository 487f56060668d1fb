"""Layers on CuPy against NumPy float64 references: the self-check, 3-D inputs (and their time against 2-D
inputs of the same rows), and a backward through the autograd tape."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tp_gpu
from tp_gpu import ColumnParallelLinear, RowParallelLinear, TensorParallelConfig
from tp_gpu.testing import assert_close


@pytest.mark.timeout(300)
def test_self_check_on_cupy(capsys, record_property):
    """``python -m tp_gpu --backend cupy``: every layer at every worker count, forward then backward."""
    from tp_gpu.__main__ import main

    status = main(["--backend", "cupy"])
    out = capsys.readouterr().out
    verdict = [line for line in out.splitlines() if line.startswith("self-check:")]
    record_property("detail", verdict[-1] if verdict else "no verdict line")
    assert status == 0, out[-3000:]
    assert verdict and "PASS" in verdict[-1]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 2e-2)])
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear], ids=lambda c: c.__name__)
def test_3d_input_equals_its_rows_in_2d(cupy, cls, dtype, tol, results_dir, record_property):
    """(8, 256, 1024) against (2048, 1024): equal outputs; the GPU median time of each goes to
    ``linear-3d.json`` (CuPy's batched-matmul path for 3-D against one GEMM)."""
    from cupyx.profiler import benchmark

    layer = cls(1024, 1024, TensorParallelConfig(n_workers=2, backend="cupy", dtype=dtype), seed=0)
    with cupy.cuda.Device(layer.devices[0]):
        x3 = cupy.asarray(np.random.default_rng(0).standard_normal((8, 256, 1024)), dtype=dtype)
        x2 = x3.reshape(-1, 1024)  # (B*T, in)
    y3 = cupy.asnumpy(layer(x3)).astype(np.float64)
    y2 = cupy.asnumpy(layer(x2)).astype(np.float64)
    error = float(np.abs(y3.reshape(y2.shape) - y2).max() / max(1.0, np.abs(y2).max()))
    seconds = {}
    for label, x in (("2d", x2), ("3d", x3)):
        run = benchmark(layer, (x,), n_repeat=50, n_warmup=5, max_duration=2.0, devices=tuple(layer.devices))
        seconds[label] = float(np.median(np.max(run.gpu_times, axis=0)))  # slowest device, median run
    row = {"layer": cls.__name__, "dtype": dtype, "error": error, "seconds_2d": seconds["2d"]}
    row.update(seconds_3d=seconds["3d"], ratio_3d_over_2d=seconds["3d"] / seconds["2d"])
    record = results_dir / "linear-3d.json"
    rows = json.loads(record.read_text()) if record.exists() else []
    record.write_text(json.dumps(rows + [row], indent=2) + "\n")
    record_property("detail", f"3-D/2-D time x{row['ratio_3d_over_2d']:.2f}, difference {error:.1e}")
    assert error <= tol, f"3-D and 2-D differ by {error:.1e} (> {tol})"


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear], ids=lambda c: c.__name__)
def test_backward_through_the_tape(cls, n_workers):
    """New autograd API: ``y = layer(tp_gpu.tensor(x, requires_grad=True)); y.backward(dy)``; x.grad and
    the weight and bias grads against float64 NumPy at odd sizes."""
    rng = np.random.default_rng(n_workers)
    config = TensorParallelConfig(n_workers=n_workers, backend="cupy", dtype="float64")
    layer = cls(13, 7 * n_workers + 1, config, seed=n_workers)
    x_host = rng.standard_normal((3, 5, 13))  # (B, T, in)
    dy = rng.standard_normal((3, 5, 7 * n_workers + 1))  # (B, T, out)
    x = tp_gpu.tensor(x_host, requires_grad=True)
    y = layer(x)
    w, b = layer.full_weight(), layer.full_bias()  # (in, out), (out,)
    assert_close(tp_gpu.to_numpy(y), x_host @ w + b, "float64", 13, what="y")
    y.backward(dy)
    grads = layer.grads()
    assert_close(tp_gpu.to_numpy(x.grad), dy @ w.T, "float64", w.shape[1], what="x.grad")
    assert_close(grads["weight"], x_host.reshape(-1, 13).T @ dy.reshape(15, -1), "float64", 15, what="dW")
    assert_close(grads["bias"], dy.sum(axis=(0, 1)), "float64", 15, what="db")
