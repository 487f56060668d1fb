"""The error promise: a bad value raises a TensorParallelError that names the
value it got and the one it expected, before anything is computed or changed.

Each case was a raw exception (TypeError, ZeroDivisionError, ...) or a silent acceptance; each test
checks the typed error, its message, and that nothing changed. Also: many-problem errors give a
count and the first five problems, ``load_checkpoint(dtype_cast=True)``, stale
temporary files of killed saves, saving through a symbolic link, and loading while another thread
runs forwards (documented as not atomic; the documented remedy, one lock, is tested). Gradients
too: a bad gradient given to ``y.backward(g)`` raises before any node of the tape runs, so a corrected
retry gives the dense reference's gradients; backward on a result computed under ``no_grad`` and a
second backward through a freed graph raise.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import safetensors.numpy
from helpers import forward_backward
from test_class_weights import dense_cross_entropy
from test_uneven import flat, gelu, gelu_grad

import tp_gpu
import tp_gpu.checkpoint_format as checkpoint_format
from tp_gpu import (
    SGD,
    Adam,
    CheckpointError,
    ColumnParallelLinear,
    ConfigError,
    Dropout,
    GradScaler,
    ParallelMLP,
    RowParallelLinear,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
    VocabParallelCrossEntropy,
    clip_grad_norm,
    load_checkpoint,
    read_checkpoint,
    regions,
    save_checkpoint,
)
from tp_gpu.checkpoint_io import remove_stale_temporaries, temporary_pattern
from tp_gpu.sharded import ShardedTensor

try:
    import torch
except ImportError:  # CI
    torch = None


def config(n_workers=2, dtype="float64", **kwargs):
    return TensorParallelConfig(n_workers=n_workers, dtype=dtype, **kwargs)


def layer_with_grads(seed=0):
    layer = ColumnParallelLinear(5, 6, config(3), seed=seed)
    rng = np.random.default_rng(seed)
    for p in layer.parameters():
        p.zero_grad()
        p.accumulate_blocks(p.stage(rng.standard_normal(p.shape)))
    return layer


def grads(params):
    return [p.assemble(p.grad_blocks).copy() for p in params]


# --- clip_grad_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ((None,), "max_norm must be a number in [0, inf] or 'inf', got None"),
        ((float("nan"),), "max_norm must be a number in [0, inf] or 'inf', got nan"),
        ((-1.0,), "max_norm must be a number in [0, inf] or 'inf', got -1.0"),
        ((True,), "max_norm must be a number in [0, inf] or 'inf', got True"),
        (("1.0",), "max_norm must be a number in [0, inf] or 'inf', got '1.0'"),
        ((1.0, 0), "norm_type must be a number in (0, inf] or 'inf', got 0"),
        ((1.0, -2.0), "norm_type must be a number in (0, inf] or 'inf', got -2.0"),
        ((1.0, "fro"), "norm_type must be a number in (0, inf] or 'inf', got 'fro'"),
        ((1.0, float("nan")), "norm_type must be a number in (0, inf] or 'inf', got nan"),
    ],
    ids=["none", "nan", "negative", "bool", "string", "norm0", "norm-neg", "fro", "norm-nan"],
)
def test_clip_grad_norm_refuses_bad_numbers_before_touching_gradients(args, message):
    layer = layer_with_grads()
    before = grads(layer.parameters())
    with pytest.raises(ConfigError) as info:
        clip_grad_norm(layer.parameters(), *args)
    assert message in str(info.value)
    for a, b in zip(before, grads(layer.parameters())):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "params, message",
    [
        ([np.zeros(3)], "must be ShardedParameter objects (model.parameters()), got ndarray at position 0"),
        (None, "takes a ShardedParameter or an iterable of them (model.parameters()), got NoneType"),
        (3, "got int"),
    ],
)
def test_clip_grad_norm_refuses_what_is_not_a_parameter(params, message):
    with pytest.raises(ConfigError) as info:
        clip_grad_norm(params, 1.0)
    assert message in str(info.value)


def test_clip_grad_norm_neighbours_that_stay_allowed():
    """max_norm 0 zeroes the gradients and inf leaves them (as torch); 'inf' is the max norm; one
    parameter alone is accepted (as torch accepts one tensor)."""
    layer = layer_with_grads()
    before = grads(layer.parameters())
    total = clip_grad_norm(layer.parameters(), math.inf)
    assert total == pytest.approx(math.sqrt(sum((g**2).sum() for g in before)))
    for a, b in zip(before, grads(layer.parameters())):
        np.testing.assert_array_equal(a, b)
    largest = clip_grad_norm(layer.parameters(), "inf", "inf")
    assert largest == max(np.abs(g).max() for g in before)
    clip_grad_norm(layer.weight, 1.0)  # one parameter
    clip_grad_norm(layer.parameters(), 0.0)
    assert all(not g.any() for g in grads(layer.parameters()))


# --- GradScaler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", None, True, [1.0], 1j])
def test_grad_scaler_scale_takes_a_tensor_or_a_real_number(value):
    with pytest.raises(
        ConfigError, match="GradScaler.scale takes a loss Tensor or a loss gradient as a real number"
    ):
        GradScaler().scale(value)
    assert GradScaler(init_scale=4.0).scale(np.float32(0.5)) == 2.0  # NumPy scalars are numbers


@pytest.mark.parametrize("method", ["step", "unscale_"])
def test_grad_scaler_step_takes_an_optimizer(method):
    scaler = GradScaler()
    with pytest.raises(ConfigError, match=rf"GradScaler.{method} takes a tp_gpu Optimizer .*, got NoneType"):
        getattr(scaler, method)(None)
    assert scaler.state_dict() == GradScaler().state_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"growth_interval": 0}, "growth_interval must be a positive integer, got 0"),
        ({"growth_interval": 2.5}, "growth_interval must be a positive integer, got 2.5"),
        ({"_growth_tracker": -1}, "_growth_tracker must be an integer in [0, growth_interval=2000), got -1"),
        ({"_growth_tracker": 2000}, "got 2000"),
        ({"scale": float("inf")}, "scale must be a finite number > 0, got inf"),
        ({"growth_factor": 1.0}, "growth_factor must be a finite number > 1, got 1.0"),
    ],
)
def test_grad_scaler_load_state_dict_checks_as_the_constructor(change, message):
    scaler = GradScaler(init_scale=8.0)
    before = scaler.state_dict()
    with pytest.raises(ConfigError) as info:
        scaler.load_state_dict({**before, **change})
    assert message in str(info.value)
    assert scaler.state_dict() == before
    with pytest.raises(ShapeError, match="takes a dict .*, got list"):
        scaler.load_state_dict([1, 2])


# --- optimizer settings in a state dict ----------------------------------------------------------


@pytest.mark.parametrize(
    "kind, settings, message",
    [
        ("adam", {"lr": -1}, "lr must be a number in (0.0, inf), got -1"),
        ("adam", {"betas": (5, 5)}, "betas[0] must be a number in [0.0, 1.0), got 5"),
        ("adam", {"betas": [0.9]}, "betas must be a pair (beta1, beta2), got [0.9]"),
        ("adam", {"eps": 0.0}, "eps must be a number in (0.0, inf), got 0.0"),
        ("sgd", {"lr": float("nan")}, "lr must be a number in (0.0, inf), got nan"),
        ("sgd", {"momentum": 1.5}, "momentum must be a number in [0.0, 1.0), got 1.5"),
    ],
)
def test_optimizer_load_state_dict_checks_settings_as_the_constructor(kind, settings, message):
    layer = layer_with_grads()
    make = {
        "adam": lambda p, **s: Adam(p, **{"lr": 0.1, **s}),
        "sgd": lambda p, **s: SGD(p, **{"lr": 0.1, **s}),
    }
    optimizer = make[kind](layer.parameters())
    optimizer.step()
    before = optimizer.state_dict()
    state = {**before, "param_groups": [{**before["param_groups"][0], **settings}]}
    with pytest.raises(ConfigError) as info:
        optimizer.load_state_dict(state)
    assert str(info.value) == f"optimizer state dict param_groups[0]: {message}"
    with pytest.raises(ConfigError) as constructed:  # the same check, word for word
        make[kind](layer.parameters(), **settings)
    assert str(constructed.value) == message
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, entry in before["state"].items():
        for key, value in entry.items():
            np.testing.assert_array_equal(after["state"][i][key], value)


def test_sgd_momentum_loaded_from_a_state_dict_takes_effect():
    """Loading momentum 0.9 into an SGD built without momentum keeps momentum buffers from then on."""
    layer = layer_with_grads()
    source = SGD(layer.parameters(), lr=0.1, momentum=0.9)
    source.step()
    target = SGD(layer.parameters(), lr=0.5)
    target.load_state_dict(source.state_dict())
    assert (target.lr, target.momentum, target.STATE_KEYS) == (0.1, 0.9, ("momentum_buffer",))
    target.step()
    assert set(target.state_dict()["state"][0]) == {"step", "momentum_buffer"}


# --- checkpoint paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, message",
    [
        (
            None,
            "checkpoint path must be a str, bytes or os.PathLike (e.g. 'model.safetensors'), got NoneType",
        ),
        (3, "got int 3"),
        ("", "checkpoint path must be a file name, got the empty string"),
        ("bad\0name.safetensors", "checkpoint path must not contain a NUL byte"),
    ],
    ids=["none", "int", "empty", "nul"],
)
def test_bad_checkpoint_paths_raise_config_error_before_anything(tmp_path, monkeypatch, path, message):
    monkeypatch.chdir(tmp_path)
    mlp = ParallelMLP(4, 6, 3, config(2), seed=1)
    before = {k: v.copy() for k, v in mlp.state_dict().items()}
    for call in (
        lambda: save_checkpoint(path, mlp),
        lambda: load_checkpoint(path, mlp),
        lambda: read_checkpoint(path),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        assert message in str(info.value)
    assert os.listdir(tmp_path) == []
    for k, v in mlp.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_bytes_paths_work(tmp_path):
    path = os.fsencode(tmp_path / "m.safetensors")
    mlp = ParallelMLP(4, 6, 3, config(2), seed=1)
    save_checkpoint(path, mlp)
    load_checkpoint(path, ParallelMLP(4, 6, 3, config(3), seed=2))


# --- many problems: a count, the first five, .problems; dtype_cast ------------------------------


def wide_model(dtype, n_layers=20):
    return {f"l{i}": ColumnParallelLinear(3, 4, config(2, dtype), seed=i) for i in range(n_layers)}


def test_a_float32_checkpoint_into_a_float64_model_gives_a_short_message(tmp_path):
    path = tmp_path / "f32.safetensors"
    save_checkpoint(path, wide_model("float32"))
    target = wide_model("float64")
    before = {k: {n: v.copy() for n, v in m.state_dict().items()} for k, m in target.items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, target)
    message, problems = str(info.value), info.value.problems
    assert len(problems) == 40 and all("expected dtype float64, found float32" in p for p in problems)
    assert "(40 problems: tensor 'l0.weight': expected dtype float64, found float32; " in message
    assert "; and 35 more; all 40 are in the exception's .problems)" in message
    assert (
        "The module expects 40: ['l0.weight', 'l0.bias', 'l1.weight', 'l1.bias', 'l10.weight'] and 35 more"
        in (message)
        or "The module expects 40: " in message
    )
    assert "dtype_cast=True" in message  # says how to convert
    assert len(message) < 1000, len(message)
    for k, m in target.items():
        for n, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k][n])


@pytest.mark.parametrize(
    "saved, loaded", [("float32", "float64"), ("float64", "float32"), ("float64", "float16")]
)
def test_dtype_cast_loads_float_into_float(tmp_path, saved, loaded):
    path = tmp_path / "m.safetensors"
    source = ParallelMLP(4, 6, 3, config(2, saved), seed=1)
    save_checkpoint(path, source)
    target = ParallelMLP(4, 6, 3, config(3, loaded), seed=2)
    assert load_checkpoint(path, target, dtype_cast=True).missing_keys == []
    for name, value in source.state_dict().items():
        got = target.state_dict()[name]
        assert got.dtype == np.dtype(loaded)
        np.testing.assert_array_equal(got, value.astype(loaded))  # rounded once, as torch's copy_


def _rewrite(path, change):
    """Rewrite the checkpoint ``path`` with ``change(tensors)`` applied and its checksums redone."""
    tensors, metadata = read_checkpoint(path)
    change(tensors)
    described = json.loads(metadata["tensors"])
    for name, a in tensors.items():
        described[name] = {
            "shape": list(a.shape),
            "dtype": a.dtype.name,
            "sha256": checkpoint_format._sha256(a),
        }
    metadata["tensors"] = json.dumps(described)
    metadata["metadata_sha256"] = checkpoint_format._metadata_sha256(metadata)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def test_dtype_cast_refuses_integers(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, ParallelMLP(4, 6, 3, config(2), seed=1))

    def to_int(tensors):
        tensors["fc1.bias"] = np.arange(6, dtype=np.int64)

    _rewrite(path, to_int)
    target = ParallelMLP(4, 6, 3, config(2), seed=2)
    before = {k: v.copy() for k, v in target.state_dict().items()}
    for cast in (False, True):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path, target, dtype_cast=cast)
        assert "tensor 'fc1.bias'" in str(info.value) and "int64" in str(info.value)
        assert info.value.problems and len(info.value.problems) == 1
    assert "dtype_cast converts float to float only" in str(info.value)
    with pytest.raises(ConfigError, match="dtype_cast must be True or False, got 'yes'"):
        load_checkpoint(path, target, dtype_cast="yes")
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_errors_about_one_thing_have_no_problem_list():
    assert TensorParallelError("x").problems == [] and ConfigError("y").problems == []


# --- leftovers of killed saves, concurrent saves, symbolic links ---------------------------------


def _temporaries(directory, target):
    pattern = temporary_pattern(str(target))
    return sorted(n for n in os.listdir(directory) if pattern.fullmatch(n))


def test_a_save_killed_with_sigkill_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    path = tmp_path / "model.safetensors"
    mlp = ParallelMLP(64, 256, 64, config(2), seed=1)
    save_checkpoint(path, mlp)
    old_bytes = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import sys, time
        import tp_gpu, tp_gpu.checkpoint_io as io
        real = io._write_all
        def slow(fh, data):
            real(fh, data[: len(data) // 2])
            fh.flush()
            print("half written", flush=True)
            time.sleep(60)  # killed here
        io._write_all = slow
        cfg = tp_gpu.TensorParallelConfig(n_workers=2, dtype="float64")
        mlp = tp_gpu.ParallelMLP(64, 256, 64, cfg, seed=2)
        tp_gpu.save_checkpoint({str(path)!r}, mlp)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "half written"
        stale = _temporaries(tmp_path, path)
        assert len(stale) == 1 and (tmp_path / stale[0]).stat().st_size > 0
        assert remove_stale_temporaries(str(path)) == []  # the live save holds its lock: left alone
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert _temporaries(tmp_path, path) == stale and path.read_bytes() == old_bytes
    save_checkpoint(path, mlp)  # the next save to the same path cleans up
    assert _temporaries(tmp_path, path) == []
    load_checkpoint(path, ParallelMLP(64, 256, 64, config(3), seed=3))


def test_cleanup_spares_live_saves_and_other_targets(tmp_path):
    """A temporary locked by a live process (a concurrent save) and those of other files stay."""
    path = tmp_path / "model.safetensors"
    live = tmp_path / ".model.safetensors.0123456789ab.tmp"
    dead = tmp_path / ".model.safetensors.ba9876543210.tmp"
    other = tmp_path / ".other.safetensors.0123456789ab.tmp"
    unrelated = tmp_path / ".model.safetensors.notours.tmp"
    for p in (live, dead, other, unrelated):
        p.write_bytes(b"partial")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl, os, sys, time; fd = os.open({str(live)!r}, os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        save_checkpoint(path, ColumnParallelLinear(2, 3, config(1)))
        assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (path, live, other, unrelated))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    save_checkpoint(path, ColumnParallelLinear(2, 3, config(1)))
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (path, other, unrelated))
    assert fcntl  # POSIX only (this file imports fcntl)


def test_saving_through_a_symbolic_link_replaces_its_target(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    target = folder / "step100.safetensors"
    link = tmp_path / "latest.safetensors"
    first = ParallelMLP(4, 6, 3, config(2), seed=1)
    save_checkpoint(target, first)
    link.symlink_to(target)
    second = ParallelMLP(4, 6, 3, config(2), seed=2)
    save_checkpoint(link, second)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(os.listdir(folder)) == ["step100.safetensors"] and sorted(os.listdir(tmp_path)) == [
        "latest.safetensors",
        "runs",
    ]
    for via in (link, target):
        loaded = read_checkpoint(via).tensors
        for name, value in second.state_dict().items():
            np.testing.assert_array_equal(loaded[name], value)
    dangling = tmp_path / "next.safetensors"
    dangling.symlink_to(folder / "step200.safetensors")
    save_checkpoint(dangling, first)  # a dangling link: its target is created
    assert dangling.is_symlink() and (folder / "step200.safetensors").is_file()


# --- gradients given to backward -----------------------------------------------------------------

GRAD_LAYERS = ["column", "column_split_output", "row", "mlp", "loss_none"]


def grad_case(kind):
    """``(layer, x_leaf, y, g, reference)``: a layer of 3 workers on 2 simulated devices, its
    output ``y`` for the leaf ``x_leaf``, the right gradient ``g`` of ``y``, and
    ``reference()``: the dense float64 ``{"x": dX, <parameter>: d<parameter>}`` for ``g``."""
    rng = np.random.default_rng(7)
    cfg = config(3, backend="simulated", devices=2)
    if kind == "loss_none":
        z = rng.standard_normal((6, 11))
        targets = rng.integers(0, 11, size=6)
        head = ColumnParallelLinear(4, 11, TensorParallelConfig(n_workers=3, backend="simulated", devices=2))
        layout = head.layout  # logits split as a head of 11 classes splits them
        shards = [
            head.backend.asarray(z[:, a:b], np.float64, d) for (a, b), d in zip(layout.ranges, head.devices)
        ]
        x = ShardedTensor(shards, -1, head.devices, head.backend).requires_grad_()
        y = VocabParallelCrossEntropy(reduction="none")(x, targets)
        g = rng.standard_normal(6)
        return None, x, y, g, lambda: {"x": dense_cross_entropy(z, targets, reduction="none")[1] * g[:, None]}
    x_host = rng.standard_normal((2, 3, 5))
    x = tp_gpu.tensor(x_host, requires_grad=True)
    if kind == "mlp":
        layer = ParallelMLP(5, 9, 4, cfg, seed=1)
    elif kind == "row":
        layer = RowParallelLinear(5, 4, cfg, seed=1)
    else:
        layer = ColumnParallelLinear(
            5, 4, config(3, backend="simulated", devices=2, gather_output=kind == "column"), seed=1
        )
    layer.load_state_dict({n: rng.standard_normal(v.shape) for n, v in layer.state_dict().items()})
    state = layer.state_dict()
    y = layer(x)
    g = rng.standard_normal((2, 3, 4))
    if kind == "column_split_output":
        pieces = np.split(g, np.cumsum(y.split_sizes)[:-1], axis=-1)
        g = ShardedTensor(
            [layer.backend.asarray(p, np.float64, d) for p, d in zip(pieces, y.devices)],
            -1,
            y.devices,
            layer.backend,
        )

    def reference():
        dy = np.asarray(g)
        if kind != "mlp":
            w = state["weight"]
            return {"x": dy @ w.T, "weight": flat(x_host).T @ flat(dy), "bias": flat(dy).sum(axis=0)}
        a, b = state["fc1.weight"], state["fc2.weight"]
        h = x_host @ a + state["fc1.bias"]
        dh = (dy @ b.T) * gelu_grad(h)
        return {
            "x": dh @ a.T,
            "fc1.weight": flat(x_host).T @ flat(dh),
            "fc1.bias": flat(dh).sum(axis=0),
            "fc2.weight": flat(gelu(h)).T @ flat(dy),
            "fc2.bias": flat(dy).sum(axis=0),
        }

    return layer, x, y, g, reference


def gradients(layer, x):
    """Every gradient the tape has given so far (None where none): ``x``'s and each parameter's."""
    found = {"x": None if x.grad is None else np.asarray(x.grad)}
    if layer is not None:
        found.update({n: None if p.grad is None else p.full_grad() for n, p in layer.named_parameters()})
    return found


def assert_gradients(got, expected):
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def wrong_gradients(y, g):
    """``(gradient, message)``: gradients of ``y`` of the wrong shape, each with what its error says."""
    shape = tuple(y.shape)
    expected = f"expected the tensor's shape {shape}"
    cases = [
        (np.ones(shape[::-1] if len(shape) > 1 else shape + (1,)), expected),
        (np.ones(shape[:-1]), f"grad has shape {shape[:-1]}; {expected}"),
        (np.ones(shape + (1,)), f"grad has shape {shape + (1,)}; {expected}"),
        (tp_gpu.tensor(np.ones(shape[1:])), f"grad has shape {shape[1:]}; {expected}"),
        (None, f"backward() without a gradient needs a scalar (one element), got shape {shape}"),
        ("abc", (f"grad has shape (); {expected}", "grad must be real numbers, got 'abc'")),
        (
            [[1.0, 2.0], [3.0]],
            ("grad could not be read as an array", "real numbers, got [[1.0, 2.0], [3.0]]"),
        ),
    ]
    if isinstance(g, ShardedTensor):  # the right shape, split otherwise
        sizes = g.split_sizes[::-1]
        assert sizes != g.split_sizes
        pieces = np.split(np.asarray(g), np.cumsum(sizes)[:-1], axis=-1)
        shards = [g.backend.asarray(p, np.float64, d) for p, d in zip(pieces, g.devices)]
        axis = f"split on axis {g.axis}"
        message = f"{axis} with sizes {sizes}; expected {axis} with sizes {g.split_sizes}"
        cases.append((ShardedTensor(shards, -1, g.devices, g.backend), message))
    return cases


@pytest.mark.parametrize("kind", GRAD_LAYERS)
def test_a_wrong_shape_gradient_raises_before_anything_then_a_corrected_retry_works(kind):
    """Each wrong gradient raises ShapeError naming its shape and the expected one; no gradient
    reached anything and the graph is kept, so ``y.backward(right)`` then gives the dense reference's
    gradients, once."""
    layer, x, y, g, reference = grad_case(kind)
    nothing = gradients(layer, x)
    assert all(v is None for v in nothing.values())
    for wrong, message in wrong_gradients(y, g):
        with pytest.raises(ShapeError) as info:
            y.backward(wrong)
        messages = (message,) if isinstance(message, str) else message  # either wording names it
        assert any(m in str(info.value) for m in messages), (type(wrong).__name__, str(info.value))
        assert gradients(layer, x) == nothing, f"a {type(wrong).__name__} gradient was consumed"
    y.backward(g)
    assert_gradients(gradients(layer, x), reference())


@pytest.mark.parametrize(
    "grad, dtype",
    [
        (lambda s: np.full(s, "a"), "<U1"),
        (lambda s: np.ones(s, complex), "complex128"),
        (lambda s: np.full(s, None), "object"),
    ],
    ids=["strings", "complex", "objects"],
)
@pytest.mark.parametrize("kind", ["column", "column_split_output", "loss_none"])
def test_a_gradient_of_the_right_shape_but_not_real_numbers_raises_before_anything(kind, grad, dtype):
    """As the layers' inputs: a gradient must hold real numbers (complex parts are not dropped
    silently, as torch refuses a complex gradient for a real output); then a retry works."""
    layer, x, y, g, reference = grad_case(kind)
    with pytest.raises(TensorParallelError) as info:
        y.backward(grad(y.shape))
    assert dtype in str(info.value) and "backward" in str(info.value), str(info.value)
    assert all(v is None for v in gradients(layer, x).values())
    y.backward(g)
    assert_gradients(gradients(layer, x), reference())


@pytest.mark.parametrize("kind", GRAD_LAYERS)
def test_a_second_backward_raises_and_changes_nothing(kind):
    """As PyTorch without retain_graph: the first backward freed what the graph kept; a second
    raises instead of doubling the gradients."""
    layer, x, y, g, reference = grad_case(kind)
    y.backward(g)
    after = gradients(layer, x)
    assert_gradients(after, reference())
    with pytest.raises(TensorParallelError, match="a second time: its saved values were freed"):
        y.backward(g)
    assert_gradients(gradients(layer, x), after)


def test_retain_graph_allows_a_second_backward_that_adds_the_gradients_again():
    """The neighbour that stays allowed: ``retain_graph=True`` keeps the graph, and a second
    backward accumulates a second copy of every gradient, as in PyTorch."""
    layer, x, y, g, reference = grad_case("mlp")
    y.backward(g, retain_graph=True)
    y.backward(g)
    assert_gradients(gradients(layer, x), {k: 2 * v for k, v in reference().items()})


@pytest.mark.parametrize("kind", GRAD_LAYERS)
def test_backward_on_a_result_computed_under_no_grad_raises(kind):
    """Under ``no_grad`` nothing is recorded (no node, no activation kept): backward on the result
    raises TensorParallelError saying why, and no gradient appears."""
    layer, x, y, g, reference = grad_case(kind)
    with tp_gpu.no_grad():
        if layer is None:  # the loss: its logits are x
            targets = np.zeros(y.shape, np.int64)
            y = VocabParallelCrossEntropy(reduction="none")(x, targets)
        else:
            y = layer(x)
    assert y.grad_fn is None and not y.requires_grad
    with pytest.raises(TensorParallelError, match="does not require grad .*ran inside no_grad"):
        y.backward(g)
    assert all(v is None for v in gradients(layer, x).values())


# --- Dropout -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, message",
    [
        (None, "Dropout input must hold real numbers (float, integer or bool), got dtype object"),
        (np.ones((2, 3), complex), "got dtype complex128"),
        (np.array([["a", "b"]]), "got dtype <U1"),
        ([[1.0], "x"], "Dropout input could not be read as a rectangular array"),
    ],
    ids=["none", "complex", "strings", "ragged"],
)
@pytest.mark.parametrize("training", [True, False])
def test_dropout_refuses_inputs_that_are_not_real_before_the_step_advances(x, message, training):
    drop = Dropout(0.5, config(2), seed=1)
    drop.train(training)
    with pytest.raises(ShapeError) as info:
        drop(x)
    assert message in str(info.value)
    assert drop.step == 0
    if training:
        drop(np.ones((2, 3)))
        assert drop.step == 1


@pytest.mark.parametrize("sharded", [False, True])
def test_dropout_with_p_one_outputs_zeros_and_a_zero_gradient_as_torch(sharded):
    cfg = config(2, backend="simulated", devices=2)
    drop = Dropout(1.0, cfg, seed=4)
    x = np.random.default_rng(0).standard_normal((3, 5))
    x[0, 0] = np.nan
    dy = np.ones((3, 5))
    if sharded:

        def split(a):
            out = regions.scatter_to_sequence_parallel_region(tp_gpu.tensor(a), drop.group, a.dtype)
            assert isinstance(out, ShardedTensor) and out.axis == 0  # split along the sequence
            return out

        leaf = split(x).requires_grad_()
        out = drop(leaf)
        out.backward(split(dy))
        y, dx = np.asarray(out), np.asarray(leaf.grad)
    else:
        out, grad = forward_backward(drop, x, dy)
        y, dx = np.asarray(out), np.asarray(grad)
    expected = x * 0.0  # NaN stays NaN, as torch's x * mask
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(dx, np.zeros_like(x))
    assert drop.step == 1
    if torch is not None:
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.nn.functional.dropout(tx, p=1.0, training=True)
        ty.backward(torch.tensor(dy))
        np.testing.assert_array_equal(ty.detach().numpy(), y)
        np.testing.assert_array_equal(tx.grad.numpy(), dx)


@pytest.mark.parametrize("p", [1.0000001, -0.1, float("nan"), True])
def test_dropout_p_outside_zero_to_one_is_refused(p):
    with pytest.raises(ConfigError, match=r"dropout p must be a number in \[0, 1\], got"):
        Dropout(p, config(2))


# --- a load while another thread runs forwards ---------------------------------------------------


def test_loading_under_the_documented_lock_never_mixes_weights(tmp_path):
    """load_checkpoint is not atomic against a concurrent forward (documented, as PyTorch's
    load_state_dict); with one lock around loads and forwards, as documented, every forward sees
    all-old or all-new weights."""
    cfg = config(4)
    model = ParallelMLP(8, 32, 8, cfg, seed=0)
    paths = []
    for seed in (1, 2):
        source = ParallelMLP(8, 32, 8, cfg, seed=seed)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(paths[-1], source)
    x = np.random.default_rng(0).standard_normal((3, 8))
    expected = []
    for p in paths:
        load_checkpoint(p, model)
        expected.append(model.backend.to_host(model(x)).copy())
    lock = threading.Lock()
    stop = threading.Event()

    def loader():
        i = 0
        while not stop.is_set():
            with lock:
                load_checkpoint(paths[i % 2], model)
            i += 1
            time.sleep(0)

    thread = threading.Thread(target=loader)
    thread.start()
    try:
        for _ in range(400):
            with lock:
                y = model.backend.to_host(model(x))
            assert any(np.array_equal(y, e) for e in expected)
    finally:
        stop.set()
        thread.join()
