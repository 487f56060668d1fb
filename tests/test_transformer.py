"""ParallelTransformerLayer: post-norm (BERT) and pre-norm (GPT) against a dense float64 reference,
forward and backward, on every backend and worker count; Hugging Face's BertLayer; eval; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import device_of, forward_backward, to_host
from scipy.special import erf
from test_attention import NAMES, additive, dense_attention, padding_mask, random_weights, separate_grads
from test_norm import PLACEMENTS, dense_layer_norm, directional_check

import tp_gpu
from tp_gpu import (
    ConfigError,
    ParallelTransformerLayer,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
)
from tp_gpu.layers import split_fused_qkv
from tp_gpu.testing import assert_close

EPS = 1e-12


def gelu(x, kind):
    if kind == "gelu":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def dense_layer(x, p, n_heads, mask, pre_norm, activation):
    """float64 reference of the block from its logical weights ``p``."""

    def mlp(h):
        return gelu(h @ p["fc1_weight"] + p["fc1_bias"], activation) @ p["fc2_weight"] + p["fc2_bias"]

    def ln(h, which):
        return dense_layer_norm(h, p[f"{which}_weight"], p[f"{which}_bias"], EPS)

    if pre_norm:
        h = x + dense_attention(ln(x, "ln1"), p, n_heads, mask)
        return h + mlp(ln(h, "ln2"))
    h = ln(x + dense_attention(x, p, n_heads, mask), "ln1")
    return ln(h + mlp(h), "ln2")


def random_layer_weights(rng, hidden, intermediate):
    p = random_weights(rng, hidden)
    p.update(
        fc1_weight=rng.standard_normal((hidden, intermediate)) * 0.4,
        fc1_bias=rng.standard_normal(intermediate),
    )
    p.update(
        fc2_weight=rng.standard_normal((intermediate, hidden)) * 0.4, fc2_bias=rng.standard_normal(hidden)
    )
    for which in ("ln1", "ln2"):
        p[f"{which}_weight"] = 1 + 0.3 * rng.standard_normal(hidden)
        p[f"{which}_bias"] = 0.3 * rng.standard_normal(hidden)
    return p


def load(layer, p):
    layer.attention.load_dense(*(p[n] for n in NAMES))
    layer.attention_norm.load_dense(p["ln1_weight"], p["ln1_bias"])
    layer.mlp.load_dense(p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], p["fc2_bias"])
    layer.mlp_norm.load_dense(p["ln2_weight"], p["ln2_bias"])


def layer_grads(layer):
    grads = layer.grads()
    out = separate_grads(layer.attention)
    for ours, name in (
        ("attention_norm", "ln1"),
        ("mlp_norm", "ln2"),
        ("mlp.fc1", "fc1"),
        ("mlp.fc2", "fc2"),
    ):
        out[f"{name}_weight"], out[f"{name}_bias"] = grads[f"{ours}.weight"], grads[f"{ours}.bias"]
    return out


CASES = [  # (pre_norm, mask, activation): BERT with padding; GPT causal with tanh GELU; pre-norm with both
    pytest.param(False, "padding", "gelu", id="post-padding"),
    pytest.param(True, "causal", "gelu_tanh", id="pre-causal"),
    pytest.param(True, "padding+causal", "gelu", id="pre-padding+causal"),
]


@pytest.mark.parametrize("pre_norm, mask_kind, activation", CASES)
@pytest.mark.parametrize("backend_spec, n_workers", PLACEMENTS, indirect=["backend_spec"])
def test_matches_dense_forward_and_backward(make_config, rng, n_workers, pre_norm, mask_kind, activation):
    batch, seq, hidden, n_heads, intermediate = 2, 5, 36, 12, 19  # head_dim 3; 19 is prime
    causal = "causal" in mask_kind
    layer = ParallelTransformerLayer(
        hidden,
        n_heads,
        intermediate,
        make_config(n_workers),
        pre_norm=pre_norm,
        activation=activation,
        causal=causal,
    )
    p = random_layer_weights(rng, hidden, intermediate)
    load(layer, p)
    x = rng.standard_normal((batch, seq, hidden))
    keep = padding_mask(rng, batch, seq) if "padding" in mask_kind else None
    mask = additive(keep, causal, batch, seq)
    expected = dense_layer(x, p, n_heads, mask, pre_norm, activation)
    g = rng.standard_normal(expected.shape)
    y, dx = forward_backward(layer, x, g, keep)
    assert device_of(layer, y) == layer.output_device
    assert_close(to_host(layer, y), expected, "float64", intermediate, "transformer layer forward")
    assert device_of(layer, dx) == layer.output_device
    grads = {"x": to_host(layer, dx), **layer_grads(layer)}

    def loss(q):
        return float(np.sum(g * dense_layer(q["x"], q, n_heads, mask, pre_norm, activation)))

    directional_check(loss, {"x": x, **p}, grads, rng)


@pytest.mark.parametrize("n_workers", [1, 5, 8])
def test_matches_hugging_face_bert_layer(rng, n_workers):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.bert import modeling_bert as bert

    batch, seq, hidden, n_heads, intermediate = 3, 6, 24, 12, 20
    hf_config = bert.BertConfig(
        hidden_size=hidden,
        num_attention_heads=n_heads,
        intermediate_size=intermediate,
        hidden_act="gelu",
        layer_norm_eps=EPS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(n_workers)
    hf = bert.BertLayer(hf_config).double()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):  # away from ones and zeros
                param.add_(torch.from_numpy(0.3 * rng.standard_normal(tuple(param.shape))))
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    config = TensorParallelConfig(n_workers=n_workers, backend="simulated", devices=3, dtype="float64")
    layer = ParallelTransformerLayer(hidden, n_heads, intermediate, config, eps=EPS)
    qkv = [sd[f"attention.self.{n}.{kind}"] for n in ("query", "key", "value") for kind in ("weight", "bias")]
    layer.attention.load_qkv(*qkv, layout="out_in")
    layer.attention.out.load_dense(
        sd["attention.output.dense.weight"], sd["attention.output.dense.bias"], layout="out_in"
    )
    layer.attention_norm.load_dense(
        sd["attention.output.LayerNorm.weight"], sd["attention.output.LayerNorm.bias"]
    )
    mlp = [sd[f"{n}.dense.{kind}"] for n in ("intermediate", "output") for kind in ("weight", "bias")]
    layer.mlp.load_dense(*mlp, layout="out_in")
    layer.mlp_norm.load_dense(sd["output.LayerNorm.weight"], sd["output.LayerNorm.bias"])
    keep = padding_mask(rng, batch, seq)
    extended = torch.from_numpy(
        (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float64).min
    )  # as BertModel
    x = torch.from_numpy(rng.standard_normal((batch, seq, hidden))).requires_grad_()
    g = torch.from_numpy(rng.standard_normal((batch, seq, hidden)))
    out = hf(x, attention_mask=extended)
    y_ref = out[0] if isinstance(out, tuple) else out
    (y_ref * g).sum().backward()
    y, dx = forward_backward(layer, x.detach().numpy(), g.numpy(), keep)
    assert_close(to_host(layer, y), y_ref.detach().numpy(), "float64", intermediate, "vs BertLayer")
    assert_close(to_host(layer, dx), x.grad.numpy(), "float64", intermediate, "vs BertLayer dx")
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    grads = layer.grads()
    q, qb, k, kb, v, vb = layer.attention.split_qkv(layout="out_in")  # the values, to check the mapping
    np.testing.assert_array_equal(q, sd["attention.self.query.weight"].numpy())
    split = split_fused_qkv(
        grads["attention.qkv.weight"], grads["attention.qkv.bias"], n_heads, layout="out_in"
    )
    mapped = {
        **{
            f"attention.self.{n}.{kind}": split[2 * i + j]
            for i, n in enumerate(("query", "key", "value"))
            for j, kind in enumerate(("weight", "bias"))
        },
        "attention.output.dense.weight": grads["attention.out.weight"].T,
        "attention.output.dense.bias": grads["attention.out.bias"],
        "attention.output.LayerNorm.weight": grads["attention_norm.weight"],
        "attention.output.LayerNorm.bias": grads["attention_norm.bias"],
        "intermediate.dense.weight": grads["mlp.fc1.weight"].T,
        "intermediate.dense.bias": grads["mlp.fc1.bias"],
        "output.dense.weight": grads["mlp.fc2.weight"].T,
        "output.dense.bias": grads["mlp.fc2.bias"],
        "output.LayerNorm.weight": grads["mlp_norm.weight"],
        "output.LayerNorm.bias": grads["mlp_norm.bias"],
    }
    assert sorted(mapped) == sorted(hf_grads)
    for name, grad in mapped.items():
        assert_close(grad, hf_grads[name], "float64", batch * seq * intermediate, f"vs BertLayer d{name}")


def test_submodule_names_and_one_group():
    config = TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    layer = ParallelTransformerLayer(24, 12, 20, config)
    assert [name for name, _ in layer.named_children()] == ["attention", "attention_norm", "mlp", "mlp_norm"]
    assert list(layer.state_dict()) == [
        "attention.qkv.weight",
        "attention.qkv.bias",
        "attention.out.weight",
        "attention.out.bias",
        "attention_norm.weight",
        "attention_norm.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "mlp_norm.weight",
        "mlp_norm.bias",
    ]
    groups = {id(m.group) for _, m in layer.named_modules() if hasattr(m, "group")}
    assert len(groups) == 1  # every submodule runs on the one group of its config


def test_no_grad_keeps_nothing(rng):
    """Under ``no_grad`` nothing is recorded (no node holds an activation) and backward raises; in
    eval mode with recording on, the graph is built as in training (dropout aside)."""
    layer = ParallelTransformerLayer(
        24, 12, 20, TensorParallelConfig(n_workers=7, backend="simulated", devices=3, dtype="float64")
    )
    x = rng.standard_normal((2, 5, 24))
    layer.eval()
    with tp_gpu.no_grad():
        y = layer(tp_gpu.tensor(x, requires_grad=True), np.ones((2, 5)))
    assert y.grad_fn is None and not y.requires_grad
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(np.ones((2, 5, 24)))
    assert all(p.grad is None for p in layer.parameters())
    y = layer(x, np.ones((2, 5)))
    assert y.grad_fn is not None
    y.backward(np.ones((2, 5, 24)))
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_heads": 7}, r"hidden \(24\) must be a multiple of n_heads \(7\)"),
        ({"pre_norm": "yes"}, "pre_norm must be True or False"),
        ({"eps": -1.0}, "eps must be a positive finite number"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"intermediate": 0}, "intermediate"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"hidden": 24, "n_heads": 12, "intermediate": 20, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ParallelTransformerLayer(
            config=TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), **args
        )


def test_bad_input_raises_before_anything_changes(rng, monkeypatch):
    layer = ParallelTransformerLayer(
        24, 12, 20, TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    )
    x = rng.standard_normal((2, 5, 24))
    leaf = tp_gpu.tensor(x, requires_grad=True)
    y = layer(leaf)
    ran = []
    for _, module in layer.named_modules():
        if module is not layer:
            monkeypatch.setattr(module, "forward", lambda *a, m=module, **k: ran.append(m))
    with pytest.raises(ShapeError, match=r"attention_mask must be \(2, 5\) .*got shape \(2, 6\)"):
        layer(x, np.ones((2, 6)))
    with pytest.raises(ShapeError, match=r"\(batch, seq, 24\) with seq >= 1, got \(5, 24\)"):
        layer(x[0])
    assert ran == []  # no submodule ran
    monkeypatch.undo()
    with pytest.raises(
        ShapeError, match=r"grad has shape \(2, 5\); expected the tensor's shape \(2, 5, 24\)"
    ):
        y.backward(np.ones((2, 5)))
    assert leaf.grad is None and all(p.grad is None for p in layer.parameters())  # nothing consumed
    g = rng.standard_normal((2, 5, 24))
    y.backward(g)  # the first forward's graph is intact
    _, dx = forward_backward(layer, x, g)
    np.testing.assert_allclose(to_host(layer, leaf.grad), to_host(layer, dx), rtol=1e-12, atol=1e-12)
