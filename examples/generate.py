"""Generate text with a decoder LM split over tensor-parallel workers, streaming it as it is made.

With ``--model`` it loads that Hugging Face folder (GPT-2, Llama or Qwen2: ``config.json``,
``model.safetensors``, ``tokenizer.json``). Without it, it writes a tiny random-weight Llama first
(hidden 64, 2 layers, 4 query heads over 2 key-value heads) with a byte-level BPE tokenizer trained
on the fly on ``benchmarks/encode_sentences.txt``: with transformers' ``save_pretrained`` where
transformers is installed, else with NumPy and safetensors (the same weights either way). Greedy
decoding picks ``argmax_v logits[v]`` at each step; ``--sample`` draws from
``softmax(logits / temperature)`` cut to the ``top-k`` largest and to the smallest set of mass
``>= top-p``. Where transformers is installed, the greedy token ids are checked against its
``generate``::

    python examples/generate.py
    python examples/generate.py --workers 4 --backend simulated --devices 3 --prompt "A man is"
    python examples/generate.py --sample --temperature 0.8 --top-k 40 --top-p 0.9 --seed 1
    python examples/generate.py --model path/to/Qwen2.5-0.5B --workers 2 --max-new-tokens 40

``write_tiny_llama(folder)`` (importable: ``from examples.generate import write_tiny_llama`` from
the repository's root) writes the tiny folder for other uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

#: The text the tiny tokenizer is trained on.
CORPUS = Path(__file__).resolve().parents[1] / "benchmarks" / "encode_sentences.txt"

#: The tiny Llama's config.json, as transformers 5 writes it (vocab_size set from the tokenizer).
TINY_LLAMA: Dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

#: The tokenizer's special tokens (ids 0 and 1, as in TINY_LLAMA).
BOS, EOS = "<s>", "</s>"


def train_tokenizer(lines: Sequence[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``lines``, adding BOS as Llama's does.

    Byte-level: any text encodes, and a character of several UTF-8 bytes may take several tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def tiny_llama_weights(config: Dict[str, Any], seed: int = 0) -> Dict[str, np.ndarray]:
    """Random float32 weights under Llama's checkpoint names (``nn.Linear`` stored ``(out, in)``).

    Each linear ``W ~ N(0, 1 / fan_in)``, so the logits spread by about 1 and greedy picks are far
    from ties; the norms' weights ``1 + N(0, 0.1^2)``.
    """
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)  # (out, in)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights[p + "input_layernorm.weight"] = norm()
        weights[p + "post_attention_layernorm.weight"] = norm()
        for name, shape in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))):
            weights[f"{p}self_attn.{name}.weight"] = linear(*shape)
        for name, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            weights[f"{p}mlp.{name}.weight"] = linear(*shape)
    weights["model.norm.weight"] = norm()
    weights["lm_head.weight"] = linear(v, h)
    return weights


def write_tiny_llama(folder: Any, *, seed: int = 0, use_transformers: Optional[bool] = None) -> str:
    """Write a tiny random-weight Llama folder (config.json, model.safetensors, tokenizer.json).

    ``use_transformers`` None: with transformers' ``save_pretrained`` where transformers and torch
    are installed, else with NumPy and safetensors; the weights are the same either way
    (:func:`tiny_llama_weights` of ``seed``). Returns the folder's path.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = train_tokenizer(lines)
    config = dict(TINY_LLAMA, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    weights = tiny_llama_weights(config, seed)
    if use_transformers is None:
        use_transformers = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    if use_transformers:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        model = LlamaForCausalLM(LlamaConfig(**fields))
        model.load_state_dict({k: torch.from_numpy(w) for k, w in weights.items()}, strict=True)
        model.save_pretrained(folder)
    else:
        from safetensors.numpy import save_file

        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config, dtype="float32"), f, indent=2)
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    return folder


def transformers_greedy(
    folder: str, ids: np.ndarray, max_new_tokens: int, dtype: str, eos: Sequence[int]
) -> np.ndarray:
    """transformers' greedy ``generate`` of ``ids`` ``(1, S)``: the sequences ``(1, S + n)``.

    With a GenerationConfig of its own (greedy, stopping at ``eos``, as the tp_gpu model does), so a
    folder's ``generation_config.json`` (a repetition penalty, other eos ids) changes nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(eos) or None,
        pad_token_id=eos[0] if eos else None,
    )
    prompt = torch.from_numpy(ids)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
    return out.numpy()


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    parser.add_argument("--model", default=None, help="a Hugging Face folder (default: a tiny random Llama)")
    parser.add_argument("--workers", type=int, default=2, help="tensor-parallel workers")
    parser.add_argument(
        "--backend", choices=["numpy", "simulated", "cupy"], default=None, help="default: auto"
    )
    parser.add_argument("--devices", type=int, default=None, help="device count (cupy, simulated)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16"], help="compute dtype"
    )
    parser.add_argument("--prompt", default="The cat sat on the", help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--top-k", type=int, default=None, help="with --sample: keep the k likeliest")
    parser.add_argument("--top-p", type=float, default=None, help="with --sample: nucleus mass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling and of the tiny weights")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("tokenizers") is None:
        print(
            "generate.py: error: tokenizers is not installed: pip install 'tp_gpu[models]'", file=sys.stderr
        )
        return 2
    from tp_gpu import TensorParallelConfig, TensorParallelError
    from tp_gpu.models.text_generation import TextGenerator

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or write_tiny_llama(os.path.join(scratch, "tiny-llama"), seed=args.seed)
        settings: Dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
        if args.sample:
            settings.update(
                do_sample=True,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
            )
        try:
            config = TensorParallelConfig(
                n_workers=args.workers, backend=args.backend, devices=args.devices, dtype=args.dtype
            )
            generator = TextGenerator.from_pretrained(folder, config)
            how = "sampled" if args.sample else "greedy"
            print(f"{generator!r}, {args.workers} workers, {args.dtype}, {how}")
            start = time.perf_counter()
            pieces = generator.stream(args.prompt, **settings)  # checks the settings, makes token 1
            print(args.prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            seconds = time.perf_counter() - start
            print()
            ids, mask = generator.encode([args.prompt])
            ours = generator.model.generate(ids, mask, **settings)  # (1, S + n), as streamed
        except TensorParallelError as exc:
            print(f"generate.py: error: {exc}", file=sys.stderr)
            return 2
        made = ours.shape[1] - ids.shape[1]
        print(f"{made} tokens in {seconds:.3f} s: {made / seconds:.1f} tokens/s")
        if args.sample:
            print("transformers check: skipped (sampling draws other numbers than transformers')")
        elif all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
            eos = generator.model.decoder_config.eos_token_ids
            theirs = transformers_greedy(folder, ids, args.max_new_tokens, args.dtype, eos)
            same = theirs.shape == ours.shape and bool(np.array_equal(theirs, ours))
            print(f"transformers' greedy generate gives the same token ids: {same}")
            if not same:
                print(f"tp_gpu:       {ours.tolist()}\ntransformers: {theirs.tolist()}", file=sys.stderr)
                if args.dtype != "float16":  # float16 rounds otherwise than PyTorch's: a near tie may flip
                    return 1
        else:
            print("transformers check: skipped (transformers or torch is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
