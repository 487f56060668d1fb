"""SGD and Adam against NumPy implementations of torch.optim's update rules, written here,
fed with gradients from real backward passes of every layer; in-place updates that stay on
their devices, skipped parameters, zero_grad, and an error for every bad argument."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tp_gpu import (
    SGD,
    Adam,
    ColumnParallelLinear,
    ConfigError,
    ParallelEmbedding,
    ParallelMLP,
    RowParallelLinear,
)

TOL = dict(rtol=1e-12, atol=1e-15)
OPTIM_WORKERS = [1, 2, 3, 8]
STEPS = 3


# --- references: torch.optim's formulas, one logical array per parameter ---------------------


class RefSGD:
    """``torch.optim.SGD``: ``v = g`` on a parameter's first step, then ``v = mu v + g``; ``w -= lr v``.

    A parameter whose gradient is None is skipped (its momentum buffer kept).
    """

    def __init__(self, weights, lr, momentum=0.0):
        self.weights = [np.array(w, dtype=np.float64) for w in weights]
        self.lr, self.momentum = lr, momentum
        self.velocity = [None] * len(self.weights)

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.momentum:
                self.velocity[i] = (
                    g.copy() if self.velocity[i] is None else self.momentum * self.velocity[i] + g
                )
                g = self.velocity[i]
            self.weights[i] = self.weights[i] - self.lr * g


class RefAdam:
    """``torch.optim.Adam`` (no weight decay, no amsgrad), with torch's per-parameter step count.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``; ``t`` counts the steps in
    which *this* parameter had a gradient.
    """

    def __init__(self, weights, lr, betas=(0.9, 0.999), eps=1e-8):
        self.weights = [np.array(w, dtype=np.float64) for w in weights]
        self.lr, self.betas, self.eps = lr, betas, eps
        n = len(self.weights)
        self.m, self.v, self.t = [None] * n, [None] * n, [0] * n

    def step(self, grads):
        b1, b2 = self.betas
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.m[i] is None:
                self.m[i], self.v[i] = np.zeros_like(g), np.zeros_like(g)
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            m_hat = self.m[i] / (1 - b1**t)
            v_hat = self.v[i] / (1 - b2**t)
            self.weights[i] = self.weights[i] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


OPTIMIZERS = {
    "sgd": (lambda params: SGD(params, lr=0.1), lambda w: RefSGD(w, lr=0.1)),
    "sgd-momentum": (
        lambda params: SGD(params, lr=0.05, momentum=0.9),
        lambda w: RefSGD(w, lr=0.05, momentum=0.9),
    ),
    "adam": (lambda params: Adam(params, lr=0.01), lambda w: RefAdam(w, lr=0.01)),
    "adam-custom": (
        lambda params: Adam(params, lr=0.003, betas=(0.8, 0.95), eps=1e-6),
        lambda w: RefAdam(w, lr=0.003, betas=(0.8, 0.95), eps=1e-6),
    ),
}


def make_pair(name, params):
    make_opt, make_ref = OPTIMIZERS[name]
    return make_opt(params), make_ref([p.full() for p in params])


# --- layers with a random training step and a dense twin ------------------------------------------


def _relu(a):
    return np.maximum(a, 0.0)


def build(kind: str, cfg):
    """``(module, step(rng), dense(inp), sample(rng))``: ``step`` runs forward + backward on random data,
    ``dense`` computes the forward from the module's logical weights, ``sample`` draws an input."""
    n = cfg.n_workers
    if kind == "column":
        module = ColumnParallelLinear(7, 3 * n, cfg, seed=1)

        def sample(rng):
            return rng.standard_normal((4, 7))

        def dense(x):
            return x @ module.full_weight() + module.full_bias()

        out_shape = (4, 3 * n)
    elif kind == "row":
        module = RowParallelLinear(5 * n, 3, cfg, seed=2)

        def sample(rng):
            return rng.standard_normal((4, 5 * n))

        def dense(x):
            return x @ module.full_weight() + module.full_bias()

        out_shape = (4, 3)
    elif kind == "embedding":
        module = ParallelEmbedding(4 * n, 5, config=cfg, seed=3)

        def sample(rng):
            return rng.integers(0, 4 * n, size=(3, 4))

        def dense(ids):
            return module.full_weight()[ids]

        out_shape = (3, 4, 5)
    elif kind == "mlp":
        module = ParallelMLP(6, 4 * n, 5, cfg, seed=4, activation="relu")

        def sample(rng):
            return rng.standard_normal((8, 6))

        def dense(x):
            fc1, fc2 = module.fc1, module.fc2
            return _relu(x @ fc1.full_weight() + fc1.full_bias()) @ fc2.full_weight() + fc2.full_bias()

        out_shape = (8, 5)
    else:  # pragma: no cover
        raise AssertionError(kind)

    def step(rng):
        module(sample(rng)).backward(rng.standard_normal(out_shape))

    return module, step, dense, sample


def backend_of(module):
    return module.backend


def output_on_host(module, y) -> np.ndarray:
    return np.asarray(module.backend.to_host(y), dtype=np.float64)


def assert_matches(params, ref):
    for p, w in zip(params, ref.weights):
        np.testing.assert_allclose(p.full(), w, **TOL, err_msg=p.name)


KINDS = ["column", "row", "embedding", "mlp"]


# --- updates against the references ----------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_workers", OPTIM_WORKERS)
def test_steps_match_reference(make_config, rng, n_workers, kind, opt_name):
    module, step, dense, sample = build(kind, make_config(n_workers))
    params = module.parameters()
    initial = [p.full() for p in params]
    opt, ref = make_pair(opt_name, params)
    for _ in range(STEPS):
        opt.zero_grad()
        step(rng)
        grads = [p.full_grad() for p in params]
        assert all(np.abs(g).max() > 0 for g in grads)  # every parameter gets a real gradient
        opt.step()
        ref.step(grads)
        assert_matches(params, ref)
        # step() reads the gradients, it does not consume or change them
        for p, g in zip(params, grads):
            np.testing.assert_array_equal(p.full_grad(), g)
    for p, w0 in zip(params, initial):
        assert np.abs(p.full() - w0).max() > 1e-4, p.name  # the test moved every parameter
    backend = backend_of(module)
    for p in params:  # updated shards stayed where they were
        assert [backend.device_of(s) for s in p.shards] == list(p.devices), p.name
        assert tuple(p.shape) == p.full().shape
    # In place: the module's own forward computes with the updated weights.
    assert module.parameters() == params and all(a is b for a, b in zip(module.parameters(), params))
    x = sample(rng)
    np.testing.assert_allclose(output_on_host(module, module(x)), dense(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_one_optimizer_over_several_modules(make_config, rng, n_workers, opt_name):
    """A column layer feeding a row layer, both in one optimizer, as a model would be."""
    cfg = make_config(n_workers)
    col = ColumnParallelLinear(5, 2 * n_workers, cfg, seed=7)
    row = RowParallelLinear(2 * n_workers, 3, cfg, seed=8)
    params = col.parameters() + row.parameters()
    opt, ref = make_pair(opt_name, params)
    for _ in range(STEPS):
        opt.zero_grad()
        x = rng.standard_normal((6, 5))
        row(col(x)).backward(rng.standard_normal((6, 3)))  # the tape runs row's backward, then col's
        grads = [p.full_grad() for p in params]
        opt.step()
        ref.step(grads)
        assert_matches(params, ref)
    x = rng.standard_normal((6, 5))
    expected = (x @ col.full_weight() + col.full_bias()) @ row.full_weight() + row.full_bias()
    np.testing.assert_allclose(output_on_host(row, row(col(x))), expected, rtol=1e-10, atol=1e-12)


# --- gradients: absent, cleared, accumulated ---------------------------------------------------------


def _exact_copies(params):
    return [p.full().copy() for p in params]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_params_without_gradient_are_left_unchanged(make_config, rng, n_workers, opt_name):
    """``a`` has a gradient every step, ``b`` skips step 2, ``frozen`` never has one."""
    cfg = make_config(n_workers)
    a = ColumnParallelLinear(5, 2 * n_workers, cfg, seed=1)
    b = RowParallelLinear(2 * n_workers, 3, cfg, seed=2)
    frozen = ParallelEmbedding(2 * n_workers, 3, config=cfg, seed=3)
    params = a.parameters() + b.parameters() + frozen.parameters()
    opt, ref = make_pair(opt_name, params)
    frozen_before = _exact_copies(frozen.parameters())
    for step_no, with_b in enumerate([True, False, True], start=1):
        opt.zero_grad()
        a(rng.standard_normal((4, 5))).backward(rng.standard_normal((4, 2 * n_workers)))
        if with_b:
            b(rng.standard_normal((4, 2 * n_workers))).backward(rng.standard_normal((4, 3)))
        grads = [p.full_grad() for p in a.parameters()]
        grads += [p.full_grad() if with_b else None for p in b.parameters()]
        grads += [None for _ in frozen.parameters()]
        b_before = _exact_copies(b.parameters())
        a_before = _exact_copies(a.parameters())
        opt.step()
        ref.step(grads)
        if not with_b:  # exactly unchanged: no momentum, no Adam drift without a gradient
            for p, old in zip(b.parameters(), b_before):
                np.testing.assert_array_equal(p.full(), old)
        for p, old in zip(frozen.parameters(), frozen_before):
            np.testing.assert_array_equal(p.full(), old)
        for p, old in zip(a.parameters(), a_before):
            assert np.abs(p.full() - old).max() > 0, (step_no, p.name)
        # a has had a gradient at every step, so its step count is the same in every convention.
        assert_matches(a.parameters(), _sub(ref, 0, 2))
        if opt_name.startswith("sgd"):  # b's momentum buffer survives the skipped step, as in torch
            assert_matches(b.parameters(), _sub(ref, 2, 4))


def _sub(ref, first, last):
    class View:
        weights = ref.weights[first:last]

    return View


@pytest.mark.parametrize("n_workers", [1, 3])
def test_adam_bias_correction_counts_each_parameters_own_steps(make_config, rng, n_workers):
    cfg = make_config(n_workers)
    a = ColumnParallelLinear(5, 2 * n_workers, cfg, seed=1)
    late = RowParallelLinear(2 * n_workers, 3, cfg, seed=2)
    params = a.parameters() + late.parameters()
    opt, ref = make_pair("adam", params)
    for with_late in (False, True, True):  # ``late`` gets its first gradient at step 2
        opt.zero_grad()
        a(rng.standard_normal((4, 5))).backward(rng.standard_normal((4, 2 * n_workers)))
        if with_late:
            late(rng.standard_normal((4, 2 * n_workers))).backward(rng.standard_normal((4, 3)))
        grads = [p.full_grad() for p in a.parameters()] + [
            p.full_grad() if with_late else None for p in late.parameters()
        ]
        opt.step()
        ref.step(grads)
    # torch: late's first update is lr * g / (|g| + eps') ~ lr * sign(g);
    # here it is damped by (1-b1)/(1-b1^2).
    assert_matches(params, ref)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_zero_grad_clears_gradients(make_config, rng, n_workers, opt_name):
    cfg = make_config(n_workers)
    mlp = ParallelMLP(6, 2 * n_workers, 5, cfg, seed=4, activation="relu")
    params = mlp.parameters()
    opt, _ = make_pair(opt_name, params)
    mlp(rng.standard_normal((4, 6))).backward(rng.standard_normal((4, 5)))
    assert all(np.abs(g).max() > 0 for g in mlp.grads().values())
    opt.step()  # builds momentum / moments, so a later step without gradients would show if it moved
    opt.zero_grad()
    grads = mlp.grads()
    assert list(grads) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for name, g in grads.items():
        assert g.shape == dict(mlp.named_parameters())[name].shape
        assert not g.any(), name
    before = _exact_copies(params)
    opt.step()  # no gradient anywhere: nothing moves
    for p, old in zip(params, before):
        np.testing.assert_array_equal(p.full(), old)
    # and gradients after zero_grad start from zero, not from the old ones
    x, g = rng.standard_normal((4, 6)), rng.standard_normal((4, 5))
    mlp(x).backward(g)
    once = mlp.grads()
    mlp.zero_grad()
    mlp(x).backward(g)
    for name, value in mlp.grads().items():
        np.testing.assert_allclose(value, once[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("n_workers", [1, 3, 8])
def test_accumulated_gradients_without_zero_grad(make_config, rng, n_workers, opt_name):
    """Without zero_grad the next backward adds to the gradient the optimizer read; the optimizer's
    state (a momentum buffer initialised from the gradient) must not alias it."""
    module, step, _, _ = build("column", make_config(n_workers))
    params = module.parameters()
    opt, ref = make_pair(opt_name, params)
    for _ in range(STEPS):
        step(rng)  # no zero_grad: gradients accumulate
        grads = [p.full_grad() for p in params]
        opt.step()
        ref.step(grads)
        assert_matches(params, ref)


# --- bad arguments -----------------------------------------------------------------------


@pytest.fixture
def params():
    return ColumnParallelLinear(4, 4, _numpy_config()).parameters()


def _numpy_config():
    from tp_gpu import TensorParallelConfig

    return TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64")


BAD_LR = [
    (0, "lr.*got 0"),
    (0.0, "lr.*got 0.0"),
    (-1, "lr.*got -1"),
    ("x", "lr.*got 'x'"),
    (math.nan, "lr.*got nan"),
    (math.inf, "lr.*got inf"),
    (None, "lr.*got None"),
    (True, "lr.*got True"),
]


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize("lr, pattern", BAD_LR, ids=[repr(v) for v, _ in BAD_LR])
def test_bad_lr(params, cls, lr, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cls(params, lr=lr)


@pytest.mark.parametrize(
    "momentum, pattern",
    [
        (1.0, r"momentum.*\[0.0, 1.0\).*got 1.0"),
        (-0.1, "momentum.*got -0.1"),
        (1.5, "momentum.*got 1.5"),
        (math.nan, "momentum.*got nan"),
        ("0.9", "momentum.*got '0.9'"),
    ],
)
def test_bad_momentum(params, momentum, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SGD(params, lr=0.1, momentum=momentum)


@pytest.mark.parametrize(
    "betas, pattern",
    [
        ((0.9,), r"betas.*pair.*got \(0.9,\)"),
        ((0.9, 0.99, 0.999), r"betas.*pair.*got \(0.9, 0.99, 0.999\)"),
        (0.9, "betas.*pair.*got 0.9"),
        ((1.0, 0.9), r"betas\[0\].*got 1.0"),
        ((0.9, 1.0), r"betas\[1\].*got 1.0"),
        ((-0.1, 0.9), r"betas\[0\].*got -0.1"),
        ((0.9, "x"), r"betas\[1\].*got 'x'"),
    ],
    ids=["one", "three", "scalar", "b1=1", "b2=1", "b1<0", "b2-str"],
)
def test_bad_betas(params, betas, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Adam(params, lr=0.1, betas=betas)


@pytest.mark.parametrize(
    "eps, pattern", [(0, "eps.*got 0"), (-1e-8, "eps.*got -1e-08"), (math.nan, "eps.*got nan")]
)
def test_bad_eps(params, eps, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Adam(params, lr=0.1, eps=eps)


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_empty_params(cls):
    with pytest.raises(ConfigError, match="no parameters"):
        cls([], lr=0.1)
    with pytest.raises(ConfigError, match="no parameters"):
        cls(iter(()), lr=0.1)


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.zeros(3), "ShardedParameter.*got ndarray"),
        ("weight", "ShardedParameter.*got str"),
        (None, "ShardedParameter.*got NoneType"),
    ],
    ids=["ndarray", "str", "None"],
)
def test_non_parameters(params, cls, bad, pattern):
    with pytest.raises(ConfigError, match=pattern):
        cls(params + [bad], lr=0.1)


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_layer_instead_of_its_parameters(cls):
    layer = ColumnParallelLinear(4, 4, _numpy_config())
    with pytest.raises(ConfigError, match="ShardedParameter.*got ColumnParallelLinear"):
        cls([layer], lr=0.1)


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_duplicated_params(params, cls):
    with pytest.raises(ConfigError, match="more than once"):
        cls(params + params[:1], lr=0.1)


def test_valid_arguments_are_accepted(params):
    """Guard for the error tests: the boundaries that are allowed."""
    SGD(params, lr=np.float64(1e-3), momentum=0.0)
    SGD(params, lr=5, momentum=0.999)
    Adam(params, lr=1e-3, betas=[0.0, 0.0], eps=1e-12)
    Adam(iter(params), lr=1e-3)
