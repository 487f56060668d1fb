"""PyTorch interop: nn.Linear / nn.Embedding / MLP weights load and give torch's outputs.

Runs where torch imports and is skipped, with the reason, elsewhere (CI
installs only ``.[test]``). Torch tensors go in directly: weights via
``from_dense(..., layout="out_in")``, inputs and gradients through DLPack.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import WORKER_COUNTS  # noqa: E402
from helpers import TOLERANCE, forward_backward, to_host  # noqa: E402

import tp_gpu  # noqa: E402
from tp_gpu import (  # noqa: E402
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    TensorParallelConfig,
    load_checkpoint,
    save_checkpoint,
)
from tp_gpu.layers.base import as_array_like  # noqa: E402

TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def assert_close(actual, expected, dtype="float64") -> None:
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(1.0, float(np.abs(expected).max())))


@pytest.fixture
def generator(request):
    seed = sum(map(ord, request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_nn_linear_loads_and_matches(make_config, generator, cls, n_workers, dtype):
    torch.manual_seed(n_workers)
    n_in, n_out = (5, 3 * n_workers) if cls is ColumnParallelLinear else (3 * n_workers, 5)
    linear = torch.nn.Linear(n_in, n_out, dtype=TORCH_DTYPES[dtype])
    layer = cls.from_dense(linear.weight, linear.bias, make_config(n_workers, dtype=dtype), layout="out_in")
    np.testing.assert_array_equal(layer.full_weight(), linear.weight.detach().numpy().T)
    np.testing.assert_array_equal(layer.full_bias(), linear.bias.detach().numpy())
    x = torch.randn(4, 2, n_in, dtype=TORCH_DTYPES[dtype], generator=generator)
    expected = linear(x).detach().numpy()
    assert_close(to_host(layer, layer(x)), expected, dtype)  # a torch tensor as input


def test_torch_state_dict_loads_with_load_dense(make_config):
    linear = torch.nn.Linear(4, 6, dtype=torch.float64)
    layer = ColumnParallelLinear(4, 6, make_config(3))
    layer.load_dense(**linear.state_dict(), layout="out_in")  # keys "weight" and "bias" match
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(to_host(layer, layer(x)), linear(x).detach().numpy())


def test_torch_state_dict_in_load_state_dict_is_refused_not_misread(make_config):
    """load_state_dict expects our (n_in, n_out) layout; torch's (n_out, n_in) raises."""
    linear = torch.nn.Linear(4, 6, dtype=torch.float64)
    layer = ColumnParallelLinear(4, 6, make_config(2))
    with pytest.raises(ShapeError, match=r"'weight' must have shape \(4, 6\), got \(6, 4\)"):
        layer.load_state_dict(linear.state_dict())


def test_nn_linear_without_bias(make_config):
    linear = torch.nn.Linear(6, 4, bias=False, dtype=torch.float64)
    layer = RowParallelLinear.from_dense(linear.weight, None, make_config(3), layout="out_in")
    np.testing.assert_array_equal(layer.full_bias(), np.zeros(4))
    x = torch.randn(5, 6, dtype=torch.float64)
    assert_close(to_host(layer, layer(x)), linear(x).detach().numpy())


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_nn_embedding_loads_and_matches(make_config, generator, n_workers):
    embedding = torch.nn.Embedding(3 * n_workers, 7, dtype=torch.float64)
    layer = ParallelEmbedding.from_dense(embedding.weight, config=make_config(n_workers))
    ids = torch.randint(0, 3 * n_workers, (4, 5), generator=generator)  # int64 ids as a torch tensor
    np.testing.assert_array_equal(
        to_host(layer, layer(ids)), embedding(ids).detach().numpy()
    )  # a lookup: exact


@pytest.mark.parametrize(
    "activation, torch_activation",
    [("gelu", torch.nn.GELU()), ("gelu_tanh", torch.nn.GELU(approximate="tanh")), ("relu", torch.nn.ReLU())],
)
@pytest.mark.parametrize("n_workers", [1, 2, 3, 8])
def test_torch_mlp_loads_and_matches(make_config, n_workers, activation, torch_activation):
    torch.manual_seed(n_workers)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(6, 4 * n_workers, dtype=torch.float64),
        torch_activation,
        torch.nn.Linear(4 * n_workers, 5, dtype=torch.float64),
    )
    sd = mlp.state_dict()
    ours = ParallelMLP.from_dense(
        sd["0.weight"],
        sd["0.bias"],
        sd["2.weight"],
        sd["2.bias"],
        make_config(n_workers),
        layout="out_in",
        activation=activation,
    )
    x = torch.randn(3, 6, dtype=torch.float64)
    assert_close(to_host(ours, ours(x)), mlp(x).detach().numpy())


@pytest.mark.parametrize("n_workers", [1, 3, 4])
def test_gradients_match_torch_autograd(make_config, n_workers):
    """Forward and backward with torch tensors (requires_grad ones too) against torch autograd."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(5, 3 * n_workers, dtype=torch.float64)
    layer = ColumnParallelLinear.from_dense(
        linear.weight, linear.bias, make_config(n_workers), layout="out_in"
    )
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = linear(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    ours, dx = forward_backward(layer, x, grad)  # x requires grad in torch: read through detach()
    assert isinstance(ours, tp_gpu.Tensor) and isinstance(dx, tp_gpu.Tensor)
    assert_close(to_host(layer, ours), y.detach().numpy())
    assert_close(to_host(layer, dx), x.grad.numpy())
    assert_close(layer.grads()["weight"], linear.weight.grad.numpy().T)
    assert_close(layer.grads()["bias"], linear.bias.grad.numpy())


def test_cpu_tensors_are_not_copied():
    t = torch.randn(3, 4, dtype=torch.float64)
    imported = as_array_like(t, "x")
    assert type(imported) is np.ndarray and np.shares_memory(imported, t.numpy())
    ids = torch.arange(6)
    assert as_array_like(ids, "ids").dtype == np.int64


def test_non_contiguous_and_float16_tensors(make_config):
    linear = torch.nn.Linear(4, 6, dtype=torch.float64)
    layer = ColumnParallelLinear.from_dense(
        linear.weight.T.contiguous(), linear.bias, make_config(2), layout="in_out"
    )  # a tensor needs its layout given
    x = torch.randn(4, 3, dtype=torch.float64).T  # a transposed view
    assert not x.is_contiguous()
    assert_close(to_host(layer, layer(x)), linear(x).detach().numpy())
    half = ColumnParallelLinear.from_dense(
        linear.weight.half(), None, make_config(2, dtype="float16"), layout="out_in"
    )
    np.testing.assert_array_equal(half.full_weight(), linear.weight.detach().half().numpy().T)


def test_bfloat16_is_a_clear_error(make_config):
    layer = ColumnParallelLinear(4, 6, make_config(2))
    with pytest.raises(
        ShapeError, match="ColumnParallelLinear input.*could not import the Tensor through DLPack"
    ):
        layer(torch.randn(3, 4, dtype=torch.bfloat16))
    with pytest.raises(ShapeError, match="could not import"):
        layer.load_dense(torch.randn(4, 6, dtype=torch.bfloat16))


def test_torch_weights_through_a_checkpoint(tmp_path):
    """Torch weights -> 4 simulated workers -> checkpoint -> 3 NumPy workers: still torch's outputs."""
    torch.manual_seed(1)
    linear = torch.nn.Linear(5, 12, dtype=torch.float64)
    source = ColumnParallelLinear.from_dense(
        linear.weight,
        linear.bias,
        TensorParallelConfig(n_workers=4, backend="simulated", devices=3, dtype="float64"),
        layout="out_in",
    )
    save_checkpoint(tmp_path / "linear.safetensors", source)
    target = ColumnParallelLinear(5, 12, TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64"))
    load_checkpoint(tmp_path / "linear.safetensors", target)
    x = torch.randn(2, 5, dtype=torch.float64)
    assert_close(to_host(target, target(x)), linear(x).detach().numpy())


# --- CUDA tensors: run only where CuPy and a CUDA build of PyTorch see a GPU -----------------


def _refuse_foreign_arrays(monkeypatch) -> None:
    """Make the CuPy backend's ``host_array`` fail for anything but a NumPy array.

    A layer's own initial weights are NumPy arrays on the host and reach the
    GPU through ``host_array``; a torch tensor or a CuPy array must not.
    """
    import tp_gpu.backends.cupy_backend as cupy_backend

    to_host = cupy_backend.host_array

    def no_host_round_trip(x):
        if not isinstance(x, np.ndarray):
            raise AssertionError(f"a {type(x).__name__} went through the host")
        return to_host(x)

    monkeypatch.setattr(cupy_backend, "host_array", no_host_round_trip)


def test_host_guard_lets_a_layers_own_weights_through(monkeypatch):
    """The guard of the CUDA tests below, checked without a GPU: building a layer (initial weights
    from the host) passes, a torch tensor is refused."""
    import tp_gpu.backends.cupy_backend as cupy_backend

    _refuse_foreign_arrays(monkeypatch)
    np.testing.assert_array_equal(cupy_backend.host_array(np.ones(2)), np.ones(2))
    with pytest.raises(AssertionError, match="Tensor went through the host"):
        cupy_backend.host_array(torch.ones(2))


@pytest.fixture
def cuda(monkeypatch):
    from helpers import skip_unless_cupy

    skip_unless_cupy()
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build sees no CUDA device")
    _refuse_foreign_arrays(monkeypatch)
    return torch.device("cuda", 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n_workers", [1, 2, 4])
def test_cuda_tensors_reach_the_cupy_backend_without_the_host(cuda, n_workers):
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4 * n_workers, dtype=torch.float64, device=cuda)
    layer = ColumnParallelLinear.from_dense(
        linear.weight,
        linear.bias,
        TensorParallelConfig(n_workers=n_workers, backend="cupy", dtype="float64"),
        layout="out_in",
    )
    x = torch.randn(3, 8, dtype=torch.float64, device=cuda)
    y = layer(x)
    assert type(y).__module__.split(".")[0] == "cupy"
    assert_close(y.get(), linear(x).detach().cpu().numpy())


@pytest.mark.gpu
def test_cuda_tensor_on_the_numpy_backend_is_copied_through_cupy(cuda):
    embedding = torch.nn.Embedding(6, 3, dtype=torch.float64, device=cuda)
    layer = ParallelEmbedding.from_dense(
        embedding.weight, config=TensorParallelConfig(n_workers=3, backend="numpy", dtype="float64")
    )
    ids = torch.tensor([[0, 5, 2]], device=cuda)
    np.testing.assert_array_equal(layer(ids), embedding(ids).detach().cpu().numpy())
