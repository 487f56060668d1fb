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
from typing import Dict, List, Optional, Tuple

import numpy as np

from tp_gpu import (
    Adam,
    ColumnParallelLinear,
    ParallelEmbedding,
    ParallelMLP,
    TensorParallelConfig,
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


class TinyLM:
    """Embedding, a residual parallel MLP and a vocab-parallel output projection."""

    def __init__(self, vocab: int, dim: int, hidden: int, config: TensorParallelConfig, seed: int = 0) -> None:
        self.embed = ParallelEmbedding(vocab, dim, config=config, seed=seed)
        self.mlp = ParallelMLP(dim, hidden, dim, config, seed=seed + 1, activation="gelu_tanh")  # seeds seed+1, seed+2
        self.head = ColumnParallelLinear(dim, vocab, dataclasses.replace(config, gather_output=False), seed=seed + 3)
        self.loss_fn = VocabParallelCrossEntropy()
        self.backend = self.head.backend

    def parameters(self):
        return self.embed.parameters() + self.mlp.parameters() + self.head.parameters()

    def dense_weights(self) -> Dict[str, np.ndarray]:
        """The logical weights, for building a dense twin."""
        return {
            "embed": self.embed.full_weight(),
            "fc1.weight": self.mlp.fc1.full_weight(),
            "fc1.bias": self.mlp.fc1.full_bias(),
            "fc2.weight": self.mlp.fc2.full_weight(),
            "fc2.bias": self.mlp.fc2.full_bias(),
            "head.weight": self.head.full_weight(),
            "head.bias": self.head.full_bias(),
        }

    def loss_and_backward(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Forward and backward through the whole model; returns the mean loss."""
        out_device = self.head.output_device
        e = self.embed(inputs)
        with self.backend.device(out_device):
            h = e + self.mlp(e)  # residual, on the output device
        logits = self.head(h)  # ShardedTensor split on the vocabulary
        loss = self.loss_fn(logits, targets)
        grad_h = self.head.backward(self.loss_fn.backward())
        grad_mlp = self.mlp.backward(grad_h)
        with self.backend.device(out_device):
            grad_e = grad_h + grad_mlp
        self.embed.backward(grad_e)
        return loss


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
    dtype: str = "float64",
    progress: bool = False,
) -> List[float]:
    """Train for ``steps`` Adam steps on fresh batches; return the loss of every step."""
    config = TensorParallelConfig(n_workers=n_workers, backend=backend, devices=devices, dtype=dtype)
    model = TinyLM(vocab, dim, hidden, config, seed=seed)
    optimizer = Adam(model.parameters(), lr=lr)
    bar = _progress_bar(steps) if progress else None
    losses = []
    for step in range(steps):
        inputs, targets = make_batch(vocab, batch, seq_len, seed, step)
        optimizer.zero_grad()
        losses.append(model.loss_and_backward(inputs, targets))
        optimizer.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        elif progress and (step % max(1, steps // 20) == 0 or step == steps - 1):
            print(f"step {step + 1:4d}/{steps}  loss {losses[-1]:.4f}", flush=True)
    if bar is not None:
        bar.close()
    return losses


def _progress_bar(steps: int):
    """A tqdm bar when tqdm is installed (the ``bench`` extra), else None (plain prints)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="training", unit="step")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="tensor-parallel workers (default 2)")
    parser.add_argument("--backend", choices=["numpy", "cupy", "simulated"], default=None, help="default: auto")
    parser.add_argument("--devices", type=int, default=None, help="device count (cupy, simulated)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=32, help="must be divisible by --workers")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32, help="must be divisible by --workers")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
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
    first, last = losses[0], float(np.mean(losses[-10:]))
    print(f"loss: first step {first:.4f}, mean of the last 10 steps {last:.4f} (uniform guess: {np.log(args.vocab):.4f})")
    return 0 if last < 0.5 * first else 1


if __name__ == "__main__":
    raise SystemExit(main())
