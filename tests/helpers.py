"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on the path)."""

from __future__ import annotations

import numpy as np
import pytest

from tp_gpu.backends import cupy_available

#: Absolute/relative tolerance of each dtype against a float64 reference.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2}


def skip_unless_cupy() -> None:
    """Skip the calling test, saying why, when CuPy cannot run here."""
    if not cupy_available():
        pytest.skip(_no_cupy())


def skip_unless_cupy_imports() -> None:
    """Skip the calling test when CuPy does not import (it may still have no GPU), in the same words as
    :func:`skip_unless_cupy`, so the test summary counts every test that CuPy's absence stops on one line."""
    try:
        import cupy  # noqa: F401
    except Exception:  # not installed, or failing to import
        pytest.skip(_no_cupy())


def _no_cupy() -> str:
    from tp_gpu.backends.cupy_backend import cupy_unavailable_reason

    return f"CuPy backend unavailable: {cupy_unavailable_reason()}"


def to_host(layer, array) -> np.ndarray:
    """An output of ``layer`` as a host float64 NumPy array."""
    import tp_gpu

    return np.asarray(tp_gpu.to_numpy(array), dtype=np.float64)


def forward_backward(module, x, grad, *args, **kwargs):
    """``(y, dx)``: ``module``'s output for ``x`` and, after ``y.backward(grad)``, the gradient of ``x``.

    ``x`` may be an array (made a leaf that requires grad) or a Tensor (a ShardedTensor, say), marked so.
    """
    import tp_gpu

    leaf = x.requires_grad_() if isinstance(x, tp_gpu.Tensor) else tp_gpu.tensor(x, requires_grad=True)
    y = module(leaf, *args, **kwargs)
    y.backward(grad)
    return y, leaf.grad


def device_of(layer, t):
    """The device a Dense output Tensor ``t`` of ``layer`` lies on: its placement's, checked to be
    where its one block is."""
    import tp_gpu
    from tp_gpu.placements import Dense

    assert isinstance(t, tp_gpu.Tensor) and isinstance(t.placement, Dense), t
    (block,) = t.blocks.values()
    assert layer.backend.device_of(block) == t.placement.device
    return t.placement.device
