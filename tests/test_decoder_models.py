"""Decoder logits (GPT-2, Llama, Qwen2) against an independent float64 reference and transformers.

The folders are written by :mod:`dense_decoder` (no torch) at small uneven shapes: vocabularies
97 / 101, widths 24 / 36, MLP width 37, head counts 3 / 6 that most worker counts do not divide,
key-value heads 1 / 2 / 3 (fewer than the workers from p = 2 on), tied and untied heads, Qwen2's
q/k/v biases, one Llama with attention and MLP biases and linear RoPE scaling, one with Llama 3
scaling and an explicit head_dim (10, not 36 / 6), GPT-2 in both key layouts. Tolerances:

* float64 against :func:`dense_decoder.reference_logits`: max abs 1e-10 (what we see: ~1e-14);
* float32 transformers against the reference: 2e-6 x max|logit| (~1e-5 here; transformers rounds
  every op to float32, whose unit roundoff is 6e-8, over two layers);
* our float32 against transformers float32: max abs 1e-4;
* float16 against the reference: 1e-2 x max|logit| (float16's unit roundoff is 4.9e-4, the weights
  themselves are rounded to it and errors grow over two layers and sums of 24-37 terms; we see up
  to 2e-3 x max|logit|, while a wrong mask, head or position shifts logits by O(1)).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np
import pytest
from conftest import WORKER_COUNTS
from dense_decoder import generate_positions, reference_logits, write_folder

from tp_gpu import TensorParallelConfig
from tp_gpu.models.decoder_loading import AutoModelForCausalLM
from tp_gpu.placements import Split

#: name -> write_folder arguments (every folder float64, 2 layers, 32 positions).
SPECS: Dict[str, Dict[str, Any]] = {
    "gpt2_tied": dict(model_type="gpt2", vocab_size=97, hidden_size=24, num_attention_heads=6,
                      intermediate_size=37, tie=True),
    "gpt2_untied_openai": dict(model_type="gpt2", vocab_size=101, hidden_size=36, num_attention_heads=3,
                               intermediate_size=37, tie=False, gpt2_layout=""),
    "llama_bias_linear": dict(model_type="llama", vocab_size=101, hidden_size=24, num_attention_heads=6,
                              num_key_value_heads=2, intermediate_size=37, tie=False,
                              extra=dict(attention_bias=True, mlp_bias=True, rope_parameters=dict(
                                  rope_type="linear", factor=2.0, rope_theta=500.0))),
    "llama3_tied_head_dim": dict(model_type="llama", vocab_size=97, hidden_size=36, num_attention_heads=6,
                                 num_key_value_heads=3, head_dim=10, intermediate_size=37, tie=True,
                                 # wavelengths 6.3, 15.8 (between L/4 and L = 16: smoothed), 40, 100, 250
                                 extra=dict(rope_parameters=dict(
                                     rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=16,
                                     rope_theta=100.0))),
    "qwen2_kv1": dict(model_type="qwen2", vocab_size=97, hidden_size=24, num_attention_heads=3,
                      num_key_value_heads=1, intermediate_size=37, tie=False),
}  # fmt: skip
NAMES = list(SPECS)
BATCH, SEQ = 3, 7
_inputs = np.random.default_rng(2022)
IDS = _inputs.integers(0, 97, (BATCH, SEQ))
MASK = np.ones((BATCH, SEQ), np.int64)
MASK[1, :2] = 0  # left padding; row 2 keeps only its last token
MASK[2, :6] = 0
POSITIONS = generate_positions(MASK)  # as transformers' generate: [1, 1, 0, 1, 2, 3, 4] on row 1
KEEP = MASK.astype(bool)  # only these query rows are compared with a mask
TOL64, TOL16 = 1e-10, 1e-2

_references: Dict[Tuple[str, bool], np.ndarray] = {}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    rng = np.random.default_rng(22)
    return {
        name: write_folder(root / name, num_hidden_layers=2, dtype="float64", rng=rng, **spec)
        for name, spec in SPECS.items()
    }


def reference(folders, name: str, masked: bool) -> np.ndarray:
    """The float64 reference logits of folder ``name``, without or with the padding mask (cached)."""
    key = (name, masked)
    if key not in _references:
        extra = (MASK, POSITIONS) if masked else ()
        _references[key] = reference_logits(folders[name], IDS, *extra)
    return _references[key]


def load(folder, n_workers: int, backend=("numpy", None), dtype="float64", **kwargs):
    config = TensorParallelConfig(
        n_workers=n_workers, backend=backend[0], devices=backend[1], dtype=dtype,
        sequence_parallel=kwargs.pop("sequence_parallel", False),
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(folder, config, **kwargs)


def logits_of(model, masked: bool) -> np.ndarray:
    out = model(IDS, MASK, POSITIONS) if masked else model(IDS)
    return np.asarray(out)


def max_error(got: np.ndarray, expected: np.ndarray, masked: bool) -> float:
    """Max abs difference, over the non-pad query rows when ``masked``."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = np.abs(got.astype(np.float64) - expected)
    return float((diff[KEEP] if masked else diff).max())


# --- float64 against the reference, at every worker count --------------------------------------------


@pytest.mark.parametrize("n_workers", WORKER_COUNTS)
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(folders, name, n_workers, make_config):
    """1..8 workers on numpy and on 1, 3 and 8 simulated devices: logits within 1e-10 of float64 NumPy,
    without a mask and with left padding and generate's position ids; logits split on the vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(folders[name], make_config(n_workers))
    vocab = SPECS[name]["vocab_size"]
    logits = model(IDS)
    assert logits.shape == (BATCH, SEQ, vocab) and logits.dtype == np.float64
    assert isinstance(logits.placement, Split) and logits.placement.axis == 2
    assert len(logits.placement.layout.sizes) == n_workers and sum(logits.placement.layout.sizes) == vocab
    assert max_error(np.asarray(logits), reference(folders, name, False), False) <= TOL64
    masked = logits_of(model, True)
    assert np.isfinite(masked).all()  # row 2's fully masked pad queries too (finfo.min, not -inf)
    assert max_error(masked, reference(folders, name, True), True) <= TOL64


def test_mask_and_positions_matter(folders):
    """The masked case is not the unmasked one in disguise: on the kept rows of a padded sequence the
    logits differ by O(1); and the logits are O(1), not near zero."""
    for name in NAMES:
        plain, masked = reference(folders, name, False), reference(folders, name, True)
        assert np.abs(plain - masked)[KEEP].max() > 0.1, name
    assert np.abs(reference(folders, "qwen2_kv1", False)).max() > 1.0  # logits are not near zero


@pytest.mark.parametrize("name", NAMES)
def test_offset_positions(folders, name):
    """Explicit position ids are used: learned position rows for GPT-2, rotary angles for Llama and
    Qwen2 (a shift 20..26 changes only GPT-2's logits: rotary scores depend on differences; steps of
    2 and an unordered row change every model's)."""
    positions = np.array([np.arange(0, 2 * SEQ, 2), np.arange(20, 20 + SEQ), [3, 1, 4, 1, 5, 9, 2]])
    model = load(folders[name], 4, ("simulated", 3))
    got = np.asarray(model(IDS, position_ids=positions))
    expected = reference_logits(folders[name], IDS, position_ids=positions)
    assert max_error(got, expected, False) <= TOL64
    change = np.abs(expected - reference(folders, name, False)).max(axis=(1, 2))  # per row
    assert change[0] > 0.1 and change[2] > 0.1
    assert (change[1] > 0.1) if name.startswith("gpt2") else (change[1] < 1e-12)


VARIANTS = {
    "gpt2-gelu-eps": ("gpt2", {"activation_function": "gelu", "layer_norm_epsilon": 0.05}),
    "gpt2-relu": ("gpt2", {"activation_function": "relu"}),
    "gpt2-pytorch-tanh": ("gpt2", {"activation_function": "gelu_pytorch_tanh", "n_inner": None}),
    "llama-gelu-eps": ("llama", {"hidden_act": "gelu", "rms_norm_eps": 0.05}),
    "qwen2-legacy-theta": ("qwen2", {"rope_parameters": None, "rope_theta": 50.0}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants(tmp_path, rng, variant):
    """Activations, norm epsilons, GPT-2's default n_inner (4H) and a legacy top-level rope_theta."""
    model_type, extra = VARIANTS[variant]
    folder = write_folder(tmp_path, model_type, vocab_size=31, hidden_size=12, num_hidden_layers=2,
                          num_attention_heads=3, intermediate_size=48, tie=False, rng=rng,
                          dtype="float64", extra=extra)  # fmt: skip
    for n_workers in (2, 5):
        model = load(folder, n_workers, ("simulated", 3))
        ids = IDS % 31
        assert max_error(np.asarray(model(ids)), reference_logits(folder, ids), False) <= TOL64


# --- transformers ----------------------------------------------------------------------------------


def _torch_logits(model, masked: bool) -> np.ndarray:
    import torch

    with torch.no_grad():
        if masked:
            out = model(
                torch.tensor(IDS), attention_mask=torch.tensor(MASK), position_ids=torch.tensor(POSITIONS)
            )
        else:
            out = model(torch.tensor(IDS))
    return out.logits.double().numpy()


def _hf_model(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("name", NAMES)
def test_reference_agrees_with_transformers(folders, name):
    """transformers float32 on the same folders is within 2e-6 x max|logit| of the float64 reference
    (so the reference computes what transformers does); our float32 within 1e-4 of transformers."""
    hf = _hf_model(folders[name])
    ours = load(folders[name], 3, ("simulated", 3), dtype="float32")
    for masked in (False, True):
        expected = reference(folders, name, masked)
        theirs = _torch_logits(hf, masked)
        assert max_error(theirs, expected, masked) <= 2e-6 * max(1.0, float(np.abs(expected).max()))
        assert max_error(logits_of(ours, masked), theirs, masked) <= 1e-4


@pytest.mark.parametrize("name", ["llama_bias_linear", "llama3_tied_head_dim"])
def test_inv_freq_matches_transformers(folders, name):
    """The reference's rotary frequencies (float64) are transformers' (float32) for linear and llama3."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from dense_decoder import inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.AutoConfig.from_pretrained(folders[name])
    rope = SPECS[name]["extra"]["rope_parameters"]
    theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
    ours = inv_freq(json.loads((folders[name] / "config.json").read_text()), config.head_dim)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6, atol=0)
    plain = inv_freq({"rope_theta": rope["rope_theta"]}, config.head_dim)
    if rope["rope_type"] == "llama3":  # the two short wavelengths smoothed, the three long ones divided
        assert np.all((plain[:2] / 8 < ours[:2]) & (ours[:2] < plain[:2]))
        np.testing.assert_allclose(ours[2:], plain[2:] / 8, rtol=1e-15)


#: transformers config class name -> keyword arguments (std 0.3 random init, so the logits are O(1)).
HF_SPECS = {
    "GPT2Config": dict(vocab_size=101, n_embd=24, n_head=6, n_layer=2, n_positions=16),
    "LlamaConfig": dict(vocab_size=97, hidden_size=36, intermediate_size=37, num_attention_heads=6,
                        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=16),
    "Qwen2Config": dict(vocab_size=103, hidden_size=24, intermediate_size=37, num_attention_heads=6,
                        num_key_value_heads=3, num_hidden_layers=2, max_position_embeddings=16,
                        tie_word_embeddings=True),
}  # fmt: skip


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Folders saved by transformers' own ``save_pretrained`` (norm weights and biases randomised
    too), with transformers' float32 logits without and with the padding mask."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(22)
    out = {}
    for name, kwargs in HF_SPECS.items():
        config = getattr(transformers, name)(initializer_range=0.3, **kwargs)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if pname.endswith("bias") or "norm" in pname or ".ln_" in pname:
                    param.add_(0.2 * torch.randn_like(param))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = folder, {masked: _torch_logits(model, masked) for masked in (False, True)}
    return out


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("name", list(HF_SPECS))
def test_transformers_saved_folders(hf_folders, name, n_workers):
    """Our float32 model on 3 simulated devices vs transformers float32: max abs 1e-4."""
    folder, expected = hf_folders[name]
    model = load(folder, n_workers, ("simulated", 3), dtype="float32")
    assert float(expected[False].std()) > 0.3  # non-trivial logits
    for masked in (False, True):
        got = logits_of(model, masked)
        assert got.dtype == np.float32
        assert max_error(got, expected[masked], masked) <= 1e-4


# --- padding, half precision, sequence parallelism -------------------------------------------------

PAD_CASES = [
    ("gpt2_tied", 3, 8),
    ("llama_bias_linear", 5, 64),
    ("qwen2_kv1", 8, 8),
    ("llama3_tied_head_dim", 2, 64),
]


@pytest.mark.parametrize("backend", [("numpy", None), ("simulated", 3)], ids=["numpy", "sim3"])
@pytest.mark.parametrize("name, n_workers, pad", PAD_CASES)
def test_pad_to_multiple_of(folders, name, n_workers, pad, backend):
    """Padded vocabulary shards (the blocks hold more than V columns) never reach the logits."""
    model = load(folders[name], n_workers, backend, pad_to_multiple_of=pad)
    vocab = SPECS[name]["vocab_size"]
    assert model.embed_tokens.layout.padded and sum(model.embed_tokens.layout.capacities) % pad == 0
    if not SPECS[name]["tie"]:
        assert model.lm_head.layout.padded
    logits = model(IDS)
    assert sum(block.shape[-1] for block in logits.blocks.values()) > vocab  # padding in the blocks
    assert logits.shape == (BATCH, SEQ, vocab) and np.asarray(logits).shape == (BATCH, SEQ, vocab)
    assert max_error(np.asarray(logits), reference(folders, name, False), False) <= TOL64
    assert max_error(logits_of(model, True), reference(folders, name, True), True) <= TOL64


@pytest.mark.parametrize("n_workers", [1, 3, 8])
@pytest.mark.parametrize("name", NAMES)
def test_float16(folders, name, n_workers):
    """float16 weights and compute on 3 simulated devices: finite, within 1e-2 x max|logit| of float64."""
    model = load(folders[name], n_workers, ("simulated", 3), dtype="float16")
    for masked in (False, True):
        got = logits_of(model, masked)
        expected = reference(folders, name, masked)
        assert got.dtype == np.float16 and np.isfinite(got).all()
        assert max_error(got, expected, masked) <= TOL16 * float(np.abs(expected).max())


@pytest.mark.parametrize("backend", [("numpy", None), ("simulated", 3)], ids=["numpy", "sim3"])
@pytest.mark.parametrize("n_workers", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_sequence_parallel(folders, name, n_workers, backend):
    """With sequence_parallel the residual stream is split along the 7 positions (uneven over 2 and 3
    workers) and the logits equal the plain forward's to 1e-12."""
    plain = load(folders[name], n_workers, backend)
    sp = load(folders[name], n_workers, backend, sequence_parallel=True)
    placement = sp.embed_tokens(IDS).placement
    assert isinstance(placement, Split) and placement.axis == 1, placement
    for masked in (False, True):
        expected = logits_of(plain, masked)
        assert max_error(logits_of(sp, masked), expected, masked) <= 1e-12
