"""Generation of the decoder models (tp_gpu.models.generation): greedy tokens equal transformers'
``generate`` for GPT-2, Llama (grouped-query, fewer key-value heads than workers, untied) and Qwen2
(tied) at 1, 3, 4 and 8 workers on NumPy and simulated devices, single prompts and left-padded
batches, with rows that finish early; transformers' position ids; ``stream``; sampled tokens the same
at every worker count; the sampled distribution (chi-square against the model's own warped softmax);
the KV cache's bytes per device; and every bad argument refused before anything runs.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest
from test_decoder_training import float64_transformers, one_torch_thread, random_model

from tp_gpu import ConfigError, IndexOutOfRangeError, ShapeError, TensorParallelConfig
from tp_gpu.layers.kv_cache import KVCache
from tp_gpu.models.decoder import DecoderForCausalLM
from tp_gpu.models.generation import left_padded_positions

NEW = 32  # new tokens per greedy run
PAD = 0  # pad id in the transformers comparisons (never an end-of-sequence id there)

#: transformers configs: odd vocabulary; 4 heads (more workers than heads at 8); 8 query heads on 2
#: key-value heads (replicated from 3 workers on); 8 on 4 (split 2, 1, 1 at 3 workers; replicated at 8).
HF_CONFIGS = {
    "gpt2": dict(vocab_size=61, n_embd=24, n_layer=2, n_head=4, n_positions=64),
    "llama": dict(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
    ),
}  # fmt: skip
BACKENDS = [("numpy", None), ("simulated", 3)]


def left_padded(rng, lengths, vocab, pad_id=PAD):
    """``(input_ids, attention_mask)`` as a tokenizer with ``padding_side="left"`` builds them."""
    seq = max(lengths)
    ids = np.full((len(lengths), seq), pad_id, dtype=np.int64)
    mask = np.zeros((len(lengths), seq), dtype=np.int64)
    for row, n in enumerate(lengths):
        ids[row, seq - n :] = rng.integers(3, vocab, n)
        mask[row, seq - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``{kind: (folder, transformers model in float64)}``, saved with ``save_pretrained``, no
    end-of-sequence or pad id in the config, and random weights far from transformers' init, so that the
    logits are not flat and greedy runs do not settle on one token: matrices ``N(0, 0.5)``, norm
    weights ``1 + N(0, 0.2)``, biases ``N(0, 0.1)`` (20 to 60 distinct tokens in the 96 of a batch)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with one_torch_thread(torch):  # for every test of the module that uses these models
        yield _transformers_models(torch, transformers, tmp_path_factory)


def _transformers_models(torch, transformers, tmp_path_factory):
    classes = {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    models = {}
    for i, (kind, sizes) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(10 + i)
        config_class, model_class = classes[kind]
        model = model_class(config_class(bos_token_id=1, eos_token_id=None, pad_token_id=None, **sizes))
        with torch.no_grad():
            for name, p in model.named_parameters():
                norm_weight = p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
                p.normal_(1.0 if norm_weight else 0.0, 0.2 if norm_weight else 0.1 if p.ndim == 1 else 0.5)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        model = model.double().eval()
        model.generation_config.eos_token_id = None
        models[kind] = (folder, model)
    return models


def hf_generate(model, ids, mask, **kwargs):
    import torch

    kwargs.setdefault("pad_token_id", PAD)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: the generation config's
    with torch.no_grad(), float64_transformers():
        out = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW,
            **kwargs,
        )
    return out.numpy()


def finish_steps(new, eos):
    """The step at which each row of a run without end-of-sequence ids ``new`` ``(B, n)`` first emits one
    of ``eos`` (``n`` when never): where it finishes when they are end-of-sequence ids."""
    hit = np.isin(new, eos)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), new.shape[1])


def choose_eos(new):
    """End-of-sequence ids for a first run ``new`` ``(B, n)``: a list (one or two ids) at which every row
    finishes, all at different steps after the first, so generation stops early and rows finished
    first are pad-filled; and one id at which row 0 finishes after step 0 and another row later."""
    tokens = sorted(set(new.ravel().tolist()) - {PAD})
    candidates = [[t] for t in tokens] + [list(pair) for pair in itertools.combinations(tokens, 2)]
    every = next(
        e for e in candidates
        if len(set(f := finish_steps(new, e).tolist())) == len(f) and 0 < min(f) and max(f) < new.shape[1] - 1
    )  # fmt: skip
    one = next(
        t for t in tokens if 0 < (f := finish_steps(new, [t]))[0] < new.shape[1] - 1 and f.max() > f[0]
    )
    return every, one


@pytest.fixture(scope="module")
def references(hf):
    """Per kind: prompts and transformers' greedy sequences without, then with, end-of-sequence ids
    chosen from the first run (:func:`choose_eos`)."""
    out = {}
    for kind, (_, model) in hf.items():
        rng = np.random.default_rng(len(kind))
        batch = left_padded(rng, [7, 3, 5], HF_CONFIGS[kind]["vocab_size"])
        single = left_padded(rng, [6], HF_CONFIGS[kind]["vocab_size"])
        plain = hf_generate(model, *batch)
        seq = batch[0].shape[1]
        eos_list, eos_one = choose_eos(plain[:, seq:])
        runs = {"batch": (batch, {}, plain), "single": (single, {}, hf_generate(model, *single))}
        for name, eos in (("eos_list", eos_list), ("eos_one", eos_one)):
            runs[name] = (batch, {"eos_token_id": eos}, hf_generate(model, *batch, eos_token_id=eos))
        finish = finish_steps(plain[:, seq:], eos_list)
        stopped = runs["eos_list"][2]
        assert stopped.shape[1] == seq + finish.max() + 1 < seq + NEW, "every row finishes: stopped early"
        for row, f in enumerate(finish):
            assert (stopped[row, seq + f + 1 :] == PAD).all(), "pad after a row's end"
        assert (runs["eos_one"][2][0, seq + finish_steps(plain[:1, seq:], [eos_one])[0] + 1 :] == PAD).all()
        out[kind] = runs
    return out


def load(folder, n_workers, backend, devices, **kwargs):
    from tp_gpu.models.decoder_loading import AutoModelForCausalLM

    config = TensorParallelConfig(
        n_workers=n_workers, backend=backend, devices=devices, dtype="float64", **kwargs
    )
    return AutoModelForCausalLM.from_pretrained(folder, config)


@pytest.mark.parametrize("backend, devices", BACKENDS, ids=["numpy", "sim3"])
@pytest.mark.parametrize("n_workers", [1, 3, 4, 8])
@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_greedy_equals_transformers(hf, references, kind, n_workers, backend, devices):
    model = load(hf[kind][0], n_workers, backend, devices)
    for name, ((ids, mask), kwargs, expected) in references[kind].items():
        got = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
        np.testing.assert_array_equal(got, expected, err_msg=f"{kind} {name}")


def test_pad_defaults_to_the_first_eos_when_the_config_has_no_pad(hf, references):
    """Without ``pad_token_id`` (and none in the config) finished rows are filled with the first
    end-of-sequence id, as transformers does."""
    (ids, mask), kwargs, _ = references["llama"]["eos_list"]
    expected = hf_generate(hf["llama"][1], ids, mask, pad_token_id=None, **kwargs)
    got = load(hf["llama"][0], 3, "simulated", 3).generate(ids, mask, max_new_tokens=NEW, **kwargs)
    np.testing.assert_array_equal(got, expected)


def test_pad_defaults_to_the_config_pad_id(hf, references, tmp_path):
    """With a ``pad_token_id`` in the config (and none given) finished rows are filled with it, as
    transformers' ``generate`` fills them with its generation config's."""
    folder, model = hf["qwen2"]
    (ids, mask), kwargs, _ = references["qwen2"]["eos_list"]
    config = json.loads((folder / "config.json").read_text())
    config["pad_token_id"] = pad = 5
    assert pad not in kwargs["eos_token_id"]
    shutil.copy(folder / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model.generation_config.pad_token_id = pad
    try:
        expected = hf_generate(model, ids, mask, pad_token_id=None, **kwargs)
    finally:
        model.generation_config.pad_token_id = None
    assert (expected == pad).any()
    got = load(tmp_path, 2, "numpy", None).generate(ids, mask, max_new_tokens=NEW, **kwargs)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_stream_yields_the_tokens_of_generate_one_step_at_a_time(hf, references, kind):
    model = load(hf[kind][0], 3, "simulated", 2)
    for name in ("batch", "eos_list"):
        (ids, mask), kwargs, expected = references[kind][name]
        steps = list(model.stream(ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs))
        assert all(s.shape == (ids.shape[0],) and s.dtype.kind == "i" for s in steps)
        generated = model.generate(ids, mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
        np.testing.assert_array_equal(np.stack(steps, axis=1), generated[:, ids.shape[1] :])
        np.testing.assert_array_equal(generated, expected)


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_left_padded_positions_and_prefill_follow_transformers(hf, references, kind):
    """transformers' ``generate`` numbers a row's real tokens ``0, 1, ...`` (``cumsum(mask) - 1``). What
    padded places get is not compared (transformers 5.x puts 0 there, 4.x put 1): no real token attends
    a padded one, so the real tokens' logits do not depend on it. The prefill's logits at the real
    tokens equal transformers' forward (RMSNorm and rope in float64, :func:`float64_transformers`) with
    our position ids and with transformers', to rounding."""
    import torch

    folder, hf_model = hf[kind]
    (ids, mask), _, _ = references[kind]["batch"]
    t_mask = torch.tensor(mask)
    theirs = hf_model._prepare_position_ids_for_generation(torch.tensor(ids), {"attention_mask": t_mask})
    ours = left_padded_positions(mask)
    real = mask == 1
    np.testing.assert_array_equal(ours[real], theirs.numpy()[real])
    model = load(folder, 3, "simulated", 3)
    logits = np.asarray(model(ids, mask, position_ids=ours))  # (B, S, V)
    for positions in (ours, theirs.numpy()):
        with torch.no_grad(), float64_transformers():
            expected = hf_model(
                torch.tensor(ids), attention_mask=t_mask, position_ids=torch.tensor(positions)
            ).logits.numpy()
        np.testing.assert_allclose(logits[real], expected[real], rtol=0, atol=1e-10)
    spread = np.asarray(model(ids, mask, position_ids=2 * ours))  # positions matter: a real check
    assert np.abs(spread[real] - logits[real]).max() > 1e-3


# ---------------------------------------------------------------------- sampling (no transformers)


LLAMA = dict(
    model_type="llama", vocab_size=29, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
SAMPLED = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(top_k=9, top_p=0.9),
]


@pytest.fixture(scope="module")
def sampled_reference():
    ids, mask = left_padded(np.random.default_rng(7), [6, 2, 4], LLAMA["vocab_size"])
    model = random_model(LLAMA).eval()
    tokens = [model.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=11, **s) for s in SAMPLED]
    return ids, mask, tokens


@pytest.mark.parametrize(
    "backend, devices, pad", [("numpy", None, None), ("simulated", 3, None), ("simulated", 8, 8)]
)
@pytest.mark.parametrize("n_workers", range(1, 9))
def test_sampled_tokens_are_the_same_at_every_worker_count(
    sampled_reference, n_workers, backend, devices, pad
):
    ids, mask, expected = sampled_reference
    model = random_model(LLAMA, n_workers, backend, devices, pad=pad).eval()
    for settings, tokens in zip(SAMPLED, expected):
        got = model.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=11, **settings)
        np.testing.assert_array_equal(got, tokens, err_msg=str(settings))
        if n_workers == 3:  # another seed draws other tokens
            other = model.generate(ids, mask, max_new_tokens=8, do_sample=True, seed=12, **settings)
            assert (other != tokens).any(), settings


# ---------------------------------------------------------------------- the sampled distribution

TINY = dict(
    model_type="llama", vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
)  # fmt: skip
ROWS, SEEDS = 1000, 4  # draws of the first new token: ROWS rows of one prompt (keyed apart) x SEEDS seeds
#: A correct sampler fails a case with probability at most ALPHA (the exact chi-square tail, scipy's;
#: the draws are seeded, so a given seed passes or fails for good).
ALPHA = 1e-6


def warped_probabilities(z, temperature=1.0, top_k=None, top_p=None):
    """``softmax`` of one row of logits ``z`` (V,) after transformers' warpers in their order, in float64:
    Temperature (``z / T``), TopK (below the k-th largest: -inf), TopP (sorted ascending, the tokens
    whose cumulative softmax is ``<= 1 - top_p`` removed, the largest always kept)."""
    s = np.asarray(z, dtype=np.float64) / temperature
    if top_k is not None:
        s = np.where(s < np.sort(s)[-top_k], -np.inf, s)
    if top_p is not None:
        order = np.argsort(s, kind="stable")
        e = np.exp(s[order] - s[order][-1])
        removed = np.cumsum(e / e.sum()) <= 1 - top_p
        removed[-1] = False
        s[order[removed]] = -np.inf
    e = np.exp(s - s.max())
    return e / e.sum()


def test_reference_warpers_equal_transformers():
    """:func:`warped_probabilities` against transformers' own warpers, on random rows."""
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(3)
    for settings in SAMPLED:
        warpers = [generation.TemperatureLogitsWarper(settings.get("temperature", 1.0))]
        if "top_k" in settings:
            warpers.append(generation.TopKLogitsWarper(settings["top_k"]))
        if "top_p" in settings:
            warpers.append(generation.TopPLogitsWarper(settings["top_p"]))
        for _ in range(20):
            z = rng.normal(0, 2, 13)
            scores = torch.tensor(z[None])
            for warper in warpers:
                scores = warper(None, scores)
            expected = torch.softmax(scores, dim=-1).numpy()[0]
            np.testing.assert_allclose(warped_probabilities(z, **settings), expected, rtol=1e-12, atol=0)


def chi_square(counts, p):
    """Pearson's statistic and degrees of freedom of ``counts`` against ``p`` over the tokens ``p`` keeps;
    tokens expected fewer than 5 times are pooled into one cell, so that the chi-square law holds."""
    expected = counts.sum() * p
    big, small = expected >= 5, (p > 0) & (expected < 5)
    observed, wanted = list(counts[big]), list(expected[big])
    if small.any():
        observed.append(counts[small].sum())
        wanted.append(expected[small].sum())
    observed, wanted = np.array(observed, dtype=np.float64), np.array(wanted)
    return float(np.sum((observed - wanted) ** 2 / wanted)), len(wanted) - 1


@pytest.fixture(scope="module")
def tiny_model():
    model = random_model(TINY, 3, "simulated", 3, seed=4).eval()
    prompt = np.array([[3, 9, 1, 7, 12]])
    z = np.asarray(model(prompt), dtype=np.float64)[0, -1]  # (V,): the logits of the first new token
    return model, prompt, z


@pytest.mark.parametrize("settings", SAMPLED, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_first_token_follows_the_warped_softmax(tiny_model, settings):
    from scipy import stats

    model, prompt, z = tiny_model
    p = warped_probabilities(z, **settings)
    draws = [
        model.generate(
            np.repeat(prompt, ROWS, axis=0), max_new_tokens=1, do_sample=True, seed=seed, **settings
        )
        for seed in range(SEEDS)
    ]
    tokens = np.concatenate([d[:, -1] for d in draws])
    counts = np.bincount(tokens, minlength=TINY["vocab_size"])
    assert counts[p == 0].sum() == 0, ("a token outside top-k / top-p was drawn", counts, p)
    if "top_k" in settings:
        assert np.count_nonzero(p) <= settings["top_k"]
    statistic, df = chi_square(counts, p)
    threshold = stats.chi2.isf(ALPHA, df)  # e.g. 43.0 at df = 10, 37.3 at df = 8
    assert statistic < threshold, (statistic, threshold, counts, counts.sum() * p)


def test_the_chi_square_check_rejects_another_temperature(tiny_model):
    """The test has power: draws at temperature 1 fail against the softmax of ``z / 1.25``."""
    from scipy import stats

    model, prompt, z = tiny_model
    draws = model.generate(np.repeat(prompt, ROWS * SEEDS, axis=0), max_new_tokens=1, do_sample=True, seed=9)
    counts = np.bincount(draws[:, -1], minlength=TINY["vocab_size"])
    statistic, df = chi_square(counts, warped_probabilities(z, temperature=1.25))
    assert statistic > stats.chi2.isf(ALPHA, df)
    statistic, df = chi_square(counts, warped_probabilities(z))
    assert statistic < stats.chi2.isf(ALPHA, df)


# ---------------------------------------------------------------------- the KV cache per device

KV_MODEL = dict(
    model_type="llama", vocab_size=11, hidden_size=48, intermediate_size=8, num_hidden_layers=2,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=32,
)  # fmt: skip
#: Bytes of one key-value head's cache: keys and values x 2 layers x batch 3 x 10 places x head_dim 4
#: x 8 (float64) = 3840; the whole cache (4 heads) is 15,360 bytes.
PER_HEAD = 2 * 2 * 3 * 10 * 4 * 8
#: Key-value heads each device caches, one worker per device. 4 >= p: the heads split (2, 1, 1 at
#: p = 3), so a device holds total / p (uneven: its share). 4 < p: query heads split in balanced whole
#: heads (12 over 8: 2, 2, 2, 2, 1, 1, 1, 1), query head h reads key-value head h // 3, and a device
#: caches each head its queries read once (worker 1 holds queries 2, 3: key-value heads 0 and 1).
KV_HEADS = {
    1: [4], 2: [2, 2], 3: [2, 1, 1], 4: [1, 1, 1, 1], 5: [1, 1, 1, 2, 1], 6: [1, 2, 1, 1, 2, 1],
    8: [1, 2, 1, 1, 1, 1, 1, 1], 12: [1] * 12,
}  # fmt: skip


@pytest.mark.parametrize("n_workers", list(KV_HEADS))
def test_kv_cache_bytes_per_device(n_workers):
    model = random_model(KV_MODEL, n_workers, "simulated", n_workers)
    plan = model.decoder_layers[0].attention.plan
    cache = KVCache(plan, 2, 3, 10, model.backend, np.float64)
    per_device = cache.nbytes_per_device()
    assert [per_device[d] for d in sorted(per_device)] == [PER_HEAD * h for h in KV_HEADS[n_workers]]
    if n_workers <= 4 and 4 % n_workers == 0:  # falls as 1 / p
        assert set(per_device.values()) == {4 * PER_HEAD // n_workers}


# ---------------------------------------------------------------------- bad arguments


GPT2 = dict(model_type="gpt2", vocab_size=13, n_embd=8, n_layer=1, n_head=2, n_positions=16)
PROMPT = np.array([[3, 4, 5, 6, 7]])
BAD = [
    ({"attention_mask": [[1, 1, 1, 1, 0]]}, ShapeError, "[1, 1, 1, 1, 0]: padding must be on the left"),
    ({"input_ids": [[3, 4, 5], [0, 0, 0]], "attention_mask": [[1, 1, 1], [0, 0, 0]]}, ShapeError, "row 1"),
    ({"attention_mask": [[1, 1, 1]]}, ShapeError, "(1, 3)"),
    ({"input_ids": [3, 4, 5]}, ShapeError, "(3,)"),
    ({"input_ids": [[3.0, 4.0]]}, ShapeError, "float64"),
    ({"input_ids": [[3, 13]]}, IndexOutOfRangeError, "13"),
    ({"input_ids": [[-1, 3]]}, IndexOutOfRangeError, "-1"),
    ({"max_new_tokens": 0}, ConfigError, "got 0"),
    ({"max_new_tokens": -1}, ConfigError, "got -1"),
    ({"max_new_tokens": 1.5}, ConfigError, "got 1.5"),
    ({"do_sample": "yes"}, ConfigError, "'yes'"),
    ({"temperature": 0.0}, ConfigError, "temperature must be a finite number > 0, got 0.0"),
    ({"temperature": -1}, ConfigError, "got -1"),
    ({"temperature": math.nan}, ConfigError, "got nan"),
    ({"temperature": math.inf}, ConfigError, "got inf"),
    ({"top_k": -1}, ConfigError, "top_k must be an integer >= 1, or None or 0 (off), got -1"),
    ({"top_k": 1.5}, ConfigError, "got 1.5"),
    ({"top_k": True}, ConfigError, "got True"),
    ({"top_p": 0.0}, ConfigError, "top_p must be a number in (0, 1], or None (off), got 0.0"),
    ({"top_p": 1.5}, ConfigError, "got 1.5"),
    ({"top_p": math.nan}, ConfigError, "got nan"),
    ({"seed": -1}, ConfigError, "got -1"),
    ({"eos_token_id": -2}, ConfigError, "got -2"),
    ({"eos_token_id": [2, "x"]}, ConfigError, "[2, 'x']"),
    ({"pad_token_id": -3}, ConfigError, "got -3"),
]  # fmt: skip


@pytest.fixture(scope="module")
def error_models():
    return {
        "llama": random_model(TINY, 2, "simulated", 2).eval(),
        "gpt2": random_model(GPT2, 2, "numpy").eval(),
        "sequence_parallel": random_model(TINY, 2, "simulated", 2, sequence_parallel=True).eval(),
    }


@pytest.fixture
def nothing_runs(monkeypatch):
    """A forward pass fails the test: a refusal must come before any."""

    def ran(*args, **kwargs):
        raise AssertionError("a forward pass ran before the refusal")

    monkeypatch.setattr(DecoderForCausalLM, "hidden_states", ran)


def call(model, how, overrides):
    kwargs = {"input_ids": PROMPT, "max_new_tokens": 3, **overrides}
    if how == "generate":
        return model.generate(kwargs.pop("input_ids"), **kwargs)
    return next(model.stream(kwargs.pop("input_ids"), **kwargs))


@pytest.mark.parametrize("how", ["generate", "stream"])
@pytest.mark.parametrize("overrides, error, text", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_are_refused_before_anything_runs(
    error_models, nothing_runs, how, overrides, error, text
):
    with pytest.raises(error, match=re.escape(text)):
        call(error_models["llama"], how, overrides)


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_sequence_parallel_models_and_gpt2_positions_are_refused(error_models, nothing_runs, how):
    with pytest.raises(ConfigError, match="sequence_parallel"):
        call(error_models["sequence_parallel"], how, {})
    # GPT-2 learns 16 positions: a 5-token prompt and n new tokens feed positions 0 .. 3 + n (the last
    # new token is never fed), so n = 13 is past them and n = 12 fits, as transformers' generate runs it
    with pytest.raises(ConfigError, match=re.escape("max_new_tokens=13") + ".*up to 16.*16"):
        call(error_models["gpt2"], how, {"max_new_tokens": 13})


def test_gpt2_generates_up_to_its_positions(error_models):
    """A 5-token prompt and 12 new tokens feed positions 0 .. 15, GPT-2's 16 learned positions."""
    out = error_models["gpt2"].generate(PROMPT, max_new_tokens=12, eos_token_id=[])
    assert out.shape == (1, 17)
