"""Text generation against transformers eager on one CPU: ``python -m benchmarks.generation``.

Two decoder shapes, built by transformers from a config with random weights (seeded), float32,
``attn_implementation="eager"``, saved with ``save_pretrained`` to a temporary folder and loaded from it
by ``tp_gpu.models.AutoModelForCausalLM.from_pretrained(folder, TensorParallelConfig(n_workers=p,
backend="numpy", dtype="float32"))`` at each ``--workers`` count:

* ``llama-small``: Llama, hidden 768, 12 layers, 12 query and 4 key-value heads, MLP 2048, vocabulary
  32,000, head untied (124.7M parameters, 49M of them in the embedding and the head);
* ``gpt2-small``: GPT-2 small, hidden 768, 12 layers, 12 heads, MLP 3072, vocabulary 50,257, head tied.

The prompt is ``--prompt`` (128) random ids per row (seeded), at each ``--batch`` (1 and 8), no
padding. Each side makes ``1 + --new-tokens`` greedy tokens, end-of-sequence disabled: one prefill
pass over the prompt, then ``--new-tokens`` (128) one-token decoding steps, each fed the token before:

* **prefill** (time to the first token): tp_gpu: the first step of ``model.stream(ids,
  max_new_tokens=1 + N, eos_token_id=[])`` (its checks, the cache's allocation, the pass over the
  prompt, the pick); transformers: ``model(input_ids=ids, use_cache=True, logits_to_keep=1)`` and
  ``logits[:, -1].argmax(-1)`` (the cache made in that call, as ``generate`` does);
* **decode**: tp_gpu: the stream's next ``N`` steps; transformers: ``N`` times ``model(input_ids=
  token[:, None], cache=cache, use_cache=True, logits_to_keep=1)`` and ``argmax``, under
  ``torch.no_grad()`` as ``generate`` runs (a loop without ``generate``'s logits processors and
  stopping criteria: the leaner of the two; before timing it is checked to give ``generate``'s
  tokens). Tokens per second: ``B * 128 / prefill`` and ``B * N / decode``.

Before anything is timed every side's tokens must equal transformers' ``generate(max_new_tokens=1 + N,
min_new_tokens=1 + N, do_sample=False)`` on the same prompt; a side that disagrees stops the run
(:class:`GenerationMismatch`). Then the sides (tp_gpu at each worker count, transformers) run a whole
generation each in the same shuffled rounds (:mod:`.harness`), each phase lapped (:mod:`.phases`).
Last, instrumented runs of each side (the fastest of ``--profile-runs``) split the time per token into
GEMMs, attention, norms and the rest (:mod:`.generation_profile`). Targets and tables:
:mod:`.generation_report`.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OPENBLAS_NUM_THREADS=1 \\
        python -m benchmarks.generation --threads 1        # 2 vCPUs: about 10 minutes
    python -m benchmarks.generation --quick                # tiny models, 16 + 8 tokens: seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tp_gpu import TensorParallelConfig
from tp_gpu.backends import get_backend

from . import generation_profile, harness, machine, skeleton
from .generation_report import REPORT, TORCH, ours
from .phases import PhaseClock, time_phases
from .report import Record, file_stem, sides_record
from .skeleton import option, positive_int

PHASES = ("prefill", "decode")


class GenerationMismatch(RuntimeError):
    """A side's greedy tokens differ from transformers': its timing would compare different work."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder shape: Llama (RMSNorm, rotary, SwiGLU, grouped-query) or GPT-2 (LayerNorm, learned
    positions, GELU, tied head)."""

    kind: str  # "llama" | "gpt2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    positions: int

    def build(self, torch: Any) -> Any:
        """transformers' model of this shape, random weights seeded by 0, float32, eager, eval mode."""
        import transformers

        torch.manual_seed(0)
        model: Any
        if self.kind == "llama":
            llama: dict[str, Any] = dict(
                hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                num_key_value_heads=self.kv_heads, intermediate_size=self.mlp, vocab_size=self.vocab,
                max_position_embeddings=self.positions, tie_word_embeddings=False,
                attn_implementation="eager",
            )  # fmt: skip
            config = transformers.LlamaConfig(**llama)
            model = transformers.LlamaForCausalLM(config)
        else:
            gpt2: dict[str, Any] = dict(
                n_embd=self.hidden, n_layer=self.layers, n_head=self.heads, n_inner=self.mlp,
                vocab_size=self.vocab, n_positions=self.positions, attn_implementation="eager",
            )  # fmt: skip
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2))
        assert model.config._attn_implementation == "eager"
        return model.float().eval()


MODELS = {
    "llama-small": ModelSpec("llama", 768, 12, 12, 4, 2048, 32_000, 2048),
    "gpt2-small": ModelSpec("gpt2", 768, 12, 12, 12, 3072, 50_257, 1024),
    "llama-tiny": ModelSpec("llama", 64, 2, 4, 2, 96, 512, 128),
    "gpt2-tiny": ModelSpec("gpt2", 64, 2, 4, 4, 256, 512, 128),
}

# --------------------------------------------------------------------------- the sides


class OursSide:
    """tp_gpu's ``stream``: the first step is the prefill, the next ``new`` the decoding steps."""

    def __init__(self, model: Any, ids: np.ndarray, new: int) -> None:
        self.model, self.ids, self.new = model, ids, new
        self.clock = PhaseClock()
        self.tokens = np.zeros((ids.shape[0], 0), dtype=np.int64)

    def run(self) -> None:
        clock, steps = self.clock, []
        clock.start()
        for tokens in self.model.stream(self.ids, max_new_tokens=1 + self.new, eos_token_id=[]):
            steps.append(tokens)  # (B,)
            if len(steps) == 1:
                clock.lap("prefill")
        clock.lap("decode")
        self.tokens = np.stack(steps, axis=1)  # (B, 1 + new)


class TorchSide:
    """transformers' forward with its cache, greedy: one prefill pass, then ``new`` one-token steps."""

    def __init__(self, model: Any, ids: np.ndarray, new: int, torch: Any) -> None:
        self.model, self.new, self.torch = model, new, torch
        self.ids = torch.from_numpy(ids)  # (B, S) int64
        self.clock = PhaseClock()
        self.tokens = np.zeros((ids.shape[0], 0), dtype=np.int64)

    def run(self) -> None:
        model, clock = self.model, self.clock
        with self.torch.no_grad():
            clock.start()
            out = model(input_ids=self.ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1)  # (B,)
            steps = [token]
            clock.lap("prefill")
            cache = out.cache
            for _ in range(self.new):
                out = model(input_ids=token[:, None], cache=cache, use_cache=True, logits_to_keep=1)
                cache, token = out.cache, out.logits[:, -1].argmax(-1)  # (B,)
                steps.append(token)
            clock.lap("decode")
        self.tokens = self.torch.stack(steps, dim=1).numpy()  # (B, 1 + new)

    def generate(self) -> np.ndarray:
        """transformers' own ``generate``, greedy, ``1 + new`` tokens whatever they are."""
        n = 1 + self.new
        with self.torch.no_grad():
            out = self.model.generate(
                self.ids, attention_mask=self.torch.ones_like(self.ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return out[:, self.ids.shape[1] :].numpy()  # (B, 1 + new)


Side = OursSide | TorchSide


def prompt(vocab: int, batch: int, length: int) -> np.ndarray:
    """``(batch, length)`` random ids of ``vocab``, the same for every side (seeded by 0)."""
    return np.random.default_rng(0).integers(0, vocab, size=(batch, length), dtype=np.int64)


def check_sides(sides: dict[str, Side], label: str) -> dict[str, Any]:
    """Run every side once; each must give transformers' ``generate`` tokens, else GenerationMismatch."""
    reference = sides[TORCH]
    assert isinstance(reference, TorchSide)
    expected = reference.generate()  # (B, 1 + new)
    for name, side in sides.items():
        side.run()
        if side.tokens.shape != expected.shape or not np.array_equal(side.tokens, expected):
            first = "shape"
            if side.tokens.shape == expected.shape:
                row, step = (int(i) for i in np.argwhere(side.tokens != expected)[0])
                first = f"first at row {row}, step {step}"
            raise GenerationMismatch(
                f"{label}: {name}'s greedy tokens differ from transformers' generate ({first}; "
                f"got {side.tokens.shape} {side.tokens[:, :8].tolist()}..., expected {expected.shape} "
                f"{expected[:, :8].tolist()}...); a benchmark of different work is not reported"
            )
    return {"tokens_equal": True, "tokens_checked": int(expected.size), "tokens_row0": expected[0].tolist()}


# --------------------------------------------------------------------------- the program

TIMING, TIMING_QUICK = skeleton.timing_options(
    repeat=(5, 3), warmup=1, max_time=(600.0, 600.0), min_time=(0.0, 0.0), retries=(1, 0)
)
OPTIONS: skeleton.Options = {
    "--models": option(f"models, of {list(MODELS)} (default llama-small gpt2-small; --quick the tiny ones)",
                       nargs="+", choices=list(MODELS)),
    "--batch": option("batch sizes (default 1 8)", type=positive_int, nargs="+", default=[1, 8]),
    "--prompt": option("prompt tokens per row (default 128; --quick 16)", type=positive_int),
    "--new-tokens": option("decoding steps after the prefill (default 128; --quick 8)", type=positive_int),
    "--workers": skeleton.workers_option([1, 4]),
    "--threads": option("NumPy's BLAS and torch threads (default 1)", type=positive_int, default=1),
    "--profile-runs": option("instrumented runs per side, the fastest kept (default 2)", type=positive_int,
                             default=2),
    "--no-profile": option("skip the instrumented runs (the split by kind)", action="store_true"),
    "--quick": option("the tiny models, 16 + 8 tokens, 3 rounds, no retry; files *-quick.*",
                      action="store_true"),
    **TIMING,
    **skeleton.output_options(),
    "--update": option("re-time the selected (model, batch) cases into an earlier run's JSON, then redraw "
                       "its Markdown", type=Path, metavar="JSON"),
}  # fmt: skip
PROGRAM = skeleton.Program(
    prog="python -m benchmarks.generation",
    description="Time greedy generation (prefill and decoding) of tp_gpu's decoder models at several "
    "worker counts against transformers' eager models on the same CPU, threads and float32 weights.",
    options=OPTIONS,
    quick_defaults=TIMING_QUICK | {
        "models": (["llama-small", "gpt2-small"], ["llama-tiny", "gpt2-tiny"]),
        "prompt": (128, 16), "new_tokens": (128, 8),
    },
)  # fmt: skip


def setup(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """torch (required: it is the reference), threads pinned to ``--threads``, the machine record."""
    torch = machine.import_torch()
    if torch is None:
        raise SystemExit(
            "the generation benchmark compares with transformers: install torch and transformers"
        )
    import transformers

    transformers.logging.set_verbosity_error()  # generate's notes on masks and pad ids
    transformers.logging.disable_progress_bar()  # save_pretrained's
    meta = skeleton.start(get_backend("numpy"), torch, args.threads)
    meta["transformers"] = transformers.__version__
    return meta, torch


def load_models(name: str, workers: Sequence[int], torch: Any) -> tuple[Any, dict[int, Any], int]:
    """transformers' model, tp_gpu's at each worker count loaded from its saved folder, its parameters."""
    reference = MODELS[name].build(torch)
    with tempfile.TemporaryDirectory(prefix=f"tp-gpu-{name}-") as folder:
        reference.save_pretrained(folder)
        from tp_gpu.models.decoder_loading import AutoModelForCausalLM

        models = {
            p: AutoModelForCausalLM.from_pretrained(
                folder, TensorParallelConfig(n_workers=p, backend="numpy", dtype="float32")
            )
            for p in workers
        }
    return reference, models, sum(int(w.numel()) for w in reference.parameters())


def run_case(args: argparse.Namespace, name: str, batch: int, loaded: tuple, torch: Any) -> Record:
    """One model at one batch: checked, timed in shared rounds phase by phase, then instrumented."""
    reference, models, parameters = loaded
    spec, label = MODELS[name], f"{name} B={batch}"
    ids = prompt(spec.vocab, batch, args.prompt)
    sides: dict[str, Side] = {ours(p): OursSide(m, ids, args.new_tokens) for p, m in models.items()}
    sides[TORCH] = TorchSide(reference, ids, args.new_tokens, torch)
    check = check_sides(sides, label)
    fns = {n: s.run for n, s in sides.items()}
    timed, phases = time_phases(fns, {n: s.clock for n, s in sides.items()}, PHASES, skeleton.timing(args))
    fields = {
        "case": "generation", "model": name, "label": label, "spec": asdict(spec), "parameters": parameters,
        "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "dtype": "float32",
        "threads": args.threads, "check": check,
    }  # fmt: skip
    record = sides_record(fields, timed, phases)
    if not args.no_profile:
        record["breakdown"] = {
            n: generation_profile.breakdown(s, torch if n == TORCH else None, args.profile_runs)
            for n, s in sides.items()
        }
    return record


def run(args: argparse.Namespace, torch: Any, save: skeleton.Save) -> list[Record]:
    """Every model at every batch; saved after each."""
    harness.warm_up_machine()
    records: list[Record] = []
    for name in args.models:
        loaded = load_models(name, args.workers, torch)
        for batch in args.batch:
            records.append(run_case(args, name, batch, loaded, torch))
            save(records)
            print(f"{name} B={batch}: done", flush=True)
        del loaded
        gc.collect()
    return records


BENCHMARK = skeleton.Benchmark(
    program=PROGRAM, report=REPORT, setup=setup, run=run,
    stem=lambda meta, args: "generation-" + (f"t{args.threads}-" if args.threads != 1 else "")
    + file_stem(meta, args.quick),
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the generation benchmark (or ``--render``); 0 on success."""
    return skeleton.main(BENCHMARK, argv)


if __name__ == "__main__":
    sys.exit(main())
