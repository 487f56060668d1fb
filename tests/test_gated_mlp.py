"""GatedMLP and SwiGLU: a dense float64 reference built from the logical gate / up / down projections
(forward, dx and every weight gradient) at 1..8 workers, odd intermediate sizes, sequence parallelism,
transformers' LlamaMLP, the silu activation, gradcheck of SwiGLU, loading and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import forward_backward, to_host
from test_norm import placements

import tp_gpu
from tp_gpu import ConfigError, ShapeError, TensorParallelConfig, get_group, regions
from tp_gpu.layers.activations import get_activation
from tp_gpu.layers.gated_mlp import GatedMLP, SwiGLU
from tp_gpu.partition import BlockLayout
from tp_gpu.placements import Partial, Split
from tp_gpu.tensor import new_tensor
from tp_gpu.testing import assert_close, gradcheck


def silu(x):
    return x / (1 + np.exp(-x))


def dense_mlp(x, gate, up, down, biases=(0.0, 0.0, 0.0)):
    """float64 reference: down(silu(x gate + bg) * (x up + bu)) + bd, weights (in, out)."""
    return (silu(x @ gate + biases[0]) * (x @ up + biases[1])) @ down + biases[2]


def dense_grads(x, gate, up, down, dy):
    """float64 reference gradients of sum(dy * dense_mlp(x)): dx, dgate, dup, ddown, by the chain rule."""
    a, b = x @ gate, x @ up  # (N, I)
    s = 1 / (1 + np.exp(-a))
    h = a * s * b  # (N, I)
    dh = dy @ down.T
    da = dh * b * s * (1 + a * (1 - s))
    db = dh * a * s
    x2 = x.reshape(-1, x.shape[-1])
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    return {
        "x": da @ gate.T + db @ up.T,
        "gate": x2.T @ flat(da),
        "up": x2.T @ flat(db),
        "down": flat(h).T @ flat(dy),
    }


def _logical_grads(mlp):
    g = mlp.grads()
    return {
        "gate": g["gate_up.weight"][:, 0::2],
        "up": g["gate_up.weight"][:, 1::2],
        "down": g["down.weight"],
    }


@pytest.mark.parametrize("intermediate", [13, 37])
@pytest.mark.parametrize("backend_spec, n_workers", placements(), indirect=["backend_spec"])
def test_matches_the_dense_mlp_forward_and_backward(make_config, rng, n_workers, intermediate):
    hidden = 7
    mlp = GatedMLP(hidden, intermediate, make_config(n_workers), seed=3)
    gate = rng.standard_normal((hidden, intermediate)) / 2
    up = rng.standard_normal((hidden, intermediate)) / 2
    down = rng.standard_normal((intermediate, hidden)) / 3
    mlp.load_dense(gate, up, down, layout="in_out")
    parts = mlp.dense_parts()
    for name, value in (("gate", gate), ("up", up), ("down", down)):
        np.testing.assert_array_equal(parts[name], value)
    x, dy = rng.standard_normal((2, 5, hidden)), rng.standard_normal((2, 5, hidden))
    y, dx = forward_backward(mlp, x, dy)
    assert_close(to_host(mlp, y), dense_mlp(x, gate, up, down), "float64", intermediate, "forward")
    expected = dense_grads(x, gate, up, down, dy)
    assert_close(to_host(mlp, dx), expected.pop("x"), "float64", intermediate, "dx")
    for name, grad in _logical_grads(mlp).items():
        assert_close(grad, expected[name], "float64", 10, f"d{name}")


def test_pairs_and_rows_split_alike_on_every_worker_count():
    """gate_up's split in whole pairs is down's split of the rows, doubled, for any size and count."""
    for p in range(1, 9):
        group = get_group(TensorParallelConfig(n_workers=p, backend="simulated", devices=3, dtype="float64"))
        for intermediate in (1, 2, 5, 13, 37, 64):
            pairs, rows = group.split(2 * intermediate, unit=2), group.split(intermediate)
            assert pairs.sizes == [2 * s for s in rows.sizes]
            assert pairs.ranges == [(2 * a, 2 * b) for a, b in rows.ranges]
            assert pairs.local == [(2 * a, 2 * b) for a, b in rows.local]


@pytest.mark.parametrize("p", [1, 3, 5, 8])
def test_each_device_holds_matching_gate_and_up_columns(rng, p):
    mlp = GatedMLP(4, 13, TensorParallelConfig(n_workers=p, backend="simulated", devices=3, dtype="float64"))
    gate, up = rng.standard_normal((13, 4)), rng.standard_normal((13, 4))
    mlp.load_dense(gate, up, rng.standard_normal((4, 13)))  # Hugging Face's (out, in)
    layout = mlp.down.layout
    for d, block in mlp.gate_up.weight.blocks.items():  # (H, 2 * I_d): pairs side by side
        host = mlp.backend.to_host(block)
        rows = np.concatenate([np.arange(13)[s] for s in layout.global_slices(d)])
        np.testing.assert_array_equal(host[:, 0::2], gate[rows].T)
        np.testing.assert_array_equal(host[:, 1::2], up[rows].T)


@pytest.mark.parametrize("p", [1, 3, 8])
@pytest.mark.parametrize("spec", [("numpy", None), ("simulated", 3)], ids=["numpy", "sim3"])
def test_sequence_parallel_equals_the_mlp_without_it(rng, p, spec):
    name, devices = spec
    config = TensorParallelConfig(n_workers=p, backend=name, devices=devices, dtype="float64")
    plain = GatedMLP(6, 11, config, seed=4)
    sp = GatedMLP(6, 11, dataclasses.replace(config, sequence_parallel=True), seed=4)
    x, dy = rng.standard_normal((2, 9, 6)), rng.standard_normal((2, 9, 6))
    y, dx = forward_backward(plain, x, dy)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    slices = regions.scatter_to_sequence_parallel_region(leaf, sp.gate_up.group)
    y_sp = sp(slices)
    assert isinstance(y_sp.placement, Split) and y_sp.placement.axis == 1
    y_sp.backward(dy)
    np.testing.assert_allclose(np.asarray(y_sp), to_host(plain, y), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(leaf.grad), to_host(plain, dx), rtol=1e-12, atol=1e-12)
    for key, grad in plain.grads().items():
        np.testing.assert_allclose(sp.grads()[key], grad, rtol=1e-12, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_matches_llama_mlp_in_float32(rng, n_workers):
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=12, intermediate_size=37, hidden_act="silu", num_attention_heads=3, num_key_value_heads=3
    )
    ref = modeling.LlamaMLP(config)
    mlp = GatedMLP.from_dense(
        ref.gate_proj.weight,
        ref.up_proj.weight,
        ref.down_proj.weight,
        config=TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float32"),
    )  # torch tensors, (out, in), through DLPack
    assert not mlp.has_bias and mlp.intermediate == 37
    x = torch.from_numpy(rng.standard_normal((2, 5, 12)).astype(np.float32)).requires_grad_()
    dy = rng.standard_normal((2, 5, 12)).astype(np.float32)
    y_ref = ref(x)
    (y_ref * torch.from_numpy(dy)).sum().backward()
    y, dx = forward_backward(mlp, x.detach(), dy)
    np.testing.assert_allclose(to_host(mlp, y), y_ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(mlp, dx), x.grad.numpy(), rtol=1e-5, atol=1e-6)
    grads = _logical_grads(mlp)
    for name, proj in (("gate", ref.gate_proj), ("up", ref.up_proj), ("down", ref.down_proj)):
        np.testing.assert_allclose(
            grads[name], proj.weight.grad.numpy().T, rtol=1e-5, atol=1e-6, err_msg=name
        )


def test_biases_load_interleaved_and_train(rng):
    h, i = 5, 7
    mlp = GatedMLP(
        h, i, TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64"), bias=True
    )
    w = [rng.standard_normal(s) for s in ((i, h), (i, h), (h, i))]
    b = [rng.standard_normal(s) for s in (i, i, h)]
    mlp.load_dense(*w, *b)
    parts = mlp.dense_parts()
    for key, value in zip(("gate_bias", "up_bias", "down_bias"), b):
        np.testing.assert_array_equal(parts[key], value)
    x, dy = rng.standard_normal((3, h)), rng.standard_normal((3, h))
    y, _ = forward_backward(mlp, x, dy)
    assert_close(to_host(mlp, y), dense_mlp(x, w[0].T, w[1].T, w[2].T, b), "float64", i)
    grads = mlp.grads()
    a, u = x @ w[0].T + b[0], x @ w[1].T + b[1]
    s = 1 / (1 + np.exp(-a))
    dh = dy @ w[2]
    np.testing.assert_allclose(
        grads["gate_up.bias"][0::2], (dh * u * s * (1 + a * (1 - s))).sum(0), rtol=1e-12
    )
    np.testing.assert_allclose(grads["gate_up.bias"][1::2], (dh * a * s).sum(0), rtol=1e-12)
    np.testing.assert_allclose(grads["down.bias"], dy.sum(0), rtol=1e-12)
    mlp.load_dense(*w, gate_bias=b[0])  # None: the up and down biases are zero
    assert not mlp.dense_parts()["up_bias"].any() and not mlp.dense_parts()["down_bias"].any()
    built = GatedMLP.from_dense(*w, None, b[1], None, layout="out_in")
    assert built.has_bias and "bias=True" in repr(built)
    np.testing.assert_array_equal(built.dense_parts()["up_bias"], b[1].astype(np.float32))  # default dtype


# ---------------------------------------------------------------------------- SwiGLU and silu


def test_silu_and_its_gradient_match_torch(rng):
    torch = pytest.importorskip("torch")
    act = get_activation("silu")
    x = np.concatenate([rng.standard_normal(50) * 4, [-800.0, -40.0, 0.0, 40.0, 800.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # exp(-|x|) never overflows
        y, g = act.forward(np, x), act.grad(np, x, np.ones_like(x))
    xt = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.silu(xt).sum().backward()
    np.testing.assert_allclose(y, torch.nn.functional.silu(xt).detach().numpy(), rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-13, atol=1e-300)


def test_silu_against_its_formula_and_float32(rng):
    act = get_activation("silu")
    x = rng.standard_normal(64) * 5
    np.testing.assert_allclose(act.forward(np, x), silu(x), rtol=1e-14)
    eps = 1e-6
    np.testing.assert_allclose(
        act.grad(np, x, np.ones(64)), (silu(x + eps) - silu(x - eps)) / (2 * eps), rtol=1e-7
    )
    x32 = x.astype(np.float32)
    assert act.forward(np, x32).dtype == np.float32 and act.grad(np, x32, x32).dtype == np.float32


@pytest.mark.parametrize("dtype, rtol", [("float32", 4e-7), ("float16", 1e-3)])
def test_silu_in_low_precision_on_the_whole_range(dtype, rtol):
    """Rounded once or twice per value, everywhere from -120 to 120 (the exponent is capped short of
    overflow: beyond the cap the value is below 1e-35 where it is not 0), with no warning."""
    act = get_activation("silu")
    x = np.linspace(-120, 120, 24001).astype(dtype)
    x64 = x.astype(np.float64)
    exact, s = silu(x64), 1 / (1 + np.exp(-x64))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, g = act.forward(np, x), act.grad(np, x, np.ones_like(x))
    assert y.dtype == np.dtype(dtype) and g.dtype == np.dtype(dtype)
    tiny = 1e-35 if dtype == "float32" else 6e-8  # float16's smallest subnormal
    np.testing.assert_allclose(y.astype(np.float64), exact, rtol=rtol, atol=tiny)
    np.testing.assert_allclose(g.astype(np.float64), s * (1 + x64 * (1 - s)), rtol=rtol, atol=4 * rtol)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", None])
def test_gradcheck_of_swiglu(rng, activation):
    assert gradcheck(lambda h: SwiGLU.apply(h, activation), [rng.standard_normal((2, 3, 10))])


def test_swiglu_of_a_whole_tensor_is_the_pairs_product(rng):
    h = rng.standard_normal((3, 8))
    y = SwiGLU.apply(tp_gpu.tensor(h), "silu")
    assert y.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(y), silu(h[:, 0::2]) * h[:, 1::2], rtol=1e-14)


def test_swiglu_refuses_partial_sums_odd_widths_and_mismatched_layouts(rng):
    group = get_group(TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    h = rng.standard_normal((3, 10))
    blocks = {d: group.backend.asarray(h / 2, np.float64, d) for d in (0, 1)}
    partial = new_tensor(blocks, Partial((0, 1)), h.shape, h.dtype, group.backend)
    with pytest.raises(ShapeError, match="SwiGLU input must hold whole"):
        SwiGLU.apply(partial, "silu", group.split(5))
    with pytest.raises(ShapeError, match=r"got shape \(3, 9\)"):
        SwiGLU.apply(tp_gpu.tensor(rng.standard_normal((3, 9))), "silu")
    pairs = regions.scatter_to_region(h, group, group.split(10, unit=2))  # 6 + 4 columns
    with pytest.raises(ShapeError, match=r"half those sizes, \[3, 2\] on devices \[0, 1\]; got \[2, 3\]"):
        SwiGLU.apply(pairs, "silu", BlockLayout.from_sizes([2, 3], group.devices))
    with pytest.raises(ShapeError, match="got None"):
        SwiGLU.apply(pairs, "silu")
    elsewhere = BlockLayout.from_sizes([3, 2], [1, 0])
    with pytest.raises(ShapeError, match=r"on devices \[0, 1\]; got \[3, 2\] on devices \[1, 0\]"):
        SwiGLU.apply(pairs, "silu", elsewhere)
    y = SwiGLU.apply(pairs, "silu", group.split(5))
    assert y.placement == Split(1, group.split(5))
    np.testing.assert_allclose(np.asarray(y), silu(h[:, 0::2]) * h[:, 1::2], rtol=1e-14)


# ---------------------------------------------------------------------------- bad input


def test_load_dense_checks_everything_before_anything_changes(rng):
    mlp = GatedMLP(4, 6, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    before = mlp.state_dict()
    good = [rng.standard_normal(s) for s in ((6, 4), (6, 4), (4, 6))]
    cases = [
        (
            (good[0].T, good[1], good[2]),
            {},
            ShapeError,
            r"gate_weight must have shape \(6, 4\) \(intermediate, hidden\)",
        ),
        (
            (good[0], good[1][:5], good[2]),
            {},
            ShapeError,
            r"up_weight must have shape \(6, 4\).* got \(5, 4\)",
        ),
        ((good[0], good[1], good[2].T), {}, ShapeError, r"GatedMLP down weight must have shape \(4, 6\)"),
        ((*good, rng.standard_normal(6)), {}, ConfigError, "built with bias=False"),
        (tuple(good), {"down_bias": np.ones(4)}, ConfigError, "built with bias=False"),
        (tuple(good), {"layout": "rows"}, ConfigError, "layout must be 'in_out'"),
        ((good[0], good[1], good[2][None]), {}, ShapeError, "must be 2-D"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mlp.load_dense(*args, **kwargs)
        for key, value in mlp.state_dict().items():
            np.testing.assert_array_equal(value, before[key])
    with_bias = GatedMLP(4, 6, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), bias=True)
    with pytest.raises(
        ShapeError, match=r"GatedMLP up_bias must have shape \(6,\) \(intermediate,\), got \(4,\)"
    ):
        with_bias.load_dense(*good, up_bias=np.ones(4))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden": 0, "intermediate": 4}, ConfigError, "hidden"),
        ({"hidden": 4, "intermediate": -1}, ConfigError, "intermediate"),
        ({"hidden": 4, "intermediate": 4, "activation": "swish"}, ConfigError, "activation must be one of"),
        ({"hidden": 4, "intermediate": 4, "bias": "no"}, ConfigError, "bias must be True or False, got 'no'"),
        ({"hidden": 4, "intermediate": 4, "seed": -1}, ConfigError, "seed"),
        ({"hidden": 4, "intermediate": 4, "config": {"n_workers": 2}}, ConfigError, "config must be"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        GatedMLP(**kwargs)


def test_wrong_input_width_is_refused(rng):
    mlp = GatedMLP(4, 6, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    with pytest.raises(ShapeError, match=r"must have shape \(\.\.\., 4\), got \(3, 5\)"):
        mlp(rng.standard_normal((3, 5)))
    assert repr(mlp).startswith("GatedMLP(hidden=4, intermediate=6, activation='silu'")
