"""Exact resume: optimizer state, loss scaler and dropout steps in one checkpoint.

A small model with dropout (embedding -> dropout -> residual MLP -> vocabulary-split head, with the
vocab-parallel loss) trains 50 steps, is saved with its optimizer, loaded into a fresh model and a
fresh optimizer (at the same or another worker count, backend), and trains 50 more. The result must
equal 100 uninterrupted steps: bit for bit at the same worker count on NumPy, to float64 rounding
(rtol 1e-12) across worker counts and backends. The uninterrupted run saves the checkpoint at step
50 on its way, so every resume reuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import numpy as np
import pytest

from tp_gpu import (
    SGD,
    Adam,
    CheckpointError,
    ColumnParallelLinear,
    Dropout,
    GradScaler,
    ParallelEmbedding,
    ParallelMLP,
    Residual,
    Sequential,
    ShapeError,
    TensorParallelConfig,
    VocabParallelCrossEntropy,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from tp_gpu.layers.dropout import keep_mask

VOCAB, HIDDEN, FFN, BATCH, SEQ = 13, 8, 12, 3, 5
P_DROP, DROP_SEED = 0.25, 7
HALF = 50
RTOL, ATOL = 1e-12, 1e-15

BACKENDS = {"numpy": ("numpy", None), "sim3": ("simulated", 3)}


def make_model(p: int, backend: str = "numpy", dtype: str = "float64") -> Sequential:
    name, devices = BACKENDS[backend]
    config = TensorParallelConfig(n_workers=p, backend=name, devices=devices, dtype=dtype)
    return Sequential(
        ParallelEmbedding(VOCAB, HIDDEN, config, seed=1),
        Dropout(P_DROP, config, seed=DROP_SEED),
        Residual(ParallelMLP(HIDDEN, FFN, HIDDEN, config, seed=3)),
        ColumnParallelLinear(HIDDEN, VOCAB, dataclasses.replace(config, gather_output=False), seed=5),
    )


def make_optimizer(kind: str, model: Sequential):
    if kind == "adam":
        return Adam(model.parameters(), lr=0.01)
    return SGD(model.parameters(), lr=0.05, momentum=0.9)


def batch(step: int):
    """Inputs and a learnable target (3 x + 1 mod V): the same for every worker count."""
    ids = np.random.default_rng([11, step]).integers(0, VOCAB, size=(BATCH, SEQ))
    return ids, (3 * ids + 1) % VOCAB


def train(model, optimizer, start: int, stop: int, scaler=None, on_step=None):
    """Steps ``start..stop-1``; returns ``[(loss, stepped, scale)]``."""
    loss_fn = VocabParallelCrossEntropy()
    log = []
    for step in range(start, stop):
        if on_step is not None:
            on_step(step)
        inputs, targets = batch(step)
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        if scaler is None:
            loss.backward()
            optimizer.step()
            log.append((float(loss), True, 1.0))
        else:
            loss.backward(scaler.scale(1.0))
            stepped = scaler.step(optimizer)
            scaler.update()
            log.append((float(loss), stepped, scaler.get_scale()))
    return log


def optimizer_arrays(optimizer):
    """``{(index, key): array}`` and ``{index: step}`` of an optimizer's state dict."""
    state = optimizer.state_dict()["state"]
    arrays = {(i, k): v for i, entry in state.items() for k, v in entry.items() if k != "step"}
    return arrays, {i: entry["step"] for i, entry in state.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``get(backend, p, kind)``: the uninterrupted 100-step run, and its checkpoint at step 50."""
    cache = {}

    def get(backend: str, p: int, kind: str):
        key = (backend, p, kind)
        if key not in cache:
            model = make_model(p, backend)
            optimizer = make_optimizer(kind, model)
            path = tmp_path_factory.mktemp("resume") / f"{backend}-{p}-{kind}.safetensors"

            def save_at_half(step):
                if step == HALF:
                    save_checkpoint(path, model, optimizer=optimizer)

            log = train(model, optimizer, 0, 2 * HALF, on_step=save_at_half)
            cache[key] = dict(
                losses=[loss for loss, _, _ in log],
                weights=model.state_dict(),
                optimizer=optimizer_arrays(optimizer),
                path=path,
            )
        return cache[key]

    return get


def resume(ref, p: int, backend: str, kind: str):
    """A fresh model and optimizer at ``p`` on ``backend`` loaded from ``ref``'s step-50 checkpoint,
    trained to step 100: ``(model, optimizer, losses)``."""
    model = make_model(p, backend)
    optimizer = make_optimizer(kind, model)
    load_checkpoint(ref["path"], model, optimizer=optimizer)
    assert model[1].step == HALF  # the dropout's step counter came back
    log = train(model, optimizer, HALF, 2 * HALF)
    return model, optimizer, ref["losses"][:HALF] + [loss for loss, _, _ in log]


def test_the_run_learns_and_dropout_changes_it(reference):
    """The setting has teeth: the loss falls, and the dropout masks change every step's loss."""
    ref = reference("numpy", 3, "adam")
    assert np.mean(ref["losses"][-10:]) < 0.8 * np.mean(ref["losses"][:10])
    model = make_model(3)
    model.eval()  # no dropout: other losses
    loss_fn = VocabParallelCrossEntropy()
    inputs, targets = batch(0)
    assert float(loss_fn(model(inputs), targets)) != ref["losses"][0]


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_resume_at_the_same_worker_count_is_bit_identical(reference, kind):
    ref = reference("numpy", 3, kind)
    model, optimizer, losses = resume(ref, 3, "numpy", kind)
    assert np.array_equal(losses, ref["losses"])
    weights = model.state_dict()
    assert list(weights) == list(ref["weights"])
    for name, value in weights.items():
        assert np.array_equal(value, ref["weights"][name]), name
    arrays, steps = optimizer_arrays(optimizer)
    ref_arrays, ref_steps = ref["optimizer"]
    assert steps == ref_steps == {i: 2 * HALF for i in range(len(model.parameters()))}
    assert arrays.keys() == ref_arrays.keys()
    for key, value in arrays.items():
        assert np.array_equal(value, ref_arrays[key]), key
    assert model[1].step == 2 * HALF


@pytest.mark.parametrize(
    "source, target, kind",
    [
        (("numpy", 3), ("numpy", 1), "adam"),
        (("numpy", 2), ("numpy", 5), "adam"),
        (("numpy", 2), ("numpy", 5), "sgd"),
        (("sim3", 3), ("sim3", 1), "adam"),
        (("sim3", 2), ("sim3", 5), "sgd"),
        (("numpy", 3), ("sim3", 2), "adam"),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v[0]}-p{v[1]}",
)
def test_resume_at_another_worker_count_matches_to_rounding(reference, source, target, kind):
    ref = reference(source[0], source[1], kind)
    model, optimizer, losses = resume(ref, target[1], target[0], kind)
    np.testing.assert_allclose(losses, ref["losses"], rtol=RTOL, atol=ATOL)
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, ref["weights"][name], rtol=RTOL, atol=ATOL, err_msg=name)
    arrays, steps = optimizer_arrays(optimizer)
    ref_arrays, ref_steps = ref["optimizer"]
    assert steps == ref_steps
    assert arrays.keys() == ref_arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_allclose(value, ref_arrays[key], rtol=RTOL, atol=ATOL, err_msg=str(key))


def test_dropout_step_is_saved_and_resumed_masks_equal_the_uninterrupted_runs(reference):
    ref = reference("numpy", 3, "adam")
    training = json.loads(read_checkpoint(ref["path"]).metadata["training"])
    assert training["dropout_steps"] == {"1": HALF}
    model = make_model(4)
    load_checkpoint(ref["path"], model, optimizer=make_optimizer("adam", model))
    drop = model[1]
    assert drop.step == HALF
    ones = np.ones((BATCH, SEQ, HIDDEN))
    out = np.asarray(drop(ones))  # the mask of step 50, scaled
    expected = keep_mask(np, P_DROP, DROP_SEED, HALF, ones.shape, (Ellipsis,)) / (1.0 - P_DROP)
    assert np.array_equal(out, expected)
    assert not np.array_equal(
        out, keep_mask(np, P_DROP, DROP_SEED, 0, ones.shape, (Ellipsis,)) / (1 - P_DROP)
    )
    assert drop.step == HALF + 1


def test_resume_without_the_dropout_step_would_differ(reference):
    """Negative control: with the dropout counter reset, the continued losses differ."""
    ref = reference("numpy", 3, "adam")
    model = make_model(3)
    optimizer = make_optimizer("adam", model)
    load_checkpoint(ref["path"], model, optimizer=optimizer)
    model[1].step = 0
    log = train(model, optimizer, HALF, HALF + 3)
    assert [loss for loss, _, _ in log] != ref["losses"][HALF : HALF + 3]


def test_resume_without_the_optimizer_state_would_differ(reference):
    """Negative control: a fresh Adam over the loaded weights takes other steps."""
    ref = reference("numpy", 3, "adam")
    model = make_model(3)
    optimizer = make_optimizer("adam", model)
    load_checkpoint(ref["path"], model)  # weights and nothing else
    model[1].step = HALF
    log = train(model, optimizer, HALF, HALF + 3)
    assert log[0][0] == ref["losses"][HALF]  # same weights, same masks: same first loss
    assert [loss for loss, _, _ in log][1:] != ref["losses"][HALF + 1 : HALF + 3]


# --- float16 with float32 master weights and a GradScaler ------------------------------------


def test_float16_with_master_weights_and_scaler_resumes_bit_identically(tmp_path):
    path = tmp_path / "f16.safetensors"
    scaler_args = dict(init_scale=2.0**22, growth_interval=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflows the scaler exists for
        model = make_model(2, dtype="float16")
        optimizer = Adam(model.parameters(), lr=0.01)
        scaler = GradScaler(**scaler_args)
        saved = {}

        def save_at_half(step):
            if step == HALF:
                save_checkpoint(path, model, optimizer=optimizer, scaler=scaler)
                saved["scaler"] = dict(scaler.state_dict())

        log = train(model, optimizer, 0, 2 * HALF, scaler=scaler, on_step=save_at_half)
        fresh = make_model(2, dtype="float16")
        fresh_optimizer = Adam(fresh.parameters(), lr=0.01)
        fresh_scaler = GradScaler()  # other settings: all of them come from the file
        load_checkpoint(path, fresh, optimizer=fresh_optimizer, scaler=fresh_scaler)
        assert fresh_scaler.state_dict() == saved["scaler"]
        resumed = train(fresh, fresh_optimizer, HALF, 2 * HALF, scaler=fresh_scaler)

    # the run exercised the scaler after the save: skipped steps, backoff and growth
    after = log[HALF:]
    assert any(not stepped for _, stepped, _ in after) and any(stepped for _, stepped, _ in after)
    assert len({scale for _, _, scale in after}) > 1
    assert all(np.isfinite(loss) for loss, _, _ in log)
    assert resumed == after  # losses, skipped steps and scales, bit for bit
    assert fresh_scaler.state_dict() == scaler.state_dict()
    for name, value in fresh.state_dict().items():
        assert value.dtype == np.float16
        assert np.array_equal(value, model.state_dict()[name]), name
    arrays, steps = optimizer_arrays(fresh_optimizer)
    ref_arrays, ref_steps = optimizer_arrays(optimizer)
    assert steps == ref_steps
    assert arrays.keys() == ref_arrays.keys()
    assert {k for _, k in arrays} == {"exp_avg", "exp_avg_sq", "master"}
    for key, value in arrays.items():
        assert value.dtype == np.float32, key
        assert np.array_equal(value, ref_arrays[key]), key

    stored = read_checkpoint(path).tensors
    assert stored["0.weight"].dtype == np.float16
    assert stored["optimizer/0.weight/master"].dtype == np.float32
    assert stored["optimizer/0.weight/exp_avg"].dtype == np.float32


# --- loading checks everything before changing anything --------------------------------------


def _trained(kind="adam", p=2, steps=3, lr=None):
    model = make_model(p)
    optimizer = make_optimizer(kind, model)
    if lr is not None:
        optimizer.lr = lr
    train(model, optimizer, 0, steps)
    return model, optimizer


def _snapshot(optimizer):
    arrays, steps = optimizer_arrays(optimizer)
    return {k: v.copy() for k, v in arrays.items()}, steps, dict(optimizer.hyperparameters())


def _assert_unchanged(optimizer, snapshot):
    arrays, steps, settings = snapshot
    now_arrays, now_steps = optimizer_arrays(optimizer)
    assert now_steps == steps
    assert now_arrays.keys() == arrays.keys()
    for key, value in now_arrays.items():
        assert np.array_equal(value, arrays[key]), key
    assert optimizer.hyperparameters() == settings


def _bad_shape(sd):
    last = max(sd["state"])
    sd["state"][last]["exp_avg"] = np.zeros((1, 2, 3))
    return sd


def _missing_key(sd):
    del sd["state"][max(sd["state"])]["exp_avg_sq"]
    return sd


def _bad_index(sd):
    sd["state"][99] = sd["state"][0]
    return sd


def _not_a_number(sd):
    sd["state"][max(sd["state"])]["exp_avg"] = np.full(sd["state"][max(sd["state"])]["exp_avg"].shape, "x")
    return sd


@pytest.mark.parametrize("spoil", [_bad_shape, _missing_key, _bad_index, _not_a_number])
def test_optimizer_load_state_dict_checks_everything_before_changing_anything(spoil):
    _, source = _trained(steps=4)
    good = source.state_dict()
    bad = spoil(copy.deepcopy(good))
    bad["param_groups"][0]["lr"] = 0.5  # would change the settings, too
    _, target = _trained(p=3, steps=2)
    before = _snapshot(target)
    with pytest.raises(ShapeError):
        target.load_state_dict(bad)
    _assert_unchanged(target, before)
    target.load_state_dict(good)  # the good one loads, re-sharded from 2 workers to 3
    _assert_unchanged(target, _snapshot(source))


def test_optimizer_load_state_dict_refuses_what_is_not_a_state_dict():
    _, optimizer = _trained()
    before = _snapshot(optimizer)
    for bad in (None, [], {"param_groups": []}):
        with pytest.raises(ShapeError):
            optimizer.load_state_dict(bad)
    _assert_unchanged(optimizer, before)


def test_optimizer_load_state_dict_replaces_the_whole_state_as_torch():
    """Parameters without state in the loaded dict (never stepped) have none after loading."""
    model = make_model(2)
    source = make_optimizer("adam", model)  # has stepped nothing: an empty state
    empty = source.state_dict()
    assert empty["state"] == {}
    _, target = _trained()
    target.load_state_dict(empty)
    assert target.state_dict()["state"] == {}


def _assert_model_unchanged(model, weights):
    for name, value in model.state_dict().items():
        assert np.array_equal(value, weights[name]), name


def test_loading_into_an_optimizer_a_checkpoint_saved_without_one_raises(tmp_path):
    path = tmp_path / "weights-only.safetensors"
    saved_model, _ = _trained(steps=2)
    save_checkpoint(path, saved_model)
    model, optimizer = _trained(p=3, steps=1)
    model[1].step = 17
    weights, before = model.state_dict(), _snapshot(optimizer)
    with pytest.raises(CheckpointError, match="without optimizer="):
        load_checkpoint(path, model, optimizer=optimizer)
    _assert_model_unchanged(model, weights)
    _assert_unchanged(optimizer, before)
    assert model[1].step == 17
    with pytest.raises(CheckpointError, match="without scaler="):
        load_checkpoint(path, model, scaler=GradScaler())
    _assert_model_unchanged(model, weights)
    load_checkpoint(path, model)  # the weights alone load
    _assert_model_unchanged(model, saved_model.state_dict())


def test_loading_state_of_another_optimizer_type_raises_and_changes_nothing(tmp_path):
    path = tmp_path / "sgd.safetensors"
    saved_model, saved_optimizer = _trained("sgd", steps=2)
    save_checkpoint(path, saved_model, optimizer=saved_optimizer)
    model, optimizer = _trained("adam", p=3, steps=1)
    weights, before = model.state_dict(), _snapshot(optimizer)
    with pytest.raises(CheckpointError, match="SGD"):
        load_checkpoint(path, model, optimizer=optimizer)
    _assert_model_unchanged(model, weights)
    _assert_unchanged(optimizer, before)
