"""Grouped-query attention split over workers: HeadPlan's rule, the layer against a float64 reference
(forward, the key-value cache, backward), and the cache's memory per device."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS

import tp_gpu
from tp_gpu.errors import ConfigError
from tp_gpu.layers.decoder_attention import AttentionStep, DecoderAttention, attention_masks
from tp_gpu.layers.head_plan import HeadPlan
from tp_gpu.layers.kv_cache import KVCache
from tp_gpu.layers.rotary import RotaryEmbedding
from tp_gpu.placements import Replicated, Split

# ---------------------------------------------------------------------- the plan


@pytest.mark.parametrize("n_heads,n_kv", [(12, 4), (6, 2), (8, 8), (6, 1), (14, 2), (2, 1), (9, 3)])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
@pytest.mark.parametrize("n_devices", [1, 3, 8])
def test_plan_gives_each_query_head_once_with_the_key_value_head_it_reads(n_heads, n_kv, workers, n_devices):
    devices = [w % n_devices for w in range(workers)]
    plan = HeadPlan.build(n_heads, n_kv, 4, devices)
    g = n_heads // n_kv
    queries = sorted(h for heads in plan.devices.values() for h in heads.query)
    assert queries == list(range(n_heads))  # every query head exactly once
    for heads in plan.devices.values():
        for k, first, count in heads.groups:
            assert all(heads.query[i] // g == heads.kv[k] for i in range(first, first + count))
        assert sorted(set(heads.kv)) == list(heads.kv)  # each key-value head kept once per device
        if plan.replicated:  # vLLM: keep only the heads the device's queries read
            assert set(heads.kv) == {h // g for h in heads.query}
    if n_kv >= workers:
        assert not plan.replicated
        per_worker = [(b - a) // 4 for a, b in plan.kv_layout.ranges]
        assert sorted(per_worker, reverse=True) == per_worker and max(per_worker) - min(per_worker) <= 1
        kv_everywhere = sorted(h for heads in plan.devices.values() for h in heads.kv)
        assert kv_everywhere == list(range(n_kv))  # split: nothing held twice
    else:
        assert plan.replicated and plan.kv_layout is None


def test_plan_examples_from_the_docstring():
    plan = HeadPlan.build(12, 4, 2, ["a", "b", "c"])  # 4 key-value heads on 3 workers: 2, 1, 1
    assert [plan.devices[d].query for d in "abc"] == [(0, 1, 2, 3, 4, 5), (6, 7, 8), (9, 10, 11)]
    plan = HeadPlan.build(8, 2, 4, ["a", "b", "c", "d"])  # fewer key-value heads than workers
    assert [plan.devices[d].kv for d in "abcd"] == [(0,), (0,), (1,), (1,)]


def test_plan_refuses_heads_that_do_not_group():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(6\).*num_key_value_heads \(4\)"):
        HeadPlan.build(6, 4, 8, ["a"])


# ---------------------------------------------------------------------- the layer, against float64


def _rope(x, cos, sin):  # x (B, n, S, hd); cos, sin (B, S, hd)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def reference(x, w, n_heads, n_kv, hd, angles, keep):
    """Dense float64 grouped-query attention, keys repeated per query head, finfo.min where hidden."""
    batch, seq, _ = x.shape
    q = (x @ w["q"] + w["bq"]).reshape(batch, seq, n_heads, hd).transpose(0, 2, 1, 3)  # (B, nh, S, hd)
    k = (x @ w["k"] + w["bk"]).reshape(batch, seq, n_kv, hd).transpose(0, 2, 1, 3)  # (B, nkv, S, hd)
    v = (x @ w["v"] + w["bv"]).reshape(batch, seq, n_kv, hd).transpose(0, 2, 1, 3)
    if angles is not None:
        q, k = _rope(q, *angles), _rope(k, *angles)
    k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # (B, nh, S, S)
    hidden = np.triu(np.ones((seq, seq), bool), 1)[None, None] | (keep == 0)[:, None, None, :]
    scores = np.where(hidden, np.finfo(np.float64).min, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, n_heads * hd)  # (B, S, nh * hd)
    return context @ w["o"] + w["bo"]


def _layer(make_config, workers, rng, n_heads=6, n_kv=2, hd=4, hidden=12):
    layer = DecoderAttention(
        hidden, n_heads, n_kv, make_config(workers), head_dim=hd, qkv_bias=True, o_bias=True
    )
    w = {
        "q": rng.normal(size=(hidden, n_heads * hd)),
        "k": rng.normal(size=(hidden, n_kv * hd)),
        "v": rng.normal(size=(hidden, n_kv * hd)),
        "o": rng.normal(size=(n_heads * hd, hidden)),
        "bq": rng.normal(size=n_heads * hd),
        "bk": rng.normal(size=n_kv * hd),
        "bv": rng.normal(size=n_kv * hd),
        "bo": rng.normal(size=hidden),
    }
    for name in "qkv":
        getattr(layer, f"{name}_proj").load_dense(w[name], w[f"b{name}"])
    layer.o_proj.load_dense(w["o"], w["bo"])
    return layer, w


def _inputs(rng, batch=2, seq=5, hidden=12, hd=4):
    x = rng.normal(size=(batch, seq, hidden))
    keep = np.ones((batch, seq), dtype=np.int64)
    keep[1, :2] = 0  # a left-padded row
    positions = np.where(keep == 1, np.cumsum(keep, axis=1) - 1, 1)
    return x, keep, RotaryEmbedding(hd, 10000.0).angles(positions)


def _step(layer, keep, angles, start=0, seq=None, cache=None):
    seq = keep.shape[1] - start if seq is None else seq
    masks = attention_masks(layer.backend, layer.group.distinct_devices, keep, start, seq, layer.dtype)
    return AttentionStep(angles, masks, cache, start)


def _valid(a, keep):
    """The rows of query positions that are not padding, flattened: (n_valid, H)."""
    return a[keep == 1]


@pytest.mark.parametrize("n_heads,n_kv", [(6, 2), (6, 6), (6, 1), (4, 4)])
@pytest.mark.parametrize("workers", WORKER_COUNTS)
def test_forward_and_backward_equal_the_float64_reference(make_config, rng, workers, n_heads, n_kv):
    layer, w = _layer(make_config, workers, rng, n_heads, n_kv)
    x, keep, angles = _inputs(rng)
    xt = tp_gpu.tensor(x, requires_grad=True)
    y = layer(xt, _step(layer, keep, angles))
    want = reference(x, w, n_heads, n_kv, 4, angles, keep)
    np.testing.assert_allclose(_valid(np.asarray(y), keep), _valid(want, keep), rtol=1e-12, atol=1e-12)

    grad = rng.normal(size=want.shape) * keep[..., None]  # no gradient from padded queries
    y.backward(grad)

    def loss(**over):
        return float(
            (
                reference(over.get("x", x), {**w, **over.get("w", {})}, n_heads, n_kv, 4, angles, keep) * grad
            ).sum()
        )

    eps = 1e-6
    for where in [(0, 3, 7), (1, 4, 0), (1, 2, 11)]:
        plus, minus = x.copy(), x.copy()
        plus[where] += eps
        minus[where] -= eps
        fd = (loss(x=plus) - loss(x=minus)) / (2 * eps)
        assert np.asarray(xt.grad)[where] == pytest.approx(fd, rel=1e-6, abs=1e-6)
    for name, param in (("k", layer.k_proj.weight), ("v", layer.v_proj.weight), ("q", layer.q_proj.weight)):
        full = param.full_grad()
        for where in [(0, 0), (5, w[name].shape[1] - 1), (11, w[name].shape[1] // 2)]:
            plus, minus = w[name].copy(), w[name].copy()
            plus[where] += eps
            minus[where] -= eps
            fd = (loss(w={name: plus}) - loss(w={name: minus})) / (2 * eps)
            assert full[where] == pytest.approx(fd, rel=1e-6, abs=1e-6), (name, where)


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 8])
def test_prefill_then_one_token_at_a_time_equals_the_whole_pass(make_config, rng, workers):
    layer, w = _layer(make_config, workers, rng)
    x, keep, (cos, sin) = _inputs(rng)
    want = reference(x, w, 6, 2, 4, (cos, sin), keep)
    with tp_gpu.no_grad():
        cache = KVCache(layer.plan, 1, 2, 5, layer.backend, layer.dtype)
        pieces = []
        for first, last in [(0, 3), (3, 4), (4, 5)]:
            step = _step(
                layer, keep[:, :last], (cos[:, first:last], sin[:, first:last]), first, last - first, cache
            )
            pieces.append(np.asarray(layer(x[:, first:last], step)))
            cache.advance(last - first)
    np.testing.assert_allclose(
        _valid(np.concatenate(pieces, 1), keep), _valid(want, keep), rtol=1e-12, atol=1e-12
    )
    assert cache.length == 5


def test_key_value_placement_split_or_replicated(make_config, rng):
    split_layer, _ = _layer(make_config, 2, rng)  # 2 key-value heads on 2 workers: split
    replicated_layer, _ = _layer(make_config, 3, rng)  # on 3 workers: replicated
    assert isinstance(split_layer.k_proj.weight.placement, Split)
    assert isinstance(replicated_layer.k_proj.weight.placement, Replicated)


def test_replicated_key_value_weights_stay_equal_copies_after_a_step():
    config = tp_gpu.TensorParallelConfig(n_workers=4, backend="simulated", devices=4, dtype="float64")
    rng = np.random.default_rng(5)
    layer = DecoderAttention(12, 6, 2, config, head_dim=4)
    x, keep, angles = _inputs(rng)
    y = layer(x, _step(layer, keep, angles))
    y.backward(rng.normal(size=y.shape))
    blocks = list(layer.k_proj.weight.grad_blocks.values())
    assert len(blocks) == 4
    for other in blocks[1:]:  # every copy holds the whole summed gradient
        np.testing.assert_array_equal(np.asarray(other), np.asarray(blocks[0]))
    tp_gpu.SGD(layer.parameters(), lr=0.1).step()
    copies = [np.asarray(b) for b in layer.k_proj.weight.blocks.values()]
    for other in copies[1:]:
        np.testing.assert_array_equal(other, copies[0])
    want = float(np.linalg.norm(layer.k_proj.weight.full_grad()))  # the copies hold one gradient
    assert tp_gpu.clip_grad_norm(layer.k_proj.parameters(), 1e9) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "n_kv,workers,expected",
    [(4, 4, [1, 1, 1, 1]), (4, 3, [2, 1, 1]), (2, 4, [1, 1, 1, 1]), (1, 3, [1, 1, 1])],
)
def test_cache_holds_each_devices_own_key_value_heads(n_kv, workers, expected):
    config = tp_gpu.TensorParallelConfig(n_workers=workers, backend="simulated", devices=workers)
    layer = DecoderAttention(32, 8, n_kv, config, head_dim=4)
    cache = KVCache(layer.plan, 3, 2, 10, layer.backend, layer.dtype)
    per_head = 2 * 3 * 2 * 10 * 4 * 4  # keys and values, 3 layers, batch 2, 10 slots, head_dim 4, float32
    assert [cache.nbytes_per_device()[d] for d in range(workers)] == [n * per_head for n in expected]


def test_cache_refuses_positions_beyond_its_capacity():
    config = tp_gpu.TensorParallelConfig(n_workers=2, backend="numpy")
    layer = DecoderAttention(16, 4, 2, config)
    cache = KVCache(layer.plan, 1, 1, 4, layer.backend, layer.dtype)
    cache.advance(3)
    with pytest.raises(
        ConfigError, match=r"holds 4 positions and 3 are filled; got 2 more, expected at most 1"
    ):
        cache.check_room(2)


def test_checkpoint_of_replicated_weights_loads_at_a_worker_count_that_splits_them(tmp_path):
    rng = np.random.default_rng(11)
    saved = DecoderAttention(
        12, 6, 2, tp_gpu.TensorParallelConfig(n_workers=3, backend="simulated", devices=3)
    )
    saved.k_proj.load_dense(rng.normal(size=(12, 4)), None)  # 2 heads of 2, no bias
    tp_gpu.save_checkpoint(tmp_path / "attention.safetensors", saved)
    loaded = DecoderAttention(
        12, 6, 2, tp_gpu.TensorParallelConfig(n_workers=2, backend="simulated", devices=2), seed=9
    )
    tp_gpu.load_checkpoint(tmp_path / "attention.safetensors", loaded)
    assert isinstance(loaded.k_proj.weight.placement, Split)
    for name, value in saved.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value)
