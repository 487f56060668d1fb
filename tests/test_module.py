"""The Module tree with real layers on 3 simulated devices: names, modes, state dicts, containers.

Names are compared with the torch-style names written out here (and with
PyTorch's own where it is installed); values with a dense float64 NumPy
reference built from the model's logical weights.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import numpy as np
import pytest
from helpers import device_of, forward_backward

import tp_gpu
from tp_gpu import (
    ColumnParallelLinear,
    IncompatibleKeys,
    Module,
    ModuleDict,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
    Sequential,
    ShapeError,
    ShardedParameter,
    TensorParallelConfig,
    TensorParallelError,
    VocabParallelCrossEntropy,
)
from tp_gpu.autograd import Function
from tp_gpu.sharded import ShardedTensor

VOCAB, DIM, HIDDEN = 29, 6, 13


def cfg(n_workers: int, **kwargs) -> TensorParallelConfig:
    return TensorParallelConfig(
        n_workers=n_workers, backend="simulated", devices=3, **{"dtype": "float64", **kwargs}
    )


class TinyLM(Module):
    """embed -> Sequential(MLP, row linear) -> column head (split logits) -> vocab-parallel loss."""

    def __init__(self, n_workers: int, seed: int = 0) -> None:
        super().__init__()
        config = cfg(n_workers)
        self.embed = ParallelEmbedding(VOCAB, DIM, config, seed=seed)
        self.blocks = Sequential(
            ParallelMLP(DIM, HIDDEN, DIM, config, seed=seed + 1, activation="relu"),
            RowParallelLinear(DIM, DIM, config, seed=seed + 3),
        )
        self.head = ColumnParallelLinear(
            DIM, VOCAB, dataclasses.replace(config, gather_output=False), seed=seed + 4
        )
        self.loss = VocabParallelCrossEntropy()

    def forward(self, ids, targets) -> tp_gpu.Tensor:
        return self.loss(self.head(self.blocks(self.embed(ids))), targets)


TINY_LM_PARAMETERS = [
    "embed.weight",
    "blocks.0.fc1.weight",
    "blocks.0.fc1.bias",
    "blocks.0.fc2.weight",
    "blocks.0.fc2.bias",
    "blocks.1.weight",
    "blocks.1.bias",
    "head.weight",
    "head.bias",
]

TINY_LM_MODULES = [
    ("", TinyLM),
    ("embed", ParallelEmbedding),
    ("blocks", Sequential),
    ("blocks.0", ParallelMLP),
    ("blocks.0.fc1", ColumnParallelLinear),
    ("blocks.0.fc2", RowParallelLinear),
    ("blocks.1", RowParallelLinear),
    ("head", ColumnParallelLinear),
    ("loss", VocabParallelCrossEntropy),
]


def random_state(model: Module, rng) -> Dict[str, np.ndarray]:
    """A random value (biases included) for every parameter of ``model``."""
    return {name: rng.standard_normal(value.shape) * 0.5 for name, value in model.state_dict().items()}


def tokens(rng, shape=(2, 5)):
    return rng.integers(0, VOCAB, size=shape), rng.integers(0, VOCAB, size=shape)


def assert_same_state(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def recorded(t: tp_gpu.Tensor) -> set:
    """The names of the tape nodes ``t`` was computed through (empty when nothing was recorded)."""
    seen, stack = set(), [t.grad_fn] if t.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(e[0] for e in node.edges if e is not None and not isinstance(e[0], tp_gpu.Tensor))
    return {node.name for node in seen}


def expect_no_graph(call) -> None:
    """``call`` is a backward through nothing recorded (or freed): it raises the tape's error, not
    some other one."""
    with pytest.raises(TensorParallelError, match="does not require grad|a second time") as info:
        call()
    assert not isinstance(info.value, ShapeError)


# ---------------------------------------------------------------------------- names


def test_named_parameters_are_dotted_torch_style_names():
    model = TinyLM(3)
    assert [name for name, _ in model.named_parameters()] == TINY_LM_PARAMETERS
    assert all(isinstance(p, ShardedParameter) for p in model.parameters())
    assert [p for _, p in model.named_parameters()] == model.parameters()
    assert list(model.state_dict()) == TINY_LM_PARAMETERS
    assert list(model.grads()) == TINY_LM_PARAMETERS
    assert model.named_parameters("m")[0][0] == "m.embed.weight"


def test_named_modules_and_children():
    model = TinyLM(4)
    assert [(name, type(m)) for name, m in model.named_modules()] == TINY_LM_MODULES
    assert [name for name, _ in model.named_children()] == ["embed", "blocks", "head", "loss"]
    assert model.children() == [model.embed, model.blocks, model.head, model.loss]
    assert [name for name, _ in model.blocks.named_modules("blocks")][:2] == ["blocks", "blocks.0"]


def test_sequential_and_module_dict_names():
    config = cfg(5)
    seq = Sequential(ParallelMLP(7, 13, 5, config), RowParallelLinear(5, 3, config))
    assert [n for n, _ in seq.named_parameters()] == [
        "0.fc1.weight", "0.fc1.bias", "0.fc2.weight", "0.fc2.bias", "1.weight", "1.bias",
    ]  # fmt: skip
    md = ModuleDict(
        {"embed": ParallelEmbedding(VOCAB, DIM, config), "mlp": ParallelMLP(DIM, HIDDEN, DIM, config)}
    )
    md["head"] = ColumnParallelLinear(DIM, VOCAB, config)
    assert [n for n, _ in md.named_parameters()] == [
        "embed.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "head.weight", "head.bias",
    ]  # fmt: skip
    assert md.keys() == ["embed", "mlp", "head"] and len(md) == 3 and "mlp" in md and "fc1" not in md
    assert md["head"] is md.head and md.values() == [m for _, m in md.items()]
    assert len(seq) == 2 and seq[1] is seq._modules["1"] and seq[-1] is seq[1]


def test_names_match_pytorch():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TorchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)

    class TorchLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, DIM)
            self.blocks = nn.Sequential(TorchMLP(), nn.Linear(DIM, DIM))
            self.head = nn.Linear(DIM, VOCAB)
            self.loss = nn.CrossEntropyLoss()

    ours, theirs = TinyLM(2), TorchLM()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    for (name, p), (_, t) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.shape in (tuple(t.shape), tuple(t.shape)[::-1]), name  # linears store (n_in, n_out)


# ---------------------------------------------------------------------------- tied parameters


class TiedPair(Module):
    """Two square column-parallel linears sharing one weight: ``y = (x W + a) W + b``."""

    def __init__(self, n_workers: int) -> None:
        super().__init__()
        self.first = ColumnParallelLinear(7, 7, cfg(n_workers), seed=1)
        self.second = ColumnParallelLinear(7, 7, cfg(n_workers), seed=2)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("n_workers", [1, 3, 5, 8])
def test_tied_parameter_listed_once_and_gets_both_gradients(rng, n_workers):
    model = TiedPair(n_workers)
    assert [n for n, _ in model.named_parameters()] == ["first.weight", "first.bias", "second.bias"]
    assert len(model.parameters()) == 3 and model.second.weight is model.first.weight
    state = random_state(model, rng)
    model.load_state_dict(state)
    w, a, b = state["first.weight"], state["first.bias"], state["second.bias"]
    x, dy = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    h = x @ w + a
    y, dx = forward_backward(model, x, dy)
    np.testing.assert_allclose(np.asarray(y), h @ w + b, rtol=1e-12, atol=1e-12)
    dh = dy @ w.T
    grads = model.grads()
    assert list(grads) == ["first.weight", "first.bias", "second.bias"]
    np.testing.assert_allclose(grads["first.weight"], x.T @ dh + h.T @ dy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["first.bias"], dh.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["second.bias"], dy.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dx), dh @ w.T, rtol=1e-12, atol=1e-12)
    assert (
        "second.weight" in model.load_state_dict({**state, "second.weight": w}, strict=False).unexpected_keys
    )


def test_module_shared_twice_is_listed_once():
    layer = RowParallelLinear(5, 3, cfg(2))
    seq = Sequential(layer, layer)
    assert [n for n, _ in seq.named_modules()] == ["", "0"]
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]


# ---------------------------------------------------------------------------- train / eval


def test_train_and_eval_propagate_and_no_grad_keeps_nothing(rng):
    model = TinyLM(5)
    ids, targets = tokens(rng)
    loss = model(ids, targets)
    # every layer recorded its function on the tape
    assert {"ColumnLinearBackward", "RowLinearBackward", "ApplyActivationBackward"} <= recorded(loss)
    assert model.eval() is model
    assert [m.training for _, m in model.named_modules()] == [False] * len(TINY_LM_MODULES)
    with tp_gpu.no_grad():
        no_grad_loss = model(ids, targets)  # the same loss, nothing recorded or kept
    assert no_grad_loss.grad_fn is None and recorded(no_grad_loss) == set()
    expect_no_graph(no_grad_loss.backward)
    assert all(not np.any(g) for g in model.grads().values())

    eval_loss = model(ids, targets)  # eval mode only switches dropout: it still records
    assert recorded(eval_loss) == recorded(loss)
    assert float(eval_loss) == pytest.approx(float(no_grad_loss), rel=1e-12)

    assert model.train() is model
    assert [m.training for _, m in model.named_modules()] == [True] * len(TINY_LM_MODULES)
    assert float(loss) == pytest.approx(float(no_grad_loss), rel=1e-12)
    loss.backward()
    assert any(np.any(g != 0) for g in model.grads().values())
    model.train(False)
    assert not model.blocks[0].fc2.training


def test_eval_of_a_submodule_leaves_the_rest_training():
    model = TinyLM(2)
    model.blocks.eval()
    assert [name for name, m in model.named_modules() if not m.training] == [
        "blocks",
        "blocks.0",
        "blocks.0.fc1",
        "blocks.0.fc2",
        "blocks.1",
    ]


def _column(rng):
    layer = ColumnParallelLinear(7, 13, cfg(4))
    x = rng.standard_normal((3, 7))
    return layer, lambda: layer(x), rng.standard_normal((3, 13))


def _row(rng):
    layer = RowParallelLinear(13, 5, cfg(6))
    x = rng.standard_normal((3, 13))
    return layer, lambda: layer(x), rng.standard_normal((3, 5))


def _embedding(rng):
    layer = ParallelEmbedding(VOCAB, DIM, cfg(7))
    ids = rng.integers(0, VOCAB, size=(2, 4))
    return layer, lambda: layer(ids), rng.standard_normal((2, 4, DIM))


def _mlp(rng):
    layer = ParallelMLP(7, 13, 5, cfg(3))
    x = rng.standard_normal((3, 7))
    return layer, lambda: layer(x), rng.standard_normal((3, 5))


def _loss(rng):
    head = ColumnParallelLinear(DIM, VOCAB, cfg(5, gather_output=False))
    x = rng.standard_normal((4, DIM))
    assert isinstance(head(x), ShardedTensor)
    layer = Sequential(head, VocabParallelCrossEntropy())
    loss = layer[1]
    targets = rng.integers(0, VOCAB, size=4)
    return layer, lambda: loss(head(x), targets), None  # a scalar: backward() needs no gradient


def _sequential(rng):
    layer = Sequential(ParallelMLP(7, 13, 5, cfg(8)), RowParallelLinear(5, 3, cfg(8)))
    x = rng.standard_normal((3, 7))
    return layer, lambda: layer(x), rng.standard_normal((3, 3))


LAYERS = [_column, _row, _embedding, _mlp, _loss, _sequential]
LAYER_IDS = ["column", "row", "embedding", "mlp", "loss", "sequential"]


@pytest.mark.parametrize("build", LAYERS, ids=LAYER_IDS)
def test_backward_twice_after_one_forward_raises(rng, build):
    layer, forward, grad = build(rng)
    assert not hasattr(layer, "backward")  # a module writes only forward; backward is the tape's
    y = forward()
    y.backward(grad)
    once = layer.grads()
    assert any(np.any(g) for g in once.values())
    expect_no_graph(lambda: y.backward(grad))  # the first backward freed the graph
    for name, g in layer.grads().items():  # and the failed call added nothing
        np.testing.assert_array_equal(g, once[name], err_msg=name)
    forward().backward(grad)  # a new forward makes backward valid again
    for name, g in layer.grads().items():
        np.testing.assert_allclose(g, 2 * once[name], rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("build", LAYERS, ids=LAYER_IDS)
def test_backward_of_a_no_grad_forward_raises(rng, build):
    layer, forward, grad = build(rng)
    layer.eval()
    with tp_gpu.no_grad():
        y = forward()
    assert y.grad_fn is None and not y.requires_grad
    expect_no_graph(lambda: y.backward(grad))
    assert all(not np.any(g) for g in layer.grads().values())
    forward().backward(grad)  # eval only switches dropout: an eval forward records
    layer.train()
    forward().backward(grad)
    assert any(np.any(g) for g in layer.grads().values())


# ---------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("n_from, n_to", [(3, 5), (1, 8), (8, 2), (4, 7), (6, 1)])
def test_state_dict_round_trip_across_worker_counts(rng, n_from, n_to):
    source, target = TinyLM(n_from, seed=0), TinyLM(n_to, seed=100)
    source.load_state_dict(random_state(source, rng))
    state = source.state_dict()
    assert all(type(v) is np.ndarray for v in state.values())
    assert not all(np.array_equal(state[k], v) for k, v in target.state_dict().items())
    assert target.load_state_dict(state) == IncompatibleKeys([], [])
    assert_same_state(target.state_dict(), state)  # bit-identical on any worker count
    ids, targets = tokens(rng)
    source_loss, target_loss = source(ids, targets), target(ids, targets)
    assert float(target_loss) == pytest.approx(float(source_loss), rel=1e-12)
    source_loss.backward()
    target_loss.backward()
    for name, g in source.grads().items():
        np.testing.assert_allclose(target.grads()[name], g, rtol=1e-10, atol=1e-12, err_msg=name)


def test_state_dict_returns_new_arrays(rng):
    model = TinyLM(3)
    state = model.state_dict()
    saved = {k: v.copy() for k, v in state.items()}
    for v in state.values():
        v[...] = 123.0
    assert_same_state(model.state_dict(), saved)


def test_load_state_dict_casts_to_the_parameter_dtype(rng):
    model = Sequential(RowParallelLinear(5, 3, cfg(2, dtype="float32")))
    weight = rng.integers(-4, 4, size=(5, 3))
    model.load_state_dict({"0.weight": weight, "0.bias": np.arange(3, dtype=np.float64) / 3})
    state = model.state_dict()
    assert state["0.weight"].dtype == np.float32 and state["0.bias"].dtype == np.float32
    np.testing.assert_array_equal(state["0.weight"], weight.astype(np.float32))
    np.testing.assert_array_equal(state["0.bias"], (np.arange(3) / 3).astype(np.float32))


def test_load_state_dict_not_strict_reports_missing_and_unexpected(rng):
    model = TinyLM(5)
    before = model.state_dict()
    new = random_state(model, rng)
    del new["head.bias"], new["blocks.0.fc1.weight"]
    new["extra.weight"] = np.zeros(3)
    result = model.load_state_dict(new, strict=False)
    assert isinstance(result, IncompatibleKeys)
    assert result.missing_keys == ["blocks.0.fc1.weight", "head.bias"]
    assert result.unexpected_keys == ["extra.weight"]
    after = model.state_dict()
    for name in TINY_LM_PARAMETERS:
        want = before[name] if name in ("head.bias", "blocks.0.fc1.weight") else new[name]
        np.testing.assert_array_equal(after[name], want, err_msg=name)


SPOILS = ["unexpected key", "missing key", "bad shape last", "bad shape first", "not an array", "complex"]


@pytest.mark.parametrize(
    "spoil, strict",
    [(spoil, True) for spoil in SPOILS]
    + [(spoil, False) for spoil in SPOILS[2:]],  # strict=False allows key mismatches
)
def test_load_state_dict_error_changes_nothing(rng, spoil, strict):
    model = TinyLM(4)
    model.load_state_dict(random_state(model, rng))
    before = model.state_dict()
    grads_before = model.grads()
    new = random_state(model, rng)  # valid values for every other parameter
    if spoil == "unexpected key":
        new["blocks.2.weight"] = np.zeros((DIM, DIM))
    elif spoil == "missing key":
        del new["blocks.1.bias"]
    elif spoil == "bad shape last":
        new["head.bias"] = np.zeros(VOCAB + 1)
    elif spoil == "bad shape first":
        new["embed.weight"] = np.zeros((DIM, VOCAB))
    elif spoil == "not an array":
        new["blocks.1.weight"] = object()
    else:
        new["blocks.1.weight"] = np.zeros((DIM, DIM), dtype=complex)
    with pytest.raises(TensorParallelError):
        model.load_state_dict(new, strict=strict)
    assert_same_state(model.state_dict(), before)
    assert_same_state(model.grads(), grads_before)


def test_load_state_dict_rejects_a_non_mapping():
    model = TinyLM(2)
    with pytest.raises(ShapeError, match="mapping"):
        model.load_state_dict([("embed.weight", np.zeros((VOCAB, DIM)))])


# ---------------------------------------------------------------------------- Sequential


def relu_reference(x, w):
    """Dense float64 Sequential(MLP(relu), row, column) from its state dict ``w``: output, activations."""
    pre = x @ w["0.fc1.weight"] + w["0.fc1.bias"]
    act = np.maximum(pre, 0)
    h = act @ w["0.fc2.weight"] + w["0.fc2.bias"]
    g = h @ w["1.weight"] + w["1.bias"]
    y = g @ w["2.weight"] + w["2.bias"]
    return y, (pre, act, h, g)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5, 8])
def test_sequential_equals_the_layers_called_by_hand_and_numpy(rng, n_workers):
    config = cfg(n_workers)
    layers = [
        ParallelMLP(7, 13, 5, config, activation="relu"),
        RowParallelLinear(5, 11, config, seed=3),
        ColumnParallelLinear(11, 4, config, seed=4),
    ]
    seq = Sequential(*layers)
    state = random_state(seq, rng)
    seq.load_state_dict(state)
    x, dy = rng.standard_normal((2, 3, 7)), rng.standard_normal((2, 3, 4))
    leaf = h = tp_gpu.tensor(x, requires_grad=True)
    for layer in layers:
        h = layer(h)
    by_hand_y = np.asarray(h).copy()
    h.backward(dy)
    by_hand_dx, by_hand_grads = np.asarray(leaf.grad).copy(), seq.grads()
    seq.zero_grad()
    assert all(not np.any(v) for v in seq.grads().values())

    y, dx = forward_backward(seq, x, dy)
    assert device_of(seq, y) == seq.output_device
    np.testing.assert_array_equal(np.asarray(y), by_hand_y)
    np.testing.assert_array_equal(np.asarray(dx), by_hand_dx)
    assert_same_state(seq.grads(), by_hand_grads)

    # And both are the dense float64 network.
    want_y, (pre, act, hh, gg) = relu_reference(x, state)
    np.testing.assert_allclose(by_hand_y, want_y, rtol=1e-11, atol=1e-11)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    d_g = dy @ state["2.weight"].T
    d_h = d_g @ state["1.weight"].T
    d_pre = (d_h @ state["0.fc2.weight"].T) * (pre > 0)
    expected = {
        "0.fc1.weight": flat(x).T @ flat(d_pre),
        "0.fc1.bias": flat(d_pre).sum(0),
        "0.fc2.weight": flat(act).T @ flat(d_h),
        "0.fc2.bias": flat(d_h).sum(0),
        "1.weight": flat(hh).T @ flat(d_g),
        "1.bias": flat(d_g).sum(0),
        "2.weight": flat(gg).T @ flat(dy),
        "2.bias": flat(dy).sum(0),
    }
    for name, want in expected.items():
        np.testing.assert_allclose(by_hand_grads[name], want, rtol=1e-10, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(by_hand_dx, d_pre @ state["0.fc1.weight"].T, rtol=1e-10, atol=1e-10)


def test_sequential_backward_runs_in_reverse_order():
    """Sequential feeds each output to the next; the tape runs their backwards in reverse."""
    calls = []

    class Logged(Function):
        @staticmethod
        def forward(ctx, x, name):
            calls.append(("forward", name))
            ctx.name = name
            return np.asarray(x) + 1.0

        @staticmethod
        def backward(ctx, grad):
            calls.append(("backward", ctx.name))
            return grad * 2.0, None

    class Step(Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            return Logged.apply(x, self.name)

    seq = Sequential(Step("a"), Step("b"), Step("c"))
    y, dx = forward_backward(seq, np.zeros(2), np.ones(2))
    np.testing.assert_array_equal(np.asarray(y), [3.0, 3.0])
    np.testing.assert_array_equal(np.asarray(dx), [8.0, 8.0])
    assert calls == [
        ("forward", "a"),
        ("forward", "b"),
        ("forward", "c"),
        ("backward", "c"),
        ("backward", "b"),
        ("backward", "a"),
    ]


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "args",
    [(3,), (np.zeros(2),), ("layer",), (None,), (Sequential(), ModuleDict)],
    ids=["int", "array", "str", "none", "class"],
)
def test_sequential_rejects_non_modules(args):
    with pytest.raises(TensorParallelError, match="Sequential takes modules"):
        Sequential(*args)


@pytest.mark.parametrize(
    "entries",
    [{"a.b": None}, {"": None}, {1: None}, {"ok": 3}, {"ok": np.zeros(2)}],
    ids=["dotted", "empty", "int-key", "int-value", "array-value"],
)
def test_module_dict_rejects_bad_entries(entries):
    entries = {k: (Sequential() if v is None else v) for k, v in entries.items()}
    with pytest.raises(TensorParallelError, match="ModuleDict"):
        ModuleDict(entries)
    md = ModuleDict()
    for key, value in entries.items():
        with pytest.raises(TensorParallelError, match="ModuleDict"):
            md[key] = value
    assert len(md) == 0 and md.children() == []


def test_assigning_a_non_parameter_to_a_parameter_raises_and_keeps_it(rng):
    layer = ColumnParallelLinear(7, 5, cfg(3))
    weight = layer.weight
    before = layer.full_weight()
    for value in (np.zeros((7, 5)), 0.0, [1, 2]):
        with pytest.raises(TensorParallelError, match="ShardedParameter"):
            layer.weight = value
        assert layer.weight is weight and dict(layer.named_parameters())["weight"] is weight
    np.testing.assert_array_equal(layer.full_weight(), before)
    layer.bias = None  # as in torch: a parameter may be removed by assigning None
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


def test_setting_attributes_before_module_init_raises():
    class Forgot(Module):
        def __init__(self):
            self.x = 1

    with pytest.raises(TensorParallelError, match="Module.__init__"):
        Forgot()


def test_deleting_and_replacing_submodules_updates_the_tree():
    model = TinyLM(2)
    del model.loss
    assert [n for n, _ in model.named_children()] == ["embed", "blocks", "head"]
    model.head = RowParallelLinear(DIM, 3, cfg(2))
    assert [n for n, _ in model.named_parameters()][-2:] == ["head.weight", "head.bias"]
    assert model.state_dict()["head.weight"].shape == (DIM, 3)
