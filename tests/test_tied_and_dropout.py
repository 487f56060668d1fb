"""Tied embeddings, worker-count-independent dropout and backward discipline.

* ``TiedLMHead`` over a ``ParallelEmbedding`` equals a PyTorch model with ``lm_head.weight =
  wte.weight`` (where torch is installed; always a NumPy twin with the backward written out): the
  loss, the gradient of the shared table (the sum of both uses) and the weights after optimizer
  steps, on uneven and padded vocabularies at 1..8 workers; one tensor in the state dict,
  re-sharded by a checkpoint.
* A model with dropout (its own Dropout and a transformer layer's) trains identically at 1, 2, 3,
  4 and 8 workers on NumPy and simulated devices; ``eval()`` turns dropout off; ``keep_mask`` of a
  slice is that slice of the whole mask; the keep rate is 1 - p within a statistical bound.
* A second ``backward`` through one graph raises and changes no gradient.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import forward_backward

import tp_gpu
from tp_gpu import (
    SGD,
    ColumnParallelLinear,
    Dropout,
    Module,
    ModuleDict,
    ParallelEmbedding,
    ParallelMLP,
    ParallelTransformerLayer,
    RowParallelLinear,
    ShardedTensor,
    TensorParallelConfig,
    TensorParallelError,
    TiedLMHead,
    VocabParallelCrossEntropy,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tp_gpu.layers.dropout import keep_mask

try:
    import torch
except ImportError:  # CI: the NumPy twin stands in for the PyTorch model
    torch = None

BACKENDS = {"numpy": ("numpy", None), "sim3": ("simulated", 3), "sim8": ("simulated", 8)}
HIDDEN, BATCH, SEQ = 6, 3, 4


def host(x) -> np.ndarray:
    """A layer output (a ShardedTensor, or an array of the NumPy or simulated backend) on the host."""
    if isinstance(x, ShardedTensor):
        return np.asarray(x.backend.to_host(x.gather()))
    return np.array(x)


def config_for(backend: str, p: int, **kwargs) -> TensorParallelConfig:
    name, devices = BACKENDS[backend]
    return TensorParallelConfig(n_workers=p, backend=name, devices=devices, **{"dtype": "float64", **kwargs})


# --- tied embeddings ---------------------------------------------------------------------------


class Tied(Module):
    """``logits = (wte(ids) A + a) wte^T``: the table is used twice."""

    def __init__(self, vocab: int, config: TensorParallelConfig, pad=None) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(vocab, HIDDEN, config, seed=2, pad_to_multiple_of=pad)
        self.lin = ColumnParallelLinear(HIDDEN, HIDDEN, config, seed=3)
        self.head = TiedLMHead(self.wte)

    def forward(self, ids):
        return self.head(self.lin(self.wte(ids)))


class NumpyTied:
    """The tied model in NumPy with its backward written out, and torch.optim.SGD's update: the twin
    every run compares with (validated against PyTorch itself where torch is installed)."""

    def __init__(self, model: Tied) -> None:
        self.weights = {
            "wte.weight": model.wte.full_weight(),
            "lin.weight": model.lin.full_weight(),
            "lin.bias": model.lin.full_bias(),
        }
        self.velocity: dict = {}

    def loss_and_grads(self, ids, targets):
        """``(loss, grads, (lookup part, head part))`` of the mean cross-entropy."""
        table, a, b = self.weights["wte.weight"], self.weights["lin.weight"], self.weights["lin.bias"]
        ids, targets = ids.reshape(-1), targets.reshape(-1)
        n = len(ids)
        h = table[ids]  # (N, H)
        z = h @ a + b  # (N, H)
        logits = z @ table.T  # (N, V)
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        total = e.sum(axis=1, keepdims=True)
        loss = float(-(shifted[np.arange(n), targets] - np.log(total[:, 0])).mean())
        dlogits = e / total
        dlogits[np.arange(n), targets] -= 1.0
        dlogits /= n
        head = dlogits.T @ z  # (V, H): the head's use of the table
        dz = dlogits @ table
        lookup = np.zeros_like(table)
        np.add.at(lookup, ids, dz @ a.T)  # the embedding's use
        grads = {"wte.weight": lookup + head, "lin.weight": h.T @ dz, "lin.bias": dz.sum(axis=0)}
        return loss, grads, (lookup, head)

    def sgd_step(self, grads, lr, momentum):
        for name, g in grads.items():
            v = self.velocity.get(name)
            v = g.copy() if v is None else momentum * v + g
            self.velocity[name] = v
            self.weights[name] = self.weights[name] - lr * v


def torch_tied(model: Tied):
    """The PyTorch model: ``nn.Embedding``, ``nn.Linear`` and ``lm_head.weight = wte.weight``."""
    nn = torch.nn

    class TorchTied(nn.Module):
        def __init__(self):
            super().__init__()
            vocab = model.wte.vocab_size
            self.wte = nn.Embedding(vocab, HIDDEN).double()
            self.lin = nn.Linear(HIDDEN, HIDDEN).double()
            self.lm_head = nn.Linear(HIDDEN, vocab, bias=False).double()
            with torch.no_grad():
                self.wte.weight.copy_(torch.tensor(model.wte.full_weight()))
                self.lin.weight.copy_(torch.tensor(model.lin.full_weight().T))
                self.lin.bias.copy_(torch.tensor(model.lin.full_bias()))
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(self.lin(self.wte(ids)))

    return TorchTied()


def tied_batch(vocab: int, step: int):
    rng = np.random.default_rng([vocab, step])
    return rng.integers(0, vocab, size=(BATCH, SEQ)), rng.integers(0, vocab, size=(BATCH, SEQ))


TIED_CASES = [(7, None), (13, None), (13, 4), (17, 8)]  # vocabulary, pad_to_multiple_of
LR, MOMENTUM = 0.5, 0.5


def assert_close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15, err_msg=what)


@pytest.mark.parametrize("backend", ["numpy", "sim3"])
@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("vocab, pad", TIED_CASES, ids=lambda v: str(v))
def test_tied_head_equals_the_twin_with_a_shared_weight(backend, p, vocab, pad):
    """Loss, gradients (the table's: both uses summed) and two SGD steps, against the NumPy twin
    and, where torch is installed, the PyTorch model with ``lm_head.weight = wte.weight``."""
    model = Tied(vocab, config_for(backend, p), pad)
    assert model.head.weight is model.wte.weight
    assert len(model.parameters()) == 3  # the table once
    twin = NumpyTied(model)
    loss_fn = VocabParallelCrossEntropy()
    optimizer = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if torch is not None:
        torch_model = torch_tied(model)
        torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=LR, momentum=MOMENTUM)
        assert len(list(torch_model.parameters())) == 3
    for step in range(2):
        ids, targets = tied_batch(vocab, step)
        optimizer.zero_grad()
        loss_tensor = loss_fn(model(ids), targets)
        loss_tensor.backward()
        loss = float(loss_tensor)
        grads = model.grads()
        expected_loss, expected, _ = twin.loss_and_grads(ids, targets)
        assert_close(loss, expected_loss, f"loss at step {step}")
        for name, g in expected.items():
            assert_close(grads[name], g, f"gradient of {name} at step {step}")
        if torch is not None:
            torch_optimizer.zero_grad()
            torch_loss = torch.nn.functional.cross_entropy(
                torch_model(torch.tensor(ids)).reshape(-1, vocab), torch.tensor(targets).reshape(-1)
            )
            torch_loss.backward()
            assert_close(loss, torch_loss.item(), "loss against torch")
            assert_close(grads["wte.weight"], torch_model.wte.weight.grad.numpy(), "table grad, torch")
            assert_close(grads["lin.weight"], torch_model.lin.weight.grad.numpy().T, "linear grad, torch")
            torch_optimizer.step()
        optimizer.step()
        twin.sgd_step(expected, LR, MOMENTUM)
        for name, value in model.state_dict().items():
            assert_close(value, twin.weights[name], f"{name} after step {step}")
        if torch is not None:
            assert_close(model.wte.full_weight(), torch_model.wte.weight.detach().numpy(), "table, torch")


def test_shared_gradient_is_the_sum_of_both_uses():
    """The table's gradient is the embedding's part plus the head's, and neither alone."""
    model = Tied(13, config_for("sim3", 4), pad=4)
    ids, targets = tied_batch(13, 0)
    loss_fn = VocabParallelCrossEntropy()
    loss_fn(model(ids), targets).backward()
    _, _, (lookup, head) = NumpyTied(model).loss_and_grads(ids, targets)
    got = model.wte.weight.full_grad()
    assert_close(got, lookup + head, "table gradient")
    assert np.abs(lookup).max() > 1e-3 and np.abs(head).max() > 1e-3
    assert not np.allclose(got, lookup) and not np.allclose(got, head)


def test_tied_state_dict_holds_one_tensor_and_a_checkpoint_reshards_it(tmp_path):
    source = Tied(13, config_for("numpy", 3), pad=4)
    loss_fn = VocabParallelCrossEntropy()
    optimizer = SGD(source.parameters(), lr=0.5)
    ids, targets = tied_batch(13, 0)
    loss_fn(source(ids), targets).backward()
    optimizer.step()
    state = source.state_dict()
    assert sorted(state) == ["lin.bias", "lin.weight", "wte.weight"]
    assert state["wte.weight"].shape == (13, HIDDEN)  # the logical rows, no padding
    assert ModuleDict({"m": source}).state_dict().keys() == {"m." + k for k in state}

    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, source)
    assert sorted(read_checkpoint(path).tensors) == ["lin.bias", "lin.weight", "wte.weight"]
    ids, targets = tied_batch(13, 1)
    source.zero_grad()
    loss = loss_fn(source(ids), targets)
    loss.backward()
    expected = float(loss)
    expected_grads = source.grads()
    for backend, p, pad in (("sim3", 5, None), ("numpy", 8, 8), ("sim8", 2, None)):
        target = Tied(13, config_for(backend, p), pad)
        assert not np.array_equal(target.wte.full_weight(), state["wte.weight"])
        load_checkpoint(path, target)
        assert target.head.weight is target.wte.weight  # still tied after loading
        assert np.array_equal(target.wte.full_weight(), state["wte.weight"])
        loss = loss_fn(target(ids), targets)
        assert_close(float(loss), expected, "loss after loading")
        loss.backward()  # both uses read the loaded table
        for name, g in target.grads().items():
            assert_close(g, expected_grads[name], f"gradient of {name} after loading")


# --- dropout that does not depend on the split ------------------------------------------------

VOCAB = 11


class DropModel(Module):
    """Embedding -> Dropout -> pre-norm causal transformer layer with dropout -> tied head."""

    def __init__(self, config: TensorParallelConfig, p_drop: float = 0.3) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(VOCAB, HIDDEN, config, seed=1)
        self.drop = Dropout(p_drop, config, seed=5)
        self.layer = ParallelTransformerLayer(
            HIDDEN, 2, 10, config, seed=2, pre_norm=True, causal=True, eps=1e-5, dropout=p_drop
        )
        self.head = TiedLMHead(self.wte)

    def forward(self, ids):
        return self.head(self.layer(self.drop(self.wte(ids))))


def drop_batch(step: int):
    ids = np.random.default_rng([5, step]).integers(0, VOCAB, size=(BATCH, SEQ))
    return ids, (2 * ids + 3) % VOCAB


def train_drop(config: TensorParallelConfig, steps: int = 8, p_drop: float = 0.3):
    """SGD with momentum (Adam would magnify the rounding noise of the key bias, whose gradient is
    zero in exact arithmetic): the losses and the final weights."""
    model = DropModel(config, p_drop)
    optimizer = SGD(model.parameters(), lr=0.2, momentum=0.9)
    loss_fn = VocabParallelCrossEntropy()
    losses = []
    for step in range(steps):
        ids, targets = drop_batch(step)
        optimizer.zero_grad()
        loss = loss_fn(model(ids), targets)
        loss.backward()
        losses.append(float(loss))
        optimizer.step()
    assert model.drop.step == steps and model.layer.dropout1.step == steps
    return np.array(losses), model.state_dict()


@pytest.fixture(scope="module")
def dropout_reference():
    return train_drop(config_for("numpy", 1))


DROP_RUNS = [("numpy", p, False) for p in (2, 3, 4, 8)]
DROP_RUNS += [("sim3", p, False) for p in (1, 2, 3, 4, 8)]
DROP_RUNS += [("sim8", 8, False), ("numpy", 3, True), ("sim3", 4, True), ("sim8", 3, True)]


@pytest.mark.parametrize("backend, p, sequence_parallel", DROP_RUNS)
def test_model_with_dropout_trains_identically_at_every_worker_count(
    dropout_reference, backend, p, sequence_parallel
):
    losses, weights = train_drop(config_for(backend, p, sequence_parallel=sequence_parallel))
    ref_losses, ref_weights = dropout_reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12, atol=0)
    for name, value in weights.items():
        np.testing.assert_allclose(value, ref_weights[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_dropout_changes_the_training(dropout_reference):
    """Negative control: other masks (another rate) give other losses, so the test above can fail."""
    ref_losses, _ = dropout_reference
    losses, _ = train_drop(config_for("numpy", 1), steps=3, p_drop=0.35)
    assert not np.allclose(losses, ref_losses[:3], rtol=1e-6)


def test_dropout_with_p_zero_is_the_identity_forward_and_backward():
    drop = Dropout(0.0, config_for("sim3", 2), seed=1)
    x = np.random.default_rng(0).standard_normal((BATCH, SEQ, HIDDEN))
    y, dx = forward_backward(drop, x, 2 * x)
    assert np.array_equal(host(y), x)
    assert np.array_equal(host(dx), 2 * x)
    assert drop.step == 0  # no mask drawn


def test_dropout_keeps_its_masks_only_while_recording():
    drop = Dropout(0.5, config_for("sim3", 3), seed=7)
    x = np.random.default_rng(1).standard_normal((BATCH, SEQ, HIDDEN))
    recorded = drop(tp_gpu.tensor(x, requires_grad=True))
    assert list(recorded.grad_fn.ctx.masks) == [drop.output_device]  # kept for backward
    with tp_gpu.no_grad():
        unrecorded = drop(tp_gpu.tensor(x, requires_grad=True))
    assert unrecorded.grad_fn is None and not unrecorded.requires_grad  # no mask kept
    constant = drop(x)  # nothing requires a gradient: nothing recorded either
    assert constant.grad_fn is None and drop.step == 3
    drop.step = 1  # the masks do not depend on recording
    assert np.array_equal(host(drop(tp_gpu.tensor(x, requires_grad=True))), host(unrecorded))
    assert not np.array_equal(host(unrecorded), host(recorded))


@pytest.mark.parametrize("backend, p", [("numpy", 2), ("sim3", 4)])
def test_eval_turns_dropout_off(backend, p):
    config = config_for(backend, p)
    model = DropModel(config)
    plain = DropModel(config, p_drop=0.0)  # the same weights, no dropout
    ids, _ = drop_batch(0)
    expected = host(plain(ids))
    model.eval()
    first = host(model(ids))
    assert np.array_equal(first, expected)
    assert np.array_equal(host(model(ids)), expected)
    assert model.drop.step == 0 and model.layer.dropout1.step == 0  # eval draws no mask
    model.train()
    assert not np.allclose(host(model(ids)), expected)
    assert model.drop.step == 1

    drop = Dropout(0.5, config, seed=3).eval()
    x = np.random.default_rng(0).standard_normal((BATCH, SEQ, HIDDEN))
    assert np.array_equal(host(drop(x)), x)


@pytest.mark.parametrize(
    "index",
    [
        (Ellipsis,),
        (slice(1, 3),),
        (slice(None), slice(2, 6)),
        (Ellipsis, slice(1, 4)),
        (slice(0, 4, 3), slice(None), slice(1, 5, 2)),
        (slice(None, None, -1), slice(3, 4)),
        (slice(2, 3), Ellipsis, slice(0, 1)),
        (np.array([3, 0, 3]),),  # not slices: the general path
    ],
    ids=str,
)
@pytest.mark.parametrize("seed, step", [(0, 0), (123456789, 7), (2**40 + 1, 10**6)])
def test_keep_mask_of_a_slice_is_that_slice_of_the_whole_mask(index, seed, step):
    shape = (4, 7, 5)
    whole = keep_mask(np, 0.4, seed, step, shape, (Ellipsis,))
    assert whole.shape == shape and whole.dtype == bool
    part = keep_mask(np, 0.4, seed, step, shape, index)
    assert np.array_equal(part, whole[index])


def test_keep_mask_depends_on_seed_step_and_index_only():
    shape = (64, 33)
    base = keep_mask(np, 0.5, 3, 4, shape, (Ellipsis,))
    assert np.array_equal(base, keep_mask(np, 0.5, 3, 4, shape, (Ellipsis,)))
    assert not np.array_equal(base, keep_mask(np, 0.5, 4, 4, shape, (Ellipsis,)))
    assert not np.array_equal(base, keep_mask(np, 0.5, 3, 5, shape, (Ellipsis,)))
    # the logical (C-order) index: the same elements of a reshaped tensor get the same draws
    flat = keep_mask(np, 0.5, 3, 4, (64 * 33,), (Ellipsis,))
    assert np.array_equal(base.reshape(-1), flat)
    assert keep_mask(np, 0.0, 3, 4, shape, (Ellipsis,)).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_within_a_statistical_bound(p):
    """Over n = 10^6 elements the kept fraction is 1 - p within 6 standard deviations, and the
    draws of neighbouring elements, of consecutive steps and of consecutive seeds are independent
    (their joint keep rate is (1 - p)^2, within 6 standard deviations)."""
    n = 10**6
    q = 1.0 - p
    a = keep_mask(np, p, 11, 0, (n,), (Ellipsis,))
    sigma = np.sqrt(p * q / n)
    assert abs(a.mean() - q) < 6 * sigma
    pairs = {
        "neighbours": (a[:-1], a[1:]),
        "steps": (a, keep_mask(np, p, 11, 1, (n,), (Ellipsis,))),
        "seeds": (a, keep_mask(np, p, 12, 0, (n,), (Ellipsis,))),
    }
    both_sigma = np.sqrt(q * q * (1 - q * q) / n)
    for what, (x, y) in pairs.items():
        assert abs((x & y).mean() - q * q) < 6 * both_sigma, what
    drop = Dropout(p, config_for("numpy", 2), seed=11)
    out = np.asarray(drop(np.ones((1000, 1000))))
    assert abs(out.mean() - 1.0) < 6 * sigma / q  # inverted dropout keeps the mean
    assert set(np.unique(out)) <= {0.0, 1.0 / q}


# --- backward twice through one graph ---------------------------------------------------------


def _grads(module):
    return {name: q.full_grad() for name, q in module.named_parameters()}


def _twice(make):
    """The module, output and output gradient of ``make()`` (one forward), after one backward."""
    module, output, grad = make()
    output.backward(grad)
    return module, output, grad


def _layer(sequence_parallel: bool = False, dropout: float = 0.0):
    def make():
        config = config_for("sim3", 3, sequence_parallel=sequence_parallel)
        layer = ParallelTransformerLayer(HIDDEN, 2, 8, config, seed=1, dropout=dropout)
        x = np.random.default_rng(1).standard_normal((BATCH, SEQ, HIDDEN))
        y = layer(x)
        return layer, y, np.ones(y.shape)

    return make


def _mlp():
    mlp = ParallelMLP(HIDDEN, 10, HIDDEN, config_for("sim3", 4), seed=1)
    y = mlp(np.random.default_rng(2).standard_normal((BATCH, HIDDEN)))
    return mlp, y, np.ones((BATCH, HIDDEN))


def _tied():
    model = Tied(13, config_for("sim3", 3), pad=4)
    loss_fn = VocabParallelCrossEntropy()
    ids, targets = tied_batch(13, 0)
    return model, loss_fn(model(ids), targets), None


def _row():
    row = RowParallelLinear(8, 3, config_for("numpy", 3), seed=1)
    return row, row(np.ones((2, 8))), np.ones((2, 3))


def _column():
    column = ColumnParallelLinear(3, 8, dataclasses.replace(config_for("sim3", 2), gather_output=False))
    y = column(np.ones((2, 3)))  # a ShardedTensor
    return column, y, y.map(lambda b: b * 0 + 1)


@pytest.mark.parametrize(
    "make",
    [_layer(), _layer(dropout=0.2), _layer(sequence_parallel=True, dropout=0.2), _mlp, _tied, _row, _column],
    ids=["layer", "layer-dropout", "layer-sequence-parallel", "mlp", "tied-model", "row", "column"],
)
def test_backward_twice_through_one_graph_raises_and_changes_no_gradient(make):
    module, output, grad = _twice(make)
    before = _grads(module)
    with pytest.raises(TensorParallelError, match="a second time"):
        output.backward(grad)
    after = _grads(module)
    for name, value in after.items():
        assert np.array_equal(value, before[name]), f"{name} changed by the refused backward"
    module, output, grad = make()  # a new forward makes backward legal again
    output.backward(grad)


def test_loss_backward_twice_raises():
    model, _, _ = _tied()
    loss_fn = VocabParallelCrossEntropy()
    ids, targets = tied_batch(13, 1)
    loss = loss_fn(model(ids), targets)
    loss.backward()
    first = model.grads()
    with pytest.raises(TensorParallelError, match="a second time"):
        loss.backward()
    assert all(np.array_equal(g, first[name]) for name, g in model.grads().items())
    model.zero_grad()
    loss_fn(model(ids), targets).backward()
    for name, g in model.grads().items():
        assert np.array_equal(g, first[name]), name
