"""Training of the decoder models: SGD steps of a Llama-shaped model (grouped-query, untied) equal
transformers' ``LlamaForCausalLM`` with ``torch.optim.SGD`` in float64, loss by loss and weight by
weight, at 1 to 4 workers (key-value projections replicated from 3 on) and with sequence parallelism;
and the gradient of every parameter of tiny GPT-2, Llama and Qwen2 models against central finite
differences of the float64 loss.

transformers computes three things in float32 even in a float64 model: RMSNorm's statistics, the
rotary angles (from a float32 ``inv_freq``) and the eager softmax. :func:`float64_transformers`
patches the first two to run in float64 (the same formulas, without the casts; ``sdpa`` attention
already computes in the inputs' dtype), so the comparison holds to rounding (1e-10 relative); stock
transformers agrees to float32 rounding (1e-5), checked as well.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import tp_gpu
from tp_gpu import SGD, TensorParallelConfig, VocabParallelCrossEntropy
from tp_gpu.autograd import no_grad
from tp_gpu.models.decoder import DecoderForCausalLM
from tp_gpu.models.decoder_config import DecoderConfig
from tp_gpu.placements import Replicated

LLAMA_SIZES = dict(
    vocab_size=37, hidden_size=24, intermediate_size=20, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)  # fmt: skip
STEPS, LR, BATCH, SEQ = 3, 0.05, 3, 9  # SEQ tokens per row: SEQ - 1 inputs and next-token targets


@contextlib.contextmanager
def float64_transformers():
    """Llama's and Qwen2's RMSNorm and rotary embedding computed in the model's dtype (float64):
    ``w * x / sqrt(mean(x^2) + eps)`` and ``cos/sin(pos * theta^(-2j/d))`` with ``inv_freq`` rebuilt in
    float64 (transformers builds it in float32); default rope only."""
    import torch
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        dim = 2 * self.inv_freq.shape[0]
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        freqs = position_ids[..., None].to(torch.float64) * inv_freq  # (B, S, d / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, d)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    with contextlib.ExitStack() as stack:
        for module, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
            for name, forward in (("RMSNorm", rms_norm), ("RotaryEmbedding", rotary)):
                cls = getattr(module, prefix + name)
                stack.enter_context(_patched(cls, "forward", forward))
        yield


@contextlib.contextmanager
def one_torch_thread(torch):
    """PyTorch on one thread while the tiny models run: on a busy two-core machine its threads wait on
    each other, and a 24 x 24 float64 product took 16 ms instead of 50 us."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def batches(vocab, steps=STEPS, seed=5):
    """``(inputs, targets)`` per step: random rows of SEQ tokens, targets the next token."""
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, vocab, (BATCH, SEQ)) for _ in range(steps)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def to_hf_names(state):
    """Our Llama state dict (``in_out`` matrices, gate and up interleaved) under transformers' names."""
    out = {
        "model.embed_tokens.weight": state["embed_tokens.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["lm_head.weight"].T,
    }
    for i in range(LLAMA_SIZES["num_hidden_layers"]):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "input_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "post_norm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{theirs}self_attn.{proj}.weight"] = state[f"{ours}attention.{proj}.weight"].T
        gate_up = state[ours + "mlp.gate_up.weight"]  # (H, 2I): gate_0, up_0, gate_1, ...
        out[theirs + "mlp.gate_proj.weight"] = gate_up[:, 0::2].T
        out[theirs + "mlp.up_proj.weight"] = gate_up[:, 1::2].T
        out[theirs + "mlp.down_proj.weight"] = state[ours + "mlp.down.weight"].T
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A transformers Llama with random float32 weights (matrices ``N(0, 0.5)``, norms ``1 + N(0, 0.2)``)
    saved in a folder, then made float64 (the same values), and its SGD run: per step loss and, after
    the last, every weight; once with RMSNorm and rope in float64, once stock."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with one_torch_thread(torch):
        yield _transformers_runs(torch, transformers, tmp_path_factory.mktemp("llama"))


def _transformers_runs(torch, transformers, folder):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(attn_implementation="sdpa", **LLAMA_SIZES)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    runs = {}
    for name, context in (("float64", float64_transformers), ("stock", contextlib.nullcontext)):
        model.load_state_dict(initial)
        model = model.double().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        losses = []
        with context():
            for inputs, targets in batches(LLAMA_SIZES["vocab_size"]):
                optimizer.zero_grad()
                logits = model(input_ids=torch.tensor(inputs)).logits  # (B, S, V)
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1)
                )
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        runs[name] = (np.array(losses), weights)
    return folder, runs


def train(folder, n_workers, backend, devices, **kwargs):
    """Our SGD run from ``folder``: per-step losses and the model after the last step."""
    from tp_gpu.models.decoder_loading import AutoModelForCausalLM

    pad = kwargs.pop("pad_to_multiple_of", None)
    config = TensorParallelConfig(
        n_workers=n_workers, backend=backend, devices=devices, dtype="float64", **kwargs
    )
    model = AutoModelForCausalLM.from_pretrained(folder, config, pad_to_multiple_of=pad).train()
    optimizer, loss_fn, losses = SGD(model.parameters(), lr=LR), VocabParallelCrossEntropy(), []
    for inputs, targets in batches(LLAMA_SIZES["vocab_size"]):
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)  # mean over the B (S - 1) next-token targets
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return np.array(losses), model


TRAINING_RUNS = [
    pytest.param(1, "numpy", None, {}, id="p1-numpy"),
    pytest.param(2, "simulated", 2, {}, id="p2-sim2-kv-split"),
    pytest.param(3, "simulated", 3, {"pad_to_multiple_of": 8}, id="p3-sim3-kv-replicated-padded"),
    pytest.param(4, "simulated", 3, {}, id="p4-sim3-kv-replicated"),
    pytest.param(2, "simulated", 2, {"sequence_parallel": True}, id="p2-sim2-sequence-parallel"),
]


@pytest.mark.parametrize("n_workers, backend, devices, kwargs", TRAINING_RUNS)
def test_sgd_steps_equal_transformers(llama, n_workers, backend, devices, kwargs):
    folder, runs = llama
    expected_losses, expected_weights = runs["float64"]
    losses, model = train(folder, n_workers, backend, devices, **kwargs)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-10)
    got = to_hf_names(model.state_dict())
    assert got.keys() == expected_weights.keys()
    for name, value in got.items():
        np.testing.assert_allclose(value, expected_weights[name], rtol=0, atol=1e-10, err_msg=name)
    replicated = [(n, p) for n, p in model.named_parameters() if isinstance(p.placement, Replicated)]
    assert bool(replicated) == (n_workers > LLAMA_SIZES["num_key_value_heads"])
    for name, p in replicated:  # every device's copy took the same steps
        copies = [tp_gpu.to_numpy(block) for block in p.blocks.values()]
        assert len(copies) == min(n_workers, devices or 1)
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0], err_msg=name)


def test_sgd_steps_equal_stock_transformers_to_float32_rounding(llama):
    """Without the patch transformers rounds RMSNorm and rope to float32: agreement to ~1e-6."""
    folder, runs = llama
    expected_losses, expected_weights = runs["stock"]
    losses, model = train(folder, 3, "simulated", 3)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for name, value in to_hf_names(model.state_dict()).items():
        np.testing.assert_allclose(value, expected_weights[name], rtol=0, atol=1e-5, err_msg=name)
    assert np.abs(losses - runs["float64"][0]).max() < 1e-12 < np.abs(losses - expected_losses).max()


# ---------------------------------------------------------------------- finite differences (no torch)

TINY = {
    "gpt2": dict(model_type="gpt2", vocab_size=17, n_embd=12, n_layer=2, n_head=3, n_positions=16),
    "llama": dict(
        model_type="llama", vocab_size=17, hidden_size=12, intermediate_size=10, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=17, hidden_size=16, intermediate_size=10, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=True,
    ),
}  # fmt: skip


def random_model(raw, n_workers=1, backend="numpy", devices=None, seed=0, pad=None, **kwargs):
    """A decoder of the ``config.json`` mapping ``raw`` with random logical weights keyed by ``seed``,
    the same at every worker count: matrices ``N(0, 0.5)``, norm weights ``1 + N(0, 0.1)``, biases
    ``N(0, 0.1)``."""
    config = TensorParallelConfig(
        n_workers=n_workers, backend=backend, devices=devices, dtype="float64", **kwargs
    )
    model = DecoderForCausalLM(DecoderConfig.from_dict(raw), config, pad_to_multiple_of=pad)
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in sorted(model.state_dict().items()):
        norm_weight = "norm" in name and name.endswith("weight")
        scale = 0.1 if value.ndim == 1 else 0.5
        state[name] = (1.0 if norm_weight else 0.0) + rng.normal(0, scale, value.shape)
    model.load_state_dict(state)
    return model


FD_RUNS = [
    pytest.param("gpt2", 2, "numpy", None, {}, id="gpt2-p2-numpy"),
    pytest.param("llama", 3, "simulated", 3, {}, id="llama-p3-sim3-kv-replicated"),
    pytest.param("llama", 2, "simulated", 2, {"sequence_parallel": True}, id="llama-p2-sequence-parallel"),
    pytest.param("qwen2", 4, "simulated", 2, {"pad": 8}, id="qwen2-p4-sim2-padded"),
]


@pytest.mark.parametrize("kind, n_workers, backend, devices, kwargs", FD_RUNS)
def test_every_gradient_equals_finite_differences(kind, n_workers, backend, devices, kwargs):
    """For each parameter ``W`` with tape gradient ``G``, along a random unit direction ``D`` (every entry
    at once) and two random single entries: ``<G, D>`` equals the central difference
    ``f(e) = (L(W + e D) - L(W - e D)) / 2e`` extrapolated to e = 0 (Richardson: ``(4 f(e/2) - f(e)) / 3``,
    truncation O(e^4) ~ 1e-16 at e = 1e-4; rounding ~1e-16 |L| / e ~ 1e-11), within 1e-8 relative + 1e-10."""
    model = random_model(TINY[kind], n_workers, backend, devices, seed=len(kind), **kwargs)
    (inputs, targets), loss_fn = batches(TINY[kind]["vocab_size"], steps=1)[0], VocabParallelCrossEntropy()
    loss_fn(model(inputs), targets).backward()
    grads, state = model.grads(), model.state_dict()
    assert grads.keys() == state.keys()

    def loss_at(name, weight):
        model.load_state_dict({name: weight}, strict=False)
        with no_grad():
            return float(loss_fn(model(inputs), targets))

    def central(name, w, d, e):
        return (loss_at(name, w + e * d) - loss_at(name, w - e * d)) / (2 * e)

    rng = np.random.default_rng(1)
    for name, w in state.items():
        direction = rng.standard_normal(w.shape)
        units = []
        for _ in range(2):
            unit = np.zeros(w.shape)
            unit[tuple(rng.integers(0, n) for n in w.shape)] = 1.0
            units.append(unit)
        for d in [direction / np.linalg.norm(direction), *units]:
            numeric = (4 * central(name, w, d, 5e-5) - central(name, w, d, 1e-4)) / 3
            analytic = float(np.sum(grads[name] * d))
            assert abs(analytic - numeric) <= 1e-10 + 1e-8 * abs(numeric), (name, analytic, numeric)
        loss_at(name, w)  # restore
        assert np.abs(grads[name]).max() > 0, name
