"""Count what each layer's forward moves between devices, on the simulated backend.

For 8 workers on 1, 2, 4 and 8 simulated devices, runs one forward of each layer on an input already
on the output device (device 0) and prints the number of cross-device copies and the bytes they move,
in units of the layer's output size. These are the counts ``scaling_model.py --pattern tp_gpu``
assumes; a GPU would move the same arrays with peer copies.

    python benchmarks/transfers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

try:
    import tp_gpu  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tp_gpu import ColumnParallelLinear, ParallelEmbedding, ParallelMLP, RowParallelLinear, TensorParallelConfig

BATCH, N_IN, N_OUT, VOCAB, WORKERS = 64, 256, 512, 4096, 8


def main() -> int:
    rng = np.random.default_rng(0)
    print(f"{WORKERS} workers; batch {BATCH}; column {N_IN}->{N_OUT}, row {N_OUT}->{N_IN}, "
          f"MLP {N_IN}->{N_OUT}->{N_IN}, embedding {BATCH} ids of {VOCAB}x{N_IN}; float32")
    print("| devices | layer | copies | bytes moved / output bytes | model (p = devices) |")
    print("|---:|---|---:|---:|---|")
    for devices in (1, 2, 4, 8):
        cfg = TensorParallelConfig(n_workers=WORKERS, backend="simulated", devices=devices, dtype="float32")
        layers = {
            "column": (ColumnParallelLinear(N_IN, N_OUT, cfg, seed=1), rng.standard_normal((BATCH, N_IN)), N_OUT,
                       "(p-1)·X + (p-1)/p·Y"),
            "row": (RowParallelLinear(N_OUT, N_IN, cfg, seed=2), rng.standard_normal((BATCH, N_OUT)), N_IN,
                    "(p-1)/p·X + (p-1)·Y"),
            "mlp": (ParallelMLP(N_IN, N_OUT, N_IN, cfg, seed=3), rng.standard_normal((BATCH, N_IN)), N_IN,
                    "(p-1)·X + (p-1)·Y"),
            "embedding": (ParallelEmbedding(VOCAB, N_IN, config=cfg, seed=4), rng.integers(0, VOCAB, BATCH), N_IN,
                          "(p-1)·ids + (p-1)·Y"),
        }
        for name, (layer, x, out_features, model) in layers.items():
            layer.eval()
            backends = {id(b): b for b in ((layer.fc1.backend, layer.fc2.backend) if name == "mlp" else (layer.backend,))}
            first = next(iter(backends.values()))
            x_dev = first.asarray(x, np.int64 if name == "embedding" else np.float32, 0)  # on the output device
            layer(x_dev)
            for b in backends.values():
                b.reset_transfers()
            layer(x_dev)
            copies = sum(count for b in backends.values() for count, _ in b.transfers.values())
            moved = sum(nbytes for b in backends.values() for _, nbytes in b.transfers.values())
            print(f"| {devices} | {name} | {copies} | {moved / (BATCH * out_features * 4):.2f} | {model} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
