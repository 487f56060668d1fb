"""ParallelSelfAttention: dense float64 multi-head attention forward and backward on every backend and
worker count (12 heads uneven on 5, 7 and 8 workers; heads fewer than workers), padding and causal
masks, the fused per-head Q/K/V layout, torch.nn.MultiheadAttention, dtypes, communication, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKEND_SPECS
from helpers import device_of, forward_backward, to_host
from test_norm import PLACEMENTS, directional_check

import tp_gpu
from tp_gpu import (
    ConfigError,
    ParallelSelfAttention,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
    collectives,
)
from tp_gpu.backends.simulated import SimArray
from tp_gpu.layers import fuse_qkv, split_fused_qkv
from tp_gpu.layers.attention_core import CoreAttention
from tp_gpu.partition import split_sizes
from tp_gpu.testing import assert_close

NAMES = ("q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "out_weight", "out_bias")


def random_weights(rng, hidden):
    """Separate Q, K, V and output weights ``(hidden, hidden)`` (in_out) and biases, all nonzero."""
    return {n: rng.standard_normal((hidden, hidden) if n.endswith("weight") else hidden) * 0.5 for n in NAMES}


def additive(keep=None, causal=False, batch=1, seq=1):
    """The float64 additive mask (B|1, 1, S|1, S) for a keep/pad mask and/or causality (or None)."""
    lowest = np.finfo(np.float64).min
    mask = None if keep is None else np.where(keep == 0, lowest, 0.0)[:, None, None, :]
    if causal:
        future = np.triu(np.ones((seq, seq), dtype=bool), 1)
        mask = np.where(future, lowest, 0.0 if mask is None else mask)
    return mask


def dense_attention(x, w, n_heads, mask=None):
    """float64 multi-head attention from separate ``in_out`` weights: per head h (columns h*hd..)."""
    batch, seq, hidden = x.shape
    hd = hidden // n_heads

    def heads(t):  # (B, S, H) -> (B, nh, S, hd)
        return t.reshape(batch, seq, n_heads, hd).transpose(0, 2, 1, 3)

    q, k, v = (heads(x @ w[f"{n}_weight"] + w[f"{n}_bias"]) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    if mask is not None:
        scores = scores + mask
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
    return context @ w["out_weight"] + w["out_bias"]


def load(attention, w):
    attention.load_dense(*(w[n] for n in NAMES))


def separate_grads(attention):
    """The layer's gradients by the names of :data:`NAMES` (Q, K, V split off the fused qkv)."""
    grads = attention.grads()
    qkv = split_fused_qkv(grads["qkv.weight"], grads["qkv.bias"], attention.n_heads)._asdict()
    return {**qkv, "out_weight": grads["out.weight"], "out_bias": grads["out.bias"]}


def padding_mask(rng, batch, seq):
    keep = np.ones((batch, seq), dtype=np.int64)
    for b in range(1, batch):  # row 0 unpadded; the others padded at the end, by different amounts
        keep[b, seq - 1 - rng.integers(0, seq - 1) :] = 0
    return keep


MASKS = ["none", "padding", "causal", "padding+causal"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend_spec, n_workers", PLACEMENTS, indirect=["backend_spec"])
def test_matches_dense_forward_and_backward(make_config, rng, n_workers, mask_kind):
    batch, seq, hidden, n_heads = 3, 7, 24, 12  # head_dim 2; 12 heads are uneven on 5, 7 and 8 workers
    causal = "causal" in mask_kind
    attention = ParallelSelfAttention(hidden, n_heads, make_config(n_workers), seed=3, causal=causal)
    assert attention.heads == split_sizes(n_heads, n_workers)
    w = random_weights(rng, hidden)
    load(attention, w)
    x = rng.standard_normal((batch, seq, hidden))
    keep = padding_mask(rng, batch, seq) if "padding" in mask_kind else None
    mask = additive(keep, causal, batch, seq)
    expected = dense_attention(x, w, n_heads, mask)
    g = rng.standard_normal(expected.shape)
    y, dx = forward_backward(attention, x, g, keep)
    assert device_of(attention, y) == attention.output_device
    assert_close(to_host(attention, y), expected, "float64", hidden, f"attention forward ({mask_kind})")
    assert device_of(attention, dx) == attention.output_device
    grads = {"x": to_host(attention, dx), **separate_grads(attention)}

    def loss(p):
        return float(np.sum(g * dense_attention(p["x"], p, n_heads, mask)))

    directional_check(loss, {"x": x, **w}, grads, rng)


@pytest.mark.parametrize("n_workers", [4, 5, 8])
@pytest.mark.parametrize(
    "backend_spec", [BACKEND_SPECS[0], BACKEND_SPECS[2], BACKEND_SPECS[3]], indirect=True
)
def test_fewer_heads_than_workers(make_config, rng, n_workers):
    """3 heads on 4..8 workers: some workers (on sim8, whole devices) hold no head at all."""
    hidden, n_heads = 12, 3
    attention = ParallelSelfAttention(hidden, n_heads, make_config(n_workers), causal=True)
    assert attention.heads == [1, 1, 1] + [0] * (n_workers - 3)
    w = random_weights(rng, hidden)
    load(attention, w)
    x = rng.standard_normal((2, 5, hidden))
    keep = padding_mask(rng, 2, 5)
    mask = additive(keep, True, 2, 5)
    g = rng.standard_normal((2, 5, hidden))
    y, dx = forward_backward(attention, x, g, keep)
    assert_close(to_host(attention, y), dense_attention(x, w, n_heads, mask), "float64", 12)
    grads = {"x": to_host(attention, dx), **separate_grads(attention)}
    directional_check(
        lambda p: float(np.sum(g * dense_attention(p["x"], p, n_heads, mask))), {"x": x, **w}, grads, rng
    )


def test_each_worker_holds_whole_heads_with_their_q_k_v(rng):
    hidden, n_heads, hd = 36, 12, 3
    config = TensorParallelConfig(n_workers=7, backend="simulated", devices=3, dtype="float64")
    attention = ParallelSelfAttention(hidden, n_heads, config)
    w = random_weights(rng, hidden)
    load(attention, w)
    first = 0
    for worker, shard in enumerate(attention.qkv.weight_shards):
        heads = attention.heads[worker]
        block = to_host(attention, shard).reshape(hidden, heads, 3, hd)  # (H, heads_i, [q k v], hd)
        for j, name in enumerate("qkv"):
            expected = w[f"{name}_weight"][:, first * hd : (first + heads) * hd].reshape(hidden, heads, hd)
            np.testing.assert_array_equal(block[:, :, j], expected)
        out_rows = to_host(attention, attention.out.weight_shards[worker])
        np.testing.assert_array_equal(out_rows, w["out_weight"][first * hd : (first + heads) * hd])
        first += heads
    assert first == n_heads


def test_fuse_and_split_qkv_round_trip_in_both_layouts(rng):
    hidden, n_heads, hd = 12, 4, 3
    parts = [rng.standard_normal((hidden, hidden) if i % 2 == 0 else hidden) for i in range(6)]
    weight, bias = fuse_qkv(*parts, n_heads=n_heads)
    assert weight.shape == (hidden, 3 * hidden) and bias.shape == (3 * hidden,)
    for h in range(n_heads):  # column (3h + j) * hd + c of the fused weight is column h * hd + c of part j
        for j in range(3):
            cols = slice((3 * h + j) * hd, (3 * h + j + 1) * hd)
            np.testing.assert_array_equal(weight[:, cols], parts[2 * j][:, h * hd : (h + 1) * hd])
            np.testing.assert_array_equal(bias[cols], parts[2 * j + 1][h * hd : (h + 1) * hd])
    for got, want in zip(split_fused_qkv(weight, bias, n_heads), parts):
        np.testing.assert_array_equal(got, want)
    out_in = [p.T if p.ndim == 2 else p for p in parts]  # PyTorch nn.Linear layout
    weight2, bias2 = fuse_qkv(*out_in, n_heads=n_heads, layout="out_in")
    np.testing.assert_array_equal(weight2, weight)
    np.testing.assert_array_equal(bias2, bias)
    attention = ParallelSelfAttention(
        hidden, n_heads, TensorParallelConfig(n_workers=3, backend="simulated", devices=2, dtype="float64")
    )
    attention.load_qkv(*out_in, layout="out_in")
    np.testing.assert_array_equal(attention.qkv.full_weight(), weight)
    for got, want in zip(attention.split_qkv(layout="out_in"), out_in):
        np.testing.assert_array_equal(got, want)
    none_bias = fuse_qkv(parts[0], None, parts[2], None, parts[4], None, n_heads=n_heads)[1]
    np.testing.assert_array_equal(none_bias, np.zeros(3 * hidden))


@pytest.mark.parametrize("n_workers", [1, 3, 5, 8])
def test_mask_forms_agree(rng, n_workers):
    """A (B, S) keep mask of any dtype equals its additive forms (B, 1, 1, S) and (B, 1, S, S)."""
    batch, seq, hidden = 2, 5, 24
    attention = ParallelSelfAttention(
        hidden, 12, TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float64")
    )
    attention.eval()
    x = rng.standard_normal((batch, seq, hidden))
    keep = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    reference = to_host(attention, attention(x, keep))
    lowest = np.finfo(np.float64).min
    keys = np.where(keep == 0, lowest, 0.0)[:, None, None, :]  # (B, 1, 1, S)
    forms = [
        keep.astype(bool),
        keep.astype(np.float32),
        keys,
        np.broadcast_to(keys, (batch, 1, seq, seq)).copy(),
    ]
    for form in forms:
        np.testing.assert_allclose(to_host(attention, attention(x, form)), reference, rtol=1e-13, atol=1e-13)
    assert not np.allclose(to_host(attention, attention(x)), reference)  # the padding mattered
    shared = np.zeros((1, 1, seq, seq))
    shared[..., 1] = -3.0  # a soft mask shared by the batch, as torch's float attn_mask
    w = {
        **attention.split_qkv()._asdict(),
        "out_weight": attention.out.full_weight(),
        "out_bias": attention.out.full_bias(),
    }
    expected = dense_attention(x, w, 12, shared)
    np.testing.assert_allclose(to_host(attention, attention(x, shared)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_workers", [1, 4, 7])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch_multihead_attention(rng, n_workers, dtype):
    torch = pytest.importorskip("torch")
    batch, seq, hidden, n_heads = 3, 6, 36, 12
    torch.manual_seed(n_workers)
    mha = torch.nn.MultiheadAttention(hidden, n_heads, batch_first=True, dtype=getattr(torch, dtype))
    with torch.no_grad():  # nonzero biases
        mha.in_proj_bias.copy_(torch.from_numpy(rng.standard_normal(3 * hidden)))
        mha.out_proj.bias.copy_(torch.from_numpy(rng.standard_normal(hidden)))
    config = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype=dtype)
    attention = ParallelSelfAttention(hidden, n_heads, config, causal=True)
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
    attention.load_dense(wq, bq, wk, bk, wv, bv, mha.out_proj.weight, mha.out_proj.bias, layout="out_in")
    keep = padding_mask(rng, batch, seq)
    x = torch.from_numpy(rng.standard_normal((batch, seq, hidden)).astype(dtype)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((batch, seq, hidden)).astype(dtype))
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    y_ref, _ = mha(
        x, x, x, key_padding_mask=torch.from_numpy(keep == 0), attn_mask=causal, need_weights=False
    )
    (y_ref * g).sum().backward()
    y, dx = forward_backward(attention, x.detach().numpy(), g.numpy(), torch.from_numpy(keep))
    assert_close(to_host(attention, y), y_ref.detach().numpy(), dtype, hidden)
    assert_close(to_host(attention, dx), x.grad.numpy(), dtype, hidden, "dx")
    grads = attention.grads()
    q, qb, k, kb, v, vb = split_fused_qkv(grads["qkv.weight"], grads["qkv.bias"], n_heads, layout="out_in")
    assert_close(
        np.concatenate([q, k, v]), mha.in_proj_weight.grad.numpy(), dtype, batch * seq, "d in_proj_weight"
    )
    assert_close(
        np.concatenate([qb, kb, vb]), mha.in_proj_bias.grad.numpy(), dtype, batch * seq, "d in_proj_bias"
    )
    assert_close(
        grads["out.weight"].T, mha.out_proj.weight.grad.numpy(), dtype, batch * seq, "d out_proj.weight"
    )
    assert_close(grads["out.bias"], mha.out_proj.bias.grad.numpy(), dtype, batch * seq, "d out_proj.bias")


def test_matches_torch_scaled_dot_product_attention_in_float32(rng):
    torch = pytest.importorskip("torch")
    batch, seq, hidden, n_heads = 2, 7, 24, 12
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float32")
    attention = ParallelSelfAttention(hidden, n_heads, config, causal=True)
    w = {k: v.astype(np.float32) for k, v in random_weights(rng, hidden).items()}
    load(attention, w)
    x = rng.standard_normal((batch, seq, hidden)).astype(np.float32)
    xt = torch.from_numpy(x)

    def heads(name):
        t = xt @ torch.from_numpy(w[f"{name}_weight"]) + torch.from_numpy(w[f"{name}_bias"])
        return t.reshape(batch, seq, n_heads, 2).transpose(1, 2)

    context = torch.nn.functional.scaled_dot_product_attention(
        heads("q"), heads("k"), heads("v"), is_causal=True
    )
    expected = context.transpose(1, 2).reshape(batch, seq, hidden) @ torch.from_numpy(w["out_weight"])
    expected = (expected + torch.from_numpy(w["out_bias"])).numpy()
    y = to_host(attention, attention(x))
    assert_close(y, expected, "float32", hidden, "vs torch SDPA")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lower_precision_softmax_and_no_float64_temporaries(rng, monkeypatch, dtype):
    """float32 runs wholly in float32; float16 takes its softmax in float32. Every array the
    simulated devices create is recorded: no (B, nh_d, S, S) float64 array may appear."""
    batch, seq, hidden, n_heads = 2, 9, 24, 12
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype=dtype)
    attention = ParallelSelfAttention(hidden, n_heads, config, causal=True)
    w = random_weights(rng, hidden)
    load(attention, w)
    created = []
    original = SimArray.__array_finalize__

    def spy(self, obj):
        original(self, obj)
        created.append((self.dtype, self.shape))

    monkeypatch.setattr(SimArray, "__array_finalize__", spy)
    x = rng.standard_normal((batch, seq, hidden)).astype(dtype)
    keep = padding_mask(rng, batch, seq)
    y, dx = forward_backward(attention, x, rng.standard_normal((batch, seq, hidden)).astype(dtype), keep)
    monkeypatch.undo()
    square = [
        (dt, shape) for dt, shape in created if len(shape) == 4 and shape[2:] == (seq, seq) and shape[1] > 1
    ]
    assert square, "the spy saw no (B, nh_d, S, S) arrays"
    assert {dt for dt, _ in square} <= {np.dtype(np.float32), np.dtype(dtype)}, {dt for dt, _ in square}
    assert np.dtype(np.float32) in {dt for dt, _ in square}  # the softmax runs in float32
    assert not [c for c in created if c[0] == np.float64 and np.prod(c[1]) >= batch * seq * seq]
    assert y.dtype == dx.dtype == np.dtype(dtype)
    w16 = {k: v.astype(dtype).astype(np.float64) for k, v in w.items()}
    expected = dense_attention(x.astype(np.float64), w16, n_heads, additive(keep, True, batch, seq))
    assert_close(to_host(attention, y), expected, dtype, hidden, f"attention {dtype}")


def test_one_reduction_forward_and_one_backward(rng, monkeypatch):
    config = TensorParallelConfig(n_workers=7, backend="simulated", devices=3, dtype="float64")
    attention = ParallelSelfAttention(24, 12, config, causal=True)
    x = rng.standard_normal((2, 5, 24))
    calls = []
    original = collectives.reduce_sum

    def counting(*args, **kwargs):
        calls.append(args[1].keys())
        return original(*args, **kwargs)

    monkeypatch.setattr(collectives, "reduce_sum", counting)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    y = attention(leaf, np.ones((2, 5)))
    assert len(calls) == 1  # in `out`
    y.backward(np.ones(y.shape))
    assert len(calls) == 2  # of dX, in `qkv`
    assert leaf.grad is not None


def test_no_grad_keeps_nothing(rng, monkeypatch):
    """Under ``no_grad`` the attention keeps no activation (its context stays empty) and nothing is
    recorded, so backward raises; with recording on (in eval mode too) it keeps what backward needs."""
    attention = ParallelSelfAttention(
        24, 12, TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    )
    x = rng.standard_normal((2, 5, 24))
    contexts = []
    original = CoreAttention.forward

    def spy(ctx, *args):
        contexts.append(ctx)
        return original(ctx, *args)

    monkeypatch.setattr(CoreAttention, "forward", staticmethod(spy))
    attention.eval()
    with tp_gpu.no_grad():
        y = attention(tp_gpu.tensor(x, requires_grad=True))
    assert y.grad_fn is None and not y.requires_grad
    assert contexts[-1].needs_input_grad == () and not hasattr(contexts[-1], "saved")
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(np.ones(y.shape))
    attention.train()
    y = attention(x)
    assert hasattr(contexts[-1], "saved") and y.grad_fn is not None  # recording keeps it again
    y.backward(np.ones(y.shape))
    with pytest.raises(TensorParallelError, match="a second time"):
        y.backward(np.ones(y.shape))  # the first backward freed what was kept


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((25, 12), {}, r"hidden \(25\) must be a multiple of n_heads \(12\); got head_dim 2\.08333"),
        ((24, 0), {}, "n_heads"),
        ((24, 12), {"causal": "yes"}, "causal must be True or False"),
        ((24, 12), {"seed": -1}, "seed"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ParallelSelfAttention(
            *args, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), **kwargs
        )


def test_bad_input_raises_before_anything_changes(rng, monkeypatch):
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    attention = ParallelSelfAttention(24, 12, config)
    x = rng.standard_normal((2, 5, 24))
    keep = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    leaf = tp_gpu.tensor(x, requires_grad=True)
    y = attention(leaf, keep)
    weights = attention.state_dict()
    calls = []
    original = CoreAttention.forward
    monkeypatch.setattr(CoreAttention, "forward", staticmethod(lambda *a: calls.append(a) or original(*a)))
    bad = [
        ((rng.standard_normal((2, 5, 23)),), r"\(\.\.\., 24\), got \(2, 5, 23\)"),
        ((rng.standard_normal((10, 24)),), r"\(batch, seq, 24\) with seq >= 1, got \(10, 24\)"),
        ((x, np.ones((2, 4))), r"attention_mask must be \(2, 5\) \(batch, seq\) .*got shape \(2, 4\)"),
        ((x, np.ones(5)), r"broadcastable to \(2, 1, 5, 5\) .*got shape \(5,\)"),
        ((x, np.zeros((2, 12, 5, 5))), r"got shape \(2, 12, 5, 5\)"),  # per-head masks are not taken
        ((x, np.zeros((2, 1, 1, 5), dtype=np.int64)), r"additive float mask.*dtype int64"),
        ((x, np.ones((2, 5), dtype=complex)), "dtype complex128"),
    ]
    for args, match in bad:
        with pytest.raises(ShapeError, match=match):
            attention(*args)
    assert calls == []  # nothing was computed
    monkeypatch.undo()
    with pytest.raises(
        ShapeError, match=r"grad has shape \(2, 5, 12\); expected the tensor's shape \(2, 5, 24\)"
    ):
        y.backward(np.ones((2, 5, 12)))
    assert leaf.grad is None and all(p.grad is None for p in attention.parameters())  # nothing consumed
    w = random_weights(rng, 24)
    with pytest.raises(ShapeError, match=r"k_weight must have shape \(24, 24\)"):
        attention.load_qkv(
            w["q_weight"], w["q_bias"], w["k_weight"][:, :20], w["k_bias"], w["v_weight"], w["v_bias"]
        )
    with pytest.raises(ShapeError, match=r"out weight must have shape \(24, 24\)"):
        attention.load_dense(*(w[n] for n in NAMES[:6]), w["out_weight"][:3], w["out_bias"])
    for name, value in attention.state_dict().items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)  # the weights unchanged
    g = rng.standard_normal((2, 5, 24))
    y.backward(g)  # the first forward's graph is intact
    fresh = ParallelSelfAttention(24, 12, TensorParallelConfig(n_workers=1, backend="numpy", dtype="float64"))
    fy, fdx = forward_backward(fresh, x, g, keep)
    np.testing.assert_allclose(to_host(fresh, fy), to_host(attention, y), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_host(fresh, fdx), to_host(attention, leaf.grad), rtol=1e-12, atol=1e-12)


def test_state_dict_names_and_repr():
    attention = ParallelSelfAttention(
        24, 12, TensorParallelConfig(n_workers=8, backend="simulated", devices=8, dtype="float64")
    )
    assert list(attention.state_dict()) == ["qkv.weight", "qkv.bias", "out.weight", "out.bias"]
    assert attention.heads == [2, 2, 2, 2, 1, 1, 1, 1]
    assert "heads=[2, 2, 2, 2, 1, 1, 1, 1]" in repr(attention)
