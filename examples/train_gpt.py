"""Train a small GPT, tensor-parallel, on real text that every Python install carries.

The model is GPT-2's shape at a small size: token and position embeddings,
pre-norm causal ``ParallelTransformerLayer`` s, a final LayerNorm, and an
output head tied to the token embedding (``TiedLMHead``), trained with
dropout, global-norm gradient clipping and Adam; ``--dtype float16`` computes
in float16 with float32 master weights and dynamic loss scaling
(``GradScaler``); ``--sequence-parallel`` keeps the activations between the
tensor-parallel regions split along the sequence.

The text is the documentation of Python's standard library, as the modules'
own docstrings (``pydoc``'s source): several hundred kilobytes of English prose
written by people, present offline on every machine with Python, read at the
character level.

    python examples/train_gpt.py --workers 1 2 4 --steps 100
    python examples/train_gpt.py --workers 4 --dtype float16 --sequence-parallel
    python examples/train_gpt.py --workers 1 2 4 --torch --plot curves.png   # PyTorch twin and a plot
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
import time
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from tp_gpu import (
    Adam,
    Dropout,
    GradScaler,
    LayerNorm,
    Module,
    ParallelEmbedding,
    ParallelTransformerLayer,
    Sequential,
    Tensor,
    TensorParallelConfig,
    TensorParallelError,
    TiedLMHead,
    VocabParallelCrossEntropy,
    clip_grad_norm,
)

#: Standard-library modules whose docstrings make the corpus (a fixed list, so it does not change
#: with what else is installed).
CORPUS_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fractions functools heapq hashlib html http inspect io itertools json "
    "logging math mimetypes operator os pathlib pickle platform pprint queue random re sched secrets "
    "shutil socket sqlite3 statistics string struct subprocess tarfile tempfile textwrap threading time "
    "timeit tokenize traceback typing unittest urllib uuid warnings weakref zipfile zlib"
).split()


def load_corpus() -> str:
    """The docstrings of :data:`CORPUS_MODULES` and of their public functions and classes, joined."""
    texts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CORPUS_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            texts.append(module.__doc__ or "")
            for attr in sorted(vars(module)):
                value = getattr(module, attr)
                if (
                    not attr.startswith("_")
                    and callable(value)
                    and getattr(value, "__module__", None) == name
                ):
                    texts.append(value.__doc__ or "")
    return "\n\n".join(t.strip() for t in texts if t and t.strip())


@dataclasses.dataclass
class GPTConfig:
    vocab: int  # characters in the corpus
    seq_len: int = 64  # context length
    hidden: int = 64  # model width
    n_heads: int = 4  # attention heads (whole heads per worker)
    n_layers: int = 2  # transformer layers
    dropout: float = 0.1  # after the embeddings


class TinyGPT(Module):
    """``wte`` + ``wpe`` -> dropout -> pre-norm causal transformer layers -> ``ln_f`` -> tied head."""

    def __init__(self, gpt: GPTConfig, config: TensorParallelConfig, seed: int = 0) -> None:
        super().__init__()
        self.wte = ParallelEmbedding(gpt.vocab, gpt.hidden, config, seed=seed)
        self.wpe = ParallelEmbedding(gpt.seq_len, gpt.hidden, config, seed=seed + 1)
        self.drop = Dropout(gpt.dropout, config, seed=seed + 2)
        layers = [
            ParallelTransformerLayer(
                gpt.hidden,
                gpt.n_heads,
                4 * gpt.hidden,
                config,
                seed=seed + 10 * (i + 1),
                pre_norm=True,
                causal=True,
                activation="gelu_tanh",
                eps=1e-5,
            )
            for i in range(gpt.n_layers)
        ]
        self.blocks = Sequential(*layers)
        self.ln_f = LayerNorm(gpt.hidden, config, eps=1e-5)
        self.head = TiedLMHead(self.wte)  # logits = h wte^T, split on the vocabulary

    def forward(self, ids: np.ndarray) -> Tensor:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)  # (B, S)
        h = self.wte(ids) + self.wpe(positions)  # (B, S, hidden)
        return self.head(self.ln_f(self.blocks(self.drop(h))))  # (B, S, vocab), split on the vocabulary


def batches(
    data: np.ndarray, seq_len: int, batch: int, seed: int, step: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Random windows of the corpus, the same for every worker count: ``(inputs, next characters)``."""
    starts = np.random.default_rng([seed, step]).integers(0, len(data) - seq_len - 1, size=batch)
    windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return windows[:, :-1], windows[:, 1:]


def train(
    data: np.ndarray, gpt: GPTConfig, config: TensorParallelConfig, args: argparse.Namespace
) -> Dict[str, Any]:
    """Train for ``args.steps`` steps; return the losses and the seconds per step."""
    model = TinyGPT(gpt, config, seed=args.seed)
    optimizer = Adam(model.parameters(), lr=args.lr)
    scaler = GradScaler(enabled=config.dtype == "float16")
    loss_fn = VocabParallelCrossEntropy()
    losses, times = [], []
    for step in range(args.steps):
        inputs, targets = batches(data, gpt.seq_len, args.batch, args.seed, step)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        scaler.scale(loss).backward()
        losses.append(float(loss))
        scaler.unscale_(optimizer)
        clip_grad_norm(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        times.append(time.perf_counter() - start)
    return {"losses": losses, "seconds_per_step": float(np.median(times[1:] or times))}


#: The optional libraries an option needs: option -> (module, pip command).
OPTIONAL_DEPENDENCIES = {
    "torch": ("torch", "pip install torch"),
    "plot": ("matplotlib", "pip install matplotlib"),
}


def missing_dependencies(args: argparse.Namespace) -> list[str]:
    """One line per optional library that a chosen option needs and that is not installed.

    Checked before any training, so a missing library costs no wasted run.
    """
    lines = []
    for option, (module, command) in OPTIONAL_DEPENDENCIES.items():
        if getattr(args, option) and importlib.util.find_spec(module) is None:
            lines.append(f"--{option} needs {module}, which is not installed: {command}")
    return lines


BACKEND_HELP = "default: auto ($TP_GPU_BACKEND, else CuPy with a GPU, else NumPy)"


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts to train with"
    )
    parser.add_argument(
        "--backend",
        choices=["numpy", "cupy", "simulated"],
        default=None,
        help=BACKEND_HELP,
    )
    parser.add_argument("--devices", type=int, default=None, help="device count (cupy, simulated)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16"], help="compute dtype"
    )
    parser.add_argument(
        "--sequence-parallel", action="store_true", help="split the activations along the sequence"
    )
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient norm limit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and dropout")
    parser.add_argument("--torch", action="store_true", help="also train a PyTorch twin (needs torch)")
    parser.add_argument("--plot", default=None, help="write the loss curves to this PNG (needs matplotlib)")
    parser.add_argument("--json", default=None, help="write the losses and timings to this JSON file")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = missing_dependencies(args)
    if missing:
        print("\n".join(f"train_gpt.py: error: {line}" for line in missing), file=sys.stderr)
        return 2
    text = load_corpus()
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text], dtype=np.int64)
    gpt = GPTConfig(vocab=len(chars))
    print(f"corpus: {len(text):,} characters of standard-library docstrings, {len(chars)} distinct")
    results: Dict[str, Any] = {"gpt": dataclasses.asdict(gpt), "args": vars(args), "runs": {}}
    try:
        for p in args.workers:
            extra = {"sequence_parallel": True} if args.sequence_parallel else {}
            config = TensorParallelConfig(
                n_workers=p, backend=args.backend, devices=args.devices, dtype=args.dtype, **extra
            )
            run = train(data, gpt, config, args)
            results["runs"][f"tp_gpu p={p}"] = run
            print(
                f"p={p}: loss {run['losses'][0]:.4f} -> {np.mean(run['losses'][-10:]):.4f}, "
                f"{1.0 / run['seconds_per_step']:.2f} steps/s"
            )
    except TensorParallelError as exc:
        print(f"train_gpt.py: error: {exc}", file=sys.stderr)
        return 2
    if args.torch:
        from gpt_torch_twin import train_torch  # examples/gpt_torch_twin.py

        run = train_torch(data, gpt, args)
        results["runs"]["torch"] = run
        print(
            f"torch: loss {run['losses'][0]:.4f} -> {np.mean(run['losses'][-10:]):.4f}, "
            f"{1.0 / run['seconds_per_step']:.2f} steps/s"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.plot:
        plot(results, args.plot)
    finals = [np.mean(r["losses"][-10:]) for r in results["runs"].values()]
    return 0 if all(np.isfinite(finals)) else 1


def plot(results: Dict[str, Any], path: str) -> None:
    """The loss curves of every run, overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for i, (name, run) in enumerate(results["runs"].items()):
        ax.plot(run["losses"], styles[i % len(styles)], label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title("TinyGPT on standard-library docstrings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
