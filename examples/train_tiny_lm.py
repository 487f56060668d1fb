"""Train a tiny tensor-parallel language model on a synthetic repeating pattern.

The model is ``ParallelEmbedding -> ParallelMLP (residual) -> output projection
-> VocabParallelCrossEntropy``:

    e = E[ids]                      (batch, seq, dim)        vocab-parallel embedding
    h = e + MLP(e)                  (batch, seq, dim)        column -> GELU -> row
    Z = h W_out                     (batch, seq, vocab)      column-parallel, kept split on vocab
    loss = cross_entropy(Z, next)                            never gathers Z

The data is a fixed random cycle over the vocabulary, so the next token is a
function of the current one and the loss can fall towards zero.

    python examples/train_tiny_lm.py --workers 4 --steps 200
    python examples/train_tiny_lm.py --backend simulated --devices 3 --workers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from tp_gpu import (
    Adam,
    ColumnParallelLinear,
    Module,
    ParallelEmbedding,
    ParallelMLP,
    Residual,
    Sequential,
    TensorParallelConfig,
    TensorParallelError,
    VocabParallelCrossEntropy,
)


def make_batch(vocab: int, batch: int, seq_len: int, seed: int, step: int) -> Tuple[np.ndarray, np.ndarray]:
    """Windows of the random cycle fixed by ``seed``, starting at random places chosen by ``step``.

    Returns ``(inputs, next tokens)``, each ``(batch, seq_len)``.
    """
    cycle = np.random.default_rng(seed).permutation(vocab)
    starts = np.random.default_rng([seed, step]).integers(0, vocab, size=batch)
    positions = (starts[:, None] + np.arange(seq_len + 1)[None, :]) % vocab
    tokens = cycle[positions]
    return tokens[:, :-1], tokens[:, 1:]


class TinyLM(Module):
    """Embedding, a residual parallel MLP and a vocab-parallel output projection, then the loss.

    ``body`` is a Sequential; its parameters are named ``body.0.weight``
    (embedding), ``body.1.inner.fc1.weight`` ... (the MLP inside the residual)
    and ``body.2.weight`` / ``body.2.bias`` (the head).
    """

    def __init__(
        self, vocab: int, dim: int, hidden: int, config: TensorParallelConfig, seed: int = 0
    ) -> None:
        super().__init__()
        head_config = dataclasses.replace(config, gather_output=False)
        self.body = Sequential(
            ParallelEmbedding(vocab, dim, config, seed=seed),
            Residual(
                ParallelMLP(dim, hidden, dim, config, seed=seed + 1, activation="gelu_tanh")
            ),  # seeds +1, +2
            ColumnParallelLinear(
                dim, vocab, head_config, seed=seed + 3
            ),  # logits stay split on the vocabulary
        )
        self.loss_fn = VocabParallelCrossEntropy()

    def dense_weights(self) -> Dict[str, np.ndarray]:
        """The logical weights, for building a dense twin."""
        state = self.state_dict()
        names = {"body.0.weight": "embed", "body.2.weight": "head.weight", "body.2.bias": "head.bias"}
        return {names.get(key, key.replace("body.1.inner.", "")): value for key, value in state.items()}

    def loss_and_backward(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Forward, then backward through the tape; returns the mean loss."""
        loss = self.loss_fn(self.body(inputs), targets)
        loss.backward()
        return float(loss)


def train(
    n_workers: int = 2,
    steps: int = 100,
    vocab: int = 32,
    dim: int = 16,
    hidden: int = 32,
    batch: int = 8,
    seq_len: int = 12,
    lr: float = 1e-2,
    seed: int = 0,
    backend: Optional[str] = None,
    devices=None,
    dtype: str = "float32",
    progress: bool = False,
) -> List[float]:
    """Train for ``steps`` Adam steps on fresh batches; return the loss of every step."""
    config = TensorParallelConfig(n_workers=n_workers, backend=backend, devices=devices, dtype=dtype)
    model = TinyLM(vocab, dim, hidden, config, seed=seed)
    if progress:
        embed = model.body[0]
        print(f"backend {embed.backend.name}, devices {embed.devices}, {n_workers} workers, {dtype}")
    optimizer = Adam(model.parameters(), lr=lr)
    bar = _progress_bar(steps) if progress else None
    losses = []
    for step in range(steps):
        inputs, targets = make_batch(vocab, batch, seq_len, seed, step)
        optimizer.zero_grad()
        losses.append(model.loss_and_backward(inputs, targets))
        optimizer.step()
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)  # drawn with the next update
            bar.update()
        elif progress and (step % max(1, steps // 20) == 0 or step == steps - 1):
            print(f"step {step + 1:4d}/{steps}  loss {losses[-1]:.4f}", flush=True)
    if bar is not None:
        bar.close()
    return losses


def _progress_bar(steps: int):
    """A tqdm bar on a terminal when tqdm is installed (the ``bench`` extra), else None (plain prints).

    The bar redraws at most once a second, and never into a log file or a pipe,
    where every redraw would be one more line.
    """
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="training", unit="step", mininterval=1.0)


BACKEND_HELP = "default: auto ($TP_GPU_BACKEND, else CuPy with a GPU, else NumPy)"


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    parser.add_argument("--workers", type=int, default=2, help="tensor-parallel workers")
    parser.add_argument(
        "--backend",
        choices=["numpy", "cupy", "simulated"],
        default=None,
        help=BACKEND_HELP,
    )
    parser.add_argument("--devices", type=int, default=None, help="device count (cupy, simulated)")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps")
    parser.add_argument(
        "--vocab", type=int, default=32, help="vocabulary size (any size splits over any --workers)"
    )
    parser.add_argument("--dim", type=int, default=16, help="embedding width")
    parser.add_argument("--hidden", type=int, default=32, help="MLP hidden width")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "float16"], help="compute dtype"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    args = parser.parse_args(argv)
    try:
        losses = train(
            n_workers=args.workers,
            steps=args.steps,
            vocab=args.vocab,
            dim=args.dim,
            hidden=args.hidden,
            lr=args.lr,
            seed=args.seed,
            backend=args.backend,
            devices=args.devices,
            dtype=args.dtype,
            progress=True,
        )
    except TensorParallelError as exc:  # a bad option: one line, not a traceback
        print(f"train_tiny_lm.py: error: {exc}", file=sys.stderr)
        return 2
    first, last = losses[0], float(np.mean(losses[-10:]))
    guess = np.log(args.vocab)
    print(f"loss: first step {first:.4f}, mean of the last 10 steps {last:.4f} (uniform guess: {guess:.4f})")
    return 0 if last < 0.5 * first else 1


if __name__ == "__main__":
    raise SystemExit(main())
