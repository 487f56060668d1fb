"""gpu_check.py's checks that run in their own process (``gpu_check.py --case NAME``) on a GPU."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from benchmarks.gpu_runner import DONE_MARKER, NO_NCCL, SKIP_STATUS

REPO = Path(__file__).resolve().parent.parent


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
