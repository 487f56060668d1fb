"""Count what each layer's forward moves between devices, on the simulated backend.

For 8 workers on 1, 2, 4 and 8 simulated devices, runs one forward of each layer on an input already
on the output device (device 0) and prints the number of cross-device copies and the bytes they move,
in units of the layer's output size. These are the counts ``scaling_model.py --pattern tp_gpu``
assumes; a GPU would move the same arrays with peer copies.

    python benchmarks/transfers.py          (or python -m benchmarks.transfers)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the package from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cases import SPECS, Shape
from tp_gpu import TensorParallelConfig

BATCH, N_IN, N_OUT, VOCAB, WORKERS = 64, 256, 512, 4096, 8

#: Per layer kind: its shape, and what the model says it moves (X: input, Y: output).
CASES = {
    "column": (Shape(BATCH, N_IN, N_OUT), "(p-1)·X + (p-1)/p·Y"),
    "row": (Shape(BATCH, N_OUT, N_IN), "(p-1)/p·X + (p-1)·Y"),
    "mlp": (Shape(BATCH, N_IN, N_OUT), "(p-1)·X + (p-1)·Y"),
    "embedding": (Shape(BATCH, VOCAB, N_IN), "(p-1)·ids + (p-1)·Y"),
}


def count(name: str, shape: Shape, devices: int) -> tuple:
    """``(copies, bytes moved)`` by the second forward of layer kind ``name`` on ``devices`` devices."""
    spec = SPECS[name]
    config = TensorParallelConfig(n_workers=WORKERS, backend="simulated", devices=devices, dtype="float32")
    layer = spec.build(shape, config)
    layer.eval()
    last = spec.parts(layer)[-1]
    host = spec.make_input(shape, "float32", np.random.default_rng(0))
    x = last.backend.asarray(host, np.int64 if spec.ids_input else np.float32, last.output_device)
    backends = {id(part.backend): part.backend for part in spec.parts(layer)}.values()
    layer(x)
    for b in backends:
        b.reset_transfers()
    layer(x)
    copies = sum(n for b in backends for n, _ in b.transfers.values())
    moved = sum(nbytes for b in backends for _, nbytes in b.transfers.values())
    return copies, moved


def main() -> int:
    print(
        f"{WORKERS} workers; batch {BATCH}; column {N_IN}->{N_OUT}, row {N_OUT}->{N_IN}, "
        f"MLP {N_IN}->{N_OUT}->{N_IN}, embedding {BATCH} ids of {VOCAB}x{N_IN}; float32"
    )
    print("| devices | layer | copies | bytes moved / output bytes | model (p = devices) |")
    print("|---:|---|---:|---:|---|")
    for devices in (1, 2, 4, 8):
        for name, (shape, model) in CASES.items():
            copies, moved = count(name, shape, devices)
            output = SPECS[name].output_bytes(shape, "float32")
            print(f"| {devices} | {name} | {copies} | {moved / output:.2f} | {model} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
