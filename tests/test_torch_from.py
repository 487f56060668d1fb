"""PyTorch weights cannot be loaded transposed by accident.

* ``from_torch(module)`` reads the layout, dtype, device and mode from an
  ``nn.Linear``, ``nn.Embedding`` or ``nn.Sequential(Linear, act, Linear)``.
* ``from_dense`` / ``load_dense`` refuse a ``torch.Tensor`` weight without an
  explicit ``layout``: a square ``nn.Linear(32, 32)`` used to load transposed.
* A shape error names the other layout when the weight would have fit it.

The torch tests are skipped, with the reason, where PyTorch is not installed;
the layout hints and the import check run everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import TOLERANCE, to_host

from tp_gpu import (
    ColumnParallelLinear,
    ConfigError,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    Tensor,
    TensorParallelConfig,
    from_torch,
)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def assert_close(actual, expected, dtype="float64") -> None:
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))


def test_import_tp_gpu_does_not_import_torch():
    code = "import sys, tp_gpu; assert callable(tp_gpu.from_torch); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- a torch.Tensor weight needs an explicit layout ---------------------------------------------------


def test_square_linear_without_layout_is_refused(torch):
    """The issue's case: a square nn.Linear was accepted in (n_in, n_out) and was wrong by 1.42."""
    linear = torch.nn.Linear(32, 32, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"torch.Tensor of shape \(32, 32\).*layout='out_in'.*from_torch"):
        ColumnParallelLinear.from_dense(linear.weight, linear.bias)
    layer = RowParallelLinear(32, 32, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    before = layer.full_weight()
    with pytest.raises(ConfigError, match="say which layout"):
        layer.load_dense(linear.weight, linear.bias)
    np.testing.assert_array_equal(layer.full_weight(), before)
    # Either layout, given, loads the tensor.
    x = torch.randn(5, 32, dtype=torch.float64)
    config = TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    expected = linear(x).detach().numpy()
    out_in = ColumnParallelLinear.from_dense(linear.weight, linear.bias, config, layout="out_in")
    in_out = ColumnParallelLinear.from_dense(linear.weight.T, linear.bias, config, layout="in_out")
    for loaded in (out_in, in_out):
        assert_close(to_host(loaded, loaded(x)), expected)


# --- shape errors point at the other layout -----------------------------------------------------------


def test_weight_that_fits_the_other_layout_says_so(rng):
    torch_layout = rng.standard_normal((6, 4))  # nn.Linear(4, 6).weight as an array: (n_out, n_in)
    layer = ColumnParallelLinear(4, 6, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    with pytest.raises(ShapeError, match=r"got \(6, 4\); it would fit layout='out_in' \(PyTorch nn.Linear's"):
        layer.load_dense(torch_layout)
    with pytest.raises(ShapeError, match=r"for layout='out_in', got \(4, 6\); it would fit layout='in_out'"):
        layer.load_dense(torch_layout.T, layout="out_in")
    with pytest.raises(ShapeError) as info:
        layer.load_dense(rng.standard_normal((5, 5)))
    assert "would fit" not in str(info.value)  # no hint where neither layout fits


def test_from_dense_of_a_torch_layout_array_points_at_the_layout(rng):
    """Non-square: the weight builds a (6, 4) layer, and then the (6,) bias is the wrong size."""
    weight, bias = rng.standard_normal((6, 4)), rng.standard_normal(6)
    with pytest.raises(ShapeError, match=r"bias has n_in=6 entries.*pass layout='out_in'"):
        ColumnParallelLinear.from_dense(
            weight, bias, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")
        )
    layer = ColumnParallelLinear.from_dense(
        weight, bias, TensorParallelConfig(n_workers=2, dtype="float64"), layout="out_in"
    )
    np.testing.assert_array_equal(layer.full_weight(), weight.T)


# --- from_torch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "kind, cls", [(None, ColumnParallelLinear), ("column", ColumnParallelLinear), ("row", RowParallelLinear)]
)
@pytest.mark.parametrize("n_in, n_out", [(32, 32), (7, 13)])
def test_linear(torch, kind, cls, n_in, n_out, dtype):
    torch.manual_seed(n_in)
    linear = torch.nn.Linear(n_in, n_out, dtype=getattr(torch, dtype))
    layer = from_torch(linear, kind=kind) if kind else from_torch(linear)
    assert type(layer) is cls
    assert (layer.dtype.name, layer.backend.name, layer.n_workers) == (dtype, "numpy", 2)
    np.testing.assert_array_equal(layer.full_weight(), linear.weight.detach().numpy().T)
    np.testing.assert_array_equal(layer.full_bias(), linear.bias.detach().numpy())
    x = torch.randn(3, 2, n_in, dtype=getattr(torch, dtype))
    y = layer(x)
    assert isinstance(y, Tensor) and y.shape == (3, 2, n_out)
    assert_close(np.asarray(y), linear(x).detach().numpy(), dtype)


def test_linear_without_bias_and_layer_arguments(torch):
    linear = torch.nn.Linear(6, 12, bias=False, dtype=torch.float64)
    layer = from_torch(
        linear, TensorParallelConfig(n_workers=4, backend="simulated", devices=3, dtype="float64"), unit=3
    )
    assert layer.unit == 3 and layer.n_workers == 4 and layer.backend.name == "simulated"
    assert layer.full_bias() is None and layer.bias is None  # bias-free, as the module
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(5, 6, dtype=torch.float64)
    assert_close(to_host(layer, layer(x)), linear(x).detach().numpy())


def test_a_config_given_is_used_as_it_is(torch):
    linear = torch.nn.Linear(5, 5)  # float32
    layer = from_torch(
        linear, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    )  # float64: cast
    assert layer.dtype == np.float64 and layer.n_workers == 3
    np.testing.assert_array_equal(layer.full_weight(), linear.weight.detach().numpy().T.astype(np.float64))


@pytest.mark.parametrize("n_workers", [1, 3])
def test_embedding(torch, n_workers):
    embedding = torch.nn.Embedding(13, 7, padding_idx=0, dtype=torch.float64)
    layer = from_torch(embedding, TensorParallelConfig(n_workers=n_workers, backend="numpy", dtype="float64"))
    assert isinstance(layer, ParallelEmbedding) and (layer.vocab_size, layer.embed_dim) == (13, 7)
    ids = torch.randint(0, 13, (4, 5))
    np.testing.assert_array_equal(to_host(layer, layer(ids)), embedding(ids).detach().numpy())
    assert from_torch(torch.nn.Embedding(9, 2, dtype=torch.float16)).dtype == np.float16


@pytest.mark.parametrize(
    "make_activation, name",
    [
        (lambda nn: nn.GELU(), "gelu"),
        (lambda nn: nn.GELU(approximate="tanh"), "gelu_tanh"),
        (lambda nn: nn.GELU("tanh"), "gelu_tanh"),
        (lambda nn: nn.ReLU(), "relu"),
        (lambda nn: nn.Identity(), None),
    ],
    ids=["gelu", "gelu-tanh", "gelu-tanh-positional", "relu", "identity"],
)
def test_sequential_mlp(torch, make_activation, name):
    torch.manual_seed(3)
    nn = torch.nn
    mlp = nn.Sequential(
        nn.Linear(6, 10, dtype=torch.float64), make_activation(nn), nn.Linear(10, 6, dtype=torch.float64)
    )
    ours = from_torch(mlp, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64"))
    assert isinstance(ours, ParallelMLP) and ours.activation.name == (name or ours.activation.name)
    x = torch.randn(4, 6, dtype=torch.float64)
    assert_close(to_host(ours, ours(x)), mlp(x).detach().numpy())


def test_eval_mode_is_kept(torch):
    linear = torch.nn.Linear(4, 4).eval()
    assert from_torch(linear).training is False
    assert from_torch(torch.nn.Linear(4, 4)).training is True


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (lambda torch: np.zeros((4, 4)), {}, "expects a torch.nn.Module.*got ndarray"),
        (lambda torch: torch.nn.Conv1d(2, 2, 1), {}, "cannot convert Conv1d"),
        (lambda torch: torch.nn.Linear(4, 4), {"kind": "diagonal"}, "kind must be one of"),
        (lambda torch: torch.nn.Embedding(4, 4), {"kind": "row"}, "kind= applies to an nn.Linear only"),
        (lambda torch: torch.nn.Embedding(4, 4, max_norm=1.0), {}, "max_norm"),
        (lambda torch: torch.nn.Linear(4, 4, dtype=torch.bfloat16), {}, "dtype torch.bfloat16"),
        (lambda torch: torch.nn.Linear(4, 4, device="meta"), {}, "device 'meta': its tensors have no data"),
        (
            lambda torch: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)),
            {},
            r"activation is Tanh\(\)",
        ),
        (
            lambda torch: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)),
            {},
            r"got \(Linear, Linear\)",
        ),
        (
            lambda torch: torch.nn.Sequential(
                torch.nn.Linear(4, 4, dtype=torch.float64), torch.nn.ReLU(), torch.nn.Linear(4, 4)
            ),
            {},
            "mix dtypes",
        ),
        (
            lambda torch: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)),
            {"unit": 2},
            "takes no layer arguments",
        ),
    ],
    ids=[
        "not-torch",
        "conv",
        "bad-kind",
        "kind-embedding",
        "max-norm",
        "bfloat16",
        "meta",
        "tanh",
        "no-activation",
        "mixed-dtypes",
        "mlp-kwargs",
    ],
)
def test_what_cannot_be_converted(torch, build, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        from_torch(build(torch), **kwargs)
