"""Rotary position embeddings: the angles (default, linear and Llama 3 scaling) against a float64
formula and transformers, the rotation on every placement (heads split over 1..8 workers, replicated,
sequence-split, dense) against a NumPy float64 reference, backward, float16 and bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_norm import placements

import tp_gpu
from tp_gpu import ConfigError, ShapeError, TensorParallelConfig, get_group, regions
from tp_gpu.layers.rotary import ApplyRotary, RotaryEmbedding, apply_rotary
from tp_gpu.placements import Partial, Replicated, Split
from tp_gpu.tensor import new_tensor
from tp_gpu.testing import assert_close, gradcheck


@dataclasses.dataclass(frozen=True)
class Scaling:
    """The fields of ``models.decoder_config.RopeScaling`` that RotaryEmbedding reads."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


LLAMA3 = Scaling("llama3", 8.0, 1.0, 4.0, 64)  # wavelengths of a 16-wide head fall in all three bands


def reference_rotation(x, cos, sin, head_dim):
    """float64: each head's x * cos + rotate_half(x) * sin, written as HF writes it."""
    b, s, w = x.shape
    heads = x.reshape(b, s, w // head_dim, head_dim)
    half = head_dim // 2
    rotated = np.concatenate([-heads[..., half:], heads[..., :half]], axis=-1)
    return (heads * cos[:, :, None] + rotated * sin[:, :, None]).reshape(b, s, w)


def reference_backward(g, cos, sin, head_dim):
    """float64: the transpose of :func:`reference_rotation`, written as a matrix product per position."""
    b, s, w = g.shape
    half = head_dim // 2
    rot = np.zeros((head_dim, head_dim))  # rotate_half(x) = rot @ x
    rot[:half, half:] = -np.eye(half)
    rot[half:, :half] = np.eye(half)
    out = np.empty_like(g)
    for i in range(b):
        for j in range(s):
            ci, si = cos[min(i, len(cos) - 1), j], sin[min(i, len(sin) - 1), j]
            m = np.diag(ci) + np.diag(si) @ rot  # y = m @ x for one head
            out[i, j] = (g[i, j].reshape(-1, head_dim) @ m).reshape(-1)  # dx = m^T dy
    return out


# ---------------------------------------------------------------------------- the angles


def test_inv_freq_and_angles_are_the_float64_formula(rng):
    rope = RotaryEmbedding(10, theta=500.0)
    expected = np.array([500.0 ** (-i / 10) for i in (0, 2, 4, 6, 8)])
    np.testing.assert_allclose(rope.inv_freq, expected, rtol=1e-15)
    positions = np.array([[1, 1, 0, 1, 2], [0, 1, 2, 3, 40]])  # left padding, then a long row
    cos, sin = rope.angles(positions)
    assert cos.shape == sin.shape == (2, 5, 10) and cos.dtype == sin.dtype == np.float64
    angle = positions[..., None] * np.concatenate([expected, expected])
    np.testing.assert_allclose(cos, np.cos(angle), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sin, np.sin(angle), rtol=1e-14, atol=1e-15)


def test_linear_scaling_divides_the_frequencies():
    plain, linear = RotaryEmbedding(8), RotaryEmbedding(8, scaling=Scaling("linear", 4.0))
    np.testing.assert_allclose(linear.inv_freq, plain.inv_freq / 4.0, rtol=1e-15)


def test_llama3_scaling_keeps_short_divides_long_and_blends_between():
    rope, plain = RotaryEmbedding(16, scaling=LLAMA3), RotaryEmbedding(16)
    wavelen = 2 * math.pi / plain.inv_freq
    short, long = wavelen < 64 / 4.0, wavelen > 64 / 1.0
    assert short.any() and long.any() and (~short & ~long).any()  # all three bands are tested
    np.testing.assert_array_equal(rope.inv_freq[short], plain.inv_freq[short])
    np.testing.assert_allclose(rope.inv_freq[long], plain.inv_freq[long] / 8.0, rtol=1e-15)
    mid = ~short & ~long
    smooth = (64 / wavelen[mid] - 1.0) / 3.0
    blended = (1 - smooth) * plain.inv_freq[mid] / 8.0 + smooth * plain.inv_freq[mid]
    np.testing.assert_allclose(rope.inv_freq[mid], blended, rtol=1e-15)


def _hf_rope(scaling, head_dim: int, theta: float):
    """transformers' LlamaRotaryEmbedding for ``scaling`` (None: default), float32."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    params = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params = {**dataclasses.asdict(scaling), "rope_theta": theta}
    config = LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rope_parameters=params,
    )
    return modeling, modeling.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize(
    "scaling", [None, Scaling("linear", 4.0), LLAMA3], ids=["default", "linear", "llama3"]
)
def test_matches_transformers_in_float32(rng, scaling):
    torch = pytest.importorskip("torch")
    hd, theta = 16, 10000.0
    modeling, hf = _hf_rope(scaling, hd, theta)
    rope = RotaryEmbedding(hd, theta, scaling)
    np.testing.assert_allclose(rope.inv_freq, hf.inv_freq.double().numpy(), rtol=1e-6)
    positions = np.array([[1, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])  # row 0 left-padded
    q = rng.standard_normal((2, 7, 3 * hd)).astype(np.float32)
    x = torch.from_numpy(q)
    hf_cos, hf_sin = hf(x, torch.from_numpy(positions))  # (B, S, hd) float32
    cos, sin = rope.angles(positions)
    np.testing.assert_allclose(cos, hf_cos.double().numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, hf_sin.double().numpy(), atol=1e-6)
    heads = x.reshape(2, 7, 3, hd).transpose(1, 2)  # (B, nh, S, hd) as Llama's attention holds them
    hf_q, _ = modeling.apply_rotary_pos_emb(heads, heads, hf_cos, hf_sin)
    hf_q = hf_q.transpose(1, 2).reshape(2, 7, 3 * hd).numpy()
    ours = apply_rotary(tp_gpu.tensor(q), (cos, sin), hd)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.asarray(ours), hf_q, atol=1e-6)
    # the rotation alone, given transformers' own angles: equal to float32 rounding
    exact = apply_rotary(tp_gpu.tensor(q), (hf_cos.double().numpy(), hf_sin.double().numpy()), hd)
    np.testing.assert_allclose(np.asarray(exact), hf_q, atol=1e-6)


# ---------------------------------------------------------------------------- the rotation, placed


def _angles(rng, batch: int, seq: int, hd: int):
    positions = rng.integers(0, 50, size=(batch, seq))
    return RotaryEmbedding(hd, theta=1000.0).angles(positions)


@pytest.mark.parametrize("backend_spec, n_workers", placements(), indirect=["backend_spec"])
def test_heads_split_over_workers_equal_the_dense_rotation(make_config, rng, n_workers):
    """5 heads of 6 over 1..8 workers (uneven; some workers without a head), forward and backward."""
    hd, heads = 6, 5
    group = get_group(make_config(n_workers))
    x = rng.standard_normal((2, 7, heads * hd))
    g = rng.standard_normal(x.shape)
    cos, sin = _angles(rng, 2, 7, hd)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    split = regions.scatter_to_region(leaf, group, group.split(heads * hd, unit=hd, what="heads"))
    y = apply_rotary(split, (cos, sin), hd)
    assert y.placement == split.placement and y.dtype == np.float64
    assert_close(np.asarray(y), reference_rotation(x, cos, sin, hd), "float64", 2, "rotary forward")
    y.backward(g)
    assert_close(np.asarray(leaf.grad), reference_backward(g, cos, sin, hd), "float64", 2, "rotary dx")


def test_each_device_gets_cos_and_sin_once_per_call(rng):
    """8 workers on 3 simulated devices: forward copies cos and sin to each device once; backward
    reuses those copies."""
    hd = 4
    group = get_group(TensorParallelConfig(n_workers=8, backend="simulated", devices=3, dtype="float64"))
    backend = group.backend
    x = rng.standard_normal((2, 3, 8 * hd))
    split = regions.scatter_to_region(x, group, group.split(8 * hd, unit=hd)).requires_grad_()
    cos, sin = _angles(rng, 2, 3, hd)
    backend.reset_transfers()
    y = apply_rotary(split, (cos, sin), hd)
    counts = {dst: count for (src, dst), (count, _) in backend.transfers.items()}
    assert counts == {0: 2, 1: 2, 2: 2}
    g = rng.standard_normal(x.shape)
    grad = regions.scatter_to_region(g, group, split.placement.layout)  # already on the devices
    backend.reset_transfers()
    y.backward(grad)
    assert sum(count for count, _ in backend.transfers.values()) == 0  # the forward's copies reused
    assert_close(np.asarray(split.grad), reference_backward(g, cos, sin, hd), "float64", 2, "dx")


@pytest.mark.parametrize("devices", [1, 3])
def test_replicated_input_rotates_each_copy_and_its_partial_gradient(rng, devices):
    hd = 4
    group = get_group(
        TensorParallelConfig(n_workers=3, backend="simulated", devices=devices, dtype="float64")
    )
    x, g = rng.standard_normal((2, 5, 3 * hd)), rng.standard_normal((2, 5, 3 * hd))
    cos, sin = _angles(rng, 2, 5, hd)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    copies = regions.copy_to_region(leaf, group)
    assert isinstance(copies.placement, Replicated)
    y = apply_rotary(copies, (cos, sin), hd)
    assert y.placement == copies.placement
    for block in y.blocks.values():  # each copy is the whole rotation
        assert_close(group.backend.to_host(block), reference_rotation(x, cos, sin, hd), "float64", 2)
    y.backward(g)  # dY replicated -> Partial dY, rotated per device, summed by the copy's backward
    assert_close(np.asarray(leaf.grad), reference_backward(g, cos, sin, hd), "float64", 2, "dx")


def test_a_partial_gradient_stays_partial(rng):
    hd = 4
    group = get_group(TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    x = rng.standard_normal((1, 3, 2 * hd))
    cos, sin = _angles(rng, 1, 3, hd)
    copies = regions.copy_to_region(x, group)
    node_ctx = ApplyRotary.ctx_class()
    node_ctx.needs_input_grad = (True, False, False)
    ApplyRotary.forward(node_ctx, copies, (cos, sin), hd)
    parts = {d: rng.standard_normal(x.shape) for d in copies.blocks}  # dY = their sum
    grad = new_tensor(
        {d: group.backend.asarray(p, np.float64, d) for d, p in parts.items()},
        Partial((0, 1)),
        x.shape,
        np.float64,
        group.backend,
    )
    dx, _, _ = ApplyRotary.backward(node_ctx, grad)
    assert dx.placement == Partial((0, 1))
    assert_close(np.asarray(dx), reference_backward(sum(parts.values()), cos, sin, hd), "float64", 2)


@pytest.mark.parametrize("p", [1, 3, 8])
@pytest.mark.parametrize("batch_rows", [2, 1])
def test_sequence_split_input_gets_its_rows_of_the_angles(rng, p, batch_rows):
    """A sequence-split ``t`` (and cos / sin of one row for the whole batch, or one per row)."""
    hd = 6
    group = get_group(TensorParallelConfig(n_workers=p, backend="simulated", devices=3, dtype="float64"))
    x, g = rng.standard_normal((2, 9, 2 * hd)), rng.standard_normal((2, 9, 2 * hd))
    cos, sin = _angles(rng, batch_rows, 9, hd)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    slices = regions.scatter_to_sequence_parallel_region(leaf, group)
    y = apply_rotary(slices, (cos, sin), hd)
    assert isinstance(y.placement, Split) and y.placement == slices.placement
    assert_close(np.asarray(y), reference_rotation(x, cos, sin, hd), "float64", 2, "forward")
    y.backward(g)
    assert_close(np.asarray(leaf.grad), reference_backward(g, cos, sin, hd), "float64", 2, "dx")


def test_positions_differ_per_row_left_padding(rng):
    hd = 8
    rope = RotaryEmbedding(hd)
    positions = np.array([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    cos, sin = rope.angles(positions)
    x = rng.standard_normal((2, 5, 2 * hd))
    y = np.asarray(apply_rotary(tp_gpu.tensor(x), (cos, sin), hd))
    # row 0 position 2 is position 0: unrotated; row 0 position 0 equals row 1 position 1's angles
    np.testing.assert_allclose(y[0, 2], x[0, 2], rtol=1e-15)
    np.testing.assert_allclose(y[0, 0], reference_rotation(x[:1, :1], cos[1:, 1:2], sin[1:, 1:2], hd)[0, 0])
    np.testing.assert_allclose(y, reference_rotation(x, cos, sin, hd), rtol=1e-13, atol=1e-14)


def test_gradcheck_with_any_cos_and_sin(rng):
    """Backward is the exact transpose of forward, even for cos / sin that are not a rotation's."""
    hd = 4
    cos, sin = rng.standard_normal((2, 3, hd)), rng.standard_normal((2, 3, hd))
    assert gradcheck(lambda t: apply_rotary(t, (cos, sin), hd), [rng.standard_normal((2, 3, 2 * hd))])


def test_rotation_keeps_each_heads_norm_and_backward_inverts_it(rng):
    hd = 8
    cos, sin = RotaryEmbedding(hd).angles(rng.integers(0, 1000, size=(2, 4)))
    x = rng.standard_normal((2, 4, 3 * hd))
    y = np.asarray(apply_rotary(tp_gpu.tensor(x), (cos, sin), hd))
    norms = np.linalg.norm(x.reshape(2, 4, 3, hd), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(y.reshape(2, 4, 3, hd), axis=-1), norms, rtol=1e-13)
    leaf = tp_gpu.tensor(x, requires_grad=True)
    apply_rotary(leaf, (cos, sin), hd).backward(y)  # R^T R x = x
    np.testing.assert_allclose(np.asarray(leaf.grad), x, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["numpy", "simulated"])
def test_float16_is_computed_in_float32_and_stays_float16(rng, backend):
    hd = 64
    group = get_group(
        TensorParallelConfig(n_workers=2, backend=backend, devices=2 if backend != "numpy" else None)
    )
    x = (rng.standard_normal((2, 5, 2 * hd)) * 100).astype(np.float16)
    cos, sin = RotaryEmbedding(hd).angles(rng.integers(0, 4000, size=(2, 5)))
    leaf = tp_gpu.tensor(x, requires_grad=True)
    t = regions.scatter_to_region(leaf, group, group.split(2 * hd, unit=hd), np.float16)
    y = apply_rotary(t, (cos, sin), hd)
    assert y.dtype == np.float16 and all(b.dtype == np.float16 for b in y.blocks.values())
    expected = reference_rotation(x.astype(np.float64), cos, sin, hd)
    assert_close(np.asarray(y), expected, "float16", 1, "float16 forward")
    # computed in float32, each element is the float64 result rounded once to float16 (ties aside);
    # computed in float16, three roundings would miss it for a good part of the elements
    assert np.mean(np.asarray(y) == expected.astype(np.float16)) > 0.99
    g = rng.standard_normal(x.shape).astype(np.float16)
    y.backward(g)
    assert leaf.grad.dtype == np.float16
    assert_close(np.asarray(leaf.grad), reference_backward(g.astype(np.float64), cos, sin, hd), "float16")


def test_no_grad_keeps_nothing(rng):
    cos, sin = _angles(rng, 1, 2, 4)
    leaf = tp_gpu.tensor(rng.standard_normal((1, 2, 8)), requires_grad=True)
    recorded = apply_rotary(leaf, (cos, sin), 4)
    assert recorded.grad_fn.ctx.placed
    with tp_gpu.no_grad():
        y = apply_rotary(leaf, (cos, sin), 4)
    assert y.grad_fn is None and not y.requires_grad


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_dim": 7}, "head_dim must be even for rotary embeddings, got 7"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 8, "theta": 0.0}, r"rope theta must be a positive finite number, got 0\.0"),
        ({"head_dim": 8, "theta": float("inf")}, "rope theta"),
        (
            {"head_dim": 8, "scaling": Scaling("yarn", 2.0)},
            "rope scaling type must be 'linear' or 'llama3', got 'yarn'",
        ),
        (
            {"head_dim": 8, "scaling": Scaling("linear", 0.0)},
            "factor must be a positive finite number, got 0.0",
        ),
        (
            {"head_dim": 8, "scaling": Scaling("llama3", 8.0, 4.0, 4.0)},
            r"high_freq_factor \(4.0\) must exceed",
        ),
        ({"head_dim": 8, "scaling": Scaling("llama3", 8.0, 1.0, 4.0, 0)}, "original_max_position_embeddings"),
    ],
)
def test_bad_rotary_embedding_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RotaryEmbedding(**kwargs)


@pytest.mark.parametrize("positions", [np.arange(5), np.zeros((1, 5)), [[0.5, 1.5]]])
def test_bad_positions(positions):
    with pytest.raises(ShapeError, match=r"positions must be integers of shape \(B, S\)"):
        RotaryEmbedding(8).angles(positions)


def test_bad_inputs_are_refused_before_anything_is_computed(rng):
    hd = 4
    cos, sin = _angles(rng, 2, 3, hd)
    x = tp_gpu.tensor(rng.standard_normal((2, 3, 2 * hd)))
    cases = [
        (
            lambda: apply_rotary(x, (cos, sin), 3),
            ConfigError,
            "head_dim must be a positive even integer, got 3",
        ),
        (lambda: apply_rotary(x, (cos, sin), 3 * hd), ShapeError, r"must be \(B, S, n_heads \* 12\)"),
        (
            lambda: apply_rotary(rng.standard_normal((6, 8)), (cos, sin), hd),
            ShapeError,
            r"got shape \(6, 8\)",
        ),
        (lambda: apply_rotary(x, cos, hd), ShapeError, "cos_sin must be a pair"),
        (
            lambda: apply_rotary(x, (cos[:, :2], sin), hd),
            ShapeError,
            r"rotary cos must have shape \(2, 3, 4\)",
        ),
        (lambda: apply_rotary(x, (cos, sin[..., :2]), hd), ShapeError, r"got \(2, 3, 2\)"),
        (lambda: apply_rotary(x, (np.concatenate([cos] * 2), sin), hd), ShapeError, r"got \(4, 3, 4\)"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_partial_input_and_heads_cut_by_the_split_are_refused(rng):
    group = get_group(TensorParallelConfig(n_workers=2, backend="simulated", devices=2, dtype="float64"))
    x = rng.standard_normal((1, 3, 8))
    cos, sin = _angles(rng, 1, 3, 4)
    blocks = {d: group.backend.asarray(x / 2, np.float64, d) for d in (0, 1)}
    partial = new_tensor(blocks, Partial((0, 1)), x.shape, x.dtype, group.backend)
    with pytest.raises(ShapeError, match="rotary input of partial sums"):
        apply_rotary(partial, (cos, sin), 4)
    by_columns = regions.scatter_to_region(
        rng.standard_normal((1, 3, 12)), group, group.split(12)
    )  # 6 + 6 columns: heads of 4 cut
    with pytest.raises(ShapeError, match=r"split \[6, 6\] on its last axis cuts heads of 4"):
        apply_rotary(by_columns, _angles(rng, 1, 3, 4), 4)
