"""BertEmbeddings: LN(word + position + token type) against a dense float64 reference, forward and
backward, on every backend and worker count; BERT's real sizes (30,522 words, 2 token types);
Hugging Face's BertEmbeddings; eval; bad input."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from helpers import device_of, to_host
from test_norm import PLACEMENTS, dense_layer_norm, directional_check

import tp_gpu
from tp_gpu import (
    BertEmbeddings,
    ConfigError,
    IndexOutOfRangeError,
    ShapeError,
    TensorParallelConfig,
    TensorParallelError,
)
from tp_gpu.testing import assert_close

EPS = 1e-12
TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def dense_embeddings(p, ids, types, positions):
    """float64 reference: LN(W[ids] + P[positions] + T[types])."""
    summed = (
        p["word_embeddings"][ids] + p["position_embeddings"][positions] + p["token_type_embeddings"][types]
    )
    return dense_layer_norm(summed, p["norm_weight"], p["norm_bias"], EPS)


def random_tables(rng, vocab, hidden, max_position, types):
    return {
        "word_embeddings": rng.standard_normal((vocab, hidden)),
        "position_embeddings": rng.standard_normal((max_position, hidden)),
        "token_type_embeddings": rng.standard_normal((types, hidden)),
        "norm_weight": 1 + 0.3 * rng.standard_normal(hidden),
        "norm_bias": 0.3 * rng.standard_normal(hidden),
    }


def load(emb, p):
    emb.load_state_dict(
        {
            **{f"{name}.weight": p[name] for name in TABLES},
            "norm.weight": p["norm_weight"],
            "norm.bias": p["norm_bias"],
        }
    )


def flat_grads(emb):
    grads = emb.grads()
    return {
        **{name: grads[f"{name}.weight"] for name in TABLES},
        "norm_weight": grads["norm.weight"],
        "norm_bias": grads["norm.bias"],
    }


def check_against_dense(emb, p, rng, ids, types=None, positions=None):
    batch, seq = ids.shape
    y = emb(ids, types, positions)
    assert device_of(emb, y) == emb.output_device
    dense_types = np.zeros((1, seq), dtype=np.int64) if types is None else types
    dense_positions = np.arange(seq)[None, :] if positions is None else positions
    expected = dense_embeddings(p, ids, dense_types, dense_positions)
    assert expected.shape == (batch, seq, emb.hidden)
    assert_close(to_host(emb, y), expected, "float64", emb.hidden, "BertEmbeddings forward")
    g = rng.standard_normal(expected.shape)
    y.backward(g)

    def loss(q):
        return float(np.sum(g * dense_embeddings(q, ids, dense_types, dense_positions)))

    directional_check(loss, p, flat_grads(emb), rng)


@pytest.mark.parametrize("backend_spec, n_workers", PLACEMENTS, indirect=["backend_spec"])
def test_matches_dense_forward_and_backward(make_config, rng, n_workers):
    vocab, hidden, max_position, types = 61, 12, 16, 9  # 61 is prime: uneven on every worker count
    emb = BertEmbeddings(vocab, hidden, max_position, types, make_config(n_workers))
    p = random_tables(rng, vocab, hidden, max_position, types)
    load(emb, p)
    ids = rng.integers(0, vocab, size=(3, 7))
    ids[0, :3] = 5  # a repeated id: its gradient rows add up
    check_against_dense(emb, p, rng, ids, rng.integers(0, types, size=(3, 7)))


@pytest.mark.parametrize(
    "types, positions",
    [
        pytest.param("none", "none", id="defaults"),
        pytest.param("batch", "batch", id="per-row"),
        pytest.param("shared", "1d", id="shared"),
    ],
)
def test_optional_id_shapes(rng, types, positions):
    emb = BertEmbeddings(
        40, 6, 10, 3, TensorParallelConfig(n_workers=5, backend="simulated", devices=3, dtype="float64")
    )
    p = random_tables(rng, 40, 6, 10, 3)
    load(emb, p)
    ids = rng.integers(0, 40, size=(2, 6))
    type_ids = {
        "none": None,
        "batch": rng.integers(0, 3, size=(2, 6)),
        "shared": rng.integers(0, 3, size=(1, 6)),
    }
    position_ids = {"none": None, "batch": rng.integers(0, 10, size=(2, 6)), "1d": rng.permutation(10)[:6]}
    check_against_dense(emb, p, rng, ids, type_ids[types], position_ids[positions])


def test_defaults_equal_explicit_zeros_and_arange(rng):
    emb = BertEmbeddings(30, 6, 8, 2, TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"))
    emb.eval()
    ids = rng.integers(0, 30, size=(2, 5))
    explicit = emb(ids, np.zeros((2, 5), dtype=np.int64), np.tile(np.arange(5), (2, 1)))
    np.testing.assert_array_equal(to_host(emb, emb(ids)), to_host(emb, explicit))


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
def test_bert_sizes(make_config, rng, n_workers):
    """BERT-base's tables, narrowed: 30,522 words (uneven on 4, 5, 7, 8 workers), 512 positions, 2 types
    (fewer types than workers: devices that own no token-type row)."""
    vocab, hidden, max_position, types = 30522, 4, 512, 2
    emb = BertEmbeddings(vocab, hidden, max_position, types, make_config(n_workers), seed=1)
    sizes = [last - first for first, last in emb.word_embeddings.partition]
    assert sum(sizes) == vocab and max(sizes) - min(sizes) <= 1
    p = random_tables(rng, vocab, hidden, max_position, types)
    load(emb, p)
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 30521, 1, 15000, 102]])  # the first and last rows too
    check_against_dense(emb, p, rng, ids, np.array([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]]))


@pytest.mark.parametrize("n_workers", [1, 5, 8])
def test_matches_hugging_face_bert_embeddings(rng, n_workers):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.bert import modeling_bert as bert

    vocab, hidden, max_position, types = 53, 10, 12, 2
    hf_config = bert.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=max_position,
        type_vocab_size=types,
        layer_norm_eps=EPS,
        hidden_dropout_prob=0.0,
        num_attention_heads=2,
    )
    torch.manual_seed(n_workers)
    hf = bert.BertEmbeddings(hf_config).double()
    with torch.no_grad():
        hf.LayerNorm.weight.add_(torch.from_numpy(0.3 * rng.standard_normal(hidden)))
        hf.LayerNorm.bias.add_(torch.from_numpy(0.3 * rng.standard_normal(hidden)))
    hf_state = hf.state_dict()
    ours = {k.replace("LayerNorm.", "norm."): v for k, v in hf_state.items()}  # the only renaming
    emb = BertEmbeddings(
        vocab,
        hidden,
        max_position,
        types,
        TensorParallelConfig(n_workers=n_workers, dtype="float64"),
        eps=EPS,
    )
    emb.load_state_dict(ours)
    ids = torch.from_numpy(rng.integers(1, vocab, size=(3, 7)))  # not the padding id 0, whose row HF freezes
    type_ids = torch.from_numpy(rng.integers(0, types, size=(3, 7)))
    y_ref = hf(input_ids=ids, token_type_ids=type_ids)
    g = rng.standard_normal(tuple(y_ref.shape))
    (y_ref * torch.from_numpy(g)).sum().backward()
    y = emb(ids, type_ids)
    assert_close(to_host(emb, y), y_ref.detach().numpy(), "float64", hidden, "vs HF forward")
    y.backward(g)
    grads = emb.grads()
    for name, param in hf.named_parameters():
        ours_name = name.replace("LayerNorm.", "norm.")
        assert_close(grads[ours_name], param.grad.numpy(), "float64", 21, f"vs HF d{name}")


def test_submodule_names_match_hugging_face():
    emb = BertEmbeddings(
        20, 4, 8, 2, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64")
    )
    assert list(emb.state_dict()) == [
        "word_embeddings.weight",
        "position_embeddings.weight",
        "token_type_embeddings.weight",
        "norm.weight",
        "norm.bias",
    ]


def test_no_grad_keeps_nothing(rng):
    emb = BertEmbeddings(
        20, 4, 8, 3, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64")
    )
    ids = rng.integers(0, 20, size=(2, 5))
    recorded = emb(ids)
    assert recorded.grad_fn is not None  # recording keeps what backward needs
    with tp_gpu.no_grad():
        y = emb(ids)
    np.testing.assert_array_equal(to_host(emb, y), to_host(emb, recorded))
    assert y.grad_fn is None and not y.requires_grad  # nothing recorded, no activation kept
    with pytest.raises(TensorParallelError, match="does not require grad"):
        y.backward(np.ones((2, 5, 4)))
    assert all(g is None for p in emb.parameters() for g in p.grad_blocks.values())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda e: e(np.ones((2, 5))),
            ShapeError,
            r"input_ids must be integers .*got shape \(2, 5\) of dtype float64",
        ),
        (lambda e: e(np.ones(5, dtype=int)), ShapeError, r"\(batch, seq\) with seq >= 1, got shape \(5,\)"),
        (lambda e: e(np.ones((2, 9), dtype=int)), ShapeError, r"9 positions, more than max_position=8"),
        (
            lambda e: e(np.ones((2, 5), dtype=int), np.zeros((2, 4), dtype=int)),
            ShapeError,
            r"token_type_ids must be integers of shape \(2, 5\) \(batch, seq\), \(1, 5\) or \(5,\); "
            r"got shape \(2, 4\)",
        ),
        (
            lambda e: e(np.ones((2, 5), dtype=int), None, np.zeros((3, 5))),
            ShapeError,
            r"position_ids must be integers",
        ),
        (
            lambda e: e(np.full((2, 5), 20)),
            IndexOutOfRangeError,
            r"token id 20 out of range; expected 0 <= id < vocab_size=20",
        ),
        (lambda e: e(np.ones((2, 5), dtype=int), np.full((2, 5), 3)), IndexOutOfRangeError, "vocab_size=3"),
    ],
)
def test_bad_input(rng, call, error, match):
    emb = BertEmbeddings(
        20, 4, 8, 3, TensorParallelConfig(n_workers=3, backend="simulated", devices=3, dtype="float64")
    )
    before = emb.state_dict()
    with pytest.raises(error, match=match):
        call(emb)
    assert all(g is None for p in emb.parameters() for g in p.grad_blocks.values())
    for name, value in emb.state_dict().items():
        np.testing.assert_array_equal(value, before[name])
    emb(np.ones((2, 5), dtype=int)).backward(np.ones((2, 5, 4)))  # the module still works


@pytest.mark.parametrize("bad", [{"vocab_size": 0}, {"max_position": -1}, {"eps": 0}, {"seed": 1.5}])
def test_bad_constructor_arguments(bad):
    args = {"vocab_size": 20, "hidden": 4, "max_position": 8, "type_vocab_size": 2, **bad}
    with pytest.raises(ConfigError):
        BertEmbeddings(config=TensorParallelConfig(n_workers=2, backend="numpy", dtype="float64"), **args)
