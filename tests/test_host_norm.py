"""The compiled host normalisations (tp_gpu.backends.host_norm): LayerNorm's and RMSNorm's forward and
backward against float64 references and against the NumPy ufunc path, row by row, at odd shapes, on
strided input and on NaN and infinity; which arrays they take; and the ``TP_GPU_HOST_KERNELS`` choice.

The layers' own tests (test_norm.py, test_rms_norm.py, the models') run on whichever path is chosen;
here both paths run, so each is tested whatever the machine has.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import tp_gpu
from tp_gpu import ConfigError, LayerNorm, RMSNorm, TensorParallelConfig
from tp_gpu.backends import get_backend, host_norm
from tp_gpu.layers.norm import _normalise as layer_norm_forward
from tp_gpu.layers.norm import _normalise_grad as layer_norm_backward
from tp_gpu.layers.rms_norm import _normalise as rms_norm_forward
from tp_gpu.layers.rms_norm import _normalise_grad as rms_norm_backward

EPS = 1e-5
SHAPES = [(1, 1), (1, 256), (3, 5, 13), (0, 7), (17, 1031), (2, 1, 3, 64)]
DTYPES = [np.float32, np.float64]
#: |error| allowed against the float64 reference, per dtype, for outputs of order one.
ATOL = {np.float32: 4e-6, np.float64: 1e-13}


@pytest.fixture
def choose(monkeypatch):
    """``choose(name)``: run on ``TP_GPU_HOST_KERNELS=name`` (``numba`` needs Numba); the choice that was
    in place is read again afterwards."""

    def choose(name: str) -> None:
        if name == "numba":
            pytest.importorskip("numba", reason="the compiled path needs Numba (pip install 'tp_gpu[host]')")
        monkeypatch.setenv(host_norm.ENV_VAR, name)
        assert host_norm.reread_choice() == name

    yield choose
    monkeypatch.undo()
    host_norm.reread_choice()


def reference_layer_norm(x, w, b):
    x = x.astype(np.float64)
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + EPS)
    xhat = (x - mean) * rstd
    return xhat * w + b, xhat, rstd


def reference_layer_norm_grad(dy, xhat, rstd, w):
    """float64: dx = rstd (g - mean g - xhat mean(g xhat)), g = dy w; dweight, dbias over the rows."""
    dy, xhat, rstd = (a.astype(np.float64) for a in (dy, xhat, rstd))
    g = dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    h = dy.shape[-1]
    return dx, (dy * xhat).reshape(-1, h).sum(0), dy.reshape(-1, h).sum(0)


def reference_rms_norm(x, w):
    x = x.astype(np.float64)
    rstd = 1 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS)
    return x * rstd * w, x * rstd, rstd


def reference_rms_norm_grad(dy, xhat, rstd, w):
    dy, xhat, rstd = (a.astype(np.float64) for a in (dy, xhat, rstd))
    g = dy * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, dy.shape[-1]).sum(0)


def data(rng, shape, dtype):
    """``x`` off-centre and scaled (so the mean and variance matter), ``dy``, a weight and a bias."""
    h = shape[-1]
    x = (rng.standard_normal(shape) * 3 + 1.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, rng.standard_normal(h).astype(dtype), rng.standard_normal(h).astype(dtype)


def assert_near(got, expected, dtype, scale=1.0):
    assert got.dtype == dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL[dtype] * scale)


def assert_relative(got, expected, dtype):
    """For ``rstd``, up to ``1/sqrt(eps)`` where a row is constant."""
    assert got.dtype == dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=ATOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_layer_norm_forward_and_backward_match_float64(choose, rng, shape, dtype, kernels):
    choose(kernels)
    x, dy, w, b = data(rng, shape, dtype)
    xp = np
    assert host_norm.serves(xp, np.dtype(dtype), x, w, b) == (kernels == "numba")
    y, xhat, rstd = layer_norm_forward(xp, x, w, b, EPS, np.dtype(dtype))
    ry, rxhat, rrstd = reference_layer_norm(x, w, b)
    assert_near(y, ry, dtype, scale=4)
    assert_near(xhat, rxhat, dtype)
    assert_relative(rstd, rrstd, dtype)
    dx, dweight, dbias = layer_norm_backward(xp, dy, xhat, rstd, w, np.dtype(dtype))
    rdx, rdweight, rdbias = reference_layer_norm_grad(dy, rxhat, rrstd, w)
    rows = max(1, int(np.prod(shape[:-1])))
    assert_near(dx, rdx, dtype, scale=4)
    assert_near(dweight, rdweight, dtype, scale=2 * rows)
    assert_near(dbias, rdbias, dtype, scale=2 * rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_rms_norm_forward_and_backward_match_float64(choose, rng, shape, dtype, kernels):
    choose(kernels)
    x, dy, w, _ = data(rng, shape, dtype)
    y, xhat, rstd = rms_norm_forward(np, x, w, EPS, np.dtype(dtype))
    ry, rxhat, rrstd = reference_rms_norm(x, w)
    assert_near(y, ry, dtype, scale=4)
    assert_near(xhat, rxhat, dtype)
    assert_relative(rstd, rrstd, dtype)
    np.testing.assert_array_equal(y, xhat * w)  # LlamaRMSNorm: the rounded xhat meets the weight
    dx, dweight = rms_norm_backward(np, dy, xhat, rstd, w, np.dtype(dtype))
    rdx, rdweight = reference_rms_norm_grad(dy, rxhat, rrstd, w)
    assert_near(dx, rdx, dtype, scale=4)
    assert_near(dweight, rdweight, dtype, scale=2 * max(1, int(np.prod(shape[:-1]))))


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_row_is_computed_alone(choose, rng, dtype):
    """A row's result is the same, to the bit, in a batch of any size or order: how rows are split
    among devices (sequence parallelism) cannot change them."""
    choose("numba")
    x, dy, w, b = data(rng, (9, 77), dtype)
    y, xhat, rstd = host_norm.layer_norm(x, w, b, EPS)
    dx, _, _ = host_norm.layer_norm_grad(dy, xhat, rstd, w)
    order = rng.permutation(9)
    y2, xhat2, rstd2 = host_norm.layer_norm(x[order], w, b, EPS)
    dx2, _, _ = host_norm.layer_norm_grad(dy[order], xhat2, rstd2, w)
    for i, row in enumerate(order):
        one = host_norm.layer_norm(x[row : row + 1], w, b, EPS)
        np.testing.assert_array_equal(one[0][0], y[row])
        np.testing.assert_array_equal(y2[i], y[row])
        np.testing.assert_array_equal(dx2[i], dx[row])
    ry, _, _ = host_norm.rms_norm(x, w, EPS)
    np.testing.assert_array_equal(host_norm.rms_norm(x[order], w, EPS)[0], ry[order])


def test_strided_and_fortran_inputs_are_read_right_and_left_unchanged(choose, rng):
    choose("numba")
    base = (rng.standard_normal((40, 30)) * 2 + 1).astype(np.float32)
    before = base.copy()
    w, b = rng.standard_normal(15).astype(np.float32), rng.standard_normal(15).astype(np.float32)
    for view in (base[::2, 1::2], np.asfortranarray(base[:, :15])):
        y, xhat, rstd = host_norm.layer_norm(view, w, b, EPS)
        assert y.shape == view.shape and rstd.shape == (view.shape[0], 1)
        assert_near(y, reference_layer_norm(view, w, b)[0], np.float32, scale=4)
        dy = rng.standard_normal(view.shape).astype(np.float32)
        dx, _, _ = host_norm.layer_norm_grad(dy, xhat, rstd, w)
        assert_near(dx, reference_layer_norm_grad(dy, xhat, rstd, w)[0], np.float32, scale=4)
    np.testing.assert_array_equal(base, before)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_nan_and_infinity_stay_in_their_rows(choose, kernels):
    """``fastmath`` is only reassociation and contraction: a NaN or an infinity makes its own row NaN,
    as in NumPy, and leaves the other rows finite and right."""
    choose(kernels)
    x = np.array([[1.0, 2.0, 4.0], [np.nan, 1.0, 2.0], [np.inf, 1.0, 2.0]], np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    f32 = np.dtype(np.float32)
    with np.errstate(invalid="ignore"):  # NumPy's ufuncs warn of the NaN they make
        layer_norm_y = layer_norm_forward(np, x, w, b, EPS, f32)[0]
        rms_norm_y = rms_norm_forward(np, x, w, EPS, f32)[0]
    for y in (layer_norm_y, rms_norm_y):
        assert np.isfinite(y[0]).all()
        assert np.isnan(y[1]).all() and np.isnan(y[2]).any()
    assert_near(layer_norm_y[:1], reference_layer_norm(x[:1], w, b)[0], np.float32)
    assert_near(rms_norm_y[:1], reference_rms_norm(x[:1], w)[0], np.float32)


def test_what_the_compiled_loops_take(choose):
    choose("numba")
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    a, b = np.ones((2, 3), np.float32), np.ones(3, np.float32)
    assert host_norm.serves(np, f32, a, b)
    assert not host_norm.serves(np, f32, a, b.astype(np.float64)), "mixed dtypes"
    assert not host_norm.serves(np, f64, a, b), "arrays not of the dtype asked"
    half = a.astype(np.float16)
    assert not host_norm.serves(np, np.dtype(np.float16), half, half), "float16 keeps the ufunc path"
    simulated = get_backend("simulated", devices=2)
    with simulated.device(0):
        on_device = simulated.asarray(a, np.float32, 0)
    assert not host_norm.serves(simulated.xp, f32, on_device, on_device), "a simulated device's array"
    assert not host_norm.serves(simulated.xp, f32, a, b)


def test_bad_choice_raises_naming_it_and_keeps_the_earlier_one(choose, monkeypatch):
    choose("numpy")
    monkeypatch.setenv(host_norm.ENV_VAR, "numbaa")
    expected = r"TP_GPU_HOST_KERNELS='numbaa' is not a choice; expected one of \('numba', 'numpy'\)"
    with pytest.raises(ConfigError, match=expected):
        host_norm.reread_choice()
    assert host_norm.host_kernels() == "numpy"


def test_numba_asked_for_but_missing_raises(choose, monkeypatch):
    choose("numpy")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    host_norm._compiled.cache_clear()
    try:
        monkeypatch.setenv(host_norm.ENV_VAR, "numba")
        with pytest.raises(ConfigError, match="TP_GPU_HOST_KERNELS=numba, but Numba does not import"):
            host_norm.reread_choice()
        monkeypatch.setenv(host_norm.ENV_VAR, "")
        assert host_norm.reread_choice() == "numpy", "unset: the ufunc path when Numba is missing"
    finally:
        host_norm._compiled.cache_clear()


def test_a_bad_choice_stops_a_backend_being_built(choose, monkeypatch):
    """Checked when a backend is built, before anything is computed; numba missing too."""
    from tp_gpu.backends import _build_backend

    choose("numpy")
    monkeypatch.setenv(host_norm.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match="TP_GPU_HOST_KERNELS='fast' is not a choice"):
        _build_backend("numpy", None)
    monkeypatch.setenv(host_norm.ENV_VAR, "numba")
    monkeypatch.setitem(sys.modules, "numba", None)
    host_norm._compiled.cache_clear()
    try:
        with pytest.raises(ConfigError, match="Numba does not import"):
            _build_backend("simulated", 2)
        monkeypatch.setenv(host_norm.ENV_VAR, "NumPy ")  # case and spaces as the user typed them
        assert isinstance(_build_backend("numpy", None), tp_gpu.backends.NumpyBackend)
    finally:
        host_norm._compiled.cache_clear()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layers_agree_on_both_paths(choose, rng, dtype):
    """LayerNorm and RMSNorm layers, forward and backward, on the compiled loops and on the ufuncs:
    both within the dtype's tolerance of each other (each is tested against float64 above)."""
    h = 37
    x = rng.standard_normal((2, 5, h)) * 2 + 1
    dy = rng.standard_normal((2, 5, h))
    w, b = rng.standard_normal(h), rng.standard_normal(h)
    results = {}
    for kernels in ("numba", "numpy"):
        choose(kernels)
        config = TensorParallelConfig(n_workers=3, dtype=dtype)
        layer_norm, rms_norm = LayerNorm(h, config), RMSNorm(h, config)
        layer_norm.load_dense(w, b)
        rms_norm.load_state_dict({"weight": w})
        got = []
        for layer in (layer_norm, rms_norm):
            leaf = tp_gpu.tensor(x.astype(dtype), requires_grad=True)
            y = layer(leaf)
            y.backward(dy.astype(dtype))
            got += [y.numpy(), leaf.grad.numpy(), layer.weight.full_grad()]
        results[kernels] = got
    for compiled, ufuncs in zip(results["numba"], results["numpy"]):
        np.testing.assert_allclose(compiled, ufuncs, rtol=0, atol=ATOL[np.dtype(dtype).type] * 40)
