"""Global-norm clipping and dynamic loss scaling against PyTorch.

Every comparison runs against a NumPy transcription of PyTorch's code (``reference_clip``,
``RefScaler``), so that it runs without torch (CI); where torch is installed, the same runs are
compared with torch itself as well, and the transcriptions are checked against it.

``tp_gpu.clip_grad_norm`` must return the total norm and leave the gradients that
``torch.nn.utils.clip_grad_norm_`` does, for norm types 1, 2, 3 and inf, below and above the limit,
with inf and NaN gradients, on NumPy and on simulated devices at several worker counts; split
parameters (row and column split, a padded embedding) and a whole one (the row-parallel bias)
count once each. ``tp_gpu.GradScaler`` must follow ``torch.amp.GradScaler`` step by step on a
scripted sequence of finite and non-finite gradients: the scale, the skipped steps, the updated
weights and the state dict.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import tp_gpu
from tp_gpu import (
    SGD,
    ColumnParallelLinear,
    ConfigError,
    GradScaler,
    ParallelEmbedding,
    RowParallelLinear,
    ShapeError,
    TensorParallelConfig,
    clip_grad_norm,
)

try:
    import torch
except ImportError:  # CI: the NumPy transcriptions stand in
    torch = None

# The NumPy transcriptions run without torch; the same words as pytest.importorskip("torch") gives, so
# the test summary counts every test that torch's absence stops on one line.
needs_torch = pytest.mark.skipif(torch is None, reason="could not import 'torch': No module named 'torch'")

BACKENDS = {"numpy": ("numpy", None), "sim3": ("simulated", 3)}
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
WORKERS = [1, 2, 3, 5, 8]


def make_params(backend: str, p: int):
    """Column-split weight and bias, row-split weight, whole row bias, padded vocabulary table."""
    name, devices = BACKENDS[backend]
    config = TensorParallelConfig(n_workers=p, backend=name, devices=devices, dtype="float64")
    column = ColumnParallelLinear(5, 7, config, seed=1)
    row = RowParallelLinear(7, 4, config, seed=2)
    embedding = ParallelEmbedding(11, 4, config, seed=3, pad_to_multiple_of=4)
    params = column.parameters() + row.parameters() + embedding.parameters()
    assert [q.layout is None for q in params] == [False, False, False, True, False]
    return params


def set_grads(params, grads):
    """Give each parameter the logical gradient ``grads[i]`` (None: no gradient)."""
    for param, grad in zip(params, grads):
        param.zero_grad()
        if grad is not None:
            param.accumulate_blocks(param.stage(np.array(grad)))  # a copy: clipping scales it in place


def random_grads(params, seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(q.shape) for q in params]


def reference_clip(grads, max_norm, norm_type):
    """``torch.nn.utils.clip_grad_norm_`` (foreach=False, error_if_nonfinite=False) in NumPy: the norm
    of the per-tensor norms, ``coef = min(max_norm / (total + 1e-6), 1)`` (NaN stays NaN, as
    ``clamp``), every gradient multiplied by it. Parameters without a gradient are skipped."""
    present = [g for g in grads if g is not None]
    if not present:
        return 0.0, list(grads)
    with np.errstate(invalid="ignore", over="ignore"):
        if math.isinf(norm_type):
            total = np.max([np.max(np.abs(g)) for g in present])  # NaN propagates, as torch's max
        else:
            norms = np.array([np.sum(np.abs(g) ** norm_type) ** (1.0 / norm_type) for g in present])
            total = np.sum(norms**norm_type) ** (1.0 / norm_type)
        coef = np.minimum(max_norm / (total + 1e-6), 1.0)
        return float(total), [None if g is None else g * coef for g in grads]


def torch_clip(grads, max_norm, norm_type):
    """``(total norm, clipped gradients)`` of torch for logical ``grads`` (None: no gradient)."""
    tensors = []
    for g in grads:
        t = torch.nn.Parameter(torch.zeros(g.shape if g is not None else (1,), dtype=torch.float64))
        t.grad = None if g is None else torch.tensor(g)
        tensors.append(t)
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type, error_if_nonfinite=False)
    return float(total), [None if t.grad is None else t.grad.numpy() for t in tensors]


def assert_clip_equal(total, clipped, expected_total, expected, what):
    """Totals and gradients equal to 1e-12 (NaN where the expected has NaN, inf where it has inf)."""
    np.testing.assert_allclose(total, expected_total, rtol=1e-12, atol=0, err_msg=f"{what}: total norm")
    for i, (got, want) in enumerate(zip(clipped, expected)):
        assert (got is None) == (want is None), f"{what}: parameter {i}"
        if want is not None:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, err_msg=f"{what}: parameter {i}")


def check_clip(params, grads, max_norm, norm_type):
    """Clip ``grads`` on ``params``; compare with the NumPy transcription and, if present, torch."""
    set_grads(params, grads)
    total = clip_grad_norm(params, max_norm, norm_type)
    assert isinstance(total, float)
    clipped = [None if all(g is None for g in q.grad_blocks.values()) else q.full_grad() for q in params]
    assert_clip_equal(total, clipped, *reference_clip(grads, max_norm, norm_type), "reference")
    if torch is not None:
        assert_clip_equal(total, clipped, *torch_clip(grads, max_norm, norm_type), "torch")
    return total


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("p", WORKERS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda n: f"norm{n:g}")
def test_clip_grad_norm_equals_torch_below_and_above_the_limit(backend, p, norm_type):
    params = make_params(backend, p)
    grads = random_grads(params, seed=p)
    norm = reference_clip(grads, 1e30, norm_type)[0]
    for max_norm in (0.3 * norm, 2.0 * norm):  # clipped; left as they are
        total = check_clip(params, grads, max_norm, norm_type)
        np.testing.assert_allclose(total, norm, rtol=1e-12)
    set_grads(params, grads)
    clip_grad_norm(params, 0.3 * norm, norm_type)
    clipped_norm = clip_grad_norm(params, 1e30, norm_type)
    np.testing.assert_allclose(clipped_norm, 0.3 * norm, rtol=1e-6)  # torch's 1e-6 in the divisor


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("p", [1, 3, 8])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda n: f"norm{n:g}")
def test_whole_parameter_counts_once_and_missing_gradients_are_skipped(backend, p, norm_type):
    params = make_params(backend, p)
    grads = random_grads(params, seed=10 + p)
    grads[3] = 100.0 * grads[3]  # the whole row bias dominates: counted p times, it would show
    grads[1] = None  # no gradient: skipped, left None
    check_clip(params, grads, 1.0, norm_type)
    only_whole = [None, None, None, grads[3], None]
    total = check_clip(params, only_whole, 1.0, norm_type)
    np.testing.assert_allclose(total, np.linalg.norm(grads[3], norm_type), rtol=1e-12)


def test_clip_without_gradients_returns_zero():
    params = make_params("numpy", 2)
    set_grads(params, [None] * len(params))
    assert clip_grad_norm(params, 1.0) == 0.0


#: Where a non-finite value goes: (parameter, index) - column weight in the last worker's columns,
#: the whole row bias, the embedding's last row (after the first worker's rows).
PLACES = {"column": (0, (4, 6)), "whole": (3, (2,)), "table": (4, (10, 3))}


def _nonfinite_cases():
    cases = []
    for value in ("inf", "nan"):
        for place in PLACES:
            for norm_type in NORM_TYPES:
                cases.append(pytest.param(value, place, norm_type))
    return cases


@pytest.mark.parametrize("backend, p", [("numpy", 1), ("numpy", 3), ("sim3", 2), ("sim3", 5)])
@pytest.mark.parametrize("value, place, norm_type", _nonfinite_cases())
def test_clip_with_a_non_finite_gradient_does_what_torch_does(backend, p, value, place, norm_type):
    params = make_params(backend, p)
    grads = random_grads(params, seed=3)
    index, at = PLACES[place]
    grads[index][at] = float(value)
    with np.errstate(invalid="ignore", over="ignore"):
        total = check_clip(params, grads, 1.0, norm_type)
    assert not math.isfinite(total)


def test_clip_with_minus_inf_and_nan_together_is_nan_as_torch():
    params = make_params("sim3", 4)
    grads = random_grads(params, seed=4)
    grads[0][0, 0] = -np.inf
    grads[4][7, 1] = np.nan
    with np.errstate(invalid="ignore"):
        for norm_type in (1.0, 2.0, 3.0):
            assert math.isnan(check_clip(params, [g.copy() for g in grads], 1.0, norm_type))


def host_reads(backend) -> int:
    """How many device-to-host copies ``backend`` (simulated) made since its last reset."""
    return sum(count for count, _ in backend.host_reads.values())


def stacked_params(p: int, copies: int):
    """``copies`` sets of make_params' five parameters on three simulated devices, one backend."""
    params = [q for _ in range(copies) for q in make_params("sim3", p)]
    assert len({id(q.backend) for q in params}) == 1
    return params


@pytest.mark.parametrize("p", [1, 3, 5, 8])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda n: f"norm{n:g}")
def test_clip_reads_the_host_once_whatever_the_number_of_parameters(p, norm_type):
    """One device-to-host copy per clip_grad_norm call, as PyTorch and Megatron synchronise once
    (it was one per parameter and device: 10 for 5 parameters on 3 devices, 50 for 25), and one
    peer copy of two float64 numbers from each other device; the result is still torch's."""
    for copies in (1, 5):
        params = stacked_params(p, copies)
        grads = random_grads(params, seed=copies)
        set_grads(params, grads)
        backend = params[0].backend
        backend.reset_transfers()
        max_norm = 0.5 * reference_clip(grads, 1e30, norm_type)[0]
        total = clip_grad_norm(params, max_norm, norm_type)
        assert host_reads(backend) == 1, backend.host_reads
        devices = {d for q in params for d in q.grad_blocks}
        peer_copies = backend.transfers.values()
        assert "host" not in {src for src, _ in backend.transfers}
        assert sum(c for c, _ in peer_copies) == len(devices) - 1, backend.transfers
        assert sum(b for _, b in peer_copies) == 16 * (len(devices) - 1)  # [split part, whole part]
        clipped = [q.full_grad() for q in params]
        assert_clip_equal(total, clipped, *reference_clip(grads, max_norm, norm_type), "reference")
        if torch is not None:
            assert_clip_equal(total, clipped, *torch_clip(grads, max_norm, norm_type), "torch")


@pytest.mark.parametrize("spoil", [False, True])
def test_unscale_reads_the_host_once_whatever_the_number_of_parameters(spoil):
    """GradScaler.unscale_'s inf/NaN check: one device-to-host copy per call (it was one per
    parameter and device), the flags combined on the devices first."""
    for copies in (1, 5):
        params = stacked_params(5, copies)
        grads = random_grads(params, seed=copies)
        if spoil:
            grads[-1][10, 3] = np.nan  # the embedding's last row, on the last worker's device
        set_grads(params, grads)
        scaler, backend = GradScaler(init_scale=4.0), params[0].backend
        backend.reset_transfers()
        assert scaler.unscale_(SGD(params, lr=0.1)) is spoil
        assert host_reads(backend) == 1, backend.host_reads
        with np.errstate(invalid="ignore"):
            for q, g in zip(params, grads):
                np.testing.assert_array_equal(q.full_grad(), g / 4.0)


@needs_torch
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda n: f"norm{n:g}")
@pytest.mark.parametrize("spoil", [None, "inf", "-inf", "nan", "inf+nan", "no-grad"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_reference_clip_is_torchs(norm_type, spoil, max_norm):
    """The NumPy transcription the clipping tests use equals torch.nn.utils.clip_grad_norm_."""
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(shape) for shape in [(5, 7), (7,), (7, 4), (4,), (11, 4)]]
    if spoil == "no-grad":
        grads[2] = None
    elif spoil is not None:
        for k, value in enumerate(spoil.split("+")):
            grads[2 + 2 * k][1, 1] = float(value)
    expected = torch_clip(grads, max_norm, norm_type)
    assert_clip_equal(*reference_clip(grads, max_norm, norm_type), *expected, "reference vs torch")


# --- GradScaler against torch.amp.GradScaler --------------------------------------------------

#: Scripted steps: "ok" finite gradients, "inf" / "nan" one non-finite element, "unscale" finite
#: gradients unscaled explicitly before step (as for clipping).
SCRIPT = ["ok", "ok", "inf", "ok", "ok", "ok", "unscale", "ok", "nan", "inf", "ok", "ok", "ok", "unscale",
          "ok", "ok", "ok", "inf", "ok", "ok", "ok", "ok"]  # fmt: skip


class RefRun:
    """``torch.amp.GradScaler`` + ``torch.optim.SGD`` transcribed: skip the step on inf/NaN, then
    ``_amp_update_scale_``: on inf/NaN ``scale *= backoff`` and the tracker resets, else the tracker
    counts and at ``growth_interval`` ``scale *= growth`` and resets, unless the grown scale overflows
    float32. Torch keeps the scale in float32: each new scale is the product in float64 rounded to
    float32 (``static_cast<float>``)."""

    def __init__(
        self, weights, lr, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000
    ):
        self.w = [np.array(w) for w in weights]
        self.lr = lr
        self.state = dict(
            scale=float(np.float32(init_scale)),
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            _growth_tracker=0,
        )

    def step(self, kind, grads):
        found_inf = kind in ("inf", "nan")
        if not found_inf:
            self.w = [w - self.lr * g for w, g in zip(self.w, grads)]
        st = self.state
        if found_inf:
            st["scale"] = float(np.float32(st["scale"] * st["backoff_factor"]))
            st["_growth_tracker"] = 0
        else:
            st["_growth_tracker"] += 1
            if st["_growth_tracker"] == st["growth_interval"]:
                with np.errstate(over="ignore"):
                    grown = np.float32(st["scale"] * st["growth_factor"])
                if np.isfinite(grown):
                    st["scale"] = float(grown)
                st["_growth_tracker"] = 0
        return not found_inf, st["scale"], dict(st)

    def weights(self):
        return self.w


class TorchRun:
    def __init__(self, weights, lr, **scaler_args):
        self.params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
        self.optimizer = torch.optim.SGD(self.params, lr=lr)
        self.scaler = torch.amp.GradScaler("cpu", **scaler_args)

    def step(self, kind, grads):
        self.scaler.scale(torch.tensor(1.0))  # starts the scale, as a scaled loss would
        for t, g in zip(self.params, grads):
            t.grad = torch.tensor(g * self.scaler.get_scale())
        if kind in ("inf", "nan"):
            self.params[0].grad.view(-1)[1] = float(kind)
        if kind == "unscale":
            self.scaler.unscale_(self.optimizer)
        before = [t.detach().clone() for t in self.params]
        self.scaler.step(self.optimizer)
        stepped = not all(torch.equal(b, t.detach()) for b, t in zip(before, self.params))
        self.scaler.update()
        return stepped, self.scaler.get_scale(), self.scaler.state_dict()

    def weights(self):
        return [t.detach().numpy() for t in self.params]


class TpRun:
    def __init__(self, backend, p, lr, **scaler_args):
        name, devices = BACKENDS[backend]
        config = TensorParallelConfig(n_workers=p, backend=name, devices=devices, dtype="float64")
        self.row = RowParallelLinear(6, 3, config, seed=4)
        self.params = self.row.parameters()
        self.optimizer = SGD(self.params, lr=lr)
        self.scaler = GradScaler(**scaler_args)

    def step(self, kind, grads):
        scaled = [g * self.scaler.scale(1.0) for g in grads]
        if kind in ("inf", "nan"):
            scaled[0] = scaled[0].copy()
            scaled[0].reshape(-1)[1] = float(kind)
        set_grads(self.params, scaled)
        if kind == "unscale":
            assert self.scaler.unscale_(self.optimizer) is False
        with np.errstate(invalid="ignore"):
            stepped = self.scaler.step(self.optimizer)
        self.scaler.update()
        return stepped, self.scaler.get_scale(), self.scaler.state_dict()

    def weights(self):
        return [q.full() for q in self.params]


def run_script(backend, p, script, scaler_args, lr=0.1, weight_rtol=1e-14, use_torch=True):
    """Run ``script`` on tp_gpu, the transcription and (if installed) torch, comparing every step:
    whether it stepped, the scale, the state dict and the weights (to ``weight_rtol``: torch's
    ``add_(alpha=)`` may fuse the multiply-add, and its 1/scale is a float32)."""
    tp_run = TpRun(backend, p, lr, **scaler_args)
    others = {"reference": RefRun(tp_run.weights(), lr, **scaler_args)}
    if torch is not None and use_torch:
        others["torch"] = TorchRun(tp_run.weights(), lr, **scaler_args)
    rng = np.random.default_rng(7)
    trajectory = []
    for i, kind in enumerate(script):
        grads = [rng.standard_normal(q.shape) for q in tp_run.params]
        got = tp_run.step(kind, grads)
        for who, run in others.items():
            want = run.step(kind, grads)
            assert got[0] == want[0], f"step {i} ({kind}): stepped {got[0]}, {who} {want[0]}"
            assert got[1] == want[1], f"step {i} ({kind}): scale {got[1]}, {who} {want[1]}"
            assert got[2] == want[2], f"step {i} ({kind}): state {got[2]}, {who} {want[2]}"
            for a, b in zip(tp_run.weights(), run.weights()):
                np.testing.assert_allclose(
                    a, b, rtol=weight_rtol, atol=weight_rtol, err_msg=f"{who}, step {i}"
                )
        trajectory.append(got)
    return trajectory, tp_run, others


@pytest.mark.parametrize("backend, p", [("numpy", 1), ("numpy", 3), ("sim3", 2), ("sim3", 5)])
def test_grad_scaler_follows_torch_on_a_scripted_sequence(backend, p):
    trajectory, _, _ = run_script(backend, p, SCRIPT, dict(init_scale=2.0**10, growth_interval=3))
    stepped = [s for s, _, _ in trajectory]
    assert stepped == [kind not in ("inf", "nan") for kind in SCRIPT]
    scales = [2.0**10] + [scale for _, scale, _ in trajectory]
    assert any(b < a for a, b in zip(scales, scales[1:]))  # it backed off
    assert any(b > a for a, b in zip(scales, scales[1:]))  # and grew


def test_grad_scaler_follows_torch_with_other_factors():
    """Growth 1.5 and backoff 0.25: the scales are exact in float32 as well (torch keeps its scale in
    float32), the weights agree to float32 rounding of torch's 1/scale."""
    args = dict(init_scale=1024.0, growth_factor=1.5, backoff_factor=0.25, growth_interval=2)
    run_script("sim3", 3, SCRIPT, args, weight_rtol=1e-6)


def test_grad_scaler_stops_growing_before_float32_overflows_as_torch():
    """From 2^126 with growth every clean step: 2^127, then it stays (2^128 is beyond float32), as
    torch's ``_amp_update_scale_``; a float64 scale would have grown to 2^128."""
    script = ["ok", "ok", "ok", "inf", "ok", "ok", "ok"]
    args = dict(init_scale=2.0**126, growth_interval=1)
    trajectory, _, _ = run_script("numpy", 2, script, args, weight_rtol=1e-6)
    assert [scale for _, scale, _ in trajectory] == [2.0**127] * 3 + [2.0**126] + [2.0**127] * 3


def test_grad_scaler_rounds_each_scale_to_float32_as_torch():
    """Factors whose products are not float32 numbers: every scale is the float32 rounding of the
    float64 product, step for step (a float64 scale drifts from torch's after one step)."""
    args = dict(init_scale=1000.0, growth_factor=1.1, backoff_factor=0.3, growth_interval=1)
    trajectory, _, _ = run_script("sim3", 2, SCRIPT, args, weight_rtol=1e-6)
    scales = [scale for _, scale, _ in trajectory]
    assert all(scale == float(np.float32(scale)) for scale in scales)
    drift, float64_scale = [], 1000.0  # the same factors applied in float64
    for kind, scale in zip(SCRIPT, scales):
        float64_scale *= 0.3 if kind in ("inf", "nan") else 1.1
        drift.append(scale != float64_scale)
    assert any(drift)


@pytest.mark.parametrize("value", [1e39, 1e-46])
def test_grad_scaler_refuses_a_scale_float32_cannot_hold(value):
    with pytest.raises(
        ConfigError,
        match="init_scale must be a positive number float32 can hold .*got " + re.escape(repr(value)),
    ):
        GradScaler(init_scale=value)
    with pytest.raises(ConfigError, match="new_scale"):
        GradScaler().update(new_scale=value)


def test_grad_scaler_state_dict_round_trips():
    """The state dict has torch's keys; it loads into a scaler built with other settings, which then
    continues exactly as the original."""
    args = dict(init_scale=2.0**8, growth_interval=2)
    _, tp_run, _ = run_script("numpy", 2, SCRIPT[:8], args, use_torch=False)
    state = tp_run.scaler.state_dict()
    assert set(state) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
    assert state["_growth_tracker"] == 1  # mid-interval: the tracker matters
    other = TpRun("sim3", 3, 0.1, init_scale=3.0, growth_factor=4.0, backoff_factor=0.1, growth_interval=50)
    other.scaler.load_state_dict(state)
    assert other.scaler.state_dict() == state
    rng = np.random.default_rng(8)
    for kind in SCRIPT[8:]:
        grads = [rng.standard_normal(q.shape) for q in tp_run.params]
        assert other.step(kind, grads) == tp_run.step(kind, grads)


@needs_torch
def test_grad_scaler_state_dict_round_trips_through_torch():
    """tp's state dict loads into torch's scaler and torch's into tp's."""
    args = dict(init_scale=2.0**8, growth_interval=2)
    _, tp_run, others = run_script("numpy", 2, SCRIPT[:9], args)
    state = tp_run.scaler.state_dict()
    other_tp, other_torch = GradScaler(), torch.amp.GradScaler("cpu")
    other_tp.load_state_dict(others["torch"].scaler.state_dict())
    other_torch.load_state_dict(state)
    assert other_tp.state_dict() == state == other_torch.state_dict()


def test_unscale_twice_raises_and_is_allowed_again_after_update():
    run = TpRun("sim3", 3, 0.1)
    grads = [np.ones(q.shape) for q in run.params]
    set_grads(run.params, [g * run.scaler.get_scale() for g in grads])
    assert run.scaler.unscale_(run.optimizer) is False
    with pytest.raises(ConfigError, match="already been called"):
        run.scaler.unscale_(run.optimizer)
    for q, g in zip(run.params, grads):  # divided once only
        assert np.array_equal(q.full_grad(), g)
    run.scaler.step(run.optimizer)  # does not unscale again
    run.scaler.update()
    assert run.scaler.state_dict()["_growth_tracker"] == 1
    set_grads(run.params, grads)
    run.scaler.unscale_(run.optimizer)  # a new iteration


def test_unscale_reports_non_finite_gradients_on_any_device():
    run = TpRun("sim3", 5, 0.1, init_scale=4.0)
    grads = [np.ones(q.shape) for q in run.params]
    grads[0][5, 2] = np.inf  # the last worker's rows of the row-split weight
    set_grads(run.params, grads)
    before = [q.full() for q in run.params]
    assert run.scaler.unscale_(run.optimizer) is True
    assert run.scaler.step(run.optimizer) is False
    for q, w in zip(run.params, before):
        assert np.array_equal(q.full(), w)
    run.scaler.update()
    assert run.scaler.get_scale() == 2.0


def test_disabled_scaler_is_transparent_as_torch():
    run = TpRun("numpy", 2, 0.1, enabled=False)
    assert run.scaler.scale(3.0) == 3.0 and run.scaler.get_scale() == 1.0
    assert run.scaler.state_dict() == {}  # as torch.amp.GradScaler(enabled=False).state_dict()
    if torch is not None:
        assert torch.amp.GradScaler("cpu", enabled=False).state_dict() == {}
    set_grads(run.params, [np.ones(q.shape) for q in run.params])
    before = [q.full() for q in run.params]
    assert run.scaler.step(run.optimizer) is True
    assert not np.array_equal(run.params[0].full(), before[0])


GOOD_STATE = {
    "scale": 2.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 3,
    "_growth_tracker": 1,
}


@pytest.mark.parametrize(
    "state",
    [
        {k: v for k, v in GOOD_STATE.items() if k != "_growth_tracker"},  # a key missing
        {**GOOD_STATE, "scale": -1.0},
        {**GOOD_STATE, "scale": float("inf")},
        {**GOOD_STATE, "growth_factor": 0.5},
        {**GOOD_STATE, "backoff_factor": 1.5},
    ],
)
def test_scaler_load_state_dict_checks_before_changing(state):
    scaler = GradScaler(init_scale=8.0, growth_interval=7)
    before = scaler.state_dict()
    with pytest.raises((ShapeError, ConfigError)):
        scaler.load_state_dict(state)
    assert scaler.state_dict() == before
    scaler.load_state_dict(GOOD_STATE)
    assert scaler.state_dict() == GOOD_STATE


def test_scaled_loss_backward_scales_every_gradient():
    """``scaler.scale(loss).backward()``, PyTorch's way: every gradient is the scale times the plain one."""
    config = tp_gpu.TensorParallelConfig(n_workers=3, dtype="float64", backend="simulated", devices=2)
    lin = tp_gpu.ColumnParallelLinear(4, 5, config)
    x = np.random.default_rng(0).standard_normal((6, 4))
    lin(x).sum().backward()
    plain = lin.weight.full_grad()
    lin.zero_grad()
    scaler = GradScaler(init_scale=8.0)
    scaled = scaler.scale(lin(x).sum())
    assert isinstance(scaled, tp_gpu.Tensor)
    scaled.backward()
    np.testing.assert_allclose(lin.weight.full_grad(), 8.0 * plain, rtol=1e-14)
